"""The protocol clients of tests/storm_sim.py's simulated nodes, each cheap per packet and
driven from event loop callbacks (a storm's hundreds of nodes share one loop per core):

- DHCP (RFC 2131): :class:`DhcpSocket`, the one client socket of a storm, drained whole
  each time it is readable, and :class:`DhcpReplies`, which routes each BOOTREPLY to its
  node by xid; :func:`dhcp_phase` is one DISCOVER/OFFER/REQUEST/ACK exchange as a PXE ROM,
  iPXE, a kernel or a booted system, each message sent again after 1 s, then 0.5 s longer
  each time, at most ``DHCP_TRIES`` times;
- TFTP (RFC 1350, blksize RFC 2348): :func:`tftp_get`, lock-step as pxelinux;
- HTTP/1.1 (RFC 9112): :func:`http_req`, one request per connection (``Connection:
  close``, as busybox wget in the initramfs) or, through an :class:`HttpPool`, one
  connection kept for a node's next request (as iPXE); a 503 retried after its
  ``Retry-After``, jittered;
- :class:`Tally`: what the clients saw (refusals, retries, bytes and reads).
"""


from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from dataclasses import dataclass
from typing import Any

PXE_OPTS = {60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\0\0", 94: b"\x01\x02\x01"}
DHCP_TRIES = 8
TFTP_TRIES = 8


@dataclass
class Tally:
    """What the clients saw: refusals (answered, counted) and errors (no answer, bad data)."""

    http_refused: int = 0
    tftp_refused: int = 0
    dhcp_retries: int = 0
    tftp_retries: int = 0
    bytes: int = 0
    #: reads of HTTP body bytes (each a wake-up of a node's event loop): bytes / reads is how
    #: much a server's sending lets a client take at once
    http_reads: int = 0
    http_bytes: int = 0
    #: TCP connections opened for HTTP (several requests share one when a node pools them)
    http_connections: int = 0


class DhcpReplies:
    """The replies :class:`DhcpSocket` reads, routed to the waiting node by xid (only
    BOOTREPLY; a datagram that does not decode is dropped)."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Queue[Any]] = {}

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        from sidusctl.serve import dhcp_codec as dc
        try:
            p = dc.decode(data)
        except dc.MalformedPacket:
            return
        q = self.waiting.get(p.xid)
        if q is not None and p.op == 2:
            q.put_nowait(p)


async def dhcp_phase(proto: DhcpReplies, tr: DhcpSocket, mac: bytes, phase: str,
                     server_ip: str | None, tally: Tally) -> dict[str, Any]:
    """DISCOVER/OFFER/REQUEST/ACK (RFC 2131 3.1) with the options of ``phase`` (``pxe``,
    ``ipxe``, ``kernel``, ``system``), broadcast flag set; retransmitted on silence."""
    from sidusctl.serve import dhcp_codec as dc
    opts: dict[int, bytes] = {}
    if phase in ("pxe", "ipxe"):
        opts.update(PXE_OPTS)
        opts[97] = b"\0" + mac + bytes(10)
    if phase == "ipxe":
        opts[77] = b"iPXE"
    if phase == "kernel":
        opts[60] = b"Linux ipconfig"
    if phase == "system":
        opts[12] = b"n" + mac.hex().encode()
    opts[55] = bytes((1, 3, 6, 12, 15, 28, 66, 67))
    xid = random.getrandbits(32)
    q: asyncio.Queue[Any] = asyncio.Queue()
    proto.waiting[xid] = q
    try:
        async def exchange(mt: int, extra: dict[int, bytes], want: int) -> Any:
            pkt = dc.DhcpPacket(op=1, xid=xid, flags=dc.FLAG_BROADCAST, chaddr=mac,
                                options={dc.OPT_MSG_TYPE: bytes([mt]), **opts, **extra}).encode()
            for attempt in range(DHCP_TRIES):
                if attempt:
                    tally.dhcp_retries += 1
                tr.sendto(pkt, ("255.255.255.255", 67))
                end = time.monotonic() + 1.0 + attempt * 0.5
                while (left := end - time.monotonic()) > 0:
                    try:
                        p = await asyncio.wait_for(q.get(), left)
                    except TimeoutError:
                        break
                    if p.msg_type == want and (server_ip is None or
                                               str(p.opt_ip(dc.OPT_SERVER_ID)) == server_ip):
                        return p
                    if p.msg_type == dc.NAK:
                        raise RuntimeError(f"{phase}: NAK")
            raise RuntimeError(f"{phase}: no {want} after {DHCP_TRIES} tries")

        offer = await exchange(dc.DISCOVER, {}, dc.OFFER)
        ack = await exchange(dc.REQUEST, {dc.OPT_REQUESTED_IP: offer.yiaddr.packed,
                                          dc.OPT_SERVER_ID: offer.options[dc.OPT_SERVER_ID]},
                             dc.ACK)
        # the boot file: option 67 if the server sent it (dnsmasq does when it is asked for,
        # as here), else the BOOTP file field (RFC 2132 section 9.5); iPXE reads either
        boot_file = ack.options.get(67) or ack.file
        return {"offer": str(offer.yiaddr), "ack": str(ack.yiaddr),
                "file": boot_file.rstrip(b"\0").decode(errors="replace"),
                "lease": int.from_bytes(ack.options.get(dc.OPT_LEASE_TIME, b"\0\0\0\0"), "big")}
    finally:
        del proto.waiting[xid]


class _TftpGet:
    """One RRQ's lock-step transfer, driven by the event loop's reader callback: each DATA is
    acknowledged from the callback itself (no task switch, queue or timeout object per
    packet), so that hundreds of simulated nodes cost the client process little CPU per
    block, as each real node has its own CPU. Silence for 1 s retransmits the last packet (at
    most ``TFTP_TRIES`` times). ``done`` gets the file's bytes, ``None`` for a "busy" ERROR
    (a refusal), or a RuntimeError. Raises OSError (the socket)."""

    def __init__(self, src: str, server: str, name: str, blksize: int, tally: Tally) -> None:
        from sidusctl.serve import tftp_codec
        from sidusctl.serve.dhcp_codec import MalformedPacket
        self.tc = tc = tftp_codec
        self.malformed = MalformedPacket
        self.loop = asyncio.get_running_loop()
        self.name, self.tally = name, tally
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.bind((src, 0))
        except OSError:
            self.sock.close()
            raise
        self.dest = (server, 69)
        self.peer: tuple[str, int] | None = None
        self.bs, self.expect, self.tries = 512, 1, 0
        self.chunks: list[bytes] = []
        self.done: asyncio.Future[bytes | None] = self.loop.create_future()
        self.last = tc.encode_request(tc.RRQ, name, "octet", {"blksize": str(blksize)})
        self.stamp = time.monotonic()
        self.loop.add_reader(self.sock.fileno(), self._readable)
        self.timer = self.loop.call_later(1.0, self._check)
        self._send(self.last)

    def _send(self, pkt: bytes) -> None:
        self.last = pkt
        with contextlib.suppress(BlockingIOError, InterruptedError):
            if self.peer is None:
                self.sock.sendto(pkt, self.dest)
            else:
                self.sock.send(pkt)

    def _readable(self) -> None:
        # one datagram per call: the loop is level-triggered and calls again if more wait,
        # and in lock-step the next DATA cannot be there before our ACK (a second recv would
        # only fail)
        if self.done.done():
            return
        try:
            data, addr = self.sock.recvfrom(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.done.set_exception(RuntimeError(f"TFTP {self.name}: {e}"))
            return
        try:
            self._on_packet(data, addr)
        except (ValueError, self.malformed) as e:  # a bad blksize, a bad packet
            self.done.set_exception(RuntimeError(f"TFTP {self.name}: {e}"))

    def _on_packet(self, data: bytes, addr: tuple[str, int]) -> None:
        tc = self.tc
        if self.peer is None:
            self.peer = addr  # the server's TID (RFC 1350 section 4): only it is heard from now
            self.sock.connect(addr)
        elif addr != self.peer:
            return
        self.tries, self.stamp = 0, time.monotonic()
        if len(data) >= 4 and data[0] == 0 and data[1] == tc.DATA:
            block = (data[2] << 8) | data[3]
            if block != self.expect & 0xFFFF:
                self._send(self.last)  # a duplicate: ack what we have again
                return
            payload = data[4:]
            self.chunks.append(payload)
            self._send(tc.encode_ack(block))
            self.expect += 1
            if len(payload) < self.bs:
                self.done.set_result(b"".join(self.chunks))
            return
        p = tc.parse(data)
        if isinstance(p, tc.Error):
            if p.code == tc.E_UNDEFINED and "busy" in p.message:
                self.done.set_result(None)
            else:
                self.done.set_exception(RuntimeError(f"TFTP {self.name}: error {p.code} "
                                                     f"{p.message}"))
        elif isinstance(p, tc.Oack):
            self.bs = int(p.options.get("blksize", "512"))
            self._send(tc.encode_ack(0))

    def _check(self) -> None:
        if self.done.done():
            return
        left = self.stamp + 1.0 - time.monotonic()
        if left <= 0:
            self.tries += 1
            self.tally.tftp_retries += 1
            if self.tries > TFTP_TRIES:
                self.done.set_exception(RuntimeError(f"TFTP {self.name}: no answer"))
                return
            self._send(self.last)
            self.stamp, left = time.monotonic(), 1.0
        self.timer = self.loop.call_later(left, self._check)

    def close(self) -> None:
        self.timer.cancel()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def tftp_get(src: str, server: str, name: str, tally: Tally,
                   blksize: int = 1468) -> bytes:
    """RRQ ``name`` from ``src`` (the node's address), lock-step (RFC 1350, blksize RFC 2348),
    as :class:`_TftpGet`. A "busy" ERROR (code 0) is a refusal: counted, retried after a pause;
    any other ERROR raises RuntimeError."""
    for _refusal in range(200):
        t = _TftpGet(src, server, name, blksize, tally)
        try:
            data = await t.done
        finally:
            t.close()
        if data is not None:
            tally.bytes += len(data)
            return data
        tally.tftp_refused += 1
        await asyncio.sleep(0.2 + random.random() * 0.3)
    raise RuntimeError(f"TFTP {name}: refused 200 times")


class HttpPool:
    """One node's idle HTTP connection kept for its next request to the same server, as
    iPXE's connection pool does (``src/net/tcp/httpconn.c``: every request says
    ``Connection: keep-alive``; an idle connection to the same host and port is reused for
    10 s; one the server closed before answering is opened again). :meth:`close` ends it,
    as iPXE does before it starts a kernel."""

    def __init__(self) -> None:
        self._idle: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The idle connection, if any, now the caller's."""
        conn, self._idle = self._idle, None
        return conn

    def put(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        """Keep ``conn`` (whose last answer was read whole) for the next request."""
        self._idle = conn

    async def close(self) -> None:
        """End the idle connection, if any."""
        if (conn := self.take()) is not None:
            await _hang_up(conn[1])


async def _hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def http_req(src: str, server: str, port: int, method: str, path: str, tally: Tally, *,
                   headers: dict[str, str] | None = None, body: bytes = b"",
                   stop_at: int | None = None, sink: Any = None,
                   pool: HttpPool | None = None) -> tuple[int, dict[str, str]]:
    """One HTTP/1.1 request from ``src``; the body goes to ``sink.update`` (at most
    ``stop_at`` bytes of it: then the connection is dropped, as a node that lost its link
    would). A 503 is a refusal: counted, retried after its Retry-After (RFC 9110 10.2.3).

    Without a ``pool`` the request has a connection of its own (``Connection: close``, as
    busybox wget); with one, it reuses the pool's idle connection and leaves its own there
    afterwards unless the server said ``Connection: close`` (RFC 9112 section 9.3), as iPXE.
    Each connection opened is counted in ``tally.http_connections``."""
    refusals = 0
    while True:
        conn = pool.take() if pool is not None else None
        reused = conn is not None
        if conn is None:
            conn = await asyncio.open_connection(server, port, local_addr=(src, 0),
                                                 limit=1 << 20)
            tally.http_connections += 1
        reader, writer = conn
        kept = False
        try:
            head = [f"{method} {path} HTTP/1.1", f"Host: {server}",
                    "Connection: " + ("close" if pool is None else "keep-alive")]
            head += [f"{k}: {v}" for k, v in (headers or {}).items()]
            if body:
                head += ["Content-Type: application/x-www-form-urlencoded",
                         f"Content-Length: {len(body)}"]
            try:
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
                await writer.drain()
                status_line = await reader.readline()
            except ConnectionError:
                if not reused:
                    raise
                status_line = b""
            if not status_line and reused:
                continue  # the server had closed the idle connection: open another
            code = int(status_line.split()[1])
            hdrs: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                k, _, v = line.decode().partition(":")
                hdrs[k.strip().lower()] = v.strip()
            if code == 503:
                if "retry-after" not in hdrs:
                    raise RuntimeError(f"HTTP {path}: 503 without Retry-After")
                tally.http_refused += 1
                wait = float(hdrs["retry-after"])
            else:
                left = int(hdrs.get("content-length", "0"))
                if stop_at is not None:
                    left = min(left, stop_at)
                while left > 0:
                    chunk = await reader.read(min(left, 1 << 20))
                    if not chunk:
                        raise RuntimeError(f"HTTP {path}: connection closed, {left} bytes short")
                    left -= len(chunk)
                    tally.bytes += len(chunk)
                    tally.http_reads += 1
                    tally.http_bytes += len(chunk)
                    if sink is not None:
                        sink.update(chunk)
                if (pool is not None and stop_at is None
                        and "close" not in hdrs.get("connection", "").lower()):
                    pool.put(conn)
                    kept = True
                return code, hdrs
        finally:
            if not kept:
                await _hang_up(writer)
        refusals += 1
        if refusals == 200:
            raise RuntimeError(f"HTTP {path}: refused 200 times")
        await asyncio.sleep(wait * (0.5 + random.random()))


class DhcpSocket:
    """The storm's one DHCP client socket: UDP port 68 (RFC 2131 section 4.1), broadcast, a
    4 MiB receive buffer, bound to ``interface`` (SO_BINDTODEVICE), shared by every simulated
    node (each node's replies are told apart by its xid and chaddr). Raises OSError.

    Not an asyncio transport: a transport reads one datagram per loop iteration, so behind a
    busy loop the replies to hundreds of nodes would queue in this one socket and be read
    seconds late, where each real node reads its own at once. This socket is drained whole
    each time it is readable."""

    def __init__(self, interface: str, proto: DhcpReplies) -> None:
        self._loop = asyncio.get_running_loop()
        self._proto = proto
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, 25, interface.encode())  # SO_BINDTODEVICE
            s.setblocking(False)
            s.bind(("0.0.0.0", 68))
        except OSError:
            s.close()
            raise
        self._sock = s
        self._loop.add_reader(s.fileno(), self._drain)

    def _drain(self) -> None:
        for _ in range(4096):
            try:
                data, addr = self._sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self._proto.datagram_received(data, addr)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        """Send now; a datagram the socket cannot take is lost, as on a busy wire (the
        node retransmits)."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            self._sock.sendto(data, addr)

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


async def dhcp_client(interface: str) -> tuple[DhcpSocket, DhcpReplies]:
    """The storm's DHCP socket and the protocol that routes its replies (:class:`DhcpSocket`)."""
    proto = DhcpReplies()
    return DhcpSocket(interface, proto), proto


