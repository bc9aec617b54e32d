"""One TFTP read transfer (RRQ) being served by :class:`sidusctl.serve.tftp.TftpServer`: its
own connected socket (the server's new TID, RFC 1350 section 4), lock-step (RFC 1350) or a
window of blocks (RFC 7440), blocks of ``blksize`` (RFC 2348) read ahead from the file, the
ACK handling (duplicate ACKs ignored in lock-step, RFC 1123 4.2.3.1) and the retransmission
timer with backoff (:func:`~sidusctl.serve.tftp_config.retransmit_wait`). A file in the
server's :class:`~sidusctl.serve.tftp_cache.PacketCache` is sent from its prebuilt packets. The
server owns the event loop, the epoll set, the receive buffer, the counters and the end of a
transfer (``_finish``)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sidusctl.serve import tftp_codec as tc
from sidusctl.serve.dhcp_codec import MalformedPacket
from sidusctl.serve.tftp_config import retransmit_wait

if TYPE_CHECKING:
    from sidusctl.serve.tftp import TftpServer

_ACK_PREFIX = b"\x00\x04"
#: bytes a transfer socket reads per datagram (the server's receive buffer): an ACK is 4 bytes
#: (RFC 1350 section 5), an ERROR a few dozen (a longer one is cut, found malformed and counted)
ACK_MAX = 1500
_READAHEAD = 64 << 10
_READAHEAD_MAX = 1 << 20
_monotonic = time.monotonic


class Transfer:
    """One RRQ being served: a connected socket to the client's TID, a window of blocks."""

    __slots__ = ("acked", "addr", "blksize", "buf", "buf_off", "fd", "filename", "high", "last_progress",
                 "nblocks", "next_send", "oack", "packets", "sent_final", "server", "size", "sock",
                 "started", "timeout", "tries", "waiting_writer", "window")

    def __init__(self, server: TftpServer, sock: socket.socket, addr: tuple[str, int],
                 filename: str, fd: int, data: bytes | None, size: int,
                 neg: tc.Negotiated, packets: list[bytes] | None = None) -> None:
        """``fd``: the open file, read ahead block by block (-1 when ``data``, netascii
        content converted up front, or ``packets``, every DATA packet of the file at
        ``neg.blksize`` (:func:`~sidusctl.serve.tftp_cache.build_packets`), is given)."""
        self.server = server
        self.sock = sock
        self.addr = addr
        self.filename = filename
        self.fd = fd
        # netascii content is converted in memory up front; octet files are read ahead
        self.buf = memoryview(data if data is not None else b"")
        self.buf_off = 0
        self.packets = packets
        self.size = size
        self.blksize = neg.blksize
        self.window = neg.windowsize
        self.timeout = neg.timeout
        self.oack = tc.encode_oack(neg.oack) if neg.oack else None
        self.nblocks = size // self.blksize + 1  # the last block is short, maybe empty
        self.acked = 0  # absolute number of the last block the client acknowledged
        self.high = 0  # highest block sent in the current window
        self.next_send = 1
        self.sent_final = False  # the final (short) block went out at least once
        self.tries = 0
        self.waiting_writer = False
        self.started = self.last_progress = time.monotonic()

    # -- sending ---------------------------------------------------------------------------

    def start(self) -> None:
        """Send the OACK when options were accepted (RFC 2347), else the first window of DATA
        blocks (one block in lock-step, RFC 1350; ``windowsize`` blocks, RFC 7440)."""
        if self.oack is not None:
            self._send_raw(self.oack)
        else:
            self._send_window()

    def _block(self, n: int) -> bytes:
        if self.packets is not None:
            return self.packets[n - 1]
        off = (n - 1) * self.blksize
        rel = off - self.buf_off
        end = rel + self.blksize
        if rel < 0 or (end > len(self.buf) and self.buf_off + len(self.buf) < self.size):
            # read ahead: one pread serves many blocks (fewer syscalls per DATA packet)
            want = min(max(_READAHEAD, self.blksize * self.window * 2), _READAHEAD_MAX)
            want = max(want - want % self.blksize, self.blksize)
            self.buf = memoryview(os.pread(self.fd, want, off))
            self.buf_off, rel, end = off, 0, self.blksize
        return tc.encode_data(n, self.buf[rel:end])

    def _send_raw(self, pkt: bytes) -> bool:
        try:
            self.sock.send(pkt)
            return True
        except BlockingIOError:
            return False
        except ConnectionRefusedError as e:  # ICMP port unreachable from an earlier send
            self._client_gone(e)
            return False
        except OSError as e:
            self.server._finish(self, ok=False, why=f"send failed: {e.strerror}")
            return False

    def _send_window(self) -> None:
        self.next_send = self.acked + 1
        self.high = min(self.acked + self.window, self.nblocks)
        self._pump()

    def _pump(self) -> None:
        while self.next_send <= self.high:
            pkt = self._block(self.next_send)
            try:
                self.sock.send(pkt)
            except BlockingIOError:
                if not self.waiting_writer:
                    self.waiting_writer = True
                    self.server.loop.add_writer(self.sock.fileno(), self.guarded(self._writable))
                return
            except ConnectionRefusedError as e:
                self._client_gone(e)
                return
            except OSError as e:
                self.server._finish(self, ok=False, why=f"send failed: {e.strerror}")
                return
            self.server.stats.bytes_sent += len(pkt) - 4
            if self.next_send == self.nblocks:
                self.sent_final = True
            self.next_send += 1

    def _writable(self) -> None:
        self.waiting_writer = False
        self.server.loop.remove_writer(self.sock.fileno())
        self._pump()

    def guarded(self, fn: Callable[[], None]) -> Callable[[], None]:
        """``fn`` (a loop callback of this transfer) wrapped so that a bug in it is counted as an
        internal error and ends this transfer instead of escaping into the event loop."""
        def call() -> None:
            try:
                fn()
            except Exception:
                self.server._internal_error(self, f"{fn.__name__} of {self.filename!r}")
        return call

    # -- receiving -------------------------------------------------------------------------

    def readable(self) -> None:
        """Read one datagram from the client: an ACK moves the transfer on, an ERROR ends it as
        aborted (RFC 1350 section 5), anything else counts as ``malformed``; an ICMP error (the
        client gone) ends it, as complete if the final block was sent."""
        # one datagram per call: the loop is level-triggered and calls again if more wait,
        # and in lock-step the next ACK cannot be there yet (a second recv would only fail);
        # read into the server's buffer (no new bytes object per ACK)
        buf = self.server.rbuf
        try:
            n = self.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # ECONNREFUSED: the client went away
            self._client_gone(e)
            return
        if n == 4 and buf[1] == 4 and buf[0] == 0:  # ACK (opcode 4)
            self._on_ack((buf[2] << 8) | buf[3])
            return
        try:
            p = tc.parse(bytes(buf[:n]))
        except MalformedPacket:
            self.server.stats.malformed += 1
            return
        if isinstance(p, tc.Error):
            self.server._finish(self, ok=False, aborted=True,
                                why=f"client sent error {p.code} ({p.message})")
            return
        self.server.stats.malformed += 1  # anything but ACK/ERROR is out of place

    def _client_gone(self, e: OSError) -> None:
        """The socket reported an ICMP error (port unreachable: ``ECONNREFUSED``) for a datagram
        sent earlier. Linux reports it before the datagrams already queued, so the final ACK
        may still be waiting behind it: those are read first. A client whose port is closed
        once the final block was sent took it and left (RFC 1350 section 6: "the host
        acknowledging the final DATA packet may terminate its side of the connection on
        sending the final ACK"; if that ACK is lost, a retransmission of the final block meets
        the closed port, or the kernel the boot loader handed over to): the transfer is
        complete, logged with the missing ACK. Before the final block it failed."""
        while self.server._transfers.get(self.sock.fileno()) is self:
            try:
                pkt = self.sock.recv(ACK_MAX)
            except OSError:  # nothing more queued (or another error): decide below
                break
            if len(pkt) == 4 and pkt[:2] == _ACK_PREFIX:
                self._on_ack((pkt[2] << 8) | pkt[3])
        if self.server._transfers.get(self.sock.fileno()) is not self:
            return  # a queued ACK completed it
        if self.sent_final:
            self.server._finish(self, ok=True, why=f"the final ACK not seen, the client closed "
                                f"its port after the final block ({e.strerror})")
        else:
            self.server._finish(self, ok=False, why=f"client unreachable: {e.strerror}")

    def _next_in_lock_step(self, h: int) -> None:
        """Lock-step's common case, kept short (it runs once per block of every transfer):
        block ``h``, the one in flight and not the last, is acknowledged; send ``h + 1``.
        The same as the rest of :meth:`_on_ack` then :meth:`_send_window` with a window of 1."""
        self.acked = h
        self.tries = 0
        self.last_progress = _monotonic()
        self.high = self.next_send = h + 1
        packets = self.packets
        pkt = packets[h] if packets is not None else self._block(h + 1)
        try:
            self.sock.send(pkt)
        except BlockingIOError:
            self._pump()  # the socket buffer is full: sent when writable
            return
        except ConnectionRefusedError as e:
            self._client_gone(e)
            return
        except OSError as e:
            self.server._finish(self, ok=False, why=f"send failed: {e.strerror}")
            return
        self.next_send = h + 2
        self.sent_final = h + 1 == self.nblocks
        self.server.stats.bytes_sent += len(pkt) - 4

    def _on_ack(self, block: int) -> None:
        """The client acknowledged ``block`` (the 16-bit number on the wire: it rolls over
        from 65535 to 0, ``acked`` counts on). Every ACK comes through here, lock-step's
        common case first (:meth:`_next_in_lock_step`)."""
        h = self.high
        if (block == h & 0xFFFF and self.window == 1 and self.acked == h - 1
                and self.next_send == h + 1 and h < self.nblocks):
            self._next_in_lock_step(h)
            return
        if self.oack is not None and self.acked == 0 and self.high == 0:
            if block != 0:
                return
            self.oack = None
            self._progress()
            self._send_window()
            return
        d = (block - self.acked) & 0xFFFF
        if d == 0:
            # duplicate ACK: lock-step ignores it (Sorcerer's Apprentice, RFC 1123 4.2.3.1);
            # with a window it means "resend from here" (RFC 7440 section 4)
            if self.window > 1 and self.next_send > self.acked + 1:
                self._send_window()
            return
        if d > self.high - self.acked:
            return  # a stray ACK from far away: ignore
        self.acked += d
        self._progress()
        if self.acked >= self.nblocks:
            self.server._finish(self, ok=True)
            return
        # the end of a window, or (RFC 7440) an ACK inside it when the client saw a gap:
        # either way continue right after what the client has
        self._send_window()

    def _progress(self) -> None:
        self.tries = 0
        self.last_progress = time.monotonic()

    def on_timer(self, now: float) -> None:
        """The server's timer at ``now`` (monotonic seconds): after :func:`retransmit_wait` without
        progress, send the OACK or the window again; fail the transfer after ``cfg.retries``
        retransmissions."""
        if now - self.last_progress < retransmit_wait(self.timeout, self.tries):
            return
        self.tries += 1
        if self.tries > self.server.cfg.retries:
            self.server._finish(self, ok=False, why=f"no ACK after {self.server.cfg.retries} retransmissions")
            return
        self.server.stats.retransmits += 1
        self.last_progress = now
        if self.oack is not None and self.high == 0:
            self._send_raw(self.oack)
        else:
            self._send_window()

    def close(self) -> None:
        """Stop watching the socket, close it and the file; idempotent. Counting and removing the
        transfer are the server's (``_finish``)."""
        loop = self.server.loop
        self.server._unwatch(self.sock.fileno())
        if self.waiting_writer:
            with contextlib.suppress(Exception):
                loop.remove_writer(self.sock.fileno())
        self.sock.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
