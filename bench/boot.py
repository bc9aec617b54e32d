#!/usr/bin/env python3
"""Benchmark: seconds from qemu start to the serial login prompt for one image booted four ways
in the same run, one guest after the other (never two qemu at once; with ``--runs 2`` the
second round in the reverse order), 2 GiB of RAM and ``--smp`` vCPUs each (default 1: with
more, qemu's TCG gives the vCPUs unsynchronized TSCs, and the guest kernel falls back to the
emulated HPET as its clock, as no real node does: docs/performance.md):

- ``nfs``: the directory root over NFS (serve-pxe's nfs-ganesha), sidus tmpfs overlay;
- ``squashfs-nfs``: the generation's squashfs file loop-mounted from serve-pxe's NFS export;
- ``squashfs-http``: the squashfs downloaded from serve-pxe's HTTP server into RAM, its
  SHA-256 checked, loop-mounted;
- ``disk`` (the reference): the same root copied onto a local virtio disk (ext4 made with
  ``mkfs.ext4 -d``), ``root=/dev/vda``; each boot from a fresh copy of that disk, as each
  network boot starts from the image (a boot writes into its disk what the next would find).

The network roots are served by one real ``sidusctl serve-pxe --nfs ganesha --http``
(:class:`sidusctl.netboot.lab.PxeLab`: its own namespace and bridge, a private state whose
image links to the built one; serve-pxe exports the squashfs itself). Every guest loads the
same kernel and initrd directly (``qemu -kernel``), so the firmware's PXE/TFTP phase, which a
local-disk boot does not have, is left out of all four; the network guests get the kernel
command line serve-pxe wrote into their ``pxelinux.cfg/01-<mac>`` and sit on a tap of the
lab's bridge (DHCP, NFS and HTTP from serve-pxe).

For ``squashfs-http`` the console is timed too (when the download starts, when the digest
matched or the image was mapped through dm-verity, when the squashfs is mounted), and after the login prompt the bench logs in to split
the download from the digest (the file downloaded again to /dev/null, to a tmpfs, and piped
into ``sha256sum``; ``sha256sum`` of the file again, coreutils' and busybox's) and to read the
RAM the image holds and /run/sidus/sidus.log (its lines carry the guest's uptime). In the first
round every guest is logged into for ``systemd-analyze`` (kernel/userspace split, ``blame``,
the critical chain to the serial login prompt) and the CPU each unit used: where the time
goes when the aim (at most 1.1x the local disk) is missed.

qemu runs under TCG (no KVM here), so absolute figures are slow; the ratios are what to compare.
At each login prompt the bench asks qemu's monitor (``info jit``) how many translation blocks
(TBs: guest code translated to host code) the boot made and how many it threw away because the
guest wrote over the code they came from, and the CPU time qemu's process used (one vCPU under
TCG keeps it busy: that time is the wall time, and what moves it between rounds is the
machine's speed, not waiting). TCG translates code per virtual address: with
address space layout randomization every program's libraries land somewhere new and are
translated again, and a page that many programs ran costs qemu 7.2 up to quadratic time in
its TBs when it is written over. A real CPU has neither cost. ``--norandmaps`` boots every guest with
the kernel's ``norandmaps`` (no randomization) to take that emulator cost out of the
comparison (docs/performance.md has both).

``--prealloc`` has qemu fault in each guest's RAM before the guest runs (``-mem-prealloc``,
the vCPUs held until the monitor's ``cont``) and starts the clock at ``cont``. This machine is
itself a virtual machine: the first write to a page of guest RAM costs qemu a page fault that
its own hypervisor serves (faulting in 2 GiB took 20 s once, after the machine had been idle,
and 0.3-0.6 s right after another guest). A node that keeps its root in RAM
(``squashfs-http``: 187 MiB written in the initramfs) pays it more than a disk boot does: its
download took 3.3-4.7 s without and 1.1-1.8 s with the RAM faulted in first (2026-12-02). A
real node's RAM has no such cost.

    .venv/bin/python bench/boot.py --image minimal [--state-dir DIR] [--runs 1]
        [--modes nfs,squashfs-nfs,squashfs-http,disk] [--smp 1] [--norandmaps] [--prealloc]
        [--no-details] [--kernel-profile] [--count-execs] [--json]

``--kernel-profile`` boots every guest with the kernel's own profiler and prints, for the
initramfs and for userspace apart, the kernel functions that took the most timer ticks and the
pages allocated, with userspace's page allocations by caller (bench/kprofile.py). The reads
cost console time: its boot times are not the figures to quote.

``--count-execs`` boots every guest with the kernel's ``sched_process_exec`` tracepoint on
from its start (``trace_event=``) and, after each login prompt, logs in and reads the trace:
how many programs the initramfs started (up to the root's ``/sbin/init``), by path, and how
many userspace started until the login. Under TCG with randomized address spaces each program
started in the initramfs costs the rest of the boot too (docs/performance.md, "Fewer programs
in the initramfs"). The login costs no boot time: the clock stopped at the prompt.

``--record-reads FILE`` instead records the files a real NFS-root boot reads, for
bench/bootstorm.py's ``nfs`` variant: the root is copied (``cp -a``) into a scratch
directory, every atime there set to 0, the copy served by nfs-ganesha (the host filesystem is
mounted ``relatime``: a read after atime 0 always moves it) to one guest booting to its login
prompt (NFS root, tmpfs overlay); then every entry whose atime moved is listed: ``f SIZE PATH``
(a file read), ``d - PATH`` (a directory listed), ``l - PATH`` (a symlink read).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# the repository first on the path, bench/ itself not (a bench script named like a standard
# library module would stand in for it)
sys.path[:] = [str(REPO), *(d for d in sys.path if Path(d or ".").resolve() != REPO / "bench")]

from bench import kprofile  # noqa: E402
from sidusctl.netboot.lab import KERNEL_ARGS_RANDOMIZED, LabNode, PxeLab  # noqa: E402
from sidusctl.subsys.ganesha import Export, serve  # noqa: E402
from sidusctl.subsys.qemu import LOGIN_RE, monitor_command  # noqa: E402
from tests.qemu_util import QUIET, Guest, guest, netns, nfs_append  # noqa: E402

MODES = ("nfs", "squashfs-nfs", "squashfs-http", "disk")
NODES = {m: LabNode(f"bb{i}", f"52:54:00:77:0b:0{i}", IPv4Address(f"10.77.0.{160 + i}"), m)
         for i, m in enumerate(MODES[:3], start=1)}
MEMORY = 2048
BOOT_TIMEOUT = 900.0
#: console lines timed on the way to the login prompt (the sidus boot script's messages)
MARKS = {"download-start": rb"sidus: root: squashfs over HTTP",
         "digest-ok": rb"sidus: sha256 [0-9a-f]+: matches",
         "verity-mapped": rb"sidus: root: verity device",
         "squashfs-mounted": rb"sidus: root: \S+ mounted \(squashfs"}


def _image(args: argparse.Namespace) -> tuple[Path, Path, Path, Path]:
    """(state dir, rootfs, kernel, initrd) of the built image."""
    from sidusctl.core.paths import state_dir
    from sidusctl.subsys.imagestore import ImageStore
    state = state_dir(args.state_dir)
    img = ImageStore(state).get(args.image)
    return state, img.rootfs, img.kernel, img.initrd


def _disk_from_root(root: Path, dest: Path) -> None:
    used = int(subprocess.run(["du", "-sb", str(root)], capture_output=True, text=True,
                              check=True).stdout.split()[0])
    size_mb = int(used * 1.4 / 2**20) + 256
    with open(dest, "wb") as f:
        f.truncate(size_mb * 2**20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "sdt-bench-root", "-d", str(root), str(dest)],
                   check=True)


def node_cmdline(lab: PxeLab, node: LabNode) -> str:
    """The kernel command line serve-pxe gave ``node`` (its ``pxelinux.cfg/01-<mac>``), less
    ``initrd=`` (qemu loads the initrd itself)."""
    name = "01-" + node.mac.replace(":", "-")
    cfgs = list(lab.workdir.rglob(f"pxelinux.cfg/{name}"))
    if not cfgs:
        raise SystemExit(f"bench/boot.py: serve-pxe wrote no pxelinux.cfg/{name}")
    for line in cfgs[0].read_text().splitlines():
        words = line.split()
        if words and words[0].upper() == "APPEND":
            return " ".join(w for w in words[1:] if not w.startswith("initrd="))
    raise SystemExit(f"bench/boot.py: no APPEND line in {cfgs[0]}")


def cpu_ms(pid: int) -> int:
    """CPU time (user + system, ms) process ``pid`` used so far (proc(5), /proc/PID/stat
    fields 14 and 15, in clock ticks). Less moved than wall time by a machine whose speed
    changes with its neighbours' load (time stolen by the hypervisor is not counted)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return round((int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK"))


