"""DHCP codec and server state machine, in-process: packets built byte by byte from the RFC 2131
layout (netboot-facts.md offsets), RFC 2132/3396/4578 options, malformed input, and a
hypothesis fuzz of the parser and of the whole request handler. The handler counts a bug
(``internal_errors``) apart from undecodable input (``malformed``): the fuzz asserts no bug was
hit, and an injected bug proves the counter is honest."""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidusctl.core.errors import ConfigError
from sidusctl.serve import dhcp_codec as dc
from sidusctl.serve.dhcp import DhcpServer
from sidusctl.serve.dhcp_config import BootPolicy, DhcpConfig, Reservation
from tests.fuzz_util import mutations

MAC = bytes.fromhex("525400ec3381")


def raw_request(options: bytes, *, xid: int = 0x3903F326, ciaddr: bytes = b"\0" * 4,
                flags: int = 0x8000, cookie: bytes = dc.MAGIC_COOKIE, mac: bytes = MAC,
                file: bytes = b"", sname: bytes = b"") -> bytes:
    """A BOOTREQUEST laid out field by field as RFC 2131 figure 1 / netboot-facts.md say."""
    b = bytearray(240)
    b[0], b[1], b[2], b[3] = 1, 1, 6, 0            # op, htype, hlen, hops
    b[4:8] = struct.pack("!I", xid)                # xid 4-7
    b[8:10] = b"\0\x04"                            # secs 8-9
    b[10:12] = struct.pack("!H", flags)            # flags 10-11
    b[12:16] = ciaddr                              # ciaddr 12
    b[28:28 + len(mac)] = mac                      # chaddr 28-43
    b[44:44 + len(sname)] = sname                  # sname 44-107
    b[108:108 + len(file)] = file                  # file 108-235
    b[236:240] = cookie                            # magic cookie at 236
    return bytes(b) + options


PXE_DISCOVER_OPTS = (
    b"\x35\x01\x01"                                               # 53 DISCOVER
    + b"\x37\x04\x01\x03\x2b\x3c"                                 # 55 parameter list
    + b"\x5d\x02\x00\x00"                                         # 93 arch 0 BIOS
    + b"\x5e\x03\x01\x02\x01"                                     # 94 UNDI 2.1
    + b"\x61\x11\x00" + bytes(range(16))                          # 97 UUID type 0 + 16
    + b"\x3c\x20" + b"PXEClient:Arch:00000:UNDI:002001"           # 60 vendor class
    + b"\xff")


def test_decode_header_fields_at_rfc_offsets() -> None:
    p = dc.decode(raw_request(PXE_DISCOVER_OPTS, ciaddr=bytes([192, 0, 2, 91])))
    assert (p.op, p.htype, p.hlen, p.hops) == (1, 1, 6, 0)
    assert p.xid == 0x3903F326 and p.secs == 4 and p.flags == dc.FLAG_BROADCAST
    assert p.ciaddr == IPv4Address("192.0.2.91")
    assert p.mac == "52:54:00:ec:33:81"
    assert p.msg_type == dc.DISCOVER
    assert p.client_arch == 0
    assert p.is_pxe
    assert p.options[dc.OPT_CLIENT_UUID] == b"\0" + bytes(range(16))
    assert p.options[dc.OPT_PARAM_LIST] == bytes([1, 3, 43, 60])


@pytest.mark.parametrize(("code", "arch"), [(b"\x00\x00", 0), (b"\x00\x06", 6), (b"\x00\x07", 7),
                                            (b"\x00\x09", 9), (b"\x00\x0a", 10),
                                            (b"\x00\x0b", 11), (b"\x00\x10", 16)])
def test_option_93_architectures(code: bytes, arch: int) -> None:
    p = dc.decode(raw_request(b"\x35\x01\x01\x5d\x02" + code + b"\xff"))
    assert p.client_arch == arch


