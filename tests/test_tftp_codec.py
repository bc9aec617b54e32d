"""TFTP without a server: the codec against RFC 1350/2347-2349/7440, a hypothesis fuzz of
the parser (it raises only MalformedPacket), and the packet cache (block numbering
modulo 65536, hits, misses, eviction, files it refuses)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidusctl.serve import tftp_codec as tc
from sidusctl.serve.dhcp_codec import MalformedPacket
from tests.fuzz_util import mutations
from tests.tftp_util import VALID

# -- codec ---------------------------------------------------------------------------------------


def test_parse_rrq_with_options_rfc2347_example() -> None:
    # RFC 2347 section "Example": RRQ foobar octet blksize 1428 tsize 0 (names case-insensitive)
    raw = b"\x00\x01foobar\x00octet\x00BlkSize\x001428\x00tsize\x000\x00"
    p = tc.parse(raw)
    assert p == tc.Request(tc.RRQ, "foobar", "octet", {"blksize": "1428", "tsize": "0"})
    assert tc.encode_request(tc.RRQ, "foobar", "octet", {"blksize": "1428", "tsize": "0"}) == \
        raw.replace(b"BlkSize", b"blksize")


def test_encode_data_ack_error_oack() -> None:
    assert tc.encode_data(1, b"abc") == b"\x00\x03\x00\x01abc"
    assert tc.encode_data(65536, b"") == b"\x00\x03\x00\x00"  # rollover to 0
    assert tc.encode_ack(7) == b"\x00\x04\x00\x07"
    assert tc.encode_error(2, "no") == b"\x00\x05\x00\x02no\x00"
    assert tc.encode_oack({"blksize": "1432"}) == b"\x00\x06blksize\x001432\x00"
    assert tc.parse(b"\x00\x06blksize\x001432\x00") == tc.Oack({"blksize": "1432"})
    assert tc.parse(b"\x00\x05\x00\x01nope\x00") == tc.Error(1, "nope")


@pytest.mark.parametrize(("opts", "size", "expect"), [
    ({"blksize": "1468"}, 10, {"blksize": "1468"}),
    ({"blksize": "100000"}, 10, {"blksize": "65464"}),      # huge: clamped (RFC 2348)
    ({"blksize": "4"}, 10, {}),                              # below 8: ignored
    ({"blksize": "12ab"}, 10, {}),
    ({"tsize": "0"}, 12345, {"tsize": "12345"}),             # RFC 2349
    ({"timeout": "0"}, 10, {}),
    ({"timeout": "5"}, 10, {"timeout": "5"}),
    ({"windowsize": "16"}, 10, {"windowsize": "16"}),         # RFC 7440
    ({"windowsize": "9999"}, 10, {"windowsize": "64"}),
    ({"multicast": ""}, 10, {}),
])
def test_negotiation(opts: dict[str, str], size: int, expect: dict[str, str]) -> None:
    assert tc.negotiate(opts, size).oack == expect


@pytest.mark.parametrize("raw", [b"", b"\x00", b"\x00\x01", b"\x00\x01file", b"\x00\x01file\x00",
                                 b"\x00\x09abcd", b"\x00\x04\x00", b"\x00\x01\x00octet\x00",
                                 b"\x00\x01f\x00octet\x00blksize\x00",
                                 b"\x00\x01f\x00octet\x00a\x001\x00a\x002\x00"])
def test_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedPacket):
        tc.parse(raw)


mutated = mutations(VALID)


FUZZ = settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.one_of(st.binary(max_size=300), mutated))
def test_fuzz_parse_raises_only_malformed(data: bytes) -> None:
    try:
        p = tc.parse(data)
    except MalformedPacket:
        return
    if isinstance(p, tc.Request):
        tc.negotiate(p.options, 1000)


# -- the packet cache ---------------------------------------------------------------------------

def test_build_packets_numbers_blocks_modulo_65536_and_ends_short() -> None:
    from sidusctl.serve.tftp_cache import build_packets
    data = os.urandom(70_000)
    pk = build_packets(data, 1)
    assert len(pk) == 70_001 and pk[-1] == b"\x00\x03" + (70_001 & 0xFFFF).to_bytes(2, "big")
    assert pk[65534][:4] == b"\x00\x03\xff\xff" and pk[65535][:4] == b"\x00\x03\x00\x00"
    assert b"".join(p[4:] for p in pk) == data
    assert [len(p) for p in build_packets(b"x" * 1468 * 2, 1468)] == [1472, 1472, 4]
    assert build_packets(b"", 512) == [b"\x00\x03\x00\x01"]


def test_packet_cache_hits_misses_evicts_and_refuses(tmp_path: Path) -> None:
    from sidusctl.serve.tftp_cache import PacketCache
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(os.urandom(10_000))
    b.write_bytes(os.urandom(10_000))
    cache = PacketCache(limit=15_000, max_file=12_000)

    def get(p: Path, blksize: int = 512) -> list[bytes] | None:
        fd = os.open(p, os.O_RDONLY)
        try:
            return cache.get(fd, os.fstat(fd), blksize)
        finally:
            os.close(fd)

    first = get(a)
    assert first is not None and b"".join(x[4:] for x in first) == a.read_bytes()
    assert get(a) is first and (cache.hits, cache.misses) == (1, 1)
    assert get(a, 1024) is not first  # another block size: other packets
    assert cache.size <= 15_000  # the 512-byte packets of a were dropped for them
    a.write_bytes(os.urandom(10_001))  # rewritten: another size and mtime, new packets
    again = get(a)
    assert again is not None and b"".join(x[4:] for x in again) == a.read_bytes()
    big = tmp_path / "big"
    big.write_bytes(os.urandom(13_000))
    assert get(big) is None  # over max_file: not cached
    fd = os.open(b, os.O_RDONLY)
    st0 = os.fstat(fd)
    os.truncate(b, 5000)  # shorter than its stat says: being rewritten, not cached
    assert cache.get(fd, st0, 512) is None
    os.close(fd)


