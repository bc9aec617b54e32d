"""DHCPv4 server for netbooting: full mode (static reservations, optional dynamic pool) and
proxyDHCP mode (PXE spec 2.1: boot information only, no addresses, ports 67 and 4011).

Protocol: RFC 2131 (state machine, section 4.3 server behaviour, 4.1 reply destinations),
RFC 2132 (options 1, 3, 6, 12, 15, 28, 51, 54, 58, 59, 66, 67), RFC 4578 (option 93 client
architecture, 97 UUID echoed to PXE clients), RFC 3046 (option 82 echoed to relays).

Boot file choice (:class:`BootPolicy`): iPXE (option 77 user class ``iPXE``) gets its script,
which breaks the chain-load loop; otherwise option 93 picks it (0 BIOS → ``pxelinux.0``, 7/9
x86-64 UEFI → an EFI binary...). A :class:`Reservation` may name its own boot file.
UEFI HTTP Boot clients (option 60 starting with ``HTTPClient``; RFC 4578 arch 16 for x64)
get option 60 ``HTTPClient`` back and an ``http://`` URL as boot file (UEFI specification
2.10, section 24.7 "HTTP Boot"), in full and proxy mode.

Safety: the sockets are bound to one interface with SO_BINDTODEVICE; there is no way to run
the server without naming the interface. Every decision is logged with the client's MAC.
Malformed datagrams are dropped and counted (:class:`DhcpStats`); the handler never raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import struct
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

from sidusctl.core.errors import ConfigError, PrerequisiteError, StateError
from sidusctl.core.log import get_logger
from sidusctl.serve import dhcp_codec as dc
from sidusctl.serve.dhcp_config import (
    HTTP_CLIENT,
    LATE_S,
    DhcpConfig,
    DhcpStats,
    Reservation,
    interface_ipv4,
)
from sidusctl.serve.leases import LeaseStore, LeaseWriteError

log = get_logger("serve.dhcp")

_SO_TIMESTAMPNS = 35  # = SCM_TIMESTAMPNS (asm-generic/socket.h); not in Python's socket module
_ANC_SPACE = socket.CMSG_SPACE(16)  # one struct timespec
OFFER_HOLD = 60.0  # seconds an offered address stays set aside for its client
DECLINE_HOLD = 600.0  # seconds a declined address is not handed out (RFC 2131 3.1.5)


class DhcpServer:
    """The server state machine plus its sockets.

    ``handle(data, src, port)`` is the whole protocol as a pure-ish function (replies as a list
    of ``(bytes, (host, port))``), which the tests and the fuzzer drive directly; ``start()``
    binds the sockets and feeds it. ``on_event(kind, mac, ip)`` (optional) reports ``ack`` and
    ``proxy`` decisions for the per-node status.
    """

    def __init__(self, cfg: DhcpConfig, *, server_ip: IPv4Address | None = None,
                 subnet: IPv4Network | None = None,
                 on_event: Callable[[str, str, str], None] | None = None) -> None:
        self.stats = DhcpStats()
        self.on_event = on_event
        self._socks: list[tuple[socket.socket, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.offers: dict[str, tuple[IPv4Address, float]] = {}
        self._offered_ip: dict[IPv4Address, str] = {}
        self._cursor = 0
        self.store: LeaseStore | None = None
        self._apply(cfg, server_ip, subnet)
        if not cfg.proxy:
            self.store = LeaseStore(cfg.lease_file, durable=cfg.durable)

    # -- configuration ---------------------------------------------------------------------

    def _apply(self, cfg: DhcpConfig, server_ip: IPv4Address | None,
               subnet: IPv4Network | None) -> None:
        if server_ip is None or subnet is None:
            if cfg.server_ip is not None and cfg.subnet is not None:
                server_ip, subnet = cfg.server_ip, cfg.subnet
            else:
                ip, net = interface_ipv4(cfg.interface)
                server_ip = cfg.server_ip or ip
                subnet = cfg.subnet or net
        self.server_ip = server_ip
        self.subnet = subnet
        cfg = dataclasses.replace(cfg, server_ip=server_ip, subnet=subnet)
        cfg.validate()
        self.cfg = cfg
        self.by_mac = {r.mac: r for r in cfg.reservations}
        self.reserved_ips = {r.ip: r.mac for r in cfg.reservations}
        # the options every OFFER and ACK carries, encoded once per configuration
        common = {dc.OPT_SUBNET_MASK: dc.o_ip(subnet.netmask),
                  dc.OPT_BROADCAST: dc.o_ip(subnet.broadcast_address)}
        if cfg.router is not None:
            common[dc.OPT_ROUTER] = dc.o_ip(cfg.router)
        if cfg.dns_servers:
            common[dc.OPT_DNS] = dc.o_ip(*cfg.dns_servers)
        if cfg.domain:
            common[dc.OPT_DOMAIN] = dc.o_text(cfg.domain)
        self._common_opts = common
        self._server_id = dc.o_ip(server_ip)
        self.next_server = cfg.next_server or server_ip
        if cfg.pool:
            lo, hi = int(cfg.pool[0]), int(cfg.pool[1])
            self._pool_range = (lo, hi)
        else:
            self._pool_range = (1, 0)
        self._cursor = 0

    def reload(self, cfg: DhcpConfig) -> None:
        """Apply a new configuration (SIGHUP) without dropping leases. The interface and mode
        cannot change while running; :class:`ConfigError` if they do or if ``cfg`` is invalid
        (the old configuration then stays in force)."""
        if cfg.interface != self.cfg.interface or cfg.proxy != self.cfg.proxy:
            raise ConfigError("reload", "interface", "interface and proxy mode cannot change "
                              "on reload", expected="a restart")
        self._apply(cfg, cfg.server_ip or self.server_ip, cfg.subnet or self.subnet)
        self.offers.clear()
        self._offered_ip.clear()
        log.info("DHCP: configuration reloaded: %d reservations, pool %s", len(self.by_mac),
                 f"{cfg.pool[0]}-{cfg.pool[1]}" if cfg.pool else "none")

    # -- sockets ---------------------------------------------------------------------------

    def _bind(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.cfg.interface.encode())
            s.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            s.setblocking(False)
            s.bind(("0.0.0.0", port))
        except OSError as e:
            s.close()
            raise PrerequisiteError(
                f"cannot bind DHCP port {port} on {self.cfg.interface}: {e.strerror}",
                hint="another DHCP server may be running on this interface, or run as root") from e
        return s

    async def start(self) -> None:
        """Bind port 67 (and 4011 in proxy mode) on the interface and start answering."""
        self._loop = asyncio.get_running_loop()
        ports = [self.cfg.port] + ([self.cfg.proxy_port] if self.cfg.proxy else [])
        for port in ports:
            s = self._bind(port)
            self._socks.append((s, port))
            self._loop.add_reader(s.fileno(), self._readable, s, port)
        log.info("DHCP %s on %s (%s, server %s, next-server %s, %d reservations, pool %s, "
                 "unknown MACs: %s)", "proxyDHCP" if self.cfg.proxy else "full",
                 self.cfg.interface, "ports " + ",".join(map(str, ports)), self.server_ip,
                 self.next_server, len(self.by_mac),
                 f"{self.cfg.pool[0]}-{self.cfg.pool[1]}" if self.cfg.pool else "none",
                 "n/a" if self.cfg.proxy else self.cfg.unknown)

    def close(self) -> None:
        """Stop answering: remove the sockets from the loop, close them and the lease store;
        idempotent."""
        for s, _ in self._socks:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(s.fileno())
            s.close()
        self._socks.clear()
        if self.store is not None:
            self.store.close()
            self.store = None

    def _readable(self, s: socket.socket, port: int) -> None:
        for _ in range(64):
            try:
                data, anc, _flags, src = s.recvmsg(4096, _ANC_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self._waited(anc)
            for reply, dest in self.handle(data, src, port):
                try:
                    s.sendto(reply, dest)
                except OSError as e:
                    log.warning("DHCP: sending to %s:%d failed: %s", dest[0], dest[1], e.strerror)

    def _waited(self, anc: list[tuple[int, int, bytes]]) -> None:
        """Count how long a datagram waited in the socket: its kernel receive time stamp
        (``SCM_TIMESTAMPNS``: two native longs, seconds and nanoseconds) against now."""
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(raw) >= 16:
                sec, nsec = struct.unpack("@qq", raw[:16])
                waited = time.time() - (sec + nsec / 1e9)
                self.stats.wait_max_ms = max(self.stats.wait_max_ms, int(waited * 1000))
                if waited > LATE_S:
                    self.stats.late += 1

    # -- protocol --------------------------------------------------------------------------

    def handle(self, data: bytes, src: tuple[str, int], port: int) -> list[tuple[bytes, tuple[str, int]]]:
        """Process one datagram received on ``port`` from ``src``; return the replies and
        their destinations. Never raises: input the codec cannot decode is counted in
        ``stats.malformed`` and dropped; any other exception is a bug, counted in
        ``stats.internal_errors`` and logged with its traceback (no reply is sent)."""
        self.stats.received += 1
        try:
            pkt = dc.decode(data)
        except dc.MalformedPacket as e:
            self.stats.malformed += 1
            log.debug("DHCP: dropped a malformed datagram from %s: %s", src[0], e)
            return []
        try:
            return self._dispatch(pkt, src, port)
        except Exception:  # a bug, not bad input: counted apart; it must never stop the server
            self.stats.internal_errors += 1
            log.exception("DHCP %s: internal error handling a message from %s", pkt.mac, src[0])
            return []

    def _ignore(self, mac: str, why: str, level: int = logging.INFO) -> list[tuple[bytes, tuple[str, int]]]:
        self.stats.ignored += 1
        log.log(level, "DHCP %s: ignored: %s", mac, why)
        return []

    def _dispatch(self, pkt: dc.DhcpPacket, src: tuple[str, int],
                  port: int) -> list[tuple[bytes, tuple[str, int]]]:
        mac = pkt.mac
        if pkt.op != dc.BOOTREQUEST:
            return self._ignore(mac, "not a BOOTREQUEST", logging.DEBUG)
        if pkt.htype != 1 or pkt.hlen != 6:
            return self._ignore(mac, f"hardware type {pkt.htype}/{pkt.hlen} is not Ethernet")
        mt = pkt.msg_type
        if mt is None:
            return self._ignore(mac, "plain BOOTP (no option 53) is not served")
        if self.cfg.proxy:
            return self._proxy(pkt, mac, mt, src, port)
        if mt == dc.DISCOVER:
            return self._discover(pkt, mac)
        if mt == dc.REQUEST:
            return self._request(pkt, mac)
        if mt == dc.RELEASE:
            return self._release(pkt, mac)
        if mt == dc.DECLINE:
            return self._decline(pkt, mac)
        if mt == dc.INFORM:
            return self._inform(pkt, mac)
        return self._ignore(mac, f"message type {mt} is not for a server")

    # address choice -----------------------------------------------------------------------

    def _pool_size(self) -> int:
        lo, hi = self._pool_range
        return max(0, hi - lo + 1)

    def _in_pool(self, ip: IPv4Address) -> bool:
        lo, hi = self._pool_range
        return lo <= int(ip) <= hi

    def _free(self, ip: IPv4Address, mac: str, now: float) -> bool:
        """Whether ``ip`` may go to ``mac`` now: not reserved for, leased to or offered to
        anyone else, not declined, not the server's own."""
        if ip in (self.server_ip, self.cfg.router, self.subnet.network_address,
                  self.subnet.broadcast_address):
            return False
        owner = self.reserved_ips.get(ip)
        if owner is not None and owner != mac:
            return False
        assert self.store is not None
        holder = self.store.holder(ip, now)
        if holder is not None and holder != mac:
            return False
        o = self._offered_ip.get(ip)
        if o is not None and o != mac:
            held = self.offers.get(o)
            if held is not None and held[0] == ip and held[1] > now:
                return False
        return True

    def _choose(self, mac: str, now: float) -> tuple[IPv4Address | None, str]:
        """The address for ``mac``: reservation, its current lease, its offer, or a free pool
        address. ``(None, reason)`` when there is none to give."""
        r = self.by_mac.get(mac)
        if r is not None:
            return r.ip, f"reservation {r.hostname or ''}".strip()
        if self.cfg.unknown != "pool":
            return None, "unknown MAC and unknown = ignore"
        assert self.store is not None
        lease = self.store.by_mac.get(mac)
        if lease is not None and self._in_pool(lease.ip) and self._free(lease.ip, mac, now):
            return lease.ip, "its lease"
        off = self.offers.get(mac)
        if off is not None and self._in_pool(off[0]) and self._free(off[0], mac, now):
            return off[0], "its offer"
        size = self._pool_size()
        lo = self._pool_range[0]
        for i in range(size):
            ip = IPv4Address(lo + (self._cursor + i) % size)
            if self._free(ip, mac, now):
                self._cursor = (self._cursor + i + 1) % size
                return ip, "pool"
        return None, "pool exhausted"

    def _acceptable(self, mac: str, ip: IPv4Address, now: float) -> bool | None:
        """For INIT-REBOOT/RENEWING: True (ACK), False (NAK), None (not ours: stay silent)."""
        r = self.by_mac.get(mac)
        if r is not None:
            return ip == r.ip
        if ip not in self.subnet:
            return False  # RFC 2131 4.3.2: wrong network
        if self.cfg.unknown != "pool":
            return None
        if not self._in_pool(ip):
            return False
        return self._free(ip, mac, now)

    # replies ------------------------------------------------------------------------------

    def _reply(self, pkt: dc.DhcpPacket, mt: int, yiaddr: IPv4Address | None,
               mac: str, *, lease: bool = True, lease_s: int | None = None) -> dc.DhcpPacket:
        """A reply of message type ``mt``; with ``lease``, options 51, 58, 59 (RFC 2132 9.2,
        9.11, 9.12: the lease, renewal at 1/2 and rebinding at 7/8 of it) for ``lease_s``
        seconds, the configured lease time by default."""
        opts: dict[int, bytes] = {dc.OPT_MSG_TYPE: dc.o_u8(mt), dc.OPT_SERVER_ID: self._server_id}
        r = self.by_mac.get(mac)
        if lease:
            t = self.cfg.lease_time if lease_s is None else lease_s
            opts[dc.OPT_LEASE_TIME] = dc.o_u32(t)
            opts[dc.OPT_T1] = dc.o_u32(t // 2)
            opts[dc.OPT_T2] = dc.o_u32(t * 7 // 8)
        if mt != dc.NAK:
            opts.update(self._common_opts)
            if r is not None and r.hostname:
                opts[dc.OPT_HOSTNAME] = dc.o_text(r.hostname)
        out = dc.DhcpPacket(op=dc.BOOTREPLY, htype=pkt.htype, hlen=pkt.hlen, xid=pkt.xid,
                            flags=pkt.flags, giaddr=pkt.giaddr, chaddr=pkt.chaddr,
                            yiaddr=yiaddr or IPv4Address(0), options=opts)
        if dc.OPT_RELAY_AGENT in pkt.options:  # RFC 3046 2.2: echo it back
            out.options[dc.OPT_RELAY_AGENT] = pkt.options[dc.OPT_RELAY_AGENT]
        return out

    def _boot(self, pkt: dc.DhcpPacket, out: dc.DhcpPacket, r: Reservation | None) -> str:
        """Fill siaddr, file, options 66/67 (and echo 97) for a booting client; the reason."""
        out.siaddr = self.next_server
        ipxe = any(c == b"iPXE" for c in pkt.user_classes)
        http = pkt.vendor_class.startswith(HTTP_CLIENT)
        booting = pkt.is_pxe or pkt.client_arch is not None or ipxe or http
        if not booting:
            return "not a network-boot client"
        name: str | None
        if r is not None and r.boot_file and not ipxe and not http:
            name, why = r.boot_file, "reservation's boot file"
        else:
            name, why = self.cfg.boot.boot_file(pkt.client_arch, ipxe, http)
        if name:
            raw = dc.o_text(name)
            if len(raw) <= 127:
                out.file = raw
            out.options[dc.OPT_BOOTFILE] = raw
            if http and not ipxe:
                # an HTTP Boot client takes an offer only with option 60 "HTTPClient"
                out.options[dc.OPT_VENDOR_CLASS] = HTTP_CLIENT
            else:
                out.options[dc.OPT_TFTP_SERVER] = dc.o_text(
                    self.cfg.tftp_server_name or str(self.next_server))
        if dc.OPT_CLIENT_UUID in pkt.options:
            out.options[dc.OPT_CLIENT_UUID] = pkt.options[dc.OPT_CLIENT_UUID]
        return f"boot file {name} ({why})" if name else why

    def _dest(self, pkt: dc.DhcpPacket, mt: int) -> tuple[str, int]:
        # RFC 2131 4.1: relay first; NAK broadcast; renewing clients unicast; else broadcast
        # (we do not write ARP entries, so a client without an address is reached by broadcast)
        if int(pkt.giaddr):
            return str(pkt.giaddr), 67
        if mt != dc.NAK and int(pkt.ciaddr):
            return str(pkt.ciaddr), 68
        return "255.255.255.255", 68

    def _send(self, pkt: dc.DhcpPacket, out: dc.DhcpPacket) -> list[tuple[bytes, tuple[str, int]]]:
        mt = out.options[dc.OPT_MSG_TYPE][0]
        return [(out.encode(), self._dest(pkt, mt))]

    def _discover(self, pkt: dc.DhcpPacket, mac: str) -> list[tuple[bytes, tuple[str, int]]]:
        now = time.time()
        ip, why = self._choose(mac, now)
        if ip is None:
            return self._ignore(mac, f"DISCOVER: {why}")
        old = self.offers.get(mac)
        if old is not None and self._offered_ip.get(old[0]) == mac:
            del self._offered_ip[old[0]]
        self.offers[mac] = (ip, now + OFFER_HOLD)
        self._offered_ip[ip] = mac
        out = self._reply(pkt, dc.OFFER, ip, mac)
        bwhy = self._boot(pkt, out, self.by_mac.get(mac))
        self.stats.offers += 1
        log.info("DHCP %s: DISCOVER -> OFFER %s (%s; %s)", mac, ip, why, bwhy)
        return self._send(pkt, out)

    def _nak(self, pkt: dc.DhcpPacket, mac: str, why: str) -> list[tuple[bytes, tuple[str, int]]]:
        self.stats.naks += 1
        out = self._reply(pkt, dc.NAK, None, mac, lease=False)
        out.options[dc.OPT_MESSAGE] = dc.o_text(why[:200])
        log.info("DHCP %s: REQUEST -> NAK (%s)", mac, why)
        return self._send(pkt, out)

    def _ack(self, pkt: dc.DhcpPacket, mac: str, ip: IPv4Address,
             state: str) -> list[tuple[bytes, tuple[str, int]]]:
        assert self.store is not None
        r = self.by_mac.get(mac)
        hostname = r.hostname if r is not None else pkt.hostname
        now = time.time()
        lease_s = self._kept(mac, ip, hostname, now)
        if lease_s is None:
            lease_s = self.cfg.lease_time
            try:
                self.store.bind(mac, ip, hostname, now + lease_s)
            except LeaseWriteError as e:
                # no ACK without a committed lease; no NAK either: the client asks again,
                # and gets its ACK once the store can be written
                return self._ignore(mac, f"REQUEST ({state}) for {ip}: {e}", logging.WARNING)
            except StateError as e:
                return self._nak(pkt, mac, f"cannot lease {ip}: {e}")
            kept = ""
        else:
            self.stats.kept += 1
            kept = ", kept"
        self.offers.pop(mac, None)
        if self._offered_ip.get(ip) == mac:
            del self._offered_ip[ip]
        out = self._reply(pkt, dc.ACK, ip, mac, lease_s=lease_s)
        bwhy = self._boot(pkt, out, r)
        self.stats.acks += 1
        log.info("DHCP %s: REQUEST (%s) -> ACK %s (lease %d s%s; %s)", mac, state, ip,
                 lease_s, kept, bwhy)
        if self.on_event:
            self.on_event("ack", mac, str(ip))
        return self._send(pkt, out)

    def _kept(self, mac: str, ip: IPv4Address, hostname: str | None, now: float) -> int | None:
        """The seconds left of ``mac``'s lease on ``ip`` if it may be handed out again as it is
        (bound to the same hostname, begun less than ``cache_threshold`` of the lease time
        ago, and not longer than the lease time now configured), else None: a new lease is
        committed."""
        assert self.store is not None
        lease = self.store.by_mac.get(mac)
        threshold = self.cfg.cache_threshold
        if threshold <= 0 or lease is None or lease.ip != ip or lease.hostname != hostname:
            return None
        left = int(lease.expires - now)
        # not longer than the lease time in force (a reload may have shortened it)
        return left if self.cfg.lease_time * (1 - threshold) <= left <= self.cfg.lease_time \
            else None

    def _request(self, pkt: dc.DhcpPacket, mac: str) -> list[tuple[bytes, tuple[str, int]]]:
        now = time.time()
        sid = pkt.opt_ip(dc.OPT_SERVER_ID)
        req = pkt.opt_ip(dc.OPT_REQUESTED_IP)
        if sid is not None:  # SELECTING (RFC 2131 4.3.2)
            if sid != self.server_ip:
                off = self.offers.pop(mac, None)
                if off is not None and self._offered_ip.get(off[0]) == mac:
                    del self._offered_ip[off[0]]
                return self._ignore(mac, f"REQUEST for server {sid}: client chose another server")
            want = req or (pkt.ciaddr if int(pkt.ciaddr) else None)
            if want is None:
                return self._ignore(mac, "REQUEST (selecting) without a requested address")
            ip, why = self._choose(mac, now)
            if ip is None:
                return self._nak(pkt, mac, why)
            if ip != want:
                return self._nak(pkt, mac, f"requested {want}, offered {ip}")
            return self._ack(pkt, mac, ip, "selecting")
        if req is not None:  # INIT-REBOOT
            state, ip = "init-reboot", req
        elif int(pkt.ciaddr):  # RENEWING / REBINDING
            state, ip = "renewing", pkt.ciaddr
        else:
            return self._ignore(mac, "REQUEST without server id, requested address or ciaddr")
        ok = self._acceptable(mac, ip, now)
        if ok is None:
            return self._ignore(mac, f"REQUEST ({state}) for {ip}: no record of this client")
        if not ok:
            return self._nak(pkt, mac, f"{ip} is not this client's address")
        return self._ack(pkt, mac, ip, state)

    def _release(self, pkt: dc.DhcpPacket, mac: str) -> list[tuple[bytes, tuple[str, int]]]:
        assert self.store is not None
        if pkt.opt_ip(dc.OPT_SERVER_ID) not in (None, self.server_ip):
            return self._ignore(mac, "RELEASE for another server", logging.DEBUG)
        try:
            released = self.store.release(mac, pkt.ciaddr)
        except LeaseWriteError as e:
            return self._ignore(mac, f"RELEASE {pkt.ciaddr}: {e}", logging.WARNING)
        if released:
            self.stats.releases += 1
            log.info("DHCP %s: RELEASE %s: lease ended", mac, pkt.ciaddr)
        else:
            log.info("DHCP %s: RELEASE %s: it held no lease on it", mac, pkt.ciaddr)
        return []

    def _decline(self, pkt: dc.DhcpPacket, mac: str) -> list[tuple[bytes, tuple[str, int]]]:
        assert self.store is not None
        ip = pkt.opt_ip(dc.OPT_REQUESTED_IP)
        if pkt.opt_ip(dc.OPT_SERVER_ID) != self.server_ip or ip is None:
            return self._ignore(mac, "DECLINE for another server or without an address", logging.DEBUG)
        lease = self.store.by_ip.get(ip)
        if lease is None or lease.mac != mac:
            return self._ignore(mac, f"DECLINE of {ip}, which it does not hold")
        try:
            self.store.decline(ip, time.time() + DECLINE_HOLD)
        except LeaseWriteError as e:
            return self._ignore(mac, f"DECLINE {ip}: {e}", logging.WARNING)
        self.stats.declines += 1
        log.warning("DHCP %s: DECLINE %s: address in use by another host; set aside %d s",
                    mac, ip, DECLINE_HOLD)
        return []

    def _inform(self, pkt: dc.DhcpPacket, mac: str) -> list[tuple[bytes, tuple[str, int]]]:
        out = self._reply(pkt, dc.ACK, None, mac, lease=False)
        self._boot(pkt, out, self.by_mac.get(mac))
        self.stats.informs += 1
        log.info("DHCP %s: INFORM from %s -> ACK (options only)", mac, pkt.ciaddr)
        return self._send(pkt, out)

    # proxyDHCP ----------------------------------------------------------------------------

    def _proxy(self, pkt: dc.DhcpPacket, mac: str, mt: int, src: tuple[str, int],
               port: int) -> list[tuple[bytes, tuple[str, int]]]:
        http = pkt.vendor_class.startswith(HTTP_CLIENT)
        if not pkt.is_pxe and not http:
            return self._ignore(mac, f"{dc.MSG_NAMES.get(mt, mt)}: not a PXE client (proxy mode)", logging.DEBUG)
        if port == self.cfg.port:
            if mt == dc.DISCOVER:
                kind = dc.OFFER
            elif mt == dc.REQUEST and pkt.opt_ip(dc.OPT_SERVER_ID) == self.server_ip:
                kind = dc.ACK
            else:
                return self._ignore(mac, f"{dc.MSG_NAMES.get(mt, mt)} on port {port}: for the "
                                    "site DHCP server", logging.DEBUG)
        elif mt in (dc.REQUEST, dc.INFORM):
            kind = dc.ACK
        else:
            return self._ignore(mac, f"{dc.MSG_NAMES.get(mt, mt)} on port {port}")
        out = dc.DhcpPacket(op=dc.BOOTREPLY, htype=pkt.htype, hlen=pkt.hlen, xid=pkt.xid,
                            flags=pkt.flags, giaddr=pkt.giaddr, chaddr=pkt.chaddr,
                            options={dc.OPT_MSG_TYPE: dc.o_u8(kind),
                                     dc.OPT_SERVER_ID: dc.o_ip(self.server_ip),
                                     dc.OPT_VENDOR_CLASS: b"PXEClient",
                                     # PXE vendor options: sub-option 6 discovery control = 8:
                                     # boot file given, no boot-server discovery
                                     dc.OPT_VENDOR: b"\x06\x01\x08\xff"})
        if http:  # UEFI HTTP Boot: option 60 HTTPClient and the URL; PXE's option 43 is not for it
            del out.options[dc.OPT_VENDOR]
        bwhy = self._boot(pkt, out, self.by_mac.get(mac))
        if port == self.cfg.port:
            self.stats.proxy_offers += kind == dc.OFFER
            self.stats.proxy_acks += kind == dc.ACK
            dest = (str(pkt.giaddr), 67) if int(pkt.giaddr) else ("255.255.255.255", 68)
        else:
            self.stats.proxy_acks += 1
            # PXE spec 2.2.4: the boot server answers the port-4011 request where it came from
            dest = src if src[0] != "0.0.0.0" else ("255.255.255.255", 68)
        log.info("DHCP %s: proxy %s on port %d -> %s (no address; %s)", mac,
                 dc.MSG_NAMES.get(mt, mt), port, dc.MSG_NAMES[kind], bwhy)
        if self.on_event:
            self.on_event("proxy", mac, src[0])
        return [(out.encode(), dest)]
