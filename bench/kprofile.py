"""The Linux kernel's built-in profiler, read from a qemu guest over its serial console: which
kernel functions a boot spent its kernel time in, split at the end of the initramfs.

The kernel samples the instruction pointer at every timer tick when it interrupts kernel code
and counts the hits in ``/proc/profile`` (kernel command line ``profile=SHIFT``; Linux's
Documentation/admin-guide/kernel-parameters.txt, ``kernel/profile.c``). The file is one native
``unsigned int`` holding the bucket width in bytes (``1 << SHIFT``), then one counter per bucket
of kernel text from ``_stext`` on; hits outside the kernel's own text (modules) are all counted
in the last bucket. Debian ships no real ``System.map``, so the bucket addresses are named from
the guest's own ``/proc/kallsyms`` (read as root: real addresses, KASLR included).

The split: ``break=bottom`` makes initramfs-tools open a shell at the end of the initramfs; the
bench reads the counters there, leaves the shell, and reads them again at the login prompt. The
difference is userspace's share. initramfs-tools reboots instead of opening that shell when the
command line has ``panic=``, so :func:`boot_words` drops it.

With each read goes the count of pages the kernel has allocated since its start (the sum of
``/proc/vmstat``'s ``pgalloc_*``): with Debian's ``CONFIG_INIT_ON_ALLOC_DEFAULT_ON`` the kernel
zeroes every one (``clear_page_*`` in the profile).

Who asked for those pages in userspace: at the same shell the bench sets a histogram trigger
on the ``kmem:mm_page_alloc`` tracepoint keyed by the kernel stack (the kernel's
Documentation/trace/histogram.rst), read at the login prompt: :func:`alloc_sites` names each
stack by its first caller outside the page allocator (``readahead_expand``,
``squashfs_bio_read``, ``wp_page_copy``...). It counts allocations, not pages (a huge page is
one).

Reading costs console time (a few seconds), so boot times taken with a profile are not
comparable with those taken without one.
"""

from __future__ import annotations

import base64
import bisect
import gzip
import re
import struct
from collections import Counter
from typing import Any

from sidusctl.subsys.qemu import Guest

#: ``profile=`` value: 16-byte buckets, about one function each
SHIFT = 4
#: the pages allocated so far, then the counters gzip'd and base64'd
_DUMP = ("awk '/^pgalloc_/ {n += $2} END {print \"SDT-PGALLOC\", n}' /proc/vmstat; "
         "gzip -9 < /proc/profile | base64")
_PGALLOC = re.compile(r"^SDT-PGALLOC (\d+)\s*$", re.M)
#: at the initramfs's shell (no :meth:`Guest.sh` there): the dump ends at a marker the shell
#: computes, which the echoed command line does not contain
_END_CMD, _END = "; echo SDT-END-$((40+2))", rb"SDT-END-42[\r\n]"
#: kernel text symbols and _stext, "ADDRESS NAME" per line, gzip'd and base64'd
_SYMS = ("awk '($2 ~ /^[tT]$/ && NF == 3) || $3 == \"_stext\" {print $1, $3}' /proc/kallsyms "
         "| gzip -9 | base64")
_B64 = re.compile(r"[A-Za-z0-9+/=]+")
#: the tracepoint whose histogram (by kernel stack) counts the page allocations
_HIST = "/sys/kernel/tracing/events/kmem/mm_page_alloc"
_HIST_SET = ("mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null; echo 'hist:keys=stacktrace:"
             f"vals=hitcount:sort=hitcount.descending:size=16384' > {_HIST}/trigger; ")
_HIST_READ = f"gzip -9 < {_HIST}/hist | base64"
#: frames of the page allocator itself, skipped to name who asked
_ALLOCATOR = frozenset({"__alloc_pages", "alloc_pages", "__folio_alloc", "folio_alloc",
                        "vma_alloc_folio", "alloc_pages_vma", "__page_cache_alloc",
                        "filemap_alloc_folio", "__get_free_pages", "get_zeroed_page"})
_STACK = re.compile(r"\{ stacktrace:\n(.*?)\} hitcount:\s*(\d+)", re.S)


def boot_words(append: str) -> str:
    """``append`` (a kernel command line) with ``profile=`` and ``break=bottom`` added and any
    ``panic=`` removed (see the module's docstring)."""
    words = [w for w in append.split() if not w.startswith(("panic=", "profile=", "break="))]
    return " ".join([*words, f"profile={SHIFT}", "break=bottom"])


def _decode(text: str) -> bytes:
    """The bytes of a gzip'd base64 dump that arrived among console lines."""
    body = "".join(s for line in text.splitlines() if _B64.fullmatch(s := line.strip()))
    return gzip.decompress(base64.b64decode(body))


def pages_allocated(text: str) -> int:
    """The ``SDT-PGALLOC N`` count in a dump's console text (pages). Raises ``ValueError``
    without one."""
    m = _PGALLOC.search(text.replace("\r", ""))
    if m is None:
        raise ValueError("no SDT-PGALLOC line in the dump")
    return int(m.group(1))


