"""What a DHCP server of :mod:`sidusctl.serve.dhcp` is told, as plain typed values: the
static :class:`Reservation` of each machine (the one reservation type of sidusctl), the
:class:`BootPolicy` that picks a boot file by client architecture (RFC 4578 option 93), user
class (option 77 ``iPXE``) and vendor class (option 60 ``HTTPClient``, UEFI HTTP Boot), the
server's :class:`DhcpConfig`, its counters (:class:`DhcpStats`), and the address of an
interface (:func:`interface_ipv4`).
"""

from __future__ import annotations

import fcntl
import socket
import struct
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal

from sidusctl.core.errors import ConfigError, PrerequisiteError
from sidusctl.serve.dns import check_domain

_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B

# RFC 4578 2.1 / IANA processor architecture types
ARCH_BIOS = 0
ARCH_EFI_IA32 = 6
ARCH_EFI_X64 = 7
ARCH_EFI_BC = 9
ARCH_EFI_ARM32 = 10
ARCH_EFI_ARM64 = 11
ARCH_EFI_X64_HTTP = 16
#: option 60 of UEFI HTTP Boot clients starts with this (``HTTPClient:Arch:00016:UNDI:003001``);
#: the server's answer carries it alone (UEFI spec 2.10, 24.7.2 "DHCP options for HTTP Boot")
HTTP_CLIENT = b"HTTPClient"


@dataclass(frozen=True)
class Reservation:
    """A static assignment: ``mac`` (normalized by :func:`sidusctl.core.mac.normalize_mac`), ``ip``,
    ``hostname`` (option 12, without the domain), ``boot_file`` (overrides the policy)."""

    mac: str
    ip: IPv4Address
    hostname: str | None = None
    boot_file: str | None = None


@dataclass(frozen=True)
class BootPolicy:
    """Boot file names by client architecture (RFC 4578 option 93). ``ipxe_script``: what a
    client announcing user class ``iPXE`` (option 77) gets, usually an ``http://`` URL or a
    TFTP path of a ``#!ipxe`` script; None gives iPXE the same file as its architecture (only
    sensible when that file is not iPXE itself). ``extra`` maps other architecture codes.
    ``http_x64``: the ``http://`` URL given to x64 UEFI HTTP Boot clients (vendor class
    ``HTTPClient``, arch 16); None: they get no boot file (no HTTP server)."""

    bios: str | None = "pxelinux.0"
    efi_x64: str | None = "grubnetx64.efi"
    efi_ia32: str | None = None
    efi_arm64: str | None = None
    ipxe_script: str | None = None
    extra: tuple[tuple[int, str], ...] = ()
    http_x64: str | None = None

    def boot_file(self, arch: int | None, ipxe: bool,
                  http: bool = False) -> tuple[str | None, str]:
        """``(file or None, reason)`` for a client of architecture ``arch`` (None: option 93
        absent, treated as BIOS when the client is a PXE client); ``http``: the client is a
        UEFI HTTP Boot client (option 60 ``HTTPClient``)."""
        if ipxe and self.ipxe_script:
            return self.ipxe_script, "iPXE user class: script"
        if http:
            if arch not in (None, ARCH_EFI_X64_HTTP):
                return None, f"HTTPClient arch {arch}: no HTTP boot file for it"
            if self.http_x64 is None:
                return None, "HTTPClient: no HTTP boot URL (HTTP server off)"
            return self.http_x64, "HTTPClient arch 16 x64 UEFI HTTP"
        a = ARCH_BIOS if arch is None else arch
        for code, name in self.extra:
            if code == a:
                return name, f"arch {a}"
        if a == ARCH_BIOS:
            return self.bios, "arch 0 BIOS"
        if a in (ARCH_EFI_X64, ARCH_EFI_BC):
            return self.efi_x64, f"arch {a} x86-64 UEFI"
        if a == ARCH_EFI_IA32:
            return self.efi_ia32, "arch 6 IA32 UEFI"
        if a == ARCH_EFI_ARM64:
            return self.efi_arm64, "arch 11 ARM64 UEFI"
        return None, f"arch {a}: no boot file configured"


