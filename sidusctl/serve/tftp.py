"""Read-only TFTP server on asyncio (RFC 1350; options RFC 2347 framework, RFC 2348 blksize,
RFC 2349 timeout and tsize, RFC 7440 windowsize).

Why not tftpy (the product card's choice): tftpy runs every transfer from one ``select`` loop in
pure Python, has no windowsize, and cannot share an event loop with the DHCP and DNS servers;
``bench/tftp.py`` measures both against dnsmasq (figures in docs/performance.md).

Behaviour:
- Jailed in ``root``: ``..`` components, symlinks resolving outside the root and absolute
  names that are not files of the tree (``/grub/grub.cfg`` is the tree's, ``/etc/passwd`` is
  refused) get error 2 (access violation) and a log line; WRQ is refused with error 2.
- Each transfer has its own UDP socket (a new TID, RFC 1350 section 4), bound to the address the
  request was sent to (IP_PKTINFO) and to the interface (SO_BINDTODEVICE) when one is given.
  The transfer sockets are watched by one epoll set of the server's own, itself watched by the
  event loop: when ACKs wait on many transfers at once (a boot storm), one loop callback
  answers them all, instead of one loop dispatch per ACK.
- Block numbers roll over from 65535 to 0, so files over 32 MiB at blksize 512 work.
- The DATA packets of an octet file are built once per file and block size and shared by its
  transfers (:class:`~sidusctl.serve.tftp_cache.PacketCache`, 128 MiB at most, files up to
  64 MiB; keyed by inode, size and modification time, so a replaced file is read again).
- Retransmission after ``timeout`` seconds (the client's RFC 2349 value if accepted), then
  after twice, four times that... up to :data:`MAX_BACKOFF` seconds (RFC 1123 section 4.2.3.2:
  a TFTP implementation must use an adaptive timeout; a client that is slow to ACK because it
  is overloaded is not sent more to do), at most ``retries`` times, then the transfer is
  abandoned and counted as failed. Any progress starts the sequence again.
- Malformed datagrams on port 69 are dropped and counted in :class:`TftpStats`; nothing a peer
  sends can raise out of the server.
- A bug (any exception other than a decode error of the codec) is not malformed input: it is
  logged at error level with its traceback and counted in ``internal_errors``, the transfer it
  happened in is abandoned, and the server goes on. Tests assert that counter stays at 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sidusctl.core.errors import PrerequisiteError
from sidusctl.core.log import get_logger
from sidusctl.serve import tftp_codec as tc
from sidusctl.serve.dhcp_codec import MalformedPacket
from sidusctl.serve.tftp_cache import PacketCache
from sidusctl.serve.tftp_config import MAX_BACKOFF, TftpConfig, TftpStats, retransmit_wait
from sidusctl.serve.tftp_transfer import ACK_MAX, Transfer

__all__ = ["MAX_BACKOFF", "TftpConfig", "TftpDenied", "TftpServer", "TftpStats",
           "resolve_in_root", "retransmit_wait"]

log = get_logger("serve.tftp")

_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_NETASCII_MAX = 64 << 20
#: epoll polls of the transfer sockets per event loop callback (see TftpServer._on_ready)
_REPOLL = 16
#: how long (s) a re-poll of the epoll set waits for the next ACK (see TftpServer._on_ready):
#: 1 ms, epoll_wait(2)'s unit (Python rounds a shorter timeout up to it)
_LINGER = 0.001


class TftpDenied(Exception):
    """Internal: a request refused with a TFTP error ``code`` and ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def resolve_in_root(root_real: str, name: str) -> str:
    """The real path of ``name`` inside ``root_real`` (itself a realpath).

    A name with a leading ``/`` is read from the root (GRUB asks for ``/grub/grub.cfg-...``
    under its prefix, as tftpd-hpa ``-s`` and dnsmasq allow) only if that file exists in the
    tree; any other absolute name (``/etc/passwd``) is refused. :class:`TftpDenied` with
    error 2 for such an absolute name, a ``..`` component, or a path whose symlinks resolve
    outside the root."""
    absolute = name.startswith("/")
    if ".." in name.replace("\\", "/").split("/"):
        raise TftpDenied(tc.E_ACCESS, "'..' is not allowed")
    real = os.path.realpath(os.path.join(root_real, name.lstrip("/")))
    if real != root_real and not real.startswith(root_real + os.sep):
        raise TftpDenied(tc.E_ACCESS, "path leaves the TFTP root")
    if absolute and not os.path.isfile(real):
        raise TftpDenied(tc.E_ACCESS, "absolute path not in the TFTP tree")
    return real