def at_initramfs_break(g: Guest, timeout: float = 900) -> tuple[bytes, int]:
    """At the ``(initramfs)`` shell of ``break=bottom``: the raw ``/proc/profile`` and the
    pages allocated so far (:func:`pages_allocated`); then leaves the shell so the boot goes on.

    Raises :class:`sidusctl.subsys.qemu.GuestError` (with the console's tail) when the shell
    or the dump's end does not come, ``ValueError`` when the dump has no page count."""
    g.expect(rb"\(initramfs\) ", timeout)
    g.sendline(_HIST_SET + _DUMP + _END_CMD)
    g.expect(_END, 300)
    text = g.child.before.decode("ascii", "replace")
    data = _decode(text)
    g.sendline("exit")
    return data, pages_allocated(text)


def at_login(g: Guest) -> tuple[bytes, int, str, int, str]:
    """In the logged-in guest: the raw ``/proc/profile``, the pages allocated so far, the
    kernel text symbols ("ADDRESS NAME" lines), the kernel's tick rate (``CONFIG_HZ``, ticks
    per second; 250 if the image has no ``/boot/config-*``) and the allocation histogram
    since the initramfs's end (for :func:`alloc_sites`). Raises
    :class:`sidusctl.subsys.qemu.GuestError` when a command fails."""
    text = g.sh(_DUMP, timeout=300)
    prof, pages = _decode(text), pages_allocated(text)
    hist = _decode(g.sh(_HIST_READ, timeout=300)).decode()
    syms = _decode(g.sh(_SYMS, timeout=300)).decode()
    hz = g.sh("sed -n 's/^CONFIG_HZ=//p' /boot/config-$(uname -r)", check=False).strip()
    return prof, pages, syms, int(hz) if hz.isdigit() else 250, hist


def alloc_sites(hist: str, top: int = 10) -> list[list[Any]]:
    """The ``top`` callers of the page allocator in a ``hist:keys=stacktrace`` histogram's
    text (the ``hist`` file's layout: Linux's Documentation/trace/histogram.rst):
    ``[[name, allocations, percent], ...]``, each stack named by its first frame outside
    :data:`_ALLOCATOR` (offsets dropped); allocations the histogram could not hold (its
    ``Dropped:`` count, when its table was full) are one row, ``(dropped)``. Raises
    ``ValueError`` for text with no stack."""
    per: Counter[str] = Counter()
    for m in _STACK.finditer(hist):
        frames = [f.strip().split("+")[0] for f in m.group(1).strip().splitlines()]
        per[next((f for f in frames if f not in _ALLOCATOR), "(allocator)")] += int(m.group(2))
    if per and (d := re.search(r"^\s*Dropped:\s*(\d+)", hist, re.M)) and int(d.group(1)):
        per["(dropped)"] = int(d.group(1))
    if not per:
        raise ValueError("mm_page_alloc histogram: no stacktrace entries")
    total = sum(per.values())
    return [[name, n, round(100 * n / total, 1)] for name, n in per.most_common(top)]


def counters(raw: bytes) -> tuple[int, tuple[int, ...]]:
    """(bucket width in bytes, per-bucket hit counts) of a raw ``/proc/profile``.

    Raises ``ValueError`` for a file that is not whole native ``unsigned int`` words."""
    if len(raw) < 8 or len(raw) % 4:
        raise ValueError(f"/proc/profile: {len(raw)} bytes, expected whole 4-byte words")
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    return words[0], words[1:]


def by_function(raw: bytes, symbols: str, base: bytes | None = None,
                hz: int = 250, top: int = 15) -> dict[str, Any]:
    """The ``top`` kernel functions by ticks in ``raw`` (less ``base``, an earlier read of the
    same boot, if given): ``{"ticks": N, "seconds": N / hz, "functions": [[name, ticks,
    percent], ...]}``; hits in modules are named ``(modules)``.

    ``symbols`` is :func:`at_login`'s listing, from the same boot as ``raw`` (KASLR moves the
    addresses each boot). Raises ``ValueError`` when it has no ``_stext`` or ``base`` has
    another shape."""
    step, hits = counters(raw)
    if base is not None:
        bstep, bhits = counters(base)
        if (bstep, len(bhits)) != (step, len(hits)):
            raise ValueError("/proc/profile: the two reads have different shapes")
        hits = tuple(a - b for a, b in zip(hits, bhits, strict=True))
    table = sorted((int(a, 16), n) for a, n in (line.split()[:2] for line in
                                                 symbols.splitlines() if line.strip()))
    names = {n: a for a, n in table}
    if "_stext" not in names:
        raise ValueError("kallsyms: no _stext")
    stext, addrs = names["_stext"], [a for a, _ in table]
    per: Counter[str] = Counter()
    for i, n in enumerate(hits):
        if not n:
            continue
        if i == len(hits) - 1:
            per["(modules)"] += n
            continue
        j = bisect.bisect_right(addrs, stext + i * step) - 1
        per[table[j][1] if j >= 0 else "(before _stext)"] += n
    total = sum(per.values())
    return {"ticks": total, "seconds": round(total / hz, 1),
            "functions": [[name, n, round(100 * n / total, 1)]
                          for name, n in per.most_common(top)] if total else []}