def test_encode_places_fields_at_rfc_offsets() -> None:
    p = dc.DhcpPacket(op=2, xid=0xDEADBEEF, flags=0x8000, yiaddr=IPv4Address("10.0.0.130"),
                      siaddr=IPv4Address("10.0.0.1"), chaddr=MAC, file=b"pxelinux.0",
                      sname=b"boot", options={dc.OPT_SERVER_ID: dc.o_ip("10.0.0.1"),
                                              dc.OPT_MSG_TYPE: dc.o_u8(dc.OFFER)})
    b = p.encode()
    assert len(b) >= 300  # BOOTP minimum (RFC 1542)
    assert b[0] == 2 and b[4:8] == bytes.fromhex("deadbeef")
    assert b[16:20] == bytes([10, 0, 0, 130])      # yiaddr
    assert b[20:24] == bytes([10, 0, 0, 1])        # siaddr = next-server
    assert b[28:34] == MAC
    assert b[44:48] == b"boot" and b[48] == 0
    assert b[108:118] == b"pxelinux.0" and b[118] == 0
    assert b[236:240] == bytes.fromhex("63825363")
    assert b[240:243] == b"\x35\x01\x02"           # message type comes first
    assert b[243:249] == b"\x36\x04\x0a\x00\x00\x01"
    assert b[249] == 255
    assert dc.decode(b).options == p.options


def test_long_option_split_and_concatenated_rfc3396() -> None:
    value = bytes(range(256)) + bytes(range(100))  # 356 bytes: two instances on the wire
    b = dc.DhcpPacket(options={dc.OPT_MSG_TYPE: b"\x01", 43: value}).encode()
    assert b.count(bytes([43, 255])) == 1
    assert dc.decode(b).options[43] == value


def test_option_overload_reads_file_and_sname_rfc2132_9_3() -> None:
    file_area = b"\x0c\x05node1\xff"
    sname_area = b"\x0f\x07cluster\xff"
    p = dc.decode(raw_request(b"\x35\x01\x01\x34\x01\x03\xff", file=file_area, sname=sname_area))
    assert p.options[dc.OPT_HOSTNAME] == b"node1"
    assert p.options[dc.OPT_DOMAIN] == b"cluster"
    assert p.file == b"" and p.sname == b""


def test_overload_option_inside_the_file_area_is_dropped() -> None:
    # found by the fuzz test in CI: option 52 (empty) in the file area, option 52 = 1 in the
    # options field. RFC 2132 9.3 gives 52 a meaning only in the options field; the copy in the
    # file area must neither reach the packet's options nor make its re-encoding unreadable.
    p = dc.decode(raw_request(b"\x34\x01\x01", file=b"\x34\x00\x0c\x02n1\xff"))
    assert dc.OPT_OVERLOAD not in p.options and p.options[dc.OPT_HOSTNAME] == b"n1"
    assert dc.decode(p.encode()) == p
    # and a caller that puts 52 into options does not make the encoder claim an overload
    q = dc.DhcpPacket(options={dc.OPT_MSG_TYPE: b"\x01", dc.OPT_OVERLOAD: b"\x03"},
                      file=b"pxelinux.0")
    r = dc.decode(q.encode())
    assert r.file == b"pxelinux.0" and dc.OPT_OVERLOAD not in r.options


def test_user_class_ipxe_both_spellings() -> None:
    raw = dc.decode(raw_request(b"\x35\x01\x01\x4d\x04iPXE\xff"))
    rfc3004 = dc.decode(raw_request(b"\x35\x01\x01\x4d\x05\x04iPXE\xff"))
    assert b"iPXE" in raw.user_classes
    assert b"iPXE" in rfc3004.user_classes


def test_pad_options_and_missing_end_are_accepted() -> None:
    p = dc.decode(raw_request(b"\x00\x00\x35\x01\x03\x00"))
    assert p.msg_type == dc.REQUEST


