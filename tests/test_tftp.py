"""TFTP: the real clients (curl, tftp-hpa, atftp) and our windowsize client against the
server on loopback: blksizes, rollover past 32 MiB, traversal refused with error 2, WRQ
refused, retransmission, many transfers at once, a window with a lost block, a replaced
file. A hypothesis fuzz of the live server checks its counters and health after each
batch (every datagram accounted for, no internal error, a real transfer still works); an
injected bug proves the internal error counter is honest. Clients that repeat, close or
go away: tests/test_tftp_quirks.py; the codec and the packet cache:
tests/test_tftp_codec.py."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidusctl.serve import tftp as tftp_server
from sidusctl.serve import tftp_client, tftp_transfer
from sidusctl.serve import tftp_codec as tc
from tests.fuzz_util import mutations
from tests.tftp_util import VALID, Live, make_root, sha, wait_for

mutated = mutations(VALID)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_root(tmp_path_factory.mktemp("tftproot"))


@pytest.fixture(scope="module")
def live(root: Path) -> Iterator[Live]:
    lv = Live(root)
    yield lv
    lv.close()
    assert lv.server.stats.internal_errors == 0, "the server hit a bug (see the logged traceback)"


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
            wait_for(lambda: lv.server.stats.active == 0)
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
            wait_for(lambda: lv.server.stats.internal_errors == 2)
            assert lv.server.stats.internal_errors == 2
            wait_for(lambda: lv.server.stats.active == 0)
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
