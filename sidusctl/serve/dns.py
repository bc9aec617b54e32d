"""A small authoritative DNS server for the cluster domain (dnslib for the wire format, RFC 1035),
on asyncio so it shares the event loop with DHCP and TFTP.

It answers A queries for ``<name>.<domain>`` (and the bare ``<name>``) and PTR queries
(``in-addr.arpa``, RFC 1035 3.5) for the zone's addresses, authoritatively (AA set; NXDOMAIN for
unknown names in the domain). Every other query is forwarded over UDP to ``upstream`` and the
answer relayed, or answered REFUSED when no upstream is configured. Undecodable datagrams are
dropped and counted (``malformed``); any other exception while answering is a bug, logged at
error level with its traceback and counted apart (``internal_errors``, 0 in a healthy server),
and the query is dropped. UDP only (no TCP, no DNSSEC, no zone transfer).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address

from dnslib import PTR, QTYPE, RCODE, RR, A, DNSError, DNSRecord

from sidusctl.core.errors import ConfigError, PrerequisiteError
from sidusctl.core.log import get_logger
from sidusctl.core.names import LABEL_RE, is_domain

log = get_logger("serve.dns")


@dataclass(frozen=True)
class Zone:
    """``domain`` (e.g. ``cluster.test``), ``records``: (short name, address) pairs,
    ``ttl`` seconds for every answer."""

    domain: str
    records: tuple[tuple[str, IPv4Address], ...] = ()
    ttl: int = 300

    def validate(self, source: str = "DNS zone") -> None:
        """:class:`ConfigError` for a domain that is not a DNS name (:func:`check_domain`), a
        short name that is not one label (:data:`LABEL_RE`), or a duplicate."""
        check_domain(self.domain, source)
        seen: set[str] = set()
        for name, _ in self.records:
            if not LABEL_RE.match(name):
                raise ConfigError(source, "records", f"name {name!r}",
                                  expected="a short host name: one DNS label, without dots")
            if name.lower() in seen:
                raise ConfigError(source, "records", f"name {name!r} given twice")
            seen.add(name.lower())


def check_domain(domain: str, source: str, key: str = "domain") -> None:
    """:class:`ConfigError` (``source``, ``key``) unless ``domain`` is a DNS domain name:
    :func:`sidusctl.core.names.is_domain` (RFC 1123 labels joined by dots, at most 253
    characters, RFC 1035 section 2.3.4)."""
    if not is_domain(domain):
        raise ConfigError(source, key, repr(domain),
                          expected="a domain such as cluster.test: labels of letters, digits "
                                   "and inner '-', joined by dots")


@dataclass(frozen=True)
class DnsConfig:
    """``zone``; ``interface`` (SO_BINDTODEVICE; None only on loopback); ``address``/``port``
    to listen on; ``upstream`` ``(host, port)`` for other names, or None to refuse them;
    ``upstream_timeout`` seconds."""

    zone: Zone
    interface: str | None = None
    address: str = "0.0.0.0"
    port: int = 53
    upstream: tuple[str, int] | None = None
    upstream_timeout: float = 2.0


@dataclass
class DnsStats:
    """Counters since start. ``malformed``: datagrams dnslib cannot decode, or that are not one
    standard query; ``internal_errors``: bugs (any other exception while answering or
    forwarding), logged with a traceback."""

    queries: int = 0
    answered: int = 0
    nxdomain: int = 0
    forwarded: int = 0
    refused: int = 0
    upstream_failures: int = 0
    malformed: int = 0
    internal_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        """Every counter by its field name."""
        return asdict(self)


def _reverse_name(ip: IPv4Address) -> str:
    return ".".join(reversed(str(ip).split("."))) + ".in-addr.arpa"


class _Forward(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


@dataclass
class DnsServer:
    """``await start()`` binds; ``set_zone()`` swaps the records (SIGHUP); ``close()``."""

    cfg: DnsConfig
    stats: DnsStats = field(default_factory=DnsStats)

    def __post_init__(self) -> None:
        self.cfg.zone.validate()
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.set_zone(self.cfg.zone)

    def set_zone(self, zone: Zone) -> None:
        """Answer from ``zone`` from now on (SIGHUP reload). :class:`ConfigError` if it does not
        validate; the old zone then stays."""
        zone.validate()
        self.zone = zone
        self._suffix = "." + zone.domain.lower()
        self._a = {name.lower(): ip for name, ip in zone.records}
        self._ptr = {_reverse_name(ip): f"{name}.{zone.domain}" for name, ip in zone.records}

    @property
    def port(self) -> int:
        """The UDP port bound (the kernel's choice when ``cfg.port`` is 0); only after
        :meth:`start`."""
        assert self._transport is not None
        return int(self._transport.get_extra_info("sockname")[1])

    async def start(self) -> None:
        """Bind the UDP socket (``cfg.address``:``cfg.port``, on ``cfg.interface`` if set) and
        answer on the running loop. :class:`PrerequisiteError` if it cannot be bound."""
        loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.cfg.interface:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.cfg.interface.encode())
            s.bind((self.cfg.address, self.cfg.port))
        except OSError as e:
            s.close()
            raise PrerequisiteError(
                f"cannot bind DNS to {self.cfg.address}:{self.cfg.port}: {e.strerror}") from e
        server = self

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                """Answer ``data`` from ``addr``, or forward it upstream (RFC 1035 4.2.1, UDP)."""
                server._on_query(data, addr)

        transport, _ = await loop.create_datagram_endpoint(Proto, sock=s)
        self._transport = transport
        log.info("DNS serving %s (%d names) on %s:%d%s; other names %s", self.zone.domain,
                 len(self._a), self.cfg.address, self.port,
                 f" (interface {self.cfg.interface})" if self.cfg.interface else "",
                 f"forwarded to {self.cfg.upstream[0]}:{self.cfg.upstream[1]}"
                 if self.cfg.upstream else "refused")

    def close(self) -> None:
        """Cancel the queries being forwarded upstream and close the socket; idempotent."""
        for t in self._tasks:
            t.cancel()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- queries ---------------------------------------------------------------------------

    def answer(self, data: bytes) -> tuple[bytes | None, bool]:
        """Answer one query from the zone: ``(reply, False)``, or ``(None, True)`` when it must
        go upstream, or ``(None, False)`` to drop it. Never raises: an undecodable query counts
        in ``stats.malformed``, a bug in ``stats.internal_errors`` (logged with its traceback)."""
        try:
            q = DNSRecord.parse(data)
        except (DNSError, ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
            self.stats.malformed += 1
            log.debug("DNS: dropped an undecodable datagram: %s", e)
            return None, False
        try:
            return self._answer(q)
        except Exception:  # a bug, not bad input
            self.stats.internal_errors += 1
            log.exception("DNS: internal error answering %r", str(q.q.qname) if q.questions else "")
            return None, False

    def _answer(self, q: DNSRecord) -> tuple[bytes | None, bool]:
        if q.header.qr or q.header.opcode != 0 or len(q.questions) != 1:
            self.stats.malformed += 1
            return None, False
        self.stats.queries += 1
        qn = str(q.q.qname).rstrip(".").lower()
        qt = q.q.qtype
        reply = q.reply()
        if qn.endswith(".in-addr.arpa"):
            target = self._ptr.get(qn)
            if target is not None:
                if qt in (QTYPE.PTR, QTYPE.ANY):
                    reply.add_answer(RR(q.q.qname, QTYPE.PTR, rdata=PTR(target + "."),
                                        ttl=self.zone.ttl))
                self.stats.answered += 1
                return reply.pack(), False
            return self._elsewhere(reply)
        short = None
        if qn.endswith(self._suffix):
            short = qn[: -len(self._suffix)]
        elif qn == self.zone.domain.lower():
            short = ""
        elif "." not in qn and qn in self._a:
            short = qn
        if short is None:
            return self._elsewhere(reply)
        ip = self._a.get(short)
        if ip is None:
            if short:  # the domain apex itself exists (NODATA), other names do not
                reply.header.rcode = RCODE.NXDOMAIN
                self.stats.nxdomain += 1
            return reply.pack(), False
        if qt in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(str(ip)), ttl=self.zone.ttl))
        self.stats.answered += 1
        return reply.pack(), False

    def _elsewhere(self, reply: DNSRecord) -> tuple[bytes | None, bool]:
        if self.cfg.upstream is not None:
            return None, True
        reply.header.aa = 0
        reply.header.rcode = RCODE.REFUSED
        self.stats.refused += 1
        return reply.pack(), False

    def _on_query(self, data: bytes, addr: tuple[str, int]) -> None:
        out, forward = self.answer(data)
        if out is not None and self._transport is not None:
            self._transport.sendto(out, addr)
        elif forward:
            t = asyncio.get_running_loop().create_task(self._forward(data, addr))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _forward(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.cfg.upstream is not None
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            _Forward, remote_addr=self.cfg.upstream)
        try:
            transport.sendto(data)
            ans = await asyncio.wait_for(proto.answer, self.cfg.upstream_timeout)
            self.stats.forwarded += 1
            if self._transport is not None:
                self._transport.sendto(ans, addr)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not isinstance(e, (TimeoutError, OSError)):
                self.stats.internal_errors += 1
                log.exception("DNS: internal error forwarding a query from %s", addr[0])
                return
            self.stats.upstream_failures += 1
            log.warning("DNS: upstream %s:%d did not answer (%s); SERVFAIL to %s",
                        self.cfg.upstream[0], self.cfg.upstream[1], e or "timeout", addr[0])
            with contextlib.suppress(Exception):
                r = DNSRecord.parse(data).reply()
                r.header.rcode = RCODE.SERVFAIL
                if self._transport is not None:
                    self._transport.sendto(r.pack(), addr)
        finally:
            transport.close()