def tcg_stats(g: Guest, monitor: Path) -> dict[str, int]:
    """qemu's TCG counters for ``g`` so far (``info jit``): ``translation_blocks`` (TBs made),
    ``tbs_invalidated`` (thrown away: the guest wrote over their code); and ``qemu_cpu_ms``,
    the CPU time its process used (:func:`cpu_ms`)."""
    text = monitor_command(monitor, "info jit")
    out = {"qemu_cpu_ms": cpu_ms(g.pid)}
    for key, label in (("translation_blocks", "TB count"),
                       ("tbs_invalidated", "TB invalidate count")):
        m = re.search(rf"^{label}\s+(\d+)", text, re.M)
        if m is None:
            raise SystemExit(f"bench/boot.py: no {label!r} in qemu's 'info jit':\n{text}")
        out[key] = int(m.group(1))
    return out


def timed_boot(g: Guest) -> dict[str, float]:
    """Seconds from qemu's start to each console mark seen and to the login prompt."""
    pats = [re.compile(p) for p in MARKS.values()] + [LOGIN_RE]
    names = [*MARKS, "login"]
    out: dict[str, float] = {}
    while "login" not in out:
        i = g.expect(pats, BOOT_TIMEOUT)
        out.setdefault(names[i], round(time.monotonic() - g.started, 1))
    g.at_login_prompt = True
    g.login_prompt_s = out["login"]
    return out