def _open_in_root(root_real: str, name: str) -> tuple[int, os.stat_result]:
    """Open ``name`` for reading: ``(fd, its fstat)``; :class:`TftpDenied` (1 or 2)
    otherwise."""
    real = resolve_in_root(root_real, name)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TftpDenied(tc.E_NOT_FOUND, "file not found") from None
    except (PermissionError, IsADirectoryError):
        raise TftpDenied(tc.E_ACCESS, "permission denied") from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # swapped for a symlink since realpath()
            raise TftpDenied(tc.E_ACCESS, "path leaves the TFTP root") from None
        raise TftpDenied(tc.E_NOT_FOUND, os.strerror(e.errno or 0)) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise TftpDenied(tc.E_ACCESS, "not a regular file")
    return fd, st


def _to_netascii(data: bytes) -> bytes:
    # RFC 764: CR -> CR NUL, LF -> CR LF
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def _make_socket(interface: str | None, bind: tuple[str, int], pktinfo: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if interface:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        if pktinfo:
            s.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        s.setblocking(False)
        s.bind(bind)
    except OSError:
        s.close()
        raise
    return s


@dataclass
class TftpServer:
    """The server. ``await start()`` binds; ``close()`` ends every transfer. ``on_event``
    (optional) is called as ``on_event(kind, client_ip, filename)`` with kind ``sent`` when a
    file was delivered completely, for the per-node status."""

    cfg: TftpConfig
    on_event: Callable[[str, str, str], None] | None = None
    stats: TftpStats = field(default_factory=TftpStats)

    def __post_init__(self) -> None:
        self._sock: socket.socket | None = None
        self._transfers: dict[int, Transfer] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._ep: select.epoll | None = None  # the transfer sockets
        self._root_real = os.path.realpath(self.cfg.root)
        self.loop: asyncio.AbstractEventLoop = asyncio.get_event_loop()
        self.cache = PacketCache()
        #: where a transfer socket's datagram is read (one at a time, in the loop's thread)
        self.rbuf = bytearray(ACK_MAX)

    @property
    def port(self) -> int:
        """The bound port (useful when ``cfg.port`` is 0)."""
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    async def start(self) -> None:
        """Bind the request socket. :class:`PrerequisiteError` if the root is not a directory
        or the address/interface cannot be bound."""
        self.loop = asyncio.get_running_loop()
        if not os.path.isdir(self._root_real):
            raise PrerequisiteError(f"TFTP root {self.cfg.root} is not a directory")
        try:
            self._sock = _make_socket(self.cfg.interface, (self.cfg.address, self.cfg.port), True)
        except OSError as e:
            where = f" on {self.cfg.interface}" if self.cfg.interface else ""
            raise PrerequisiteError(
                f"cannot bind TFTP to {self.cfg.address}:{self.cfg.port}{where}: {e.strerror}") from e
        self.loop.add_reader(self._sock.fileno(), self._on_request)
        self._ep = select.epoll()
        self.loop.add_reader(self._ep.fileno(), self._on_ready)
        self._timer = self.loop.call_later(0.1, self._tick)
        log.info("TFTP serving %s on %s:%d%s", self._root_real, self.cfg.address, self.port,
                 f" (interface {self.cfg.interface})" if self.cfg.interface else "")

    def set_root(self, root: Path) -> None:
        """Serve another root from the next request on (SIGHUP reload)."""
        self._root_real = os.path.realpath(root)

    def close(self) -> None:
        """End every transfer (not counted as failed), stop the timer and close the sockets;
        idempotent."""
        if self._timer:
            self._timer.cancel()
        for t in list(self._transfers.values()):
            t.close()
        self._transfers.clear()
        self.stats.active = 0
        if self._ep is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self._ep.fileno())
            self._ep.close()
            self._ep = None
        if self._sock is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    # -- transfer sockets --------------------------------------------------------------------

    def _on_ready(self) -> None:
        """The loop's callback for the epoll set: one datagram read on each ready transfer
        socket (level-triggered: one with more waiting is ready again at the next poll).
        The set is polled again, up to ``_REPOLL`` times, waiting at most ``_LINGER`` seconds
        each time for an ACK, while ACKs keep coming: in a storm the ACKs answering a batch
        of DATA arrive within a fraction of a millisecond, and one more ``epoll_wait`` costs
        less than a turn of the event loop. The loop's other readers and timers (DHCP, HTTP
        accepts) wait at most ``_REPOLL * _LINGER`` seconds plus the batches' work."""
        transfers = self._transfers
        wait = 0.0
        for _ in range(_REPOLL):
            if self._ep is None:
                return
            ready = self._ep.poll(wait, 512)
            if not ready:
                return
            wait = _LINGER
            for fd, _events in ready:
                t = transfers.get(fd)
                if t is None:  # ended by an earlier one of this batch
                    continue
                try:
                    t.readable()
                except Exception:
                    self._internal_error(t, f"readable of {t.filename!r}")

    def _unwatch(self, fd: int) -> None:
        if self._ep is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    # -- timers ----------------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        self._timer = self.loop.call_later(0.1, self._tick)  # first: a bug must not stop the timer
        for t in list(self._transfers.values()):
            try:
                t.on_timer(now)
            except Exception:
                self._internal_error(t, f"timer of {t.filename!r}")

    def _internal_error(self, t: Transfer | None, what: str) -> None:
        """Count and log (error level, with the current exception's traceback) a bug met while
        handling ``what``; end transfer ``t`` (if any) as failed. Called from an ``except``."""
        self.stats.internal_errors += 1
        who = f"{t.addr[0]}:{t.addr[1]}" if t is not None else "?"
        log.exception("TFTP %s: internal error in %s", who, what)
        if t is None:
            return
        try:
            self._finish(t, ok=False, why="internal error")
        except Exception:
            log.exception("TFTP %s: internal error while ending the transfer", who)
            self._transfers.pop(t.sock.fileno(), None)
            with contextlib.suppress(Exception):
                t.close()
            self.stats.active = len(self._transfers)

    # -- requests --------------------------------------------------------------------------

    def _on_request(self) -> None:
        assert self._sock is not None
        for _ in range(64):
            try:
                data, anc, _flags, addr = self._sock.recvmsg(65536, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            local = self.cfg.address
            for level, typ, cdata in anc:
                if level == socket.IPPROTO_IP and typ == _IP_PKTINFO and len(cdata) >= 12:
                    # ipi_spec_dst: our local address for the reply (ipi_addr may be a
                    # broadcast address, which a transfer socket cannot bind to)
                    local = socket.inet_ntoa(cdata[4:8])
            try:
                self._handle(data, addr, local)
            except Exception:  # a bug, not bad input: count it apart, log it and go on
                self.stats.internal_errors += 1
                log.exception("TFTP %s:%d: internal error handling a request", addr[0], addr[1])

    def _reply_error(self, addr: tuple[str, int], code: int, msg: str) -> None:
        assert self._sock is not None
        with contextlib.suppress(OSError):
            self._sock.sendto(tc.encode_error(code, msg), addr)

    def _handle(self, data: bytes, addr: tuple[str, int], local: str) -> None:
        try:
            p = tc.parse(data)
        except MalformedPacket as e:
            self.stats.malformed += 1
            log.debug("TFTP: dropped a malformed datagram from %s: %s", addr[0], e)
            return
        if not isinstance(p, tc.Request):
            self.stats.malformed += 1
            log.debug("TFTP: dropped a %s on port %d from %s", type(p).__name__, self.port, addr[0])
            return
        self.stats.requests += 1
        who = f"{addr[0]}:{addr[1]}"
        if p.opcode == tc.WRQ:
            self.stats.wrq_refused += 1
            log.warning("TFTP %s: WRQ %r refused (read-only server)", who, p.filename)
            self._reply_error(addr, tc.E_ACCESS, "read-only server: WRQ refused")
            return
        if p.mode not in ("octet", "netascii"):
            log.warning("TFTP %s: RRQ %r in mode %r refused", who, p.filename, p.mode)
            self._reply_error(addr, tc.E_ILLEGAL, f"mode {p.mode} not supported")
            return
        running, mine = self._from_client(addr)
        if running is not None:
            if running.filename == p.filename:
                self._repeated(running)
                return
            # the client's port asks for another file: it gave the old transfer up
            self._finish(running, ok=False, aborted=True,
                         why=f"the client asked for {p.filename!r} from the same port")
            mine -= 1
        if len(self._transfers) >= self.cfg.max_transfers:
            self.stats.refused += 1
            log.warning("TFTP %s: RRQ %r refused: %d transfers running (max_transfers)", who,
                        p.filename, len(self._transfers))
            self._reply_error(addr, tc.E_UNDEFINED, "server busy")
            return
        if self.cfg.max_per_client and mine >= self.cfg.max_per_client:
            self.stats.refused += 1
            log.warning("TFTP %s: RRQ %r refused: %d transfers from this client "
                        "(max_per_client)", who, p.filename, mine)
            self._reply_error(addr, tc.E_UNDEFINED, "server busy")
            return
        try:
            fd, st = _open_in_root(self._root_real, p.filename)
            size = st.st_size
        except TftpDenied as e:
            if e.code == tc.E_ACCESS:
                self.stats.access_denied += 1
                log.warning("TFTP %s: RRQ %r denied: %s (error 2)", who, p.filename, e.message)
            else:
                self.stats.not_found += 1
                log.info("TFTP %s: RRQ %r: %s (error %d)", who, p.filename, e.message, e.code)
            self._reply_error(addr, e.code, e.message)
            return
        content: bytes | None = None
        if p.mode == "netascii":
            if size > _NETASCII_MAX:
                os.close(fd)
                self._reply_error(addr, tc.E_ILLEGAL, "file too large for netascii; use octet")
                return
            content = _to_netascii(os.pread(fd, size, 0))
            os.close(fd)
            fd, size = -1, len(content)
        neg = tc.negotiate(p.options, size, max_blksize=self.cfg.max_blksize,
                           max_window=self.cfg.max_window, default_timeout=self.cfg.timeout)
        if neg.refused:
            self.stats.options_refused += len(neg.refused)
        packets = None
        if fd >= 0:
            try:
                packets = self.cache.get(fd, st, neg.blksize)
            except OSError as e:  # unreadable: the transfer reads (and fails) by itself
                log.debug("TFTP %s: %r not cached: %s", who, p.filename, e.strerror)
            if packets is not None:
                os.close(fd)
                fd = -1
        try:
            sock = _make_socket(self.cfg.interface, (local, 0), False)
            sock.connect(addr)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            log.error("TFTP %s: cannot open a transfer socket: %s", who, e.strerror)
            self._reply_error(addr, tc.E_UNDEFINED, "server error")
            return
        t = Transfer(self, sock, addr, p.filename, fd, content, size, neg, packets)
        self._transfers[sock.fileno()] = t
        self.stats.active = len(self._transfers)
        assert self._ep is not None
        self._ep.register(sock.fileno(), select.EPOLLIN)
        log.info("TFTP %s: RRQ %r (%d bytes, blksize %d, windowsize %d%s)", who, p.filename, size,
                 neg.blksize, neg.windowsize, ", options " + ",".join(neg.oack) if neg.oack else "")
        t.guarded(t.start)()

    def _from_client(self, addr: tuple[str, int]) -> tuple[Transfer | None, int]:
        """The transfer running to the client port ``addr`` (its TID, RFC 1350 section 4),
        if any, and how many transfers run to ``addr``'s host (one pass over them)."""
        running, mine = None, 0
        host = addr[0]
        for t in self._transfers.values():
            if t.addr[0] == host:
                mine += 1
                if t.addr[1] == addr[1]:
                    running = t
        return running, mine

    def _repeated(self, t: Transfer) -> None:
        """The client sent the RRQ of running transfer ``t`` again, from the same port: its
        retransmission timer fired before our first packet reached it (a busy boot loader in a
        storm), or it is a late copy. One transfer serves it, rather than a second one racing
        the first from another server port to the same client port (the client keeps the
        first TID and answers the second with an ERROR or a port unreachable, RFC 1350
        section 4). dnsmasq, by default, starts that second transfer; in its single-port mode
        it starts the transfer again. While nothing is acknowledged the first packet (OACK or
        DATA 1) goes out again at once; later the request is stale and dropped. Counted as
        ``repeated``."""
        self.stats.repeated += 1
        resend = t.acked == 0
        log.info("TFTP %s:%d: RRQ %r repeated while its transfer runs (%s)", t.addr[0], t.addr[1],
                 t.filename, "first packet sent again" if resend else "ignored")
        if resend:
            t.guarded(t.start)()

    def _finish(self, t: Transfer, *, ok: bool, aborted: bool = False, why: str = "") -> None:
        if self._transfers.pop(t.sock.fileno(), None) is None:
            return
        secs = time.monotonic() - t.started
        who = f"{t.addr[0]}:{t.addr[1]}"
        if ok:
            self.stats.completed += 1
            rate = t.size / secs / 1e6 if secs > 0 else 0.0
            log.info("TFTP %s: sent %r (%d bytes in %.2f s, %.1f MB/s%s)", who, t.filename,
                     t.size, secs, rate, f"; {why}" if why else "")
            if self.on_event:
                self.on_event("sent", t.addr[0], t.filename)
        elif aborted:
            self.stats.aborted += 1
            log.info("TFTP %s: %r ended by the client: %s", who, t.filename, why)
        else:
            self.stats.failed += 1
            log.warning("TFTP %s: %r failed: %s", who, t.filename, why)
        t.close()
        self.stats.active = len(self._transfers)
