"""The node inventory (``nodes.toml``): which machine (MAC, IPv4 address, name) boots which
image with which writable layer. Parsed and validated once, every problem reported at once
with file and line (:class:`ConfigErrors`); the result is a frozen :class:`Inventory` that the
boot-loader renderer and the DHCP/TFTP/DNS servers share (``reservations()``).

File shape::

    [network]
    subnet = "10.13.20.0/24"          # the nodes' IPv4 network (required)
    server = "10.13.20.13"            # next-server: TFTP and NFS server (required)
    nfs_root = "/srv/nfsroot/{image}" # server path of each image's root; default: the image
                                      # store's rootfs directory
    domain = "cluster.lan"            # optional, for DNS and option 15
    iscsi_target_ip = "10.13.20.13"   # default iSCSI portal (default: server)
    iscsi_target = "iqn....:default"  # target IQN for the default menu's iscsi label

    [defaults]                        # any node key except name/mac/ip
    image = "minimal"
    overlay = "tmpfs"                 # tmpfs | disk | iscsi | nfs | off
    root = "nfs"                      # the lower layer: nfs | squashfs-nfs | squashfs-http
    kernel_args = ["console=tty0"]

    [groups.compute]                  # group defaults, override [defaults]
    overlay = "disk"
    disk = "LABEL=sidus-rw"

    [[nodes]]
    name = "node1"
    mac = "52:54:00:12:34:56"
    ip = "10.13.20.130"
    group = "compute"                 # optional
    # image, root, overlay, size, disk, format, iscsi_target_ip, iscsi_target, iscsi_initiator,
    # nfs_share, kernel_args, hostname: as in [defaults], the node's own value wins

MACs are written lower-case with colons; ``01-<mac-with-dashes>`` is pxelinux's file name
(ARP hardware type 1, RFC 1700), the upper-case hex IPv4 address its other name.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, ValidationError

from sidusctl.core.config import Checker, Frozen, as_tuple, key_name, parse_toml, read_text
from sidusctl.core.mac import normalize_mac, pxelinux_name
from sidusctl.core.names import is_domain
from sidusctl.serve.dhcp_config import Reservation

MODES = ("tmpfs", "disk", "iscsi", "nfs", "off")
#: where the lower (read-only) layer comes from: the image's directory over NFS, its squashfs
#: export loop-mounted from the NFS-mounted export directory, or downloaded over HTTP into RAM
ROOTS = ("nfs", "squashfs-nfs", "squashfs-http")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
IQN_RE = re.compile(r"^iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:\S+)?$")
DISK_RE = re.compile(r"^(/dev/\S+|LABEL=\S+|UUID=[0-9A-Fa-f-]+)$")
SIZE_RE = re.compile(r"^\d+[kmgKMG%]?$")
ARG_RE = re.compile(r"^\S+$")

NODE_KEYS = ("name", "mac", "ip", "group", "image", "root", "overlay", "size", "disk", "format",
             "iscsi_target_ip", "iscsi_target", "iscsi_initiator", "nfs_share", "kernel_args",
             "hostname")
DEFAULT_KEYS = tuple(k for k in NODE_KEYS if k not in ("name", "mac", "ip", "group", "hostname"))
NETWORK_KEYS = ("subnet", "server", "nfs_root", "domain", "iscsi_target_ip", "iscsi_target")
TOP_KEYS = ("network", "defaults", "groups", "nodes")
DEFAULT_ISCSI_TARGET = "iqn.2013-04.zone.sidus.target:default"  # the SIDUS seed's


@dataclass(frozen=True)
class Node:
    """One machine. ``mac`` lower-case colon form; ``ip`` an IPv4 address in the subnet."""

    name: str
    mac: str
    ip: ipaddress.IPv4Address
    image: str
    overlay: str = "tmpfs"
    root: str = "nfs"
    group: str | None = None
    size: str | None = None
    disk: str | None = None
    format: bool = False
    iscsi_target_ip: str | None = None
    iscsi_target: str | None = None
    iscsi_initiator: str | None = None
    nfs_share: str | None = None
    kernel_args: tuple[str, ...] = ()
    hostname: str | None = None
    line: int | None = None

    @property
    def mac_dashes(self) -> str:
        """``52-54-00-12-34-56`` (iPXE's ``${net0/mac:hexhyp}``)."""
        return self.mac.replace(":", "-")

    @property
    def pxelinux_name(self) -> str:
        """``01-52-54-00-12-34-56``: pxelinux.cfg file name (ARP type 1 = Ethernet)."""
        return pxelinux_name(self.mac)

    @property
    def hex_ip(self) -> str:
        """The address as 8 upper-case hex digits (pxelinux, GRUB): 10.0.0.130 → 0A000082."""
        return f"{int(self.ip):08X}"


@dataclass(frozen=True)
class Network:
    """An inventory's ``[network]``: the nodes' ``subnet`` and the boot ``server``'s address
    on it (next-server, DHCP server identifier); ``nfs_root``: each image's root as the NFS
    server exports it, ``{image}`` replaced (None: the image's own path); ``domain`` (DNS,
    DHCP option 15); the default iSCSI portal (None: ``server``) and target IQN of the
    ``iscsi`` writable layer."""

    subnet: ipaddress.IPv4Network
    server: ipaddress.IPv4Address
    nfs_root: str | None = None
    domain: str | None = None
    iscsi_target_ip: str | None = None
    iscsi_target: str = DEFAULT_ISCSI_TARGET
    #: the line of ``server`` in the file (for messages about it), when known
    server_line: int | None = None


@dataclass(frozen=True)
class Inventory:
    """A validated inventory: ``network``, ``nodes`` (file order), ``default_image``."""

    file: str
    network: Network
    nodes: tuple[Node, ...]
    default_image: str | None
    default_args: tuple[str, ...] = field(default=())

    def images(self) -> list[str]:
        """The image names the inventory uses, in order of first appearance: ``default_image``
        first, then each node's; no duplicates."""
        seen: list[str] = []
        for img in [*( [self.default_image] if self.default_image else []),
                    *(n.image for n in self.nodes)]:
            if img not in seen:
                seen.append(img)
        return seen

    @functools.cached_property
    def _by_mac(self) -> dict[str, Node]:
        return {n.mac: n for n in self.nodes}

    @functools.cached_property
    def _by_ip(self) -> dict[str, Node]:
        return {str(n.ip): n for n in self.nodes}

    def by_mac(self, mac: str) -> Node | None:
        """The node with this MAC (any notation :func:`sidusctl.core.mac.normalize_mac`
        takes), or None. Constant time: a storm asks for every report."""
        m = _mac_or_none(mac)
        return self._by_mac.get(m) if m is not None else None

    def by_ip(self, ip: str) -> Node | None:
        """The node whose reserved address is ``ip`` (dotted quad), or None."""
        return self._by_ip.get(ip)

    def reservations(self) -> list[Reservation]:
        """The DHCP servers' view of the nodes (RFC 2131 chaddr → yiaddr, option 12)."""
        return [Reservation(n.mac, n.ip, n.hostname or n.name) for n in self.nodes]


def _mac_or_none(mac: object) -> str | None:
    try:
        return normalize_mac(mac)
    except ValueError:
        return None


# -- the file's shape -------------------------------------------------------------------------

def _matches(pattern: re.Pattern[str], expected: str) -> AfterValidator:
    def f(v: str) -> str:
        if not pattern.match(v):
            raise ValueError(expected)
        return v
    return AfterValidator(f)


def _ipv4(v: object) -> object:
    if isinstance(v, str):
        try:
            return ipaddress.IPv4Address(v)
        except ValueError:
            raise ValueError("an IPv4 address such as 10.13.20.130") from None
    if not isinstance(v, ipaddress.IPv4Address):
        raise ValueError("an IPv4 address such as 10.13.20.130")
    return v


def _subnet(v: object) -> object:
    if isinstance(v, str):
        try:
            return ipaddress.IPv4Network(v, strict=True)
        except ValueError as e:
            raise ValueError(f"an IPv4 network such as 10.13.20.0/24 ({e})") from None
    if not isinstance(v, ipaddress.IPv4Network):
        raise ValueError("an IPv4 network such as 10.13.20.0/24")
    return v


def _unicast_mac(v: str) -> str:
    try:
        mac = normalize_mac(v)
    except ValueError:
        raise ValueError("a MAC address such as 52:54:00:12:34:56 (six hex pairs separated "
                         "by ':' or '-')") from None
    if int(mac[:2], 16) & 1:
        raise ValueError("a unicast MAC (first octet even); this is a multicast address")
    return mac


def _domain(v: str) -> str:
    """The inventory's domain: a DNS domain (:func:`~sidusctl.core.names.is_domain`) in
    lower case, as its host names (:data:`NAME_RE`)."""
    if not (is_domain(v) and v == v.lower()):
        raise ValueError("DNS labels of lower-case letters, digits and inner '-', joined by "
                         "dots, at most 253 characters")
    return v


IPv4 = Annotated[ipaddress.IPv4Address, BeforeValidator(_ipv4)]
HostName = Annotated[str, _matches(NAME_RE, "a DNS label: lower-case letters, digits, '-' "
                                            "(RFC 1123)")]
Iqn = Annotated[str, _matches(IQN_RE, "an IQN such as iqn.2013-04.zone.sidus.target:node1 "
                                      "(RFC 3720)")]
KernelArg = Annotated[str, _matches(ARG_RE, "a kernel argument without spaces")]


class Values(Frozen):
    """The keys ``[defaults]``, ``[groups.NAME]`` and a node may set (None: not set here)."""

    image: Annotated[str, _matches(IMAGE_RE, "an image name: lower-case letters, digits, '.', "
                                             "'_', '-'")] | None = None
    overlay: Literal[MODES] | None = None  # type: ignore[valid-type]
    root: Literal[ROOTS] | None = None  # type: ignore[valid-type]
    size: Annotated[str, _matches(SIZE_RE, "a number with k, m, g or % (e.g. \"2g\", "
                                           "\"50%\")")] | None = None
    disk: Annotated[str, _matches(DISK_RE, "/dev/NAME, LABEL=L or UUID=U")] | None = None
    format: bool | None = None
    iscsi_target_ip: IPv4 | None = None
    iscsi_target: Iqn | None = None
    iscsi_initiator: Iqn | None = None
    nfs_share: Annotated[str, _matches(re.compile(r"^[^\s:]+:\S*$"), "SERVER:/PATH (may contain "
                                                                    "@MAC@ or @IP@)")] | None = None
    kernel_args: Annotated[tuple[KernelArg, ...], BeforeValidator(as_tuple)] | None = None

    def given(self) -> dict[str, Any]:
        """The keys set here (not None), as ``{field name: value}``."""
        return {k: v for k, v in self if v is not None}


class NodeFile(Values):
    """One ``[[nodes]]`` table."""

    name: HostName
    mac: Annotated[str, AfterValidator(_unicast_mac)]
    ip: IPv4
    group: str | None = None
    hostname: HostName | None = None


class NetworkFile(Frozen):
    """The ``[network]`` table."""

    subnet: Annotated[ipaddress.IPv4Network, BeforeValidator(_subnet)]
    server: IPv4
    nfs_root: Annotated[str, _matches(re.compile(r"^/"), "an absolute path, may contain "
                                                         "{image}")] | None = None
    domain: Annotated[str, AfterValidator(_domain)] | None = None
    iscsi_target_ip: IPv4 | None = None
    iscsi_target: Iqn = DEFAULT_ISCSI_TARGET


# -- parsing ----------------------------------------------------------------------------------

def parse(text: str, file: str = "nodes.toml", *, known_images: Iterable[str] | None = None) -> Inventory:
    """Parse and validate inventory ``text``. ``known_images``: if given, every image a node
    (or the defaults) names must be one of them. Raises :class:`ConfigErrors` listing every
    problem found (field and cross-field ones together), each with file and line."""
    data = parse_toml(text, file)
    c = Checker(file, text)
    for k in data:
        if k not in TOP_KEYS:
            c.error((k,), "unknown key", "one of " + ", ".join(TOP_KEYS))

    # [network]
    net_raw = data.get("network")
    network: Network | None = None
    if not isinstance(net_raw, dict):
        c.error("network", "missing [network] table" if net_raw is None else "must be a table",
                "[network] with subnet and server", line=c.line(("network",)))
    else:
        netf = c.validate(NetworkFile, net_raw, ("network",))
        if netf is not None:
            network = Network(netf.subnet, netf.server, netf.nfs_root, netf.domain,
                              str(netf.iscsi_target_ip) if netf.iscsi_target_ip else None,
                              netf.iscsi_target, server_line=c.line(("network", "server")))
            sub = netf.subnet
            if sub.prefixlen <= 30 and netf.server in (sub.network_address,
                                                       sub.broadcast_address):
                kind = "network" if netf.server == sub.network_address else "broadcast"
                c.error(("network", "server"), f"{netf.server} is the {kind} address of {sub}",
                        f"the boot server's own address on {sub}")

    # [defaults] and [groups.*]
    def values(raw: object, loc: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            c.error(loc, "must be a table", f"[{'.'.join(loc)}]")
            return {}
        v = c.validate(Values, raw, loc)
        if v is not None:
            return v.given()
        # the bad keys are reported; the good ones still apply, so that no node is blamed for
        # a key its [defaults] or group has (a missing image...)
        good: dict[str, Any] = {}
        for k, val in raw.items():
            with contextlib.suppress(ValidationError):
                good.update(Values.model_validate({k: val}).given())
        return good

    defaults = values(data.get("defaults", {}), ("defaults",))
    groups_raw = data.get("groups", {})
    groups: dict[str, dict[str, Any]] = {}
    if not isinstance(groups_raw, dict):
        c.error(("groups",), "must be a table of tables", "[groups.NAME]")
    else:
        groups = {g: values(raw, ("groups", g)) for g, raw in groups_raw.items()}

    # [[nodes]]
    nodes_raw = data.get("nodes", [])
    if not isinstance(nodes_raw, list):
        c.error(("nodes",), "must be an array of tables", "[[nodes]] entries")
        nodes_raw = []
    known = set(known_images) if known_images is not None else None
    if known is not None and "image" in defaults and defaults["image"] not in known:
        c.error(("defaults", "image"), f"unknown image {defaults['image']!r}",
                "a built image: " + (", ".join(sorted(known)) or "none built yet"))
    nodes: list[Node] = []
    seen_mac: dict[str, tuple[str, int | None]] = {}
    seen_ip: dict[ipaddress.IPv4Address, tuple[str, int | None]] = {}
    seen_name: dict[str, int | None] = {}
    dns_names: list[_DnsName] = []
    for idx, raw in enumerate(nodes_raw):
        loc: tuple[str | int, ...] = ("nodes", idx)
        if not isinstance(raw, dict):
            c.error(loc, "must be a table", "[[nodes]] with name, mac, ip")
            continue
        name = raw.get("name")
        good_name = isinstance(name, str) and bool(NAME_RE.match(name))
        label: tuple[str | int, ...] = ("nodes", str(name)) if good_name else loc
        who = str(name) if good_name else key_name(loc)
        nf = c.validate(NodeFile, raw, loc, label=label)

        def err(key: str, problem: str, expected: str, at: str | None = None,
                loc: tuple[str | int, ...] = loc, label: tuple[str | int, ...] = label) -> None:
            c.error((*loc, at or key), problem, expected, label=key_name((*label, key)),
                    line=c.line((*loc, at)) if at else None)

        hostname = raw.get("hostname")
        if isinstance(hostname, str) and NAME_RE.match(hostname):
            dns_names.append(_DnsName(hostname, "hostname", who, label,
                                      c.line((*loc, "hostname"))))
        elif hostname is None and good_name:
            assert isinstance(name, str)
            dns_names.append(_DnsName(name, "name", who, label, c.line((*loc, "name"))))
        if good_name:
            assert isinstance(name, str)
            if name in seen_name:
                err("name", f"duplicate node name {name!r} (first at line {seen_name[name]})",
                    "unique names")
            seen_name.setdefault(name, c.line((*loc, "name")))
        mac = _mac_or_none(raw.get("mac"))
        if mac is not None and not int(mac[:2], 16) & 1:
            if mac in seen_mac:
                other, oline = seen_mac[mac]
                err("mac", f"duplicate MAC {mac} (also node {other!r} at line {oline})",
                    "one MAC per node")
            else:
                seen_mac[mac] = (who, c.line((*loc, "mac")))
        ip: ipaddress.IPv4Address | None = None
        with contextlib.suppress(ValueError, TypeError):
            ip = ipaddress.IPv4Address(raw.get("ip"))
        if ip is not None and network is not None:
            sub = network.subnet
            if ip not in sub:
                err("ip", f"{ip} is outside the subnet {sub}", f"an address in {sub}")
                ip = None
            elif ip in (sub.network_address, sub.broadcast_address):
                kind = "network" if ip == sub.network_address else "broadcast"
                err("ip", f"{ip} is the {kind} address of {sub}", "a host address")
                ip = None
            elif ip == network.server:
                err("ip", f"{ip} is the server's own address", "a node address")
                ip = None
        if ip is not None:
            if ip in seen_ip:
                other, oline = seen_ip[ip]
                err("ip", f"duplicate IP {ip} (also node {other!r} at line {oline})",
                    "one address per node")
            else:
                seen_ip[ip] = (who, c.line((*loc, "ip")))
        group = raw.get("group")
        gvals: dict[str, Any] = {}
        if group is not None:
            if not isinstance(group, str) or group not in groups:
                err("group", f"unknown group {group!r}",
                    "one of: " + (", ".join(sorted(groups)) or "no [groups.*] defined"))
            else:
                gvals = groups[group]
        # a node with a bad field is still cross-checked, with its raw values
        own = nf.given() if nf is not None else raw
        merged = {**defaults, **gvals,
                  **{k: v for k, v in own.items() if k in DEFAULT_KEYS}}
        image = merged.get("image")
        if image is None:
            err("image", "no image for this node",
                "image = \"NAME\" on the node, its group or [defaults]", at="")
        elif known is not None and isinstance(image, str) and image not in known and image != defaults.get("image"):
            err("image", f"unknown image {image!r}",
                "a built image: " + (", ".join(sorted(known)) or "none built yet"),
                at=None if "image" in raw else "")
        mode = merged.get("overlay", "tmpfs")
        for need, m, hint in (("disk", "disk", "disk = \"/dev/sdb1\", \"LABEL=...\" or \"UUID=...\""),
                              ("iscsi_target", "iscsi", "iscsi_target = \"iqn....\""),
                              ("nfs_share", "nfs", "nfs_share = \"SERVER:/PATH/@MAC@\"")):
            if mode == m and need not in merged and need not in raw:
                what = {"disk": "a disk", "iscsi": "a target IQN", "nfs": "a read-write share"}[m]
                err(need, f"{m} mode needs {what}", hint, at="")
        if nf is None or ip is None or image is None:
            continue
        nodes.append(Node(
            name=nf.name, mac=nf.mac, ip=nf.ip, image=image, overlay=mode,
            root=merged.get("root", "nfs"), group=nf.group,
            size=merged.get("size"), disk=merged.get("disk"),
            format=bool(merged.get("format", False)),
            iscsi_target_ip=str(merged["iscsi_target_ip"]) if merged.get("iscsi_target_ip") else None,
            iscsi_target=merged.get("iscsi_target"), iscsi_initiator=merged.get("iscsi_initiator"),
            nfs_share=merged.get("nfs_share"), kernel_args=tuple(merged.get("kernel_args", ())),
            hostname=nf.hostname, line=c.line(loc),
        ))
    _check_dns_names(c, dns_names)
    c.done()
    assert network is not None
    return Inventory(file, network, tuple(nodes), defaults.get("image"),
                     tuple(defaults.get("kernel_args", ())))


@dataclass(frozen=True)
class _DnsName:
    """The name a node answers to in DNS and DHCP option 12 (:meth:`Inventory.reservations`,
    serve-pxe's zone): its ``hostname``, or its ``name`` without one (``key``)."""

    dns: str
    key: Literal["name", "hostname"]
    node: str
    label: tuple[str | int, ...]
    line: int | None


def _check_dns_names(c: Checker, names: list[_DnsName]) -> None:
    """Record at ``c`` every hostname that is another node's DNS name (its name or hostname;
    compared without case, as DNS compares names). The node that keeps the name is the first
    one answering to it by its ``name``, else the first by its hostname; a name taken twice by
    ``name`` alone is a duplicate node name, reported as such."""
    by_dns: dict[str, list[_DnsName]] = {}
    for d in names:
        by_dns.setdefault(d.dns.lower(), []).append(d)
    for same in by_dns.values():
        if len(same) < 2:
            continue
        keeper = next((d for d in same if d.key == "name"), same[0])
        for d in same:
            if d is keeper or d.key != "hostname":
                continue
            c.error(key_name((*d.label, "hostname")),
                    f"duplicate DNS name {d.dns!r} (also the {keeper.key} of node "
                    f"{keeper.node!r} at line {keeper.line})",
                    "a hostname that is no other node's DNS name (its hostname, or its name "
                    "if it has none)", line=d.line)


def load(path: Path, *, known_images: Iterable[str] | None = None) -> Inventory:
    """Read and validate the inventory file ``path`` (see :func:`parse`)."""
    return parse(read_text(path, "inventory file"), str(path), known_images=known_images)