def http_details(g: Guest) -> dict[str, Any]:
    """In the logged-in squashfs-http guest: the image file's size, a second ``sha256sum``
    of it (seconds: the digest's share of the boot), RAM it holds (MiB, tmpfs ``used``), the
    download again alone and piped into ``sha256sum`` (seconds), and :func:`systemd_details`."""
    if not g.logged_in:
        g.login(timeout=300)
    path = g.sh("ls /run/sidus/img/*.squashfs 2>/dev/null | head -n1", check=False).strip()
    out: dict[str, Any] = {"image_file": path}
    if path:
        out["image_mib"] = round(int(g.sh(f"stat -c %s {path}")) / 2**20, 1)
        out["sha256sum_again_s"] = _guest_seconds(g, f"sha256sum {path} >/dev/null")
        # the initramfs's digest is busybox's
        out["busybox_sha256sum_again_s"] = _guest_seconds(
            g, f"busybox sha256sum {path} >/dev/null")
        out["tmpfs_used_mib"] = round(int(g.sh(
            f"df -k --output=used $(dirname {path}) | tail -n1")) / 1024, 1)
    src = g.sh("sed -n 's/.*sidus.src=\\([^ ]*\\).*/\\1/p' /proc/cmdline", check=False).strip()
    if src:
        # the download alone (to /dev/null), then download and digest in one pipe: how much
        # of the digest a pipe could hide behind the download on this guest's one vCPU
        # (busybox's wget and sha256sum, as in the initramfs)
        out["download_only_s"] = _guest_seconds(g, f"busybox wget -q -O /dev/null {src}")
        out["download_to_tmpfs_s"] = _guest_seconds(
            g, f"busybox wget -q -O /dev/shm/sdt-again {src}")
        out["download_to_tmpfs_bytes"] = int(g.sh("stat -c %s /dev/shm/sdt-again; "
                                                  "rm -f /dev/shm/sdt-again"))
        out["download_piped_to_sha256_s"] = _guest_seconds(
            g, f"busybox wget -q -O - {src} | busybox sha256sum >/dev/null")
    # how the node checked its image: verity (blocks as read) or digest (whole file first),
    # and dm-verity's own verdict so far (V: no block failed; C: a corrupt block was read)
    out["check"] = g.sh("sed -n 's/^SIDUS_CHECK=//p' /run/sidus/state", check=False).strip()
    out["verity_status"] = g.sh("dmsetup status sidus-root 2>/dev/null", check=False).strip()
    # what the boot read through the verity device (the blocks it hashed: each once), MiB
    # (block/stat: field 3, sectors read; dm-verity checks each 4 KiB block at most once)
    sectors = g.sh("read -r _ _ s _ </sys/block/dm-0/stat 2>/dev/null && echo $s",
                   check=False).strip()
    if sectors.isdigit():
        out["verity_read_mib"] = round(int(sectors) * 512 / 2**20, 1)
    out["mem_available_mib"] = round(int(g.sh(
        "awk '/MemAvailable/ {print $2}' /proc/meminfo")) / 1024, 1)
    out["sidus_log"] = g.sh("cat /run/sidus/sidus.log", check=False)[-1500:]
    out.update(systemd_details(g, login=False))
    return out