@pytest.mark.parametrize(("data", "words"), [
    (raw_request(b"")[:239], "truncated"),
    (b"", "truncated"),
    (raw_request(b"\x35\x01\x01\xff", cookie=b"\x63\x82\x53\x64"), "cookie"),
    (raw_request(b"\x35\x05\x01\xff"), "past the end"),
    (raw_request(b"\x35"), "no length byte"),
    (raw_request(b"\x34\x01\x01\xff", file=b"\x0c\x7f"), "past the end"),
    (raw_request(b"\x34\x01\x07\xff"), "overload"),
    (b"\x03" + raw_request(b"\xff")[1:], "op 3"),
    (raw_request(b"\xff")[:2] + b"\x11" + raw_request(b"\xff")[3:], "hlen 17"),
])
def test_malformed_packets_are_refused_with_a_reason(data: bytes, words: str) -> None:
    with pytest.raises(dc.MalformedPacket, match=words):
        dc.decode(data)


# -- the server's state machine, without sockets ----------------------------------------------

SERVER = IPv4Address("10.0.0.1")
NET = IPv4Network("10.0.0.0/24")
POLICY = BootPolicy(bios="pxelinux.0", efi_x64="grubnetx64.efi", ipxe_script="http://10.0.0.1/boot.ipxe")


def make_server(tmp_path: Path, **kw: object) -> DhcpServer:
    cfg = DhcpConfig(interface="sdt-unbound", lease_file=tmp_path / "leases.sqlite",
                     reservations=(Reservation("52:54:00:ec:33:81", IPv4Address("10.0.0.130"),
                                               "node1"),),
                     boot=POLICY, router=IPv4Address("10.0.0.254"),
                     dns_servers=(SERVER,), domain="cluster.test", lease_time=600, **kw)  # type: ignore[arg-type]
    return DhcpServer(cfg, server_ip=SERVER, subnet=NET)


def one(replies: list[tuple[bytes, tuple[str, int]]]) -> tuple[dc.DhcpPacket, tuple[str, int]]:
    assert len(replies) == 1, replies
    return dc.decode(replies[0][0]), replies[0][1]


