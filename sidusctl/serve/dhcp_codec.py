"""DHCPv4 packet codec: BOOTP header + options (RFC 2131 section 2, RFC 2132, RFC 3396, RFC 4578).

Wire layout (RFC 2131 figure 1): op 0, htype 1, hlen 2, hops 3, xid 4-7, secs 8-9, flags 10-11,
ciaddr 12, yiaddr 16, siaddr 20 (next-server), giaddr 24, chaddr 28-43, sname 44-107,
file 108-235, magic cookie ``63 82 53 63`` at 236, options from 240.

:func:`decode` turns bytes into a :class:`DhcpPacket` or raises :class:`MalformedPacket`
(never anything else, whatever the input); :meth:`DhcpPacket.encode` is its inverse. Options
are kept as raw bytes keyed by code; repeated codes are concatenated (RFC 3396), and options
carried in ``file``/``sname`` under option 52 (overload, RFC 2132 section 9.3) are merged in.
Typed accessors read the options the servers need.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from sidusctl.core.errors import SidusError

MAGIC_COOKIE = b"\x63\x82\x53\x63"
HEADER_LEN = 236
MIN_LEN = HEADER_LEN + 4  # header + cookie; options may be empty
BOOTP_MIN_SIZE = 300  # RFC 1542 2.1: some clients drop replies shorter than a BOOTP packet

BOOTREQUEST = 1
BOOTREPLY = 2

# message types, option 53 (RFC 2132 section 9.6)
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = 1, 2, 3, 4, 5, 6, 7, 8
MSG_NAMES = {DISCOVER: "DISCOVER", OFFER: "OFFER", REQUEST: "REQUEST", DECLINE: "DECLINE",
             ACK: "ACK", NAK: "NAK", RELEASE: "RELEASE", INFORM: "INFORM"}

# option codes (RFC 2132, RFC 4578, RFC 3004, RFC 3046)
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN = 15
OPT_BROADCAST = 28
OPT_VENDOR = 43
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MSG_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAM_LIST = 55
OPT_MESSAGE = 56
OPT_MAX_SIZE = 57
OPT_T1 = 58
OPT_T2 = 59
OPT_VENDOR_CLASS = 60
OPT_CLIENT_ID = 61
OPT_TFTP_SERVER = 66
OPT_BOOTFILE = 67
OPT_USER_CLASS = 77
OPT_RELAY_AGENT = 82
OPT_CLIENT_ARCH = 93
OPT_CLIENT_NDI = 94
OPT_CLIENT_UUID = 97
OPT_END = 255

FLAG_BROADCAST = 0x8000

_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
assert _HEADER.size == HEADER_LEN


class MalformedPacket(SidusError):
    """A datagram that is not a well-formed DHCP/BOOTP message (or TFTP packet, in
    :mod:`sidusctl.serve.tftp_codec`); the message says what is wrong and at which offset."""


def _ip(b: bytes) -> IPv4Address:
    return IPv4Address(b)


def parse_options(buf: bytes, base: int, into: dict[int, bytes]) -> bool:
    """Parse an options area (RFC 2132 section 2) into ``into``; repeated codes concatenate
    (RFC 3396). ``base`` is the area's offset in the packet, for messages. Returns whether an
    End option was seen. :class:`MalformedPacket` if a length byte or value runs past the end.
    """
    i, n = 0, len(buf)
    while i < n:
        code = buf[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            return True
        if i + 1 >= n:
            raise MalformedPacket(f"option {code} at offset {base + i} has no length byte")
        length = buf[i + 1]
        end = i + 2 + length
        if end > n:
            raise MalformedPacket(
                f"option {code} at offset {base + i} has length {length}, "
                f"past the end of its area ({n - i - 2} bytes left)")
        into[code] = into.get(code, b"") + buf[i + 2:end]
        i = end
    return False


def _cstring(b: bytes) -> bytes:
    return b.split(b"\0", 1)[0]


@dataclass
class DhcpPacket:
    """One DHCP message. Addresses are :class:`IPv4Address`; ``chaddr`` is the 16-byte field,
    ``sname``/``file`` the NUL-terminated header strings (bytes, without padding), ``options``
    the raw option values keyed by code (RFC 2132), in insertion order for encoding."""

    op: int = BOOTREQUEST
    htype: int = 1
    hlen: int = 6
    hops: int = 0
    xid: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: IPv4Address = field(default_factory=lambda: IPv4Address(0))
    yiaddr: IPv4Address = field(default_factory=lambda: IPv4Address(0))
    siaddr: IPv4Address = field(default_factory=lambda: IPv4Address(0))
    giaddr: IPv4Address = field(default_factory=lambda: IPv4Address(0))
    chaddr: bytes = b"\0" * 16
    sname: bytes = b""
    file: bytes = b""
    options: dict[int, bytes] = field(default_factory=dict)

    # -- typed accessors ------------------------------------------------------------------

    @property
    def mac(self) -> str:
        """The hardware address, lowercase colon-separated (``hlen`` bytes of ``chaddr``)."""
        return ":".join(f"{b:02x}" for b in self.chaddr[: min(self.hlen, 16)])

    @property
    def msg_type(self) -> int | None:
        """Option 53, or None for a plain BOOTP message."""
        v = self.options.get(OPT_MSG_TYPE)
        return v[0] if v and len(v) == 1 else None

    def opt_ip(self, code: int) -> IPv4Address | None:
        """An option holding one IPv4 address (50, 54...), or None if absent or not 4 bytes."""
        v = self.options.get(code)
        return _ip(v) if v is not None and len(v) == 4 else None

    def opt_u16(self, code: int) -> int | None:
        """An option holding one 16-bit unsigned integer in network byte order (57, maximum message
        size: RFC 2132 9.10), or None if absent or not 2 bytes."""
        v = self.options.get(code)
        return struct.unpack("!H", v)[0] if v is not None and len(v) == 2 else None

    @property
    def client_arch(self) -> int | None:
        """Option 93 (RFC 4578 2.1): the first architecture type (0 BIOS, 7/9 EFI x86-64...)."""
        v = self.options.get(OPT_CLIENT_ARCH)
        return struct.unpack("!H", v[:2])[0] if v is not None and len(v) >= 2 else None

    @property
    def vendor_class(self) -> bytes:
        """Option 60, e.g. ``PXEClient:Arch:00000:UNDI:002001`` (empty if absent)."""
        return self.options.get(OPT_VENDOR_CLASS, b"")

    @property
    def is_pxe(self) -> bool:
        """A PXE client: option 60 starts with ``PXEClient`` (PXE spec 2.1, RFC 4578)."""
        return self.vendor_class.startswith(b"PXEClient")

    @property
    def user_classes(self) -> list[bytes]:
        """Option 77 (RFC 3004) as a list of classes. iPXE sends the bare string ``iPXE``
        rather than RFC 3004's length-prefixed list, so both readings are offered."""
        v = self.options.get(OPT_USER_CLASS)
        if not v:
            return []
        out = [v]
        i = 0
        parsed: list[bytes] = []
        while i < len(v):
            ln = v[i]
            if ln == 0 or i + 1 + ln > len(v):
                parsed = []
                break
            parsed.append(v[i + 1:i + 1 + ln])
            i += 1 + ln
        return out + parsed

    @property
    def hostname(self) -> str | None:
        """Option 12 (RFC 2132 3.14) as text, bytes that are not ASCII replaced; None if absent or
        empty."""
        v = self.options.get(OPT_HOSTNAME)
        return v.decode("ascii", "replace") if v else None

    # -- encoding -------------------------------------------------------------------------

    def encode(self, min_size: int = BOOTP_MIN_SIZE) -> bytes:
        """The wire form: header, cookie, options (long values split per RFC 3396), End, then
        zero padding up to ``min_size`` bytes. Options 0, 52 and 255 in :attr:`options` are
        ignored: they frame the options area (RFC 2132 3.1, 3.2, 9.3) and are not values.
        :class:`MalformedPacket` if a field does not fit."""
        if len(self.sname) > 63 or len(self.file) > 127:
            raise MalformedPacket("sname (max 63 bytes) or file (max 127 bytes) too long")
        if len(self.chaddr) > 16:
            raise MalformedPacket("chaddr longer than 16 bytes")
        head = _HEADER.pack(
            self.op, self.htype, self.hlen, self.hops, self.xid, self.secs, self.flags,
            self.ciaddr.packed, self.yiaddr.packed, self.siaddr.packed, self.giaddr.packed,
            self.chaddr.ljust(16, b"\0"), self.sname.ljust(64, b"\0"),
            self.file.ljust(128, b"\0"))
        parts = [head, MAGIC_COOKIE]
        # message type first: some PXE ROMs look for it there
        order = sorted(self.options, key=lambda c: c != OPT_MSG_TYPE)
        for code in order:
            if code in (OPT_PAD, OPT_END, OPT_OVERLOAD):
                continue  # framing, not data: this encoder never overloads sname/file
            value = self.options[code]
            if not value:
                parts.append(bytes((code, 0)))
            for i in range(0, len(value), 255):
                chunk = value[i:i + 255]
                parts.append(bytes((code, len(chunk))) + chunk)
        parts.append(bytes((OPT_END,)))
        out = b"".join(parts)
        if len(out) < min_size:
            out += b"\0" * (min_size - len(out))
        return out