def _guest_seconds(g: Guest, command: str) -> float:
    """Seconds (the guest's /proc/uptime) that ``command`` takes in the logged-in guest."""
    t = g.sh(f"s=$(cut -d' ' -f1 /proc/uptime); {command}; "
             "e=$(cut -d' ' -f1 /proc/uptime); echo \"$s $e\"", timeout=600).split()
    return round(float(t[-1]) - float(t[-2]), 1)


#: the twelve units that used the most CPU since boot, "MS ms UNIT" per line (systemctl show's
#: blocks are blank-line separated; CPUUsageNSec is "[not set]" without accounting)
UNIT_CPU = ("systemctl show -p Id -p CPUUsageNSec '*.service' '*.scope' '*.mount' 2>/dev/null "
            "| awk 'BEGIN { RS = \"\" } { id = \"\"; c = \"\"; n = split($0, l, \"\\n\"); "
            "for (i = 1; i <= n; i++) { if (l[i] ~ /^Id=/) id = substr(l[i], 4); "
            "if (l[i] ~ /^CPUUsageNSec=[0-9]/) c = substr(l[i], 14) } "
            "if (id != \"\" && c != \"\") printf \"%d ms %s\\n\", c / 1000000, id }' "
            "| sort -rn | head -n 12")


def systemd_details(g: Guest, login: bool = True) -> dict[str, Any]:
    """In the guest (logged in first if ``login``): ``systemd-analyze``'s split of the boot
    (kernel, initrd, userspace: its own clock, not the bench's), the ten slowest units of
    ``systemd-analyze blame`` (wall time each, overlapping on one vCPU), the twelve units that
    used the most CPU (:data:`UNIT_CPU`, milliseconds) and the critical chain to the serial
    login prompt: where a network root's userspace loses time against the disk."""
    if login and not g.logged_in:
        g.login(timeout=300)
    return {"systemd_analyze": g.sh("systemd-analyze 2>&1 | head -n1", check=False).strip(),
            "systemd_blame": g.sh("systemd-analyze blame 2>&1 | head -n10",
                                  check=False).strip(),
            # CPU each unit used (ms, cgroup accounting): blame's wall times overlap on one
            # vCPU; this says which units took the CPU from the ones on the critical chain
            "systemd_cpu_ms": g.sh(UNIT_CPU, check=False).strip(),
            # the units the login prompt waited for, each with when it was up (+ how long
            # it took): what lies on the path to the prompt
            "systemd_critical_chain": g.sh(
                "systemd-analyze critical-chain --no-pager serial-getty@ttyS0.service 2>&1 "
                "| tail -n +3 | head -n 25", check=False).strip()}