def test_reserved_pxe_client_gets_offer_with_boot_file_and_options(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    try:
        out, dest = one(srv.handle(raw_request(PXE_DISCOVER_OPTS), ("0.0.0.0", 68), 67))
        assert dest == ("255.255.255.255", 68)
        assert out.op == 2 and out.msg_type == dc.OFFER and out.xid == 0x3903F326
        assert out.yiaddr == IPv4Address("10.0.0.130")
        assert out.siaddr == SERVER and out.file == b"pxelinux.0"
        o = out.options
        assert o[dc.OPT_SUBNET_MASK] == dc.o_ip("255.255.255.0")
        assert o[dc.OPT_ROUTER] == dc.o_ip("10.0.0.254")
        assert o[dc.OPT_DNS] == dc.o_ip(SERVER)
        assert o[dc.OPT_HOSTNAME] == b"node1"
        assert o[dc.OPT_DOMAIN] == b"cluster.test"
        assert o[dc.OPT_BROADCAST] == dc.o_ip("10.0.0.255")
        assert o[dc.OPT_LEASE_TIME] == dc.o_u32(600)
        assert o[dc.OPT_SERVER_ID] == dc.o_ip(SERVER)
        assert o[dc.OPT_TFTP_SERVER] == b"10.0.0.1"
        assert o[dc.OPT_BOOTFILE] == b"pxelinux.0"
        assert o[dc.OPT_CLIENT_UUID] == b"\0" + bytes(range(16))
    finally:
        srv.close()


@pytest.mark.parametrize(("extra", "boot"), [
    (b"\x5d\x02\x00\x07", b"grubnetx64.efi"),
    (b"\x5d\x02\x00\x09", b"grubnetx64.efi"),
    (b"\x5d\x02\x00\x07\x4d\x04iPXE", b"http://10.0.0.1/boot.ipxe"),   # loop broken
    (b"\x5d\x02\x00\x00\x4d\x04iPXE", b"http://10.0.0.1/boot.ipxe"),
])
def test_boot_file_by_architecture_and_ipxe(tmp_path: Path, extra: bytes, boot: bytes) -> None:
    srv = make_server(tmp_path)
    try:
        out, _ = one(srv.handle(raw_request(b"\x35\x01\x01" + extra + b"\xff"), ("0.0.0.0", 68), 67))
        assert out.options[dc.OPT_BOOTFILE] == boot
    finally:
        srv.close()


def _request_opts(ip: str, server: IPv4Address | None = SERVER) -> bytes:
    o = b"\x35\x01\x03\x32\x04" + IPv4Address(ip).packed
    if server is not None:
        o += b"\x36\x04" + server.packed
    return o + b"\xff"


def test_full_exchange_persists_lease_and_naks_wrong_address(tmp_path: Path) -> None:
    srv = make_server(tmp_path)
    try:
        one(srv.handle(raw_request(b"\x35\x01\x01\xff"), ("0.0.0.0", 68), 67))
        ack, _ = one(srv.handle(raw_request(_request_opts("10.0.0.130")), ("0.0.0.0", 68), 67))
        assert ack.msg_type == dc.ACK and ack.yiaddr == IPv4Address("10.0.0.130")
        nak, dest = one(srv.handle(raw_request(_request_opts("10.0.0.99", None)),
                                   ("0.0.0.0", 68), 67))
        assert nak.msg_type == dc.NAK and dest == ("255.255.255.255", 68)
        # renewing: unicast to ciaddr
        renew, dest = one(srv.handle(raw_request(b"\x35\x01\x03\xff", ciaddr=bytes([10, 0, 0, 130]),
                                                 flags=0), ("10.0.0.130", 68), 67))
        assert renew.msg_type == dc.ACK and dest == ("10.0.0.130", 68)
    finally:
        srv.close()
    srv = make_server(tmp_path)  # reopen: the lease is on disk
    try:
        assert srv.store is not None
        assert srv.store.by_mac["52:54:00:ec:33:81"].ip == IPv4Address("10.0.0.130")
    finally:
        srv.close()


def _commits(srv: DhcpServer) -> int:
    """Transactions committed to the lease store so far (SQLite's own count of changes)."""
    assert srv.store is not None
    return int(srv.store._db.total_changes)


def test_a_recent_lease_is_kept_without_a_commit(tmp_path: Path) -> None:
    """A network boot asks for its address several times in seconds: the first REQUEST
    commits a lease, those within ``cache_threshold`` of it get the same lease and its
    remaining time (options 51, 58, 59) and commit nothing; an older lease, another hostname
    or a threshold of 0 commit a new one."""
    mac = "52:54:00:ec:33:81"
    srv = make_server(tmp_path)  # lease_time 600, threshold 0.25: kept while 450 s or more left
    try:
        assert srv.store is not None
        ack, _ = one(srv.handle(raw_request(_request_opts("10.0.0.130")), ("0.0.0.0", 68), 67))
        assert ack.options[dc.OPT_LEASE_TIME] == dc.o_u32(600)
        first, n = srv.store.by_mac[mac].expires, _commits(srv)
        # 100 s later (the lease's expiry moved back instead of waiting): kept
        srv.store.by_mac[mac] = replace(srv.store.by_mac[mac], expires=first - 100)
        ack, _ = one(srv.handle(raw_request(_request_opts("10.0.0.130")), ("0.0.0.0", 68), 67))
        assert ack.msg_type == dc.ACK and ack.yiaddr == IPv4Address("10.0.0.130")
        left = int.from_bytes(ack.options[dc.OPT_LEASE_TIME], "big")
        assert 495 <= left <= 500
        assert ack.options[dc.OPT_T1] == dc.o_u32(left // 2)
        assert ack.options[dc.OPT_T2] == dc.o_u32(left * 7 // 8)
        assert _commits(srv) == n and srv.stats.kept == 1 and srv.stats.acks == 2
        # 200 s later: more than a quarter of the lease gone, a new one is committed
        srv.store.by_mac[mac] = replace(srv.store.by_mac[mac], expires=first - 200)
        ack, _ = one(srv.handle(raw_request(_request_opts("10.0.0.130")), ("0.0.0.0", 68), 67))
        assert ack.options[dc.OPT_LEASE_TIME] == dc.o_u32(600)
        assert _commits(srv) > n and srv.stats.kept == 1
        assert srv.store.by_mac[mac].expires >= first
    finally:
        srv.close()
    srv = make_server(tmp_path, cache_threshold=0)
    try:
        assert srv.store is not None
        n = _commits(srv)
        for _ in range(2):
            ack, _ = one(srv.handle(raw_request(_request_opts("10.0.0.130")), ("0.0.0.0", 68), 67))
            assert ack.options[dc.OPT_LEASE_TIME] == dc.o_u32(600)
        assert _commits(srv) >= n + 2 and srv.stats.kept == 0
    finally:
        srv.close()


def test_a_kept_lease_follows_the_hostname(tmp_path: Path) -> None:
    """A pool client that sends another hostname (option 12) gets a new commit: the store
    records what the machine calls itself now."""
    mac = bytes.fromhex("020000000042")
    srv = make_server(tmp_path, pool=(IPv4Address("10.0.0.100"), IPv4Address("10.0.0.101")),
                      unknown="pool")
    try:
        assert srv.store is not None
        offer, _ = one(srv.handle(raw_request(b"\x35\x01\x01\xff", mac=mac), ("0.0.0.0", 68), 67))
        ip = str(offer.yiaddr)
        one(srv.handle(raw_request(_request_opts(ip), mac=mac), ("0.0.0.0", 68), 67))
        n = _commits(srv)
        named = _request_opts(ip)[:-1] + b"\x0c\x05node7\xff"
        ack, _ = one(srv.handle(raw_request(named, mac=mac), ("0.0.0.0", 68), 67))
        assert ack.msg_type == dc.ACK and _commits(srv) > n and srv.stats.kept == 0
        assert srv.store.by_mac["02:00:00:00:00:42"].hostname == "node7"
        n = _commits(srv)
        one(srv.handle(raw_request(named, mac=mac), ("0.0.0.0", 68), 67))
        assert _commits(srv) == n and srv.stats.kept == 1
    finally:
        srv.close()


@pytest.mark.parametrize("threshold", [-0.1, 1.0, 2])
def test_cache_threshold_out_of_range_is_refused(tmp_path: Path, threshold: float) -> None:
    cfg = DhcpConfig(interface="sdt-unbound", lease_file=tmp_path / "l.sqlite",
                     cache_threshold=threshold)
    with pytest.raises(ConfigError, match="cache_threshold"):
        cfg.validate()


def test_unknown_macs_ignored_or_pooled(tmp_path: Path) -> None:
    other = bytes.fromhex("020000000001")
    srv = make_server(tmp_path)
    try:
        assert srv.handle(raw_request(b"\x35\x01\x01\xff", mac=other), ("0.0.0.0", 68), 67) == []
        assert srv.stats.ignored == 1
    finally:
        srv.close()
    srv = make_server(tmp_path, pool=(IPv4Address("10.0.0.100"), IPv4Address("10.0.0.101")),
                      unknown="pool")
    try:
        got = set()
        for i in range(3):
            mac = bytes.fromhex(f"0200000000{i + 2:02x}")
            r = srv.handle(raw_request(b"\x35\x01\x01\xff", mac=mac), ("0.0.0.0", 68), 67)
            if r:
                ip = dc.decode(r[0][0]).yiaddr
                one(srv.handle(raw_request(_request_opts(str(ip)), mac=mac), ("0.0.0.0", 68), 67))
                got.add(ip)
        # two addresses, three clients: the third gets nothing, never a duplicate
        assert got == {IPv4Address("10.0.0.100"), IPv4Address("10.0.0.101")}
    finally:
        srv.close()


def test_proxy_answers_pxe_only_without_address(tmp_path: Path) -> None:
    srv = make_server(tmp_path, proxy=True)
    try:
        assert srv.handle(raw_request(b"\x35\x01\x01\xff"), ("0.0.0.0", 68), 67) == []
        out, dest = one(srv.handle(raw_request(PXE_DISCOVER_OPTS), ("0.0.0.0", 68), 67))
        assert out.msg_type == dc.OFFER and out.yiaddr == IPv4Address(0)
        assert out.options[dc.OPT_VENDOR_CLASS] == b"PXEClient"
        assert out.file == b"pxelinux.0" and out.siaddr == SERVER
        req = PXE_DISCOVER_OPTS.replace(b"\x35\x01\x01", b"\x35\x01\x03")
        ack, dest = one(srv.handle(raw_request(req, ciaddr=bytes([10, 0, 0, 77])),
                                   ("10.0.0.77", 68), 4011))
        assert ack.msg_type == dc.ACK and ack.yiaddr == IPv4Address(0)
        assert dest == ("10.0.0.77", 68)
    finally:
        srv.close()


# -- fuzz ------------------------------------------------------------------------------------

VALID = [raw_request(PXE_DISCOVER_OPTS), raw_request(_request_opts("10.0.0.130")),
         raw_request(b"\x35\x01\x01\x34\x01\x03\xff", file=b"\x0c\x05node1\xff")]


mutated = mutations(VALID, changes=8, tail=40)


FUZZ = settings(max_examples=4000, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.one_of(st.binary(max_size=600), mutated))
def test_fuzz_decode_raises_only_malformed(data: bytes) -> None:
    try:
        p = dc.decode(data)
    except dc.MalformedPacket:
        return
    p.mac, p.msg_type, p.client_arch, p.user_classes, p.hostname, p.is_pxe  # noqa: B018
    again = dc.decode(p.encode())  # what we decoded re-encodes to the same packet
    assert again == p


@pytest.fixture(scope="module")
def fuzz_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[DhcpServer]]:
    full = make_server(tmp_path_factory.mktemp("full"),
                       pool=(IPv4Address("10.0.0.10"), IPv4Address("10.0.0.200")), unknown="pool")
    proxy = make_server(tmp_path_factory.mktemp("proxy"), proxy=True)
    yield [full, proxy]
    full.close()
    proxy.close()


@FUZZ
@given(data=st.one_of(st.binary(max_size=600), mutated), port=st.sampled_from([67, 4011]))
def test_fuzz_server_handler_never_raises(fuzz_servers: list[DhcpServer], data: bytes,
                                         port: int) -> None:
    for srv in fuzz_servers:
        received, malformed = srv.stats.received, srv.stats.malformed
        for reply, _dest in srv.handle(data, ("0.0.0.0", 68), port):
            assert dc.decode(reply).op == dc.BOOTREPLY
        assert srv.stats.internal_errors == 0, "the handler hit a bug (see the logged traceback)"
        assert srv.stats.received == received + 1
        try:
            dc.decode(data)
        except dc.MalformedPacket:
            assert srv.stats.malformed == malformed + 1
        else:
            assert srv.stats.malformed == malformed


def test_an_injected_bug_is_counted_as_internal_not_malformed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    srv = make_server(tmp_path)
    try:
        def boom(*_a: object) -> list[tuple[bytes, tuple[str, int]]]:
            raise RuntimeError("injected bug")
        monkeypatch.setattr(srv, "_dispatch", boom)
        with caplog.at_level(logging.ERROR, logger="sidusctl"):
            assert srv.handle(raw_request(PXE_DISCOVER_OPTS), ("0.0.0.0", 68), 67) == []
            assert srv.handle(b"\x01junk", ("0.0.0.0", 68), 67) == []
        assert srv.stats.internal_errors == 1 and srv.stats.malformed == 1
        bug = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(bug) == 1 and bug[0].exc_info is not None
        assert "injected bug" in str(bug[0].exc_info[1])
        monkeypatch.undo()  # the real handler again: served, and no bug counted
        _pkt, _dest = one(srv.handle(raw_request(PXE_DISCOVER_OPTS), ("0.0.0.0", 68), 67))
        assert srv.stats.internal_errors == 1 and srv.stats.offers == 1
    finally:
        srv.close()


def test_release_decline_inform_relay_and_expired_reuse(tmp_path: Path) -> None:
    import time as _time
    srv = make_server(tmp_path, pool=(IPv4Address("10.0.0.100"), IPv4Address("10.0.0.101")),
                      unknown="pool")
    a, b = bytes.fromhex("0200000000aa"), bytes.fromhex("0200000000bb")
    src = ("0.0.0.0", 68)
    try:
        assert srv.store is not None
        off, _ = one(srv.handle(raw_request(b"\x35\x01\x01\xff", mac=a), src, 67))
        one(srv.handle(raw_request(_request_opts(str(off.yiaddr)), mac=a), src, 67))
        # RELEASE frees the address
        rel = b"\x35\x01\x07\x36\x04" + SERVER.packed + b"\xff"
        assert srv.handle(raw_request(rel, mac=a, ciaddr=off.yiaddr.packed), src, 67) == []
        assert "02:00:00:00:00:aa" not in srv.store.by_mac
        # DECLINE sets the address aside: the next client gets the other one
        one(srv.handle(raw_request(b"\x35\x01\x01\xff", mac=a), src, 67))
        ack, _ = one(srv.handle(raw_request(_request_opts(str(off.yiaddr)), mac=a), src, 67))
        dec = b"\x35\x01\x04\x32\x04" + ack.yiaddr.packed + b"\x36\x04" + SERVER.packed + b"\xff"
        assert srv.handle(raw_request(dec, mac=a), src, 67) == []
        off_b, _ = one(srv.handle(raw_request(b"\x35\x01\x01\xff", mac=b), src, 67))
        assert off_b.yiaddr != ack.yiaddr
        # INFORM: options, no address, no lease time, unicast to ciaddr
        inf, dest = one(srv.handle(raw_request(b"\x35\x01\x08\xff", mac=b,
                                               ciaddr=bytes([10, 0, 0, 7])), ("10.0.0.7", 68), 67))
        assert inf.msg_type == dc.ACK and inf.yiaddr == IPv4Address(0)
        assert dc.OPT_LEASE_TIME not in inf.options and dest == ("10.0.0.7", 68)
        # relayed: the reply goes to the relay's port 67, option 82 echoed
        relayed = bytearray(raw_request(b"\x35\x01\x01\x52\x04\x01\x02ab\xff", mac=b))
        relayed[24:28] = bytes([10, 0, 0, 254])
        out, dest = one(srv.handle(bytes(relayed), ("10.0.0.254", 67), 67))
        assert dest == ("10.0.0.254", 67) and out.options[dc.OPT_RELAY_AGENT] == b"\x01\x02ab"
        # an expired lease's address goes back to the pool
        srv.store.bind("02:00:00:00:00:cc", IPv4Address("10.0.0.101"), None, _time.time() - 1)
        assert srv.store.holder(IPv4Address("10.0.0.101"), _time.time()) is None
    finally:
        srv.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_BINDTODEVICE needs root")
def test_the_wait_of_a_datagram_in_the_socket_is_measured(tmp_path: Path) -> None:
    """The server reads each datagram's kernel receive time stamp: a DISCOVER that arrives
    while the event loop is busy (blocked 1.5 s here) is answered, and counted ``late``
    with its wait; one that finds the loop free is not."""
    import asyncio
    import dataclasses
    import time

    srv = make_server(tmp_path)
    srv.cfg = dataclasses.replace(srv.cfg, interface="lo", port=0)
    pkt = dc.DhcpPacket(op=1, xid=7, flags=dc.FLAG_BROADCAST,
                        chaddr=bytes.fromhex("525400ec3381"),
                        options={dc.OPT_MSG_TYPE: bytes([dc.DISCOVER])}).encode()

    async def run() -> None:
        await srv.start()
        port = srv._socks[0][0].getsockname()[1]
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            c.sendto(pkt, ("127.0.0.1", port))
            await asyncio.sleep(0.5)  # read at once
            assert (srv.stats.received, srv.stats.late) == (1, 0), srv.stats
            c.sendto(pkt, ("127.0.0.1", port))
            time.sleep(1.5)  # the loop is busy elsewhere: the datagram waits in the socket
            await asyncio.sleep(0.5)
        finally:
            c.close()
            srv.close()

    asyncio.run(run())
    assert srv.stats.received == 2 and srv.stats.offers == 2, srv.stats
    assert srv.stats.late == 1 and 1500 <= srv.stats.wait_max_ms < 60_000, srv.stats