def decode(data: bytes) -> DhcpPacket:
    """Parse one datagram. :class:`MalformedPacket` (and only that) if it is shorter than 240
    bytes, lacks the magic cookie, has an op other than 1/2, an hlen over 16, or an option whose
    length runs past the end of its area (including the ``file``/``sname`` overload areas)."""
    if len(data) < MIN_LEN:
        raise MalformedPacket(f"truncated: {len(data)} bytes, a DHCP message has at least {MIN_LEN}")
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname,
     file) = _HEADER.unpack_from(data, 0)
    if data[HEADER_LEN:MIN_LEN] != MAGIC_COOKIE:
        raise MalformedPacket(f"wrong magic cookie {data[HEADER_LEN:MIN_LEN].hex()} at offset 236 "
                              f"(expected {MAGIC_COOKIE.hex()})")
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise MalformedPacket(f"op {op} at offset 0 (expected 1 BOOTREQUEST or 2 BOOTREPLY)")
    if hlen > 16:
        raise MalformedPacket(f"hlen {hlen} at offset 2 (at most 16)")
    options: dict[int, bytes] = {}
    parse_options(data[MIN_LEN:], MIN_LEN, options)
    overload = options.pop(OPT_OVERLOAD, None)
    if overload is not None:
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise MalformedPacket(f"option 52 (overload) value {overload.hex()} (expected 1, 2 or 3)")
        # RFC 2131 4.1: options, then file, then sname
        if overload[0] & 1:
            parse_options(file, 108, options)
            file = b""
        if overload[0] & 2:
            parse_options(sname, 44, options)
            sname = b""
        # RFC 2132 9.3: option 52 means something only in the options field; a copy found in
        # the overloaded areas is not a second overload and is dropped
        options.pop(OPT_OVERLOAD, None)
    return DhcpPacket(
        op=op, htype=htype, hlen=hlen, hops=hops, xid=xid, secs=secs, flags=flags,
        ciaddr=_ip(ciaddr), yiaddr=_ip(yiaddr), siaddr=_ip(siaddr), giaddr=_ip(giaddr),
        chaddr=chaddr, sname=_cstring(sname), file=_cstring(file), options=options)


# -- option value builders -----------------------------------------------------------------

def o_ip(*addrs: IPv4Address | str) -> bytes:
    """One or more IPv4 addresses (options 1, 3, 6, 28, 54...)."""
    return b"".join((a if isinstance(a, ipaddress.IPv4Address) else ipaddress.IPv4Address(a)).packed
                    for a in addrs)


def o_u32(v: int) -> bytes:
    """A 32-bit unsigned integer (option 51 lease time, 58, 59), seconds."""
    return struct.pack("!I", v)


def o_u8(v: int) -> bytes:
    """An 8-bit unsigned option value (RFC 2132, e.g. option 53's message type); ValueError
    outside 0-255."""
    return bytes((v,))


def o_text(s: str) -> bytes:
    """An NVT ASCII string (options 12, 15, 56, 60, 66, 67); not NUL-terminated (RFC 2132 2)."""
    return s.encode("ascii")
