"""The vnode model: vnetworks, vnodes, their vifaces and limits, as typed dataclasses that
round-trip through the JSON state file (``to_dict``/``from_dict``). Validation that needs only
the value lives here; validation that needs the platform (names taken, addresses free) lives in
:mod:`sidusctl.vnode.platform`.

States follow Distem: a created vnode is ``READY``; ``start`` makes it ``RUNNING``; ``stop``
makes it ``READY`` again; ``freeze``/``unfreeze`` move between ``RUNNING`` and ``FROZEN``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from sidusctl.core.errors import ConfigError
from sidusctl.subsys.cgroups import IoLimit, MemLimits
from sidusctl.subsys.net.links import IFNAMSIZ

READY, RUNNING, FROZEN = "READY", "RUNNING", "FROZEN"
FS_MODES = ("cow", "distinct", "shared")
NET_MODES = ("classical", "vxlan")
LOCALHOST = "localhost"

VNODE_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
VNET_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,11}$")
IFACE_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")


def check_vnode_name(name: str, where: str = "vnode") -> str:
    """vnode names are host names: lower-case letters, digits and '-', 1-32 characters."""
    if not VNODE_NAME_RE.match(name):
        raise ConfigError(where, "name", f"invalid vnode name {name!r}",
                          expected="a host name: lower-case letters, digits and '-', 1-32 chars")
    return name


def check_vnet_name(name: str, where: str = "vnetwork") -> str:
    """vnetwork names become the bridge's name: 1-12 characters (room for a '-vx' suffix)."""
    if not VNET_NAME_RE.match(name):
        raise ConfigError(where, "name", f"invalid vnetwork name {name!r}",
                          expected="lower-case letters, digits and '-', 1-12 characters")
    return name