@dataclass(frozen=True)
class DhcpConfig:
    """Everything the server needs, validated by :meth:`validate`.

    ``interface``: the one device served (mandatory). ``server_ip``/``subnet``: default to the
    interface's first IPv4 address and its prefix. ``router``, ``dns_servers``, ``domain``:
    options 3, 6, 15. ``lease_time`` seconds (option 51). ``pool``: first and last address
    handed to MACs without a reservation when ``unknown == "pool"``; ``unknown == "ignore"``
    answers reserved MACs only. ``next_server``: siaddr (default ``server_ip``);
    ``tftp_server_name``: option 66 (default the next-server address as text). ``proxy``:
    proxyDHCP mode. ``lease_file``: the SQLite store (full mode). ``cache_threshold``: a
    fraction of ``lease_time`` (0 turns it off): a REQUEST from a machine whose lease on the
    same address and hostname began less than that long ago is answered with that lease and
    its remaining time, without a new commit (as ISC dhcpd's ``dhcp-cache-threshold`` and
    Kea's ``cache-threshold``, both 25 % by default): a network boot asks for its address two
    or three times in a few seconds (PXE ROM, iPXE, the kernel), and only the first writes.
    """

    interface: str
    lease_file: Path
    reservations: tuple[Reservation, ...] = ()
    boot: BootPolicy = BootPolicy()
    server_ip: IPv4Address | None = None
    subnet: IPv4Network | None = None
    router: IPv4Address | None = None
    dns_servers: tuple[IPv4Address, ...] = ()
    domain: str | None = None
    lease_time: int = 3600
    pool: tuple[IPv4Address, IPv4Address] | None = None
    unknown: Literal["pool", "ignore"] = "ignore"
    next_server: IPv4Address | None = None
    tftp_server_name: str | None = None
    proxy: bool = False
    port: int = 67
    proxy_port: int = 4011
    durable: bool = False
    cache_threshold: float = 0.25

    def validate(self, source: str = "DHCP configuration") -> None:
        """:class:`ConfigError` naming the first inconsistency (duplicate MAC or address,
        address outside the subnet, pool reversed or outside the subnet...)."""
        if not self.interface:
            raise ConfigError(source, "interface", "no interface given",
                              expected="the name of the one interface to serve")
        macs: set[str] = set()
        ips: set[IPv4Address] = set()
        for r in self.reservations:
            if r.mac in macs:
                raise ConfigError(source, "reservations", f"MAC {r.mac} reserved twice")
            if r.ip in ips:
                raise ConfigError(source, "reservations", f"address {r.ip} reserved twice")
            macs.add(r.mac)
            ips.add(r.ip)
            if self.subnet is not None and r.ip not in self.subnet:
                raise ConfigError(source, "reservations",
                                  f"{r.mac}: address {r.ip} is outside {self.subnet}")
        if self.pool is not None:
            lo, hi = self.pool
            if int(hi) < int(lo):
                raise ConfigError(source, "pool", f"{lo}-{hi} is reversed",
                                  expected="FIRST-LAST with FIRST <= LAST")
            if self.subnet is not None and (lo not in self.subnet or hi not in self.subnet):
                raise ConfigError(source, "pool", f"{lo}-{hi} is not inside {self.subnet}")
        if self.unknown == "pool" and self.pool is None and not self.proxy:
            raise ConfigError(source, "unknown", "'pool' chosen but no pool given",
                              expected="a pool, or unknown = 'ignore'")
        if self.domain is not None:
            check_domain(self.domain, source)
        if not 60 <= self.lease_time <= 2**31:
            raise ConfigError(source, "lease_time", f"{self.lease_time}",
                              expected="seconds between 60 and 2^31")
        if not 0 <= self.cache_threshold < 1:
            raise ConfigError(source, "cache_threshold", f"{self.cache_threshold}",
                              expected="a fraction of the lease time, from 0 (off) to below 1")


#: seconds after which a datagram handled is counted ``late`` (:class:`DhcpStats`)
LATE_S = 1.0


@dataclass
class DhcpStats:
    """Counters since start (one per decision kind). ``malformed``: datagrams the codec could
    not decode (:class:`~sidusctl.serve.dhcp_codec.MalformedPacket`), dropped. ``internal_errors``:
    bugs, i.e. any other exception while handling a decoded message, logged at error level with
    the traceback; 0 in a healthy server (the tests assert it). ``wait_max_ms``: the longest a
    datagram waited between its arrival (the kernel's receive time stamp, ``SO_TIMESTAMPNS``,
    socket(7)) and its handling, milliseconds; ``late``: datagrams handled more than
    :data:`LATE_S` after arrival (a client has retransmitted by then: RFC 2131 section 4.1
    and PXE ROMs wait 4 s, klibc's ipconfig and simulated nodes less)."""

    received: int = 0
    malformed: int = 0
    internal_errors: int = 0
    ignored: int = 0
    offers: int = 0
    acks: int = 0
    naks: int = 0
    #: ACKs that kept a recent lease instead of committing a new one (``cache_threshold``)
    kept: int = 0
    releases: int = 0
    declines: int = 0
    informs: int = 0
    proxy_offers: int = 0
    proxy_acks: int = 0
    wait_max_ms: int = 0
    late: int = 0

    def as_dict(self) -> dict[str, int]:
        """Every counter by its field name."""
        return asdict(self)


def interface_ipv4(ifname: str) -> tuple[IPv4Address, IPv4Network]:
    """The first IPv4 address of ``ifname`` and its network (SIOCGIFADDR/SIOCGIFNETMASK).
    :class:`PrerequisiteError` if the interface does not exist or has no IPv4 address."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        req = struct.pack("256s", ifname.encode()[:15])
        addr = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24]
        mask = fcntl.ioctl(s.fileno(), _SIOCGIFNETMASK, req)[20:24]
    except OSError as e:
        raise PrerequisiteError(
            f"interface {ifname}: no IPv4 address ({e.strerror})",
            hint=f"give {ifname} an address (ip addr add ... dev {ifname}) or check its name") from e
    finally:
        s.close()
    ip = IPv4Address(addr)
    net = IPv4Network(f"{ip}/{IPv4Address(mask)}", strict=False)
    return ip, net
