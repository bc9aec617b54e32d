"""TFTP: codec against RFC 1350/2347-2349/7440, a hypothesis fuzz of the parser and of the live
server, and the real clients (curl, tftp-hpa) plus our windowsize client against the server on
loopback: blksizes, rollover past 32 MiB, traversal refused with error 2, WRQ refused,
retransmission, many transfers at once. The live fuzz checks the server's counters and health
after each batch (every datagram accounted for, no internal error, a real transfer still
works); an injected bug proves the internal error counter is honest."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidusctl.serve import tftp as tftp_server
from sidusctl.serve import tftp_client, tftp_transfer
from sidusctl.serve import tftp_codec as tc
from sidusctl.serve.dhcp_codec import MalformedPacket
from sidusctl.serve.tftp import TftpConfig, TftpServer
from tests.fuzz_util import mutations

# -- codec --------------------------------------------------------------------------------------


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


VALID = [b"\x00\x01pxelinux.0\x00octet\x00blksize\x001468\x00tsize\x000\x00",
         b"\x00\x04\x00\x01", b"\x00\x05\x00\x08cancel\x00", b"\x00\x03\x00\x01data",
         b"\x00\x02up\x00octet\x00"]


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


# -- a live server on loopback -------------------------------------------------------------------

T = TypeVar("T")


class Live:
    """The server running on its own event loop in a thread."""

    def __init__(self, root: Path, **kw: object) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        cfg = TftpConfig(root=root, address="127.0.0.1", port=0, **kw)  # type: ignore[arg-type]

        async def make() -> TftpServer:
            s = TftpServer(cfg)
            await s.start()
            return s

        self.server = asyncio.run_coroutine_threadsafe(make(), self.loop).result(5)
        self.port = self.server.port

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a client coroutine on a separate loop in this thread."""
        return asyncio.run(coro)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("tftproot")
    (r / "small.bin").write_bytes(os.urandom(70_001))
    (r / "exact.bin").write_bytes(os.urandom(1468 * 20))  # ends with an empty DATA block
    (r / "pxelinux.cfg").mkdir()
    (r / "pxelinux.cfg" / "default").write_text("DEFAULT linux\n")
    big = r / "big.bin"
    with big.open("wb") as f:  # 33 MiB + 1 byte: block numbers roll over at blksize 512
        chunk = os.urandom(1 << 20)
        for i in range(33):
            f.write(bytes([i]) + chunk[1:])
        f.write(b"x")
    (r / "escape").symlink_to("/etc/passwd")
    (r / "escapedir").symlink_to("/etc")
    (r / "inside").symlink_to("small.bin")
    return r


@pytest.fixture(scope="module")
def live(root: Path) -> Iterator[Live]:
    lv = Live(root)
    yield lv
    lv.close()
    assert lv.server.stats.internal_errors == 0, "the server hit a bug (see the logged traceback)"


def sha(p: Path | bytes) -> str:
    return hashlib.sha256(p if isinstance(p, bytes) else p.read_bytes()).hexdigest()


@pytest.mark.parametrize("blksize", [None, 8, 1468, 8192, 65464])
def test_curl_fetches_with_blksizes(live: Live, root: Path, tmp_path: Path,
                                    blksize: int | None) -> None:
    out = tmp_path / "out"
    argv = ["curl", "-sS", "--max-time", "60", "-o", str(out)]
    if blksize:
        argv += ["--tftp-blksize", str(blksize)]
    name = "exact.bin" if blksize == 1468 else "small.bin"
    subprocess.run([*argv, f"tftp://127.0.0.1:{live.port}/{name}"], check=True)
    assert sha(out) == sha(root / name)