@dataclass
class VNetwork:
    """A virtual network: a bridge on each host (``classical``) or a bridge with a VXLAN link
    (RFC 7348) enslaved (``vxlan``). ``gateway`` is the host bridge's address in ``cidr`` (the
    last usable one by default); ``netns`` runs the host side in a named network namespace
    (a second "host" on one machine)."""

    name: str
    cidr: str
    mode: str = "classical"
    root_interface: str | None = None
    vxlan_id: int | None = None
    vxlan_port: int = 4789
    vxlan_group: str | None = None
    vxlan_remote: str | None = None
    gateway: str | None = None
    netns: str | None = None
    host: str = LOCALHOST
    #: more unicast peers besides ``vxlan_remote``: one all-zeros FDB entry each (RFC 7348
    #: head-end replication), so no multicast is needed between many hosts
    vxlan_remotes: list[str] = field(default_factory=list)
    #: source address of the VXLAN packets (default: chosen by the kernel's routing)
    vxlan_local: str | None = None
    #: MTU of the bridge, the VXLAN link and the vnodes' vifaces (None: the kernel's default)
    mtu: int | None = None

    def peers(self) -> list[str]:
        """Every unicast VXLAN peer: ``vxlan_remote`` then ``vxlan_remotes``, no repeats."""
        return list(dict.fromkeys([*([self.vxlan_remote] if self.vxlan_remote else []),
                                   *self.vxlan_remotes]))

    @property
    def network(self) -> ipaddress.IPv4Network:
        """``cidr`` as an :class:`~ipaddress.IPv4Network`; ValueError if it is not one (host bits
        set included)."""
        return ipaddress.IPv4Network(self.cidr)

    @property
    def bridge(self) -> str:
        """The host bridge's name: the vnetwork's name."""
        return self.name

    @property
    def vxlan_link(self) -> str:
        """The VXLAN link's name, ``<name>-vx``."""
        return f"{self.name}-vx"

    def validate(self) -> VNetwork:
        """Check the fields and set ``gateway`` when it is None (the address before the broadcast
        one); returns self. :class:`ConfigError` for a bad name, CIDR (smaller than /30 included),
        mode, gateway (outside the CIDR, or its network or broadcast address), VXLAN settings (VNI 1-16777215, UDP port 1-65535, IPv4 addresses of
        the group, peers and local end) or MTU."""
        check_vnet_name(self.name)
        try:
            net = ipaddress.IPv4Network(self.cidr, strict=True)
        except ValueError as e:
            raise ConfigError(f"vnetwork {self.name}", "cidr", f"invalid CIDR {self.cidr!r} ({e})",
                              expected="an IPv4 network such as 10.144.0.0/22") from e
        if net.num_addresses < 4:
            raise ConfigError(f"vnetwork {self.name}", "cidr", f"{self.cidr} is too small",
                              expected="a prefix of /30 or shorter")
        if self.mode not in NET_MODES:
            raise ConfigError(f"vnetwork {self.name}", "mode", f"unknown mode {self.mode!r}",
                              expected=" or ".join(NET_MODES))
        if self.gateway is None:
            self.gateway = str(net.broadcast_address - 1)
        else:
            try:
                gateway = ipaddress.IPv4Address(self.gateway)
            except ValueError as e:
                raise ConfigError(f"vnetwork {self.name}", "gateway",
                                  f"invalid address {self.gateway!r} ({e})",
                                  expected=f"an IPv4 address in {self.cidr}") from e
            if gateway not in net:
                raise ConfigError(f"vnetwork {self.name}", "gateway",
                                  f"{self.gateway} is outside {self.cidr}")
            if gateway in (net.network_address, net.broadcast_address):
                what = "network" if gateway == net.network_address else "broadcast"
                raise ConfigError(f"vnetwork {self.name}", "gateway",
                                  f"{self.gateway} is the {what} address of {self.cidr}",
                                  expected=f"a host address, {net.network_address + 1} to "
                                           f"{net.broadcast_address - 1}")
        if self.mode == "vxlan":
            if self.vxlan_id is None:
                raise ConfigError(f"vnetwork {self.name}", "vxlan_id", "missing",
                                  expected="a VXLAN network identifier, 1-16777215")
            if not 0 < self.vxlan_id < 2**24:
                raise ConfigError(f"vnetwork {self.name}", "vxlan_id",
                                  f"{self.vxlan_id} out of range", expected="1-16777215")
            if bool(self.vxlan_group) == bool(self.peers()):
                raise ConfigError(f"vnetwork {self.name}", "vxlan_group",
                                  "give exactly one of vxlan_group (multicast) or vxlan_remote "
                                  "(unicast peer)")
            if self.vxlan_group and not self.root_interface:
                raise ConfigError(f"vnetwork {self.name}", "root_interface",
                                  "a multicast VXLAN group needs a root interface")
        if not 0 < self.vxlan_port < 65536:
            raise ConfigError(f"vnetwork {self.name}", "vxlan_port",
                              f"{self.vxlan_port} out of range", expected="a UDP port, 1-65535")
        for key, addrs in (("vxlan_remote", [self.vxlan_remote]),
                           ("vxlan_remotes", self.vxlan_remotes),
                           ("vxlan_group", [self.vxlan_group]), ("vxlan_local", [self.vxlan_local])):
            for a in addrs:
                try:
                    if a is not None:
                        ipaddress.IPv4Address(a)
                except ValueError as e:
                    raise ConfigError(f"vnetwork {self.name}", key, f"invalid address {a!r} ({e})",
                                      expected="an IPv4 address such as 10.0.0.9") from e
        if self.mtu is not None and not 576 <= self.mtu <= 65535:
            raise ConfigError(f"vnetwork {self.name}", "mtu", f"{self.mtu} out of range",
                              expected="576-65535")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (:func:`dataclasses.asdict`), as state.json stores it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VNetwork:
        """The vnetwork of a :meth:`to_dict` dict, not validated; TypeError for a key that is not a
        field."""
        return cls(**d)


@dataclass
class VIface:
    """A vnode's interface ``name`` (``if0``) on ``vnetwork`` with IPv4 ``address``;
    ``bandwidth`` bits per second and ``latency_ms`` apply to both directions."""

    name: str
    vnetwork: str
    address: str | None = None
    bandwidth: int | None = None
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (:func:`dataclasses.asdict`), as state.json stores it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VIface:
        """The viface of a :meth:`to_dict` dict; TypeError for a key that is not a field."""
        return cls(**d)


