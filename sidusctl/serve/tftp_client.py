"""A small asyncio TFTP client (RRQ only) with blksize, tsize, timeout and windowsize
(RFC 2347-2349, RFC 7440), for diagnostics, tests and ``bench/tftp.py``: none of the Debian
clients (curl, tftp-hpa, atftp) negotiates windowsize.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from dataclasses import dataclass

from sidusctl.core.errors import SidusError
from sidusctl.serve import tftp_codec as tc
from sidusctl.serve.dhcp_codec import MalformedPacket


class TftpClientError(SidusError):
    """The server answered with an ERROR (``code``), or stopped answering."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class FetchResult:
    """``data`` received, ``seconds`` taken, ``options`` the server acknowledged."""

    data: bytes
    seconds: float
    options: dict[str, str]


class _Proto(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))


async def fetch(host: str, filename: str, *, port: int = 69, blksize: int | None = None,
                windowsize: int | None = None, tsize: bool = False, timeout: float = 1.0,
                retries: int = 5) -> FetchResult:
    """Download ``filename`` from ``host:port``. :class:`TftpClientError` on an ERROR packet
    (with its code) or after ``retries`` timeouts of ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    options: dict[str, str] = {}
    if blksize:
        options["blksize"] = str(blksize)
    if windowsize:
        options["windowsize"] = str(windowsize)
    if tsize:
        options["tsize"] = "0"
    transport, proto = await loop.create_datagram_endpoint(_Proto, local_addr=("0.0.0.0", 0))
    started = time.monotonic()
    try:
        rrq = tc.encode_request(tc.RRQ, filename, "octet", options)
        transport.sendto(rrq, (host, port))
        last_sent = rrq
        peer: tuple[str, int] | None = None
        bs, window = 512, 1
        acked_opts: dict[str, str] = {}
        chunks: list[bytes] = []
        expect = 1  # absolute number of the next block wanted
        in_window = 0
        tries = 0
        while True:
            try:
                data, addr = await asyncio.wait_for(proto.queue.get(), timeout)
            except TimeoutError:
                tries += 1
                if tries > retries:
                    raise TftpClientError(f"{host}: no answer after {retries} retries "
                                          f"(block {expect})") from None
                transport.sendto(last_sent, peer or (host, port))
                continue
            if peer is None:
                peer = addr
            elif addr != peer:
                continue
            try:
                p = tc.parse(data)
            except MalformedPacket:
                continue
            tries = 0
            if isinstance(p, tc.Error):
                raise TftpClientError(f"{host}: error {p.code}: {p.message}", p.code)
            if isinstance(p, tc.Oack) and expect == 1 and not chunks:
                acked_opts = p.options
                bs = int(p.options.get("blksize", 512))
                window = int(p.options.get("windowsize", 1))
                last_sent = tc.encode_ack(0)
                transport.sendto(last_sent, peer)
                continue
            if not isinstance(p, tc.Data):
                continue
            if p.block != expect & 0xFFFF:
                # out of order: ask again from the last block we have (RFC 7440 section 4)
                if p.block != (expect - 1) & 0xFFFF:
                    last_sent = tc.encode_ack(expect - 1)
                    transport.sendto(last_sent, peer)
                    in_window = 0
                continue
            chunks.append(p.payload)
            expect += 1
            in_window += 1
            done = len(p.payload) < bs
            if done or in_window >= window:
                last_sent = tc.encode_ack(expect - 1)
                transport.sendto(last_sent, peer)
                in_window = 0
            if done:
                return FetchResult(b"".join(chunks), time.monotonic() - started, acked_opts)
    finally:
        with contextlib.suppress(Exception):
            transport.close()


async def send_raw(host: str, port: int, payload: bytes, wait: float = 1.0) -> bytes | None:
    """Send one datagram and return the first answer (or None after ``wait`` seconds): for
    tests that speak to the server with hand-made packets."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Proto, local_addr=("0.0.0.0", 0))
    try:
        transport.sendto(payload, (host, port))
        try:
            data, _ = await asyncio.wait_for(proto.queue.get(), wait)
            return data
        except TimeoutError:
            return None
    finally:
        transport.close()


def error_code(packet: bytes | None) -> int | None:
    """The error code of a TFTP ERROR packet, else None."""
    if packet is None or len(packet) < 4 or packet[:2] != b"\x00\x05":
        return None
    return int(struct.unpack_from("!H", packet, 2)[0])