def test_tftp_hpa_fetches(live: Live, root: Path, tmp_path: Path) -> None:
    # tftp-hpa 5.2's client has no blksize option: RFC 1350 512-byte blocks
    out = tmp_path / "out"
    r = subprocess.run(["tftp", "-m", "binary", "127.0.0.1", str(live.port),
                        "-c", "get", "small.bin", str(out)],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert sha(out) == sha(root / "small.bin")


@pytest.mark.parametrize(("blksize", "window"), [(512, None), (1468, None), (1468, 16),
                                                 (8192, 4)])
def test_atftp_fetches_with_blksize_and_windowsize(live: Live, root: Path, tmp_path: Path,
                                                   blksize: int, window: int | None) -> None:
    out = tmp_path / "out"
    argv = ["atftp", "--option", f"blksize {blksize}", "--option", "tsize 0"]
    if window:
        argv += ["--option", f"windowsize {window}"]
    r = subprocess.run([*argv, "-g", "-r", "pxelinux.cfg/default" if blksize == 512 else "small.bin",
                        "-l", str(out), "127.0.0.1", str(live.port)],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sha(out) == sha(root / ("pxelinux.cfg/default" if blksize == 512 else "small.bin"))


def test_file_over_32_mib_rolls_block_numbers_over(live: Live, root: Path, tmp_path: Path) -> None:
    out = tmp_path / "big"
    subprocess.run(["curl", "-sS", "--max-time", "120", "-o", str(out),
                    f"tftp://127.0.0.1:{live.port}/big.bin"], check=True)
    assert out.stat().st_size == 33 * (1 << 20) + 1 > 65535 * 512
    assert sha(out) == sha(root / "big.bin")


def test_windowsize_with_our_client(live: Live, root: Path) -> None:
    res = live.run(tftp_client.fetch("127.0.0.1", "small.bin", port=live.port, blksize=1468,
                                     windowsize=16, tsize=True))
    assert isinstance(res, tftp_client.FetchResult)
    assert res.options == {"blksize": "1468", "windowsize": "16", "tsize": "70001"}
    assert sha(res.data) == sha(root / "small.bin")


@pytest.mark.parametrize("name", ["../etc/passwd", "/etc/passwd", "pxelinux.cfg/../../x",
                                  "escape", "escapedir/passwd"])
def test_traversal_gets_error_2_and_a_log_line(live: Live, name: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="sidusctl.serve.tftp"):
        ans = live.run(tftp_client.send_raw("127.0.0.1", live.port,
                                            tc.encode_request(tc.RRQ, name)))
        assert tftp_client.error_code(ans) == tc.E_ACCESS
    assert any(name in r.getMessage() and "denied" in r.getMessage() for r in caplog.records)


def test_traversal_with_tftp_hpa(live: Live, tmp_path: Path) -> None:
    r = subprocess.run(["tftp", "-m", "binary", "127.0.0.1", str(live.port), "-c", "get",
                        "../../etc/passwd", str(tmp_path / "p")],
                       capture_output=True, text=True, timeout=30, check=False)
    assert "Error code 2" in r.stdout + r.stderr


def test_leading_slash_names_a_file_of_the_tree(live: Live, root: Path) -> None:
    # GRUB asks for /grub/grub.cfg-01-<mac> under its prefix: a file of the tree is served
    res = live.run(tftp_client.fetch("127.0.0.1", "/small.bin", port=live.port))
    assert isinstance(res, tftp_client.FetchResult) and sha(res.data) == sha(root / "small.bin")
    # a missing one is refused as any absolute name outside the tree (error 2, not 1)
    ans = live.run(tftp_client.send_raw("127.0.0.1", live.port,
                                        tc.encode_request(tc.RRQ, "/no-such-file")))
    assert tftp_client.error_code(ans) == tc.E_ACCESS


def test_symlink_inside_root_is_served(live: Live, root: Path) -> None:
    res = live.run(tftp_client.fetch("127.0.0.1", "inside", port=live.port))
    assert isinstance(res, tftp_client.FetchResult) and sha(res.data) == sha(root / "small.bin")


def test_missing_file_is_error_1(live: Live) -> None:
    with pytest.raises(tftp_client.TftpClientError) as e:
        live.run(tftp_client.fetch("127.0.0.1", "pxelinux.cfg/01-52-54-00-00-00-01",
                                   port=live.port))
    assert e.value.code == tc.E_NOT_FOUND


def test_wrq_refused(live: Live, tmp_path: Path, root: Path) -> None:
    src = tmp_path / "upload"
    src.write_text("x")
    r = subprocess.run(["tftp", "-m", "binary", "127.0.0.1", str(live.port), "-c", "put",
                        str(src), "upload"], capture_output=True, text=True, timeout=30, check=False)
    assert "Error code 2" in r.stdout + r.stderr
    assert not (root / "upload").exists()
    before = live.server.stats.wrq_refused
    ans = live.run(tftp_client.send_raw("127.0.0.1", live.port, tc.encode_request(tc.WRQ, "x")))
    assert tftp_client.error_code(ans) == tc.E_ACCESS
    assert live.server.stats.wrq_refused == before + 1


def test_many_transfers_at_once(live: Live, root: Path) -> None:
    async def many() -> list[tftp_client.FetchResult]:
        return await asyncio.gather(*[
            tftp_client.fetch("127.0.0.1", "small.bin", port=live.port, blksize=1468,
                              windowsize=(i % 3) * 4 or None) for i in range(60)])
    results = live.run(many())
    assert isinstance(results, list) and len(results) == 60
    want = sha(root / "small.bin")
    assert all(sha(r.data) == want for r in results)


def test_malformed_datagrams_dropped_counted_and_server_keeps_serving(live: Live,
                                                                      root: Path) -> None:
    before = live.server.stats.malformed
    junk = [b"", b"\x00", b"\x00\x09zzzz", b"\x00\x01noterminator", b"\x00\x04\x00\x01",
            b"\x00\x01f\x00octet\x00blksize\x00"] + [os.urandom(n) for n in (3, 40, 600)]

    async def spray() -> None:
        for j in junk:
            assert await tftp_client.send_raw("127.0.0.1", live.port, j, wait=0.05) is None
    live.run(spray())
    res = live.run(tftp_client.fetch("127.0.0.1", "small.bin", port=live.port))
    assert isinstance(res, tftp_client.FetchResult) and sha(res.data) == sha(root / "small.bin")
    # the RRQ came after the junk on the same socket: all of it has been counted by now
    assert live.server.stats.malformed >= before + 7


def test_huge_blksize_clamped_and_served(live: Live, root: Path) -> None:
    res = live.run(tftp_client.fetch("127.0.0.1", "small.bin", port=live.port, blksize=99_999_999))
    assert isinstance(res, tftp_client.FetchResult)
    assert res.options["blksize"] == "65464" and sha(res.data) == sha(root / "small.bin")


def test_retransmission_backs_off() -> None:
    """RFC 1123 section 4.2.3.2 (adaptive timeout): each retransmission waits twice the one
    before, up to MAX_BACKOFF, never less than the timeout a client asked for (RFC 2349)."""
    assert [tftp_server.retransmit_wait(1.0, n) for n in range(6)] == [1, 2, 4, 8, 8, 8]
    assert [tftp_server.retransmit_wait(0.2, n) for n in range(3)] == [0.2, 0.4, 0.8]
    assert tftp_server.retransmit_wait(20.0, 3) == 20.0
    assert tftp_server.retransmit_wait(1.0, 1000) == tftp_server.MAX_BACKOFF


def test_retransmission_is_bounded(root: Path) -> None:
    lv = Live(root, timeout=0.2, retries=3)
    try:
        async def silent_client() -> int:
            loop = asyncio.get_running_loop()
            got: list[bytes] = []

            class P(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                    got.append(data)
                    arrived.append(time.monotonic())
            tr, _ = await loop.create_datagram_endpoint(P, local_addr=("127.0.0.1", 0))
            tr.sendto(tc.encode_request(tc.RRQ, "small.bin"), ("127.0.0.1", lv.port))
            for _ in range(200):  # never ACK; wait for the server to give up
                if lv.server.stats.failed:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # nothing more may come after giving up
            tr.close()
            return len(got)
        arrived: list[float] = []
        n = lv.run(silent_client())
        assert n == 4  # DATA 1 and exactly 3 retransmissions
        # backed off: 0.2 s, then 0.4 s, then 0.8 s (a lower bound: a busy machine only
        # makes the gaps longer)
        assert arrived[-1] - arrived[0] >= 0.2 + 0.4 + 0.8 - 0.05, arrived
        assert lv.server.stats.failed == 1 and lv.server.stats.retransmits == 3
        assert lv.server.stats.active == 0

        async def lossy_client() -> bytes:
            # drops the first copy of block 2: the server must resend it after the timeout
            loop = asyncio.get_running_loop()
            q: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

            class P(asyncio.DatagramProtocol):
                def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                    q.put_nowait((data, addr))
            tr, _ = await loop.create_datagram_endpoint(P, local_addr=("127.0.0.1", 0))
            tr.sendto(tc.encode_request(tc.RRQ, "small.bin"), ("127.0.0.1", lv.port))
            out, dropped, block = [], False, 1
            while True:
                data, addr = await asyncio.wait_for(q.get(), 3)
                p = tc.parse(data)
                assert isinstance(p, tc.Data)
                if p.block == 2 and not dropped:
                    dropped = True
                    continue
                if p.block == block:
                    out.append(p.payload)
                    tr.sendto(tc.encode_ack(block), addr)
                    block += 1
                    if len(p.payload) < 512:
                        tr.close()
                        return b"".join(out)
        data = lv.run(lossy_client())
        assert sha(data) == sha(root / "small.bin")
        deadline = time.monotonic() + 5
        while lv.server.stats.active and time.monotonic() < deadline:
            time.sleep(0.02)  # the final ACK is handled on the server's thread
        assert lv.server.stats.retransmits == 4 and lv.server.stats.completed == 1
    finally:
        lv.close()


def _spray(port: int, batch: list[bytes]) -> None:
    """Send ``batch`` to the request port from a socket closed right after (transfers it starts
    meet ICMP port unreachable and fail, as they would for a vanished client)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for d in batch:
            s.sendto(d, ("127.0.0.1", port))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(st.one_of(st.binary(max_size=120), mutated), min_size=1, max_size=20))
def test_fuzz_live_server(live: Live, root: Path, batch: list[bytes]) -> None:
    # through the real request socket, then a real transfer: loopback keeps the order, so
    # when the transfer is done every datagram of the batch has been handled
    st0 = live.server.stats
    requests, malformed = st0.requests, st0.malformed
    _spray(live.port, batch)
    res = live.run(tftp_client.fetch("127.0.0.1", "pxelinux.cfg/default", port=live.port))
    assert isinstance(res, tftp_client.FetchResult)
    assert res.data == (root / "pxelinux.cfg" / "default").read_bytes()
    assert live.server.stats.internal_errors == 0, "the server hit a bug (see the traceback)"
    # each datagram is either a request or counted malformed (+1: our own RRQ)
    assert (live.server.stats.requests - requests) + (live.server.stats.malformed - malformed) \
        == len(batch) + 1


def test_server_still_serves_after_fuzz(live: Live, root: Path) -> None:
    res = live.run(tftp_client.fetch("127.0.0.1", "small.bin", port=live.port, windowsize=8))
    assert isinstance(res, tftp_client.FetchResult) and sha(res.data) == sha(root / "small.bin")
    assert live.server.stats.internal_errors == 0


def _wait_for(cond: object, secs: float = 10) -> None:
    deadline = time.monotonic() + secs
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.02)


def test_an_injected_bug_is_counted_as_internal_not_malformed(
        root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    lv = Live(root)
    try:
        real = lv.server._handle
        calls = []

        def buggy_handle(*a: object) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected bug in the request handler")
            real(*a)  # type: ignore[arg-type]
        monkeypatch.setattr(lv.server, "_handle", buggy_handle)
        with caplog.at_level(logging.ERROR, logger="sidusctl"):
            _spray(lv.port, [tc.encode_request(tc.RRQ, "small.bin")])
            res = lv.run(tftp_client.fetch("127.0.0.1", "small.bin", port=lv.port))
            assert isinstance(res, tftp_client.FetchResult)  # the server went on
            assert lv.server.stats.internal_errors == 1 and lv.server.stats.malformed == 0
            # the client is done at its last ACK, the server once it has read it: wait for
            # that before the bug goes in (else that last ACK meets the bug)
            _wait_for(lambda: lv.server.stats.active == 0)
            assert lv.server.stats.completed == 1

            # a bug inside a running transfer (its ACK handler, which every ACK goes
            # through): that transfer is abandoned and counted, the loop and the other
            # transfers are unharmed
            def buggy_ack(self: object, block: int) -> None:
                raise RuntimeError("injected bug in a transfer")
            monkeypatch.setattr(tftp_transfer.Transfer, "_on_ack", buggy_ack)
            with pytest.raises(tftp_client.TftpClientError):
                lv.run(tftp_client.fetch("127.0.0.1", "small.bin", port=lv.port, timeout=0.3,
                                         retries=1))
            _wait_for(lambda: lv.server.stats.internal_errors == 2)
            assert lv.server.stats.internal_errors == 2
            _wait_for(lambda: lv.server.stats.active == 0)
            assert lv.server.stats.active == 0 and lv.server.stats.failed >= 1
        bugs = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
        assert [str(r.exc_info[1]) for r in bugs if r.exc_info] == [
            "injected bug in the request handler", "injected bug in a transfer"]
        monkeypatch.undo()
        res = lv.run(tftp_client.fetch("127.0.0.1", "small.bin", port=lv.port, windowsize=4))
        assert isinstance(res, tftp_client.FetchResult) and sha(res.data) == sha(root / "small.bin")
        assert lv.server.stats.internal_errors == 2
    finally:
        lv.close()


def test_window_with_a_lost_block_resends_from_the_gap(live: Live, root: Path) -> None:
    """RFC 7440 section 4: the client ACKs the last block it has in order; the server goes on
    from there (here block 3 of a window of 4 is dropped once)."""
    async def client() -> tuple[bytes, int]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

        class P(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                q.put_nowait((data, addr))
        tr, _ = await loop.create_datagram_endpoint(P, local_addr=("127.0.0.1", 0))
        tr.sendto(tc.encode_request(tc.RRQ, "small.bin", "octet",
                                    {"blksize": "1024", "windowsize": "4"}), ("127.0.0.1", live.port))
        data, addr = await asyncio.wait_for(q.get(), 3)
        assert tc.parse(data) == tc.Oack({"blksize": "1024", "windowsize": "4"})
        tr.sendto(tc.encode_ack(0), addr)
        out, expect, dropped, gaps, in_window = [], 1, False, 0, 0
        while True:
            data, _ = await asyncio.wait_for(q.get(), 3)
            p = tc.parse(data)
            assert isinstance(p, tc.Data)
            if p.block == 3 and not dropped:
                dropped = True
                continue
            if p.block != expect:
                if p.block > expect:  # a gap: say what we have, once per window
                    gaps += 1
                    tr.sendto(tc.encode_ack(expect - 1), addr)
                    # drain the rest of this window
                    while not q.empty():
                        q.get_nowait()
                    in_window = 0
                continue
            out.append(p.payload)
            expect += 1
            in_window += 1
            if len(p.payload) < 1024:
                tr.sendto(tc.encode_ack(p.block), addr)
                tr.close()
                return b"".join(out), gaps
            if in_window == 4:
                tr.sendto(tc.encode_ack(p.block), addr)
                in_window = 0
    got: tuple[bytes, int] = live.run(client())
    assert got[1] >= 1  # gaps seen
    assert sha(got[0]) == sha(root / "small.bin")


# -- a client that repeats its RRQ (its timer fired before our first packet reached it) ---------

def test_a_repeated_rrq_is_served_by_the_running_transfer(
        root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """pxelinux under load sent its RRQ again from the same port before the OACK reached it (a
    CI run): one transfer serves it from one server port, its first packet sent again while
    nothing is acknowledged and the copy dropped later; no second transfer races the first
    towards the same client port. A request for another file from that port ends the old
    transfer and starts the new one."""
    lv = Live(root, timeout=5, retries=3)
    caplog.set_level(logging.INFO, logger="sidusctl")
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        c.settimeout(5)
        c.bind(("127.0.0.1", 0))
        rrq = tc.encode_request(tc.RRQ, "small.bin", options={"blksize": "1024", "tsize": "0"})
        c.sendto(rrq, ("127.0.0.1", lv.port))
        first, tid = c.recvfrom(2048)
        assert isinstance(tc.parse(first), tc.Oack)
        c.sendto(rrq, ("127.0.0.1", lv.port))  # the OACK is "late": ask again
        again, tid2 = c.recvfrom(2048)
        assert again == first and tid2 == tid  # the same OACK from the same transfer
        assert (lv.server.stats.requests, lv.server.stats.repeated) == (2, 1)
        assert lv.server.stats.active == 1
        c.sendto(tc.encode_ack(0), tid)
        out, block = [], 1
        while True:
            data, addr = c.recvfrom(2048)
            p = tc.parse(data)
            assert isinstance(p, tc.Data) and addr == tid
            if p.block != block:
                continue
            if block == 3:  # mid-transfer: a stale copy is dropped, nothing is resent
                c.sendto(rrq, ("127.0.0.1", lv.port))
            out.append(p.payload)
            c.sendto(tc.encode_ack(block), tid)
            block += 1
            if len(p.payload) < 1024:
                break
        assert sha(b"".join(out)) == sha(root / "small.bin")
        _wait_for(lambda: lv.server.stats.active == 0)
        st_ = lv.server.stats
        assert (st_.requests, st_.repeated, st_.completed, st_.failed, st_.retransmits) == \
            (3, 2, 1, 0, 0)
        assert caplog.text.count("repeated while its transfer runs (first packet sent again)") == 1
        assert caplog.text.count("repeated while its transfer runs (ignored)") == 1

        # another file from the same port: the old transfer is given up, the new one served
        c.sendto(tc.encode_request(tc.RRQ, "small.bin"), ("127.0.0.1", lv.port))
        d1, old = c.recvfrom(2048)
        assert isinstance(tc.parse(d1), tc.Data)
        c.sendto(tc.encode_request(tc.RRQ, "pxelinux.cfg/default"), ("127.0.0.1", lv.port))
        while True:  # a retransmission from the old transfer may still be in flight
            data, addr = c.recvfrom(2048)
            if addr != old:
                break
        p = tc.parse(data)
        assert isinstance(p, tc.Data) and p.payload == (root / "pxelinux.cfg/default").read_bytes()
        c.sendto(tc.encode_ack(1), addr)
        _wait_for(lambda: lv.server.stats.active == 0)
        assert (lv.server.stats.completed, lv.server.stats.aborted) == (2, 1)
        assert "'small.bin' ended by the client: the client asked for " \
            "'pxelinux.cfg/default' from the same port" in caplog.text
        assert lv.server.stats.internal_errors == 0
    finally:
        c.close()
        lv.close()


def test_per_client_limit_refuses_another_port_not_a_repeat_nor_a_new_file(
        root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``max_per_client`` 1: a second port of the same host gets error 0 "server busy"
    (counted in ``refused``, a warning logged); the RRQ repeated from the running transfer's
    port is served by it, and another file from that port replaces the old transfer, as
    neither adds a transfer."""
    lv = Live(root, timeout=5, retries=3, max_per_client=1)
    caplog.set_level(logging.INFO, logger="sidusctl")
    a, b = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    try:
        for c in (a, b):
            c.settimeout(5)
            c.bind(("127.0.0.1", 0))
        rrq = tc.encode_request(tc.RRQ, "small.bin")
        a.sendto(rrq, ("127.0.0.1", lv.port))
        assert isinstance(tc.parse(a.recvfrom(2048)[0]), tc.Data)
        b.sendto(rrq, ("127.0.0.1", lv.port))
        err = tc.parse(b.recvfrom(2048)[0])
        assert isinstance(err, tc.Error) and err.message == "server busy"
        assert "transfers from this client (max_per_client)" in caplog.text
        a.sendto(rrq, ("127.0.0.1", lv.port))  # a repeat: DATA 1 again, not refused
        assert isinstance(tc.parse(a.recvfrom(2048)[0]), tc.Data)
        a.sendto(tc.encode_request(tc.RRQ, "pxelinux.cfg/default"), ("127.0.0.1", lv.port))
        while True:  # past any DATA 1 of the old transfer still on its way
            data, addr = a.recvfrom(2048)
            p = tc.parse(data)
            assert isinstance(p, tc.Data)
            if p.payload == (root / "pxelinux.cfg/default").read_bytes():
                break
        a.sendto(tc.encode_ack(1), addr)
        _wait_for(lambda: lv.server.stats.active == 0)
        st_ = lv.server.stats
        assert (st_.refused, st_.repeated, st_.aborted, st_.completed) == (1, 1, 1, 1)
        assert st_.internal_errors == 0
    finally:
        a.close()
        b.close()
        lv.close()


# -- a client that closes its port (ICMP port unreachable, RFC 1350 section 6) -------------------

def _closing_client(lv: Live, name: str) -> tuple[socket.socket, tuple[str, int]]:
    """A client socket that sent an RRQ for ``name`` (no options: lock-step, 512-byte
    blocks) and received DATA 1; returned open with the server's TID address."""
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(5)
    c.bind(("127.0.0.1", 0))
    c.sendto(tc.encode_request(tc.RRQ, name), ("127.0.0.1", lv.port))
    data, addr = c.recvfrom(1024)
    p = tc.parse(data)
    assert isinstance(p, tc.Data) and p.block == 1
    return c, addr


def test_client_closing_after_the_final_block_without_its_ack_completed_it(
        root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A boot loader that took the final block and handed over to its kernel before its final
    ACK arrived (GRUB under load in a CI run): the retransmission of the final block meets a
    closed port. The transfer is complete, logged as sent with the missing ACK, not failed;
    a client that leaves before the final block did fail."""
    lv = Live(root, timeout=0.2, retries=3)
    caplog.set_level(logging.INFO, logger="sidusctl")
    try:
        c, _ = _closing_client(lv, "pxelinux.cfg/default")  # one block: the final one
        c.close()  # no ACK
        _wait_for(lambda: lv.server.stats.active == 0)
        assert (lv.server.stats.completed, lv.server.stats.failed) == (1, 0)
        assert lv.server.stats.retransmits >= 1  # the one that met the closed port
        assert "sent 'pxelinux.cfg/default'" in caplog.text
        assert "the final ACK not seen" in caplog.text and "Connection refused" in caplog.text

        c, _ = _closing_client(lv, "small.bin")  # 137 blocks: left after the first
        c.close()
        _wait_for(lambda: lv.server.stats.active == 0)
        assert (lv.server.stats.completed, lv.server.stats.failed) == (1, 1)
        assert "'small.bin' failed: client unreachable: Connection refused" in caplog.text
        assert lv.server.stats.internal_errors == 0
    finally:
        lv.close()


def test_final_ack_queued_behind_a_port_unreachable_is_read(
        root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Linux reports a pending ICMP error on a connected UDP socket before the datagrams
    already queued: the final ACK that arrived after it is still read, and the transfer is
    complete without a note. The server's loop is held while the error and the ACK are
    arranged: a retransmission of DATA 1 (on the transfer's own socket, as the timer would)
    to the closed client port, then the client's ACK from a socket bound again to that port."""
    lv = Live(root, timeout=5, retries=3)
    caplog.set_level(logging.INFO, logger="sidusctl")
    hold, held = threading.Event(), threading.Event()

    def block_loop() -> None:
        held.set()
        hold.wait(10)
    try:
        c, server_tid = _closing_client(lv, "pxelinux.cfg/default")
        port = c.getsockname()[1]
        lv.loop.call_soon_threadsafe(block_loop)
        assert held.wait(5)
        c.close()
        (t,) = lv.server._transfers.values()
        t.sock.send(t._block(1))  # meets the closed port: ICMP port unreachable
        time.sleep(0.2)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind(("127.0.0.1", port))
            again.sendto(tc.encode_ack(1), server_tid)
            time.sleep(0.2)
            hold.set()
            _wait_for(lambda: lv.server.stats.active == 0)
        assert (lv.server.stats.completed, lv.server.stats.failed) == (1, 0)
        assert "sent 'pxelinux.cfg/default'" in caplog.text
        assert "final ACK not seen" not in caplog.text
    finally:
        hold.set()
        lv.close()


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


def test_a_replaced_file_is_served_new_and_uncached_files_still_are(
        live: Live, root: Path, tmp_path: Path) -> None:
    """The packets are cached by inode, size and modification time: a file replaced between
    two transfers is served with its new content. With the cache off (a file over its
    limit) the blocks are read from the file, as before."""
    f = root / "replaced.bin"
    for content in (os.urandom(5000), os.urandom(7000)):
        tmp = root / "replaced.tmp"
        tmp.write_bytes(content)
        tmp.rename(f)
        out = tmp_path / "replaced"
        subprocess.run(["curl", "-sS", "--max-time", "60", "--tftp-blksize", "1468", "-o",
                        str(out), f"tftp://127.0.0.1:{live.port}/replaced.bin"], check=True)
        assert out.read_bytes() == content
    assert live.server.cache.misses >= 2
    cache = live.server.cache
    saved = cache.max_file
    cache.max_file = 0
    try:
        for name in ("small.bin", "exact.bin"):
            res = live.run(tftp_client.fetch("127.0.0.1", name, port=live.port, blksize=1468))
            assert isinstance(res, tftp_client.FetchResult)
            assert sha(res.data) == sha(root / name)
    finally:
        cache.max_file = saved
