"""TFTP packet codec (RFC 1350 section 5, option extension RFC 2347, options RFC 2348 blksize,
RFC 2349 timeout/tsize, RFC 7440 windowsize).

Opcodes: 1 RRQ, 2 WRQ, 3 DATA, 4 ACK, 5 ERROR, 6 OACK. :func:`parse` returns one of the
dataclasses below or raises :class:`MalformedPacket` (never anything else); the ``encode_*``
functions build packets. :func:`negotiate` applies the server's limits to requested options.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from sidusctl.serve.dhcp_codec import MalformedPacket

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6

# error codes (RFC 1350 appendix, RFC 2347)
E_UNDEFINED, E_NOT_FOUND, E_ACCESS, E_DISK_FULL, E_ILLEGAL, E_UNKNOWN_TID, E_EXISTS, \
    E_NO_USER, E_OPTION = 0, 1, 2, 3, 4, 5, 6, 7, 8

BLKSIZE_MIN, BLKSIZE_MAX = 8, 65464  # RFC 2348
TIMEOUT_MIN, TIMEOUT_MAX = 1, 255  # RFC 2349
WINDOW_MIN, WINDOW_MAX = 1, 65535  # RFC 7440
MAX_FILENAME = 1024  # ours: no sane boot file name is longer


@dataclass(frozen=True)
class Request:
    """RRQ or WRQ: ``opcode``, ``filename`` (str, undecodable bytes kept by surrogateescape),
    ``mode`` (lowercased), ``options`` (names lowercased, values as sent)."""

    opcode: int
    filename: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Data:
    """A DATA packet (RFC 1350 section 5, opcode 3): ``block`` as sent (0-65535), ``payload``
    up to the negotiated blksize in bytes (fewer ends the file)."""

    block: int
    payload: bytes


@dataclass(frozen=True)
class Ack:
    """An ACK (RFC 1350 section 5, opcode 4) of ``block`` (0-65535; 0 acknowledges an OACK,
    RFC 2347)."""

    block: int


@dataclass(frozen=True)
class Error:
    """An ERROR packet (RFC 1350 section 5, opcode 5): ``code`` 0-7 (section 5's table; 8 is
    RFC 2347's option refusal) and its text."""

    code: int
    message: str


@dataclass(frozen=True)
class Oack:
    """An option acknowledgement (RFC 2347, opcode 6): the options the server accepted,
    names lowercase, values as text."""

    options: dict[str, str]


Packet = Request | Data | Ack | Error | Oack


def _strings(body: bytes, what: str) -> list[bytes]:
    if not body.endswith(b"\0"):
        raise MalformedPacket(f"{what}: last field is not NUL-terminated")
    return body[:-1].split(b"\0")


def parse(data: bytes) -> Packet:
    """Parse one TFTP datagram; :class:`MalformedPacket` if it is truncated, has an unknown
    opcode, unterminated strings, an odd number of option fields, or duplicate options."""
    if len(data) < 4:
        raise MalformedPacket(f"truncated: {len(data)} bytes (a TFTP packet has at least 4)")
    opcode = struct.unpack_from("!H", data)[0]
    body = data[2:]
    if opcode in (RRQ, WRQ):
        fields = _strings(body, "request")
        if len(fields) < 2 or len(fields) % 2:
            raise MalformedPacket("request: expected filename, mode and name/value option pairs")
        raw_name, raw_mode = fields[0], fields[1]
        if not raw_name:
            raise MalformedPacket("request: empty filename")
        if len(raw_name) > MAX_FILENAME:
            raise MalformedPacket(f"request: filename of {len(raw_name)} bytes (max {MAX_FILENAME})")
        options: dict[str, str] = {}
        for i in range(2, len(fields), 2):
            name = fields[i].decode("ascii", "replace").lower()
            if name in options:
                raise MalformedPacket(f"request: option {name!r} given twice")
            options[name] = fields[i + 1].decode("ascii", "replace")
        return Request(opcode, raw_name.decode("utf-8", "surrogateescape"),
                       raw_mode.decode("ascii", "replace").lower(), options)
    if opcode == DATA:
        return Data(struct.unpack_from("!H", body)[0], body[2:])
    if opcode == ACK:
        if len(body) != 2:
            raise MalformedPacket(f"ACK of {len(data)} bytes (expected 4)")
        return Ack(struct.unpack_from("!H", body)[0])
    if opcode == ERROR:
        code = struct.unpack_from("!H", body)[0]
        rest = body[2:]
        msg = rest[:-1] if rest.endswith(b"\0") else rest
        return Error(code, msg.decode("ascii", "replace"))
    if opcode == OACK:
        fields = _strings(body, "OACK") if body else []
        if len(fields) % 2:
            raise MalformedPacket("OACK: odd number of option fields")
        return Oack({fields[i].decode("ascii", "replace").lower():
                     fields[i + 1].decode("ascii", "replace") for i in range(0, len(fields), 2)})
    raise MalformedPacket(f"unknown opcode {opcode}")


def encode_request(opcode: int, filename: str, mode: str = "octet",
                   options: dict[str, str] | None = None) -> bytes:
    """An RRQ (``opcode`` 1) or WRQ (2) (RFC 1350 section 5): ``filename`` (bytes that are
    not UTF-8 kept through ``surrogateescape``), ``mode`` (``octet`` or ``netascii``), then
    each option name and value (RFC 2347), every field ending in a NUL byte."""
    parts = [filename.encode("utf-8", "surrogateescape"), mode.encode()]
    for k, v in (options or {}).items():
        parts += [k.encode(), v.encode()]
    return struct.pack("!H", opcode) + b"".join(p + b"\0" for p in parts)


_HEAD = struct.Struct("!HH")


def encode_data(block: int, payload: bytes | memoryview) -> bytes:
    """A DATA packet (RFC 1350 section 5): opcode 3, ``block`` modulo 65536 (it rolls over
    from 65535 to 0), then ``payload`` (up to the negotiated blksize, RFC 2348). One copy of
    the payload (a memoryview of a read-ahead buffer is not copied first)."""
    return _HEAD.pack(DATA, block & 0xFFFF) + payload


def encode_ack(block: int) -> bytes:
    """An ACK (RFC 1350 section 5) of ``block`` modulo 65536."""
    return struct.pack("!HH", ACK, block & 0xFFFF)


def encode_error(code: int, message: str) -> bytes:
    """An ERROR packet (RFC 1350 section 5): ``code`` (0-8), ``message`` in ASCII (other
    characters become ``?``), NUL-terminated."""
    return struct.pack("!HH", ERROR, code) + message.encode("ascii", "replace") + b"\0"


def encode_oack(options: dict[str, str]) -> bytes:
    """An OACK (RFC 2347): each accepted option's name and value, NUL-terminated, in
    ``options``' order."""
    return struct.pack("!H", OACK) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in options.items())


