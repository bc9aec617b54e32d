"""bench/kprofile.py's reading of the kernel's /proc/profile (kernel/profile.c's layout: one
unsigned int bucket width, then one counter per bucket of text from _stext; module hits in the
last bucket). The reads from a real guest are exercised by ``bench/boot.py --kernel-profile``;
here the parser alone, on files made in that layout."""

from __future__ import annotations

import struct

import pytest

from bench import kprofile

STEXT = 0xFFFFFFFF81000000
SYMS = "\n".join([f"{STEXT:x} _stext", f"{STEXT:x} startup_64", f"{STEXT + 0x40:x} clear_page_rep",
                  f"{STEXT + 0x80:x} __memcpy", ""])


def _profile(counts: list[int], step: int = 16) -> bytes:
    return struct.pack(f"={len(counts) + 1}I", step, *counts)


def test_buckets_named_by_function_modules_last() -> None:
    # buckets of 16 bytes: 0-3 startup_64, 4-7 clear_page_rep, 8.. __memcpy, the last: modules
    raw = _profile([1, 0, 0, 0, 5, 0, 3, 0, 2, 0, 0, 7])
    out = kprofile.by_function(raw, SYMS, hz=250)
    assert out["ticks"] == 18 and out["seconds"] == 0.1
    assert out["functions"][:2] == [["clear_page_rep", 8, 44.4], ["(modules)", 7, 38.9]]
    assert dict((f, n) for f, n, _ in out["functions"]) == {
        "clear_page_rep": 8, "(modules)": 7, "__memcpy": 2, "startup_64": 1}


def test_base_subtracted() -> None:
    early = _profile([1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0])
    late = _profile([1, 0, 0, 0, 9, 0, 0, 0, 4, 0, 0, 0])
    out = kprofile.by_function(late, SYMS, base=early)
    assert out["ticks"] == 11
    assert out["functions"] == [["clear_page_rep", 7, 63.6], ["__memcpy", 4, 36.4]]


def test_nothing_counted() -> None:
    assert kprofile.by_function(_profile([0] * 12), SYMS) == {
        "ticks": 0, "seconds": 0.0, "functions": []}


@pytest.mark.parametrize("raw, syms, base, message", [
    (b"\x10\x00\x00", SYMS, None, "expected whole 4-byte words"),
    (_profile([1] * 12), "ffffffff81000000 startup_64\n", None, "no _stext"),
    (_profile([1] * 12), SYMS, _profile([1] * 11), "different shapes"),
])
def test_bad_input_named(raw: bytes, syms: str, base: bytes | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kprofile.by_function(raw, syms, base=base)


def test_boot_words() -> None:
    assert kprofile.boot_words("console=ttyS0 panic=-1 quiet profile=2") == (
        f"console=ttyS0 quiet profile={kprofile.SHIFT} break=bottom")


def test_pages_allocated() -> None:
    text = "gzip -9 ...\r\nSDT-PGALLOC 86871\r\nH4sIAAAA\r\n"
    assert kprofile.pages_allocated(text) == 86871
    with pytest.raises(ValueError, match="no SDT-PGALLOC"):
        kprofile.pages_allocated("awk ... SDT-PGALLOC\r\n")


HIST = """# event histogram
#
# trigger info: hist:keys=stacktrace:vals=hitcount:sort=hitcount.descending:size=16384 [active]
#

{ stacktrace:
         folio_alloc+0x1d/0x60
         readahead_expand+0xd7/0x1e0
         squashfs_readahead+0x13a/0x8e0
} hitcount:      14801
{ stacktrace:
         squashfs_bio_read+0x9b/0x2a0
         squashfs_read_data+0x73/0x470
} hitcount:       3139
{ stacktrace:
         __folio_alloc+0x17/0x50
         vma_alloc_folio+0x9c/0x370
         wp_page_copy+0x80/0x720
} hitcount:       2000
{ stacktrace:
         folio_alloc+0x1d/0x60
         readahead_expand+0xd7/0x1e0
         squashfs_readahead+0x13a/0x8e0
         read_pages+0x4a/0x200
} hitcount:         60

Totals:
    Hits: 20000
"""


def test_allocations_named_by_their_first_caller_outside_the_allocator() -> None:
    assert kprofile.alloc_sites(HIST) == [["readahead_expand", 14861, 74.3],
                                          ["squashfs_bio_read", 3139, 15.7],
                                          ["wp_page_copy", 2000, 10.0]]
    assert kprofile.alloc_sites(HIST, top=1) == [["readahead_expand", 14861, 74.3]]
    # a full table: what it could not hold is counted as one row
    full = HIST.replace("Hits: 20000\n", "Hits: 20500\n    Entries: 4\n    Dropped: 500\n")
    assert kprofile.alloc_sites(full)[-1] == ["(dropped)", 500, 2.4]
    assert "(dropped)" not in dict((n, c) for n, c, _ in kprofile.alloc_sites(
        HIST.replace("Hits: 20000\n", "Hits: 20000\n    Dropped: 0\n")))
    with pytest.raises(ValueError, match="no stacktrace entries"):
        kprofile.alloc_sites("# event histogram\n\nTotals:\n    Hits: 0\n")