@dataclass
class VNode:
    """A virtual node. ``image`` is an image name (the image store) or a tarball path;
    ``image_key`` the content hash of the unpacked image it runs. ``fs``: cow, distinct or shared.
    Limits: ``mem`` (MemLimits fields), ``cpus`` (CPU time in CPUs), ``cpuset``, ``io``
    (IoLimit fields) and, per viface, bandwidth and latency. ``persistent_journal`` False (the
    default) makes systemd-journald keep the vnode's logs in RAM (its root is deleted at stop
    anyway), which keeps a booted cow vnode's disk cost to a few MiB."""

    name: str
    image: str
    fs: str
    image_key: str = ""
    ifaces: list[VIface] = field(default_factory=list)
    ssh_pubkey: str | None = None
    ssh_privkey: str | None = None
    copy_host_keys: bool = False
    mem: dict[str, Any] = field(default_factory=dict)
    cpus: float | None = None
    cpuset: str | None = None
    io: list[dict[str, Any]] = field(default_factory=list)
    io_hierarchy: int = 1
    start_command: str | None = None
    persistent_journal: bool = False
    state: str = READY
    host: str = LOCALHOST
    created: float = 0.0
    started: float | None = None
    exit_code: int | None = None

    def mem_limits(self) -> MemLimits:
        """``mem`` as :class:`MemLimits` (TypeError for a key that is not one of its fields)."""
        return MemLimits(**self.mem)

    def io_limits(self) -> list[IoLimit]:
        """``io`` as :class:`IoLimit` objects, in order (TypeError for an unknown key)."""
        return [IoLimit(**d) for d in self.io]

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, ``ifaces`` as a list of :meth:`VIface.to_dict` dicts, as state.json
        stores it."""
        d = asdict(self)
        d["ifaces"] = [i.to_dict() for i in self.ifaces]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VNode:
        """The vnode of a :meth:`to_dict` dict (``d`` is not modified); TypeError for a key that is
        not a field."""
        d = dict(d)
        d["ifaces"] = [VIface.from_dict(i) for i in d.get("ifaces", [])]
        return cls(**d)


def parse_hierarchy(v: object, where: str = "hierarchy") -> int:
    """``v1``/``1`` -> 1, ``v2``/``2`` -> 2."""
    s = str(v).lower().lstrip("v")
    if s not in ("1", "2"):
        raise ConfigError(where, "hierarchy", f"unknown cgroup hierarchy {v!r}", expected="v1 or v2")
    return int(s)


def parse_mib(v: object, where: str, key: str, *, zero: bool = False) -> int | str:
    """A memory size in MiB (an integer) or ``max``. ``zero``: 0 is a size too (a swap limit
    of 0: no swap at all, v1 ``memsw`` = ``mem``, v2 ``memory.swap.max`` 0; the kernel's
    Documentation/admin-guide/cgroup-v2.rst). Raises :class:`ConfigError` naming ``where``
    and ``key`` for anything else: not an integer, negative, or 0 without ``zero``."""
    if isinstance(v, str) and v.strip().lower() == "max":
        return "max"
    try:
        n = int(str(v))
    except ValueError as e:
        raise ConfigError(where, key, f"invalid size {v!r}", expected="MiB (an integer) or 'max'") from e
    if n < 0 or (n == 0 and not zero):
        raise ConfigError(where, key, f"invalid size {v!r}",
                          expected="0 or more MiB" if zero else "a positive number of MiB")
    return n


def parse_bps(v: object, where: str, key: str) -> int | str:
    """Bytes per second (an integer, with an optional k/M/G binary suffix) or ``max``."""
    s = str(v).strip()
    if s.lower() == "max":
        return "max"
    m = re.fullmatch(r"([0-9]+)([kKmMgG]?)(i?[bB]?)?", s)
    if not m:
        raise ConfigError(where, key, f"invalid byte rate {v!r}",
                          expected="bytes per second, e.g. 1048576, 10M or 'max'")
    mult = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
    return int(m.group(1)) * mult


@dataclass
class IfaceSpec:
    """``--iface if0:NET[:IP]`` parsed."""

    name: str
    vnetwork: str
    address: str | None = None

    @classmethod
    def parse(cls, text: str) -> IfaceSpec:
        """``IFNAME:VNETWORK[:IPV4]`` (the address optional, not checked here); ConfigError
        (key ``--iface``) for any other shape."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or not all(parts[:2]):
            raise ConfigError("--iface", None, f"invalid viface {text!r}",
                              expected="IFNAME:VNETWORK[:IPV4], e.g. if0:vnet or if0:vnet:10.144.0.5")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 and parts[2] else None)


def veth_name(vnode: str, ifname: str) -> str:
    """The host end of viface ``ifname``'s veth: ``VNODE-IFNAME``, or a digest of it when that
    is longer than an interface name may be (IFNAMSIZ)."""
    name = f"{vnode}-{ifname}"
    if len(name) <= IFNAMSIZ:
        return name
    return "vn" + hashlib.sha1(name.encode()).hexdigest()[:9] + ifname[-4:]


def hwaddr(vnode: str, ifname: str) -> str:
    """A stable, locally administered MAC address (``02:..``) for viface ``ifname`` of ``vnode``."""
    h = hashlib.sha1(f"{vnode}/{ifname}".encode()).hexdigest()
    return "02:" + ":".join(h[i:i + 2] for i in range(0, 10, 2))