@dataclass(frozen=True)
class Negotiated:
    """What the server accepted: ``blksize`` (bytes), ``timeout`` (seconds), ``windowsize``
    (blocks per ACK), ``tsize`` (True if the client asked for it), and ``oack``: the options to
    acknowledge (empty: no OACK, send DATA 1 at once, RFC 2347)."""

    blksize: int = 512
    timeout: float = 1.0
    windowsize: int = 1
    tsize: bool = False
    oack: dict[str, str] = field(default_factory=dict)
    refused: tuple[str, ...] = ()


def _int(v: str) -> int | None:
    v = v.strip()
    if not v.isdigit() or len(v) > 10:
        return None
    return int(v)


def negotiate(options: dict[str, str], file_size: int | None, *, max_blksize: int = BLKSIZE_MAX,
              max_window: int = 64, default_timeout: float = 1.0) -> Negotiated:
    """Apply RFC 2347-2349 and 7440 to a request's options.

    ``blksize`` above ``max_blksize`` (or above 65464) is answered with the maximum (RFC 2348
    lets the server answer less); values below 8 or not numbers are ignored (not acknowledged),
    as are unknown options. ``timeout`` outside 1..255 is ignored; ``tsize`` is answered with
    ``file_size``; ``windowsize`` is capped at ``max_window``. Ignored options are listed in
    ``refused`` so the server can count them.
    """
    blksize, timeout, window, tsize = 512, default_timeout, 1, False
    oack: dict[str, str] = {}
    refused: list[str] = []
    for name, value in options.items():
        n = _int(value)
        if name == "blksize":
            if n is None or n < BLKSIZE_MIN:
                refused.append(name)
                continue
            blksize = min(n, max_blksize, BLKSIZE_MAX)
            oack[name] = str(blksize)
        elif name == "timeout":
            if n is None or not TIMEOUT_MIN <= n <= TIMEOUT_MAX:
                refused.append(name)
                continue
            timeout = float(n)
            oack[name] = str(n)
        elif name == "tsize":
            if n is None or file_size is None:
                refused.append(name)
                continue
            tsize = True
            oack[name] = str(file_size)
        elif name == "windowsize":
            if n is None or n < WINDOW_MIN:
                refused.append(name)
                continue
            window = min(n, max_window, WINDOW_MAX)
            oack[name] = str(window)
        else:
            refused.append(name)
    return Negotiated(blksize, timeout, window, tsize, oack, tuple(refused))