def _kernel_profile(g: Guest, early: tuple[bytes, int]) -> dict[str, Any]:
    """Logs in and reads the kernel profile (bench/kprofile.py): the kernel's top functions
    and the pages it allocated in the initramfs (up to its end: ``early``, the profile and
    page count read there) and in userspace (from there to now), with userspace's
    allocations by caller (:func:`kprofile.alloc_sites`)."""
    g.login(timeout=300)
    raw, pages, syms, hz, hist = kprofile.at_login(g)
    return {"initramfs": {**kprofile.by_function(early[0], syms, hz=hz),
                          "pages_allocated": early[1]},
            "userspace": {**kprofile.by_function(raw, syms, base=early[0], hz=hz),
                          "pages_allocated": pages - early[1],
                          "allocations_by_caller": kprofile.alloc_sites(hist)}}


#: kernel command line words for ``--count-execs``: every exec traced from the kernel's start
#: (1 MiB of trace buffer holds some 10 000 events; a boot of ``minimal`` makes about 500)
EXEC_TRACE_WORDS = ("trace_event=sched:sched_process_exec", "trace_buf_size=1M")
EXEC_RE = re.compile(r"sched_process_exec: filename=(\S+) pid=(\d+)")


def count_execs(g: Guest) -> dict[str, Any]:
    """Logs in (if not yet) and reads the boot's ``sched_process_exec`` trace (tracefs, which
    systemd mounts on /sys/kernel/tracing): ``initramfs`` (programs started before pid 1 ran
    the root's init), ``initramfs_by_path`` (path: count, most first) and ``userspace`` (from
    there to the login). Raises RuntimeError when the trace holds no exec of pid 1 (the
    command line lacked :data:`EXEC_TRACE_WORDS`, or the buffer overflowed)."""
    if not g.logged_in:
        g.login(timeout=300)
    text = g.sh("grep -o 'sched_process_exec: filename=[^ ]* pid=[0-9]*' "
                "/sys/kernel/tracing/trace", check=False, timeout=120)
    execs = [(m.group(1), int(m.group(2))) for m in EXEC_RE.finditer(text)]
    # /init is the initramfs's pid 1; its next exec (run-init's) is the root's init
    cut = next((i for i, (path, pid) in enumerate(execs) if pid == 1 and path != "/init"),
               None)
    if cut is None:
        raise RuntimeError(f"no exec of pid 1 in the guest's exec trace ({len(execs)} execs)")
    by_path = Counter(path for path, _ in execs[:cut])
    return {"initramfs": cut, "userspace": len(execs) - cut,
            "initramfs_by_path": dict(by_path.most_common())}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    state, root, kernel, initrd = _image(args)
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    times: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    details: dict[str, Any] = {}
    profiles: dict[str, list[dict[str, Any]]] = {}
    tcg: dict[str, list[dict[str, int]]] = {m: [] for m in modes}
    execs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    tag = os.getpid() % 10000
    with tempfile.TemporaryDirectory(prefix="sdt-bench-boot-", dir="/var/tmp") as tmp:
        disk = Path(tmp) / "root.img"
        _disk_from_root(root, disk)
        serve_cmd = [sys.executable, "-m", "sidusctl", "serve-pxe"]
        # randomization as on hardware unless --norandmaps (the lab's default turns it off)
        with PxeLab(f"sdt-bb{tag}", state, args.image, list(NODES.values()), Path(tmp) / "lab",
                    serve_command=serve_cmd, kernel_args=KERNEL_ARGS_RANDOMIZED) as lab:
            t0 = time.monotonic()
            lab.start_serve("--nfs", "ganesha", "--http", ready_timeout=900)
            details["serve_pxe_ready_s"] = round(time.monotonic() - t0, 1)
            cmdlines = {m: node_cmdline(lab, n) for m, n in NODES.items()}
            details["cmdlines"] = cmdlines
            for i in range(args.runs):
                # odd runs in the reverse order: a machine whose load changes during the run
                # does not always favour the same boot
                for m in (modes if i % 2 == 0 else modes[::-1]):
                    name = f"sdt-bb{tag}-{m}-{i}"
                    log = Path(tmp) / f"{m}-{i}.console.log"
                    if m == "disk":
                        # every disk boot from a copy of the disk as mkfs made it: a boot
                        # writes into its disk what the next would find (the AppArmor cache,
                        # before the build made one; a random seed, timer stamps), where
                        # a network root starts from the image at every boot
                        run_disk = Path(tmp) / "root-run.img"
                        subprocess.run(["cp", "--sparse=always", str(disk), str(run_disk)],
                                       check=True)
                        kw: dict[str, Any] = {"append": " ".join(
                            ["console=ttyS0", "root=/dev/vda", "rw", "panic=-1", *QUIET]),
                            "disks": (run_disk,)}
                    else:
                        kw = {"append": cmdlines[m], "tap": lab.add_tap(),
                              "mac": NODES[m].mac}
                    if args.kernel_profile:
                        kw["append"] = kprofile.boot_words(kw["append"])
                    if args.norandmaps:
                        kw["append"] += " norandmaps"
                    if args.count_execs:
                        kw["append"] += " " + " ".join(EXEC_TRACE_WORDS)
                    kw["smp"] = args.smp
                    kw["prealloc"] = args.prealloc
                    monitor = Path(tmp) / f"{m}-{i}.monitor"
                    # the disk images and the exported squashfs written back before the
                    # clock starts: no boot shares the machine with the kernel's writeback
                    os.sync()
                    with guest(name, kernel=kernel, initrd=initrd, netns=lab.netns,
                               memory=MEMORY, log=log, timeout=BOOT_TIMEOUT, monitor=monitor,
                               **kw) as g:
                        try:
                            if args.prealloc:
                                setup = details.setdefault("prealloc_setup_s", {})
                                setup.setdefault(m, []).append(round(g.cont(), 2))
                            early = kprofile.at_initramfs_break(g) if args.kernel_profile \
                                else None
                            times[m].append(timed_boot(g))
                            tcg[m].append(tcg_stats(g, monitor))
                            if early is not None:
                                profiles.setdefault(m, []).append(_kernel_profile(g, early))
                            if i == 0 and not args.no_details:
                                if m == "squashfs-http":
                                    details["squashfs_http"] = http_details(g)
                                else:
                                    details[m.replace("-", "_")] = systemd_details(g)
                            if args.count_execs:
                                execs[m].append(count_execs(g))
                        except BaseException:
                            print(f"--- console of {name} ---\n{g.tail(4000)}\n--- serve-pxe "
                                  f"---\n{lab.serve_text()[-4000:]}", file=sys.stderr)
                            raise
                    print(f"  {m:14} run {i + 1}: {times[m][-1]} {tcg[m][-1]}", file=sys.stderr)
    med = {m: statistics.median(t["login"] for t in times[m]) for m in modes}
    disk_s = med["disk"]
    return {"runs": args.runs, "accel": "tcg", "memory_mib": MEMORY, "vcpus": args.smp,
            "norandmaps": args.norandmaps, "prealloc": args.prealloc,
            "login_s": {m: round(v, 1) for m, v in med.items()},
            "ratio_over_disk": {m: round(med[m] / disk_s, 2) for m in modes if m != "disk"},
            "marks": {m: times[m] for m in modes}, "tcg_at_login": tcg, "details": details,
            **({"kernel_profile": profiles} if args.kernel_profile else {}),
            **({"execs": execs} if args.count_execs else {}),
            "load_average": os.getloadavg(),
            "reference": "same image on a local virtio disk (direct kernel boot)"}


