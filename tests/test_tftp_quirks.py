"""TFTP clients seen misbehaving on loaded machines, against the server on loopback: an RRQ
repeated from the port of a running transfer, the per-client limit, a client that
closes its port after the final block without its ACK, and a final ACK queued behind
an ICMP port unreachable."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from sidusctl.serve import tftp_codec as tc
from tests.tftp_util import Live, make_root, sha, wait_for


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_root(tmp_path_factory.mktemp("tftproot"))


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
        wait_for(lambda: lv.server.stats.active == 0)
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
        wait_for(lambda: lv.server.stats.active == 0)
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
        wait_for(lambda: lv.server.stats.active == 0)
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
        wait_for(lambda: lv.server.stats.active == 0)
        assert (lv.server.stats.completed, lv.server.stats.failed) == (1, 0)
        assert lv.server.stats.retransmits >= 1  # the one that met the closed port
        assert "sent 'pxelinux.cfg/default'" in caplog.text
        assert "the final ACK not seen" in caplog.text and "Connection refused" in caplog.text

        c, _ = _closing_client(lv, "small.bin")  # 137 blocks: left after the first
        c.close()
        wait_for(lambda: lv.server.stats.active == 0)
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
            wait_for(lambda: lv.server.stats.active == 0)
        assert (lv.server.stats.completed, lv.server.stats.failed) == (1, 0)
        assert "sent 'pxelinux.cfg/default'" in caplog.text
        assert "final ACK not seen" not in caplog.text
    finally:
        hold.set()
        lv.close()