# -- recording the reads of a real NFS-root boot --------------------------------------------------

def record_reads(args: argparse.Namespace) -> int:
    _state, root, kernel, initrd = _image(args)
    with tempfile.TemporaryDirectory(prefix="sdt-bench-reads-", dir="/var/tmp") as tmp:
        copy = Path(tmp) / "rootfs"
        subprocess.run(["cp", "-a", str(root), str(copy)], check=True)
        # every directory read first, then every atime set (a directory read after its atime
        # was set would look listed by the boot); atime 0 makes relatime move it on a read
        entries = [Path(d, n) for d, ds, fs in os.walk(copy) for n in [*ds, *fs]]
        for p in [copy, *entries]:
            st = p.lstat()
            os.utime(p, ns=(0, st.st_mtime_ns), follow_symlinks=False)
        moved = [p for p in [copy, *entries] if p.lstat().st_atime_ns != 0]
        if moved:
            raise SystemExit(f"bench/boot.py: atime 0 did not stick on {len(moved)} entries, "
                             f"e.g. {moved[:3]}")
        with netns("bbrec") as ns, serve([Export(copy)], netns=ns, bind_addr=None,
                                         workdir=Path(tmp) / "ganesha"), \
                guest("sdt-bench-reads", kernel=kernel, initrd=initrd, netns=ns,
                      memory=MEMORY, append=nfs_append(copy, "sidus.overlay=tmpfs"),
                      log=Path(tmp) / "reads.console.log", timeout=BOOT_TIMEOUT) as g:
            login_s = g.wait_login_prompt()
        lines: list[tuple[int, str]] = []
        total = 0
        # lstat only, from the list made before the boot: listing a directory or following a
        # symlink would move its atime now
        for p in [copy, *entries]:
            st = p.lstat()
            if st.st_atime_ns == 0:
                continue
            rel = "/" + str(p.relative_to(copy)) if p != copy else "/"
            if stat.S_ISLNK(st.st_mode):
                lines.append((st.st_atime_ns, f"l - {rel}"))
            elif stat.S_ISDIR(st.st_mode):
                lines.append((st.st_atime_ns, f"d - {rel}"))
            elif stat.S_ISREG(st.st_mode):
                lines.append((st.st_atime_ns, f"f {st.st_size} {rel}"))
                total += st.st_size
        head = [
            "# The files, directories and symlinks a real NFS-root boot of the minimal image",
            "# reads, from qemu start to the login prompt (bench/boot.py --record-reads).",
            f"# Made {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: the root copied"
            " (cp -a), every atime set to 0,",
            "# served by nfs-ganesha (VFS FSAL over ext4 mounted relatime) to a qemu guest (TCG,"
            " NFSv3 over TCP,",
            f"# rsize 8192, sidus tmpfs overlay) that reached its login prompt in {login_s:.0f} s;"
            " then every",
            "# entry whose atime moved, in the order of those atimes (first access first):",
            "# 'f SIZE PATH' read, 'd - PATH' listed, 'l - PATH' readlink.",
            f"# {sum(ln[0] == 'f' for _, ln in lines)} files ({total / 2**20:.1f} MiB), "
            f"{sum(ln[0] == 'd' for _, ln in lines)} directories, "
            f"{sum(ln[0] == 'l' for _, ln in lines)} symlinks. Lookups and stat()s of"
            " entries",
            "# never read are not seen by atime (the replay makes them anyway on each path).",
        ]
        out = Path(args.record_reads)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join([*head, *(ln for _, ln in sorted(lines))]) + "\n")
        print(f"{out}: {len(lines)} entries, {total / 2**20:.1f} MiB of files; login prompt "
              f"after {login_s:.1f} s")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", default="minimal")
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated boots to run, of {','.join(MODES)} (disk is required:"
                         " the ratios are over it)")
    ap.add_argument("--smp", type=int, default=1,
                    help="vCPUs of every guest (default 1; with more, the guests' kernels "
                         "find their TSCs unsynchronized under TCG and use the HPET)")
    ap.add_argument("--norandmaps", action="store_true",
                    help="boot every guest without address space randomization (the kernel's "
                         "norandmaps): TCG translates each program's libraries again at each "
                         "new address, a cost no real CPU has")
    ap.add_argument("--prealloc", action="store_true",
                    help="fault in each guest's RAM before it runs and start the clock then "
                         "(qemu -mem-prealloc -S, then cont): the host's first touch of guest "
                         "memory, a cost no real node has, left out of every boot")
    ap.add_argument("--no-details", action="store_true",
                    help="skip the login into the squashfs-http guest after its boot")
    ap.add_argument("--record-reads", metavar="FILE", default=None,
                    help="record what an NFS-root boot reads into FILE (see above) instead")
    ap.add_argument("--kernel-profile", action="store_true",
                    help="profile each guest's kernel (bench/kprofile.py), initramfs and "
                         "userspace apart; the boot times then include the reads")
    ap.add_argument("--count-execs", action="store_true",
                    help="trace every exec from the kernel's start and count, after each "
                         "login prompt, the programs the initramfs and userspace started")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/boot.py: needs root (namespaces, qemu, NFS)")
    if shutil.which("mksquashfs") is None:
        sys.exit("bench/boot.py: mksquashfs not found (apt-get install squashfs-tools)")
    if args.record_reads:
        return record_reads(args)
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown or "disk" not in args.modes.split(","):
        sys.exit(f"bench/boot.py: --modes {args.modes}: expected some of {','.join(MODES)}, "
                 "disk among them")
    result = bench(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"boot to login prompt (qemu TCG, {args.smp} vCPUs, {MEMORY} MiB, "
          f"{'norandmaps' if args.norandmaps else 'randomized address spaces'}, "
          f"{'RAM faulted in first, ' if args.prealloc else ''}"
          f"median of {args.runs}):")
    for m in result["login_s"]:
        ratio = "" if m == "disk" else f"  {result['ratio_over_disk'][m]:5.2f}x the disk"
        last = result["tcg_at_login"][m][-1]
        print(f"  {m:14} {result['login_s'][m]:6.1f} s{ratio}   (last boot: "
              f"{last['translation_blocks']} TBs made, {last['tbs_invalidated']} thrown away)")
    for sq in result["marks"].get("squashfs-http", []):
        print(f"  squashfs-http console: {sq}")
    d = result["details"].get("squashfs_http")
    if d:
        print(f"  squashfs-http image {d.get('image_mib')} MiB in RAM (tmpfs "
              f"{d.get('tmpfs_used_mib')} MiB), checked by {d.get('check')} "
              f"({d.get('verity_status') or 'no verity device'}, "
              f"{d.get('verity_read_mib')} MiB read through it), "
              f"sha256sum again {d.get('sha256sum_again_s')} s, "
              f"MemAvailable {d['mem_available_mib']} MiB")
    for m, runs in result.get("kernel_profile", {}).items():
        for phase in ("initramfs", "userspace"):
            p = runs[0][phase]
            top = ", ".join(f"{f} {n}" for f, n, _ in p["functions"][:5])
            print(f"  {m:14} kernel in {phase}: {p['ticks']} ticks ({p['seconds']} s), "
                  f"{p['pages_allocated']} pages allocated: {top}")
        callers = runs[0]["userspace"]["allocations_by_caller"][:5]
        sites = ", ".join(f"{f} {n}" for f, n, _ in callers)
        print(f"  {m:14} page allocations in userspace by caller: {sites}")
    for m, runs in result.get("execs", {}).items():
        e = runs[-1]
        top = ", ".join(f"{p.rsplit('/', 1)[-1]} {n}"
                        for p, n in list(e["initramfs_by_path"].items())[:6])
        print(f"  {m:14} programs started (last boot): initramfs {e['initramfs']} ({top}), "
              f"userspace to the login {e['userspace']}")
    print(f"  load average at the end: {result['load_average']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
