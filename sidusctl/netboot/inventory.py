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
    kernel_args = ["console=tty0"]

    [groups.compute]                  # group defaults, override [defaults]
    overlay = "disk"
    disk = "LABEL=sidus-rw"

    [[nodes]]
    name = "node1"
    mac = "52:54:00:12:34:56"
    ip = "10.13.20.130"
    group = "compute"                 # optional
    # image, overlay, size, disk, format, iscsi_target_ip, iscsi_target, iscsi_initiator,
    # nfs_share, kernel_args, hostname: as in [defaults], the node's own value wins

MACs are written lower-case with colons; ``01-<mac-with-dashes>`` is pxelinux's file name
(ARP hardware type 1, RFC 1700), the upper-case hex IPv4 address its other name.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidusctl.core.errors import ConfigError, ConfigErrors
from sidusctl.core.mac import normalize_mac
from sidusctl.serve.dhcp import Reservation

MODES = ("tmpfs", "disk", "iscsi", "nfs", "off")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
IQN_RE = re.compile(r"^iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:\S+)?$")
DISK_RE = re.compile(r"^(/dev/\S+|LABEL=\S+|UUID=[0-9A-Fa-f-]+)$")
SIZE_RE = re.compile(r"^\d+[kmgKMG%]?$")
ARG_RE = re.compile(r"^\S+$")

NODE_KEYS = ("name", "mac", "ip", "group", "image", "overlay", "size", "disk", "format",
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
        return "01-" + self.mac_dashes

    @property
    def hex_ip(self) -> str:
        """The address as 8 upper-case hex digits (pxelinux, GRUB): 10.0.0.130 → 0A000082."""
        return f"{int(self.ip):08X}"


@dataclass(frozen=True)
class Network:
    subnet: ipaddress.IPv4Network
    server: ipaddress.IPv4Address
    nfs_root: str | None = None
    domain: str | None = None
    iscsi_target_ip: str | None = None
    iscsi_target: str = DEFAULT_ISCSI_TARGET


@dataclass(frozen=True)
class Inventory:
    """A validated inventory: ``network``, ``nodes`` (file order), ``default_image``."""

    file: str
    network: Network
    nodes: tuple[Node, ...]
    default_image: str | None
    default_args: tuple[str, ...] = field(default=())

    def images(self) -> list[str]:
        seen: list[str] = []
        for img in [*( [self.default_image] if self.default_image else []),
                    *(n.image for n in self.nodes)]:
            if img not in seen:
                seen.append(img)
        return seen

    def by_mac(self, mac: str) -> Node | None:
        m = _mac_or_none(mac)
        return next((n for n in self.nodes if n.mac == m), None)

    def reservations(self) -> list[Reservation]:
        """The DHCP servers' view of the nodes (RFC 2131 chaddr → yiaddr, option 12)."""
        return [Reservation(n.mac, n.ip, n.hostname or n.name) for n in self.nodes]


def _mac_or_none(mac: object) -> str | None:
    try:
        return normalize_mac(mac)
    except ValueError:
        return None


# -- line numbers -----------------------------------------------------------------------------

class _Lines:
    """Finds the line of a key in the TOML text (tomllib keeps no positions)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: list[tuple[int, str]] = []
        for i, ln in enumerate(self.lines, 1):
            s = ln.strip()
            if s.startswith("["):
                self.headers.append((i, s.split("#", 1)[0].strip()))
        self.node_starts = [i for i, h in self.headers if h.replace(" ", "") == "[[nodes]]"]

    def _section(self, header: str) -> tuple[int, int] | None:
        for idx, (i, h) in enumerate(self.headers):
            if h.replace(" ", "") == header:
                end = self.headers[idx + 1][0] if idx + 1 < len(self.headers) else len(self.lines) + 1
                return i, end
        return None

    def _find_key(self, start: int, end: int, key: str) -> int | None:
        pat = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for i in range(start, min(end, len(self.lines) + 1)):
            if pat.match(self.lines[i - 1]):
                return i
        return None

    def node(self, index: int, key: str | None = None) -> int | None:
        if index >= len(self.node_starts):
            return None
        start = self.node_starts[index]
        later = [i for i, _ in self.headers if i > start]
        end = later[0] if later else len(self.lines) + 1
        if key is None:
            return start
        return self._find_key(start, end, key) or start

    def table(self, header: str, key: str | None = None) -> int | None:
        sec = self._section(header)
        if sec is None:
            return None
        if key is None:
            return sec[0]
        return self._find_key(sec[0], sec[1], key) or sec[0]


LineFn = Callable[[str | None], int | None]


def _table_fn(lines: _Lines, header: str) -> LineFn:
    def f(key: str | None) -> int | None:
        return lines.table(header, key)
    return f


def _node_fn(lines: _Lines, index: int) -> LineFn:
    def f(key: str | None) -> int | None:
        return lines.node(index, key)
    return f


def _top_fn(lines: _Lines) -> LineFn:
    def f(key: str | None) -> int | None:
        return lines.table(f"[{key}]")
    return f


# -- parsing ----------------------------------------------------------------------------------

class _Checker:
    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[ConfigError] = []

    def err(self, key: str | None, problem: str, expected: str | None = None,
            line: int | None = None) -> None:
        self.errors.append(ConfigError(self.file, key, problem, expected=expected, line=line))


def _check_values(c: _Checker, where: str, d: Mapping[str, Any], line: LineFn) -> dict[str, Any]:
    """Type and format checks of the overridable keys; returns the valid ones."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        ln = line(k)
        key = f"{where}.{k}"
        if k == "image":
            if not isinstance(v, str) or not IMAGE_RE.match(v):
                c.err(key, f"invalid image name {v!r}", "lower-case letters, digits, '.', '_', '-'", ln)
                continue
        elif k == "overlay":
            if v not in MODES:
                c.err(key, f"unknown writable-layer mode {v!r}", " | ".join(MODES), ln)
                continue
        elif k == "size":
            if not isinstance(v, str) or not SIZE_RE.match(v):
                c.err(key, f"invalid tmpfs size {v!r}", "a number with k, m, g or % (e.g. \"2g\", \"50%\")", ln)
                continue
        elif k == "disk":
            if not isinstance(v, str) or not DISK_RE.match(v):
                c.err(key, f"invalid disk {v!r}", "/dev/NAME, LABEL=L or UUID=U", ln)
                continue
        elif k == "format":
            if not isinstance(v, bool):
                c.err(key, f"invalid value {v!r}", "true or false", ln)
                continue
        elif k == "iscsi_target_ip":
            try:
                ipaddress.IPv4Address(v)
            except (ValueError, TypeError):
                c.err(key, f"invalid IPv4 address {v!r}", "an address such as 10.13.20.13", ln)
                continue
        elif k in ("iscsi_target", "iscsi_initiator"):
            if not isinstance(v, str) or not IQN_RE.match(v):
                c.err(key, f"invalid iSCSI name {v!r}", "an IQN such as iqn.2013-04.zone.sidus.target:node1 (RFC 3720)", ln)
                continue
        elif k == "nfs_share":
            if not isinstance(v, str) or ":" not in v or " " in v:
                c.err(key, f"invalid NFS share {v!r}", "SERVER:/PATH (may contain @MAC@ or @IP@)", ln)
                continue
        elif k == "kernel_args":
            if not isinstance(v, list) or not all(isinstance(a, str) and ARG_RE.match(a) for a in v):
                c.err(key, f"invalid kernel arguments {v!r}", "a list of strings without spaces", ln)
                continue
            v = tuple(v)
        elif k == "hostname" and (not isinstance(v, str) or not NAME_RE.match(v)):
            c.err(key, f"invalid host name {v!r}", "a DNS label (RFC 1123)", ln)
            continue
        out[k] = v
    return out


def _unknown(c: _Checker, where: str, d: Mapping[str, Any], allowed: Iterable[str],
             line: LineFn) -> None:
    allowed = tuple(allowed)
    for k in d:
        if k not in allowed:
            c.err(f"{where}.{k}" if where else k, "unknown key", "one of " + ", ".join(allowed), line(k))


def parse(text: str, file: str = "nodes.toml", *, known_images: Iterable[str] | None = None) -> Inventory:
    """Parse and validate inventory ``text``. ``known_images``: if given, every image a node
    (or the defaults) names must be one of them. Raises :class:`ConfigErrors` listing every
    problem found, each with file and line."""
    c = _Checker(file)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise ConfigErrors([ConfigError(file, None, f"not valid TOML: {e}",
                                        line=int(m.group(1)) if m else None)]) from e
    lines = _Lines(text)
    _unknown(c, "", data, TOP_KEYS, _top_fn(lines))

    # [network]
    net_raw = data.get("network")
    network: Network | None = None
    if not isinstance(net_raw, dict):
        c.err("network", "missing [network] table", "[network] with subnet and server", None)
    else:
        nl = _table_fn(lines, "[network]")
        _unknown(c, "network", net_raw, NETWORK_KEYS, nl)
        subnet = server = None
        try:
            subnet = ipaddress.IPv4Network(net_raw["subnet"], strict=True)
        except KeyError:
            c.err("network.subnet", "missing", "an IPv4 network such as 10.13.20.0/24", nl(None))
        except (ValueError, TypeError) as e:
            c.err("network.subnet", f"invalid network {net_raw['subnet']!r}: {e}",
                  "an IPv4 network such as 10.13.20.0/24", nl("subnet"))
        try:
            server = ipaddress.IPv4Address(net_raw["server"])
        except KeyError:
            c.err("network.server", "missing", "the TFTP/NFS server's IPv4 address", nl(None))
        except (ValueError, TypeError):
            c.err("network.server", f"invalid IPv4 address {net_raw['server']!r}",
                  "an address such as 10.13.20.13", nl("server"))
        nfs_root = net_raw.get("nfs_root")
        if nfs_root is not None and (not isinstance(nfs_root, str) or not nfs_root.startswith("/")):
            c.err("network.nfs_root", f"invalid path {nfs_root!r}",
                  "an absolute path, may contain {image}", nl("nfs_root"))
            nfs_root = None
        extra = _check_values(c, "network", {k: v for k, v in net_raw.items()
                                              if k in ("iscsi_target_ip", "iscsi_target")}, nl)
        domain = net_raw.get("domain")
        if domain is not None and (not isinstance(domain, str)
                                   or not all(NAME_RE.match(p) for p in domain.split("."))):
            c.err("network.domain", f"invalid domain {domain!r}", "DNS labels joined by dots", nl("domain"))
            domain = None
        if subnet is not None and server is not None:
            network = Network(subnet, server, nfs_root, domain,
                              extra.get("iscsi_target_ip"),
                              extra.get("iscsi_target", DEFAULT_ISCSI_TARGET))

    # [defaults] and [groups.*]
    defaults_raw = data.get("defaults", {})
    defaults: dict[str, Any] = {}
    if not isinstance(defaults_raw, dict):
        c.err("defaults", "must be a table", "[defaults]", lines.table("[defaults]"))
    else:
        dl = _table_fn(lines, "[defaults]")
        _unknown(c, "defaults", defaults_raw, DEFAULT_KEYS, dl)
        defaults = _check_values(c, "defaults", {k: v for k, v in defaults_raw.items()
                                                 if k in DEFAULT_KEYS}, dl)
    groups: dict[str, dict[str, Any]] = {}
    groups_raw = data.get("groups", {})
    if not isinstance(groups_raw, dict):
        c.err("groups", "must be a table of tables", "[groups.NAME]", None)
    else:
        for gname, graw in groups_raw.items():
            gl = _table_fn(lines, f"[groups.{gname}]")
            if not isinstance(graw, dict):
                c.err(f"groups.{gname}", "must be a table", f"[groups.{gname}]", gl(None))
                continue
            _unknown(c, f"groups.{gname}", graw, DEFAULT_KEYS, gl)
            groups[gname] = _check_values(c, f"groups.{gname}", {k: v for k, v in graw.items()
                                                                 if k in DEFAULT_KEYS}, gl)

    # [[nodes]]
    nodes_raw = data.get("nodes", [])
    if not isinstance(nodes_raw, list):
        c.err("nodes", "must be an array of tables", "[[nodes]] entries", None)
        nodes_raw = []
    known = set(known_images) if known_images is not None else None
    nodes: list[Node] = []
    seen_mac: dict[str, tuple[str, int | None]] = {}
    seen_ip: dict[ipaddress.IPv4Address, tuple[str, int | None]] = {}
    seen_name: dict[str, int | None] = {}
    if known is not None and "image" in defaults and defaults["image"] not in known:
        c.err("defaults.image", f"unknown image {defaults['image']!r}",
              "a built image: " + (", ".join(sorted(known)) or "none built yet"),
              lines.table("[defaults]", "image"))
    for idx, raw in enumerate(nodes_raw):
        ln = _node_fn(lines, idx)
        label = f"nodes[{idx}]"
        if not isinstance(raw, dict):
            c.err(label, "must be a table", "[[nodes]] with name, mac, ip", ln(None))
            continue
        name = raw.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            c.err(f"{label}.name", "missing" if name is None else f"invalid node name {name!r}",
                  "a DNS label: lower-case letters, digits, '-' (RFC 1123)", ln("name"))
            name = None
        else:
            label = f"nodes.{name}"
            if name in seen_name:
                c.err(f"{label}.name", f"duplicate node name {name!r} (first at line {seen_name[name]})",
                      "unique names", ln("name"))
            seen_name.setdefault(name, ln("name"))
        _unknown(c, label, raw, NODE_KEYS, ln)
        mac = _mac_or_none(raw["mac"]) if "mac" in raw else None
        if "mac" not in raw:
            c.err(f"{label}.mac", "missing", "a MAC address such as 52:54:00:12:34:56", ln(None))
        elif mac is None:
            c.err(f"{label}.mac", f"invalid MAC address {raw['mac']!r}",
                  "six hex pairs separated by ':' or '-', e.g. 52:54:00:12:34:56", ln("mac"))
        else:
            if int(mac[:2], 16) & 1:
                c.err(f"{label}.mac", f"{raw['mac']!r} is a multicast address",
                      "a unicast MAC (first octet even)", ln("mac"))
            elif mac in seen_mac:
                other, oline = seen_mac[mac]
                c.err(f"{label}.mac", f"duplicate MAC {mac} (also node {other!r} at line {oline})",
                      "one MAC per node", ln("mac"))
            else:
                seen_mac[mac] = (name or label, ln("mac"))
        ip: ipaddress.IPv4Address | None = None
        if "ip" not in raw:
            c.err(f"{label}.ip", "missing", "an IPv4 address in the subnet", ln(None))
        else:
            try:
                ip = ipaddress.IPv4Address(raw["ip"])
            except (ValueError, TypeError):
                c.err(f"{label}.ip", f"invalid IPv4 address {raw['ip']!r}",
                      "an address such as 10.13.20.130", ln("ip"))
        if ip is not None:
            if network is not None:
                sub = network.subnet
                if ip not in sub:
                    c.err(f"{label}.ip", f"{ip} is outside the subnet {sub}",
                          f"an address in {sub}", ln("ip"))
                    ip = None
                elif ip in (sub.network_address, sub.broadcast_address):
                    c.err(f"{label}.ip", f"{ip} is the {'network' if ip == sub.network_address else 'broadcast'} address of {sub}",
                          "a host address", ln("ip"))
                    ip = None
                elif ip == network.server:
                    c.err(f"{label}.ip", f"{ip} is the server's own address", "a node address", ln("ip"))
                    ip = None
            if ip is not None:
                if ip in seen_ip:
                    other, oline = seen_ip[ip]
                    c.err(f"{label}.ip", f"duplicate IP {ip} (also node {other!r} at line {oline})",
                          "one address per node", ln("ip"))
                else:
                    seen_ip[ip] = (name or label, ln("ip"))
        group = raw.get("group")
        gvals: dict[str, Any] = {}
        if group is not None:
            if group not in groups:
                c.err(f"{label}.group", f"unknown group {group!r}",
                      "one of: " + (", ".join(sorted(groups)) or "no [groups.*] defined"), ln("group"))
            else:
                gvals = groups[group]
        own = _check_values(c, label, {k: v for k, v in raw.items()
                                       if k in NODE_KEYS and k not in ("name", "mac", "ip", "group")}, ln)
        merged = {**defaults, **gvals, **own}
        image = merged.get("image")
        if image is None:
            c.err(f"{label}.image", "no image for this node", "image = \"NAME\" on the node, its group or [defaults]", ln(None))
        elif known is not None and image not in known and image != defaults.get("image"):
            c.err(f"{label}.image", f"unknown image {image!r}",
                  "a built image: " + (", ".join(sorted(known)) or "none built yet"),
                  ln("image") if "image" in own else ln(None))
        mode = merged.get("overlay", "tmpfs")
        if mode == "disk" and "disk" not in merged:
            c.err(f"{label}.disk", "disk mode needs a disk", "disk = \"/dev/sdb1\", \"LABEL=...\" or \"UUID=...\"", ln(None))
        if mode == "iscsi" and "iscsi_target" not in merged:
            c.err(f"{label}.iscsi_target", "iscsi mode needs a target IQN", "iscsi_target = \"iqn....\"", ln(None))
        if mode == "nfs" and "nfs_share" not in merged:
            c.err(f"{label}.nfs_share", "nfs mode needs a read-write share", "nfs_share = \"SERVER:/PATH/@MAC@\"", ln(None))
        if name is None or mac is None or ip is None or image is None:
            continue
        nodes.append(Node(
            name=name, mac=mac, ip=ip, image=image, overlay=mode, group=group,
            size=merged.get("size"), disk=merged.get("disk"), format=bool(merged.get("format", False)),
            iscsi_target_ip=merged.get("iscsi_target_ip"), iscsi_target=merged.get("iscsi_target"),
            iscsi_initiator=merged.get("iscsi_initiator"), nfs_share=merged.get("nfs_share"),
            kernel_args=tuple(merged.get("kernel_args", ())), hostname=own.get("hostname"),
            line=ln(None),
        ))
    if c.errors:
        # in file order; problems without a line (a missing table) first
        raise ConfigErrors(sorted(c.errors, key=lambda e: e.line or 0))
    assert network is not None
    return Inventory(file, network, tuple(nodes), defaults.get("image"),
                     tuple(defaults.get("kernel_args", ())))


def load(path: Path, *, known_images: Iterable[str] | None = None) -> Inventory:
    """Read and validate the inventory file ``path`` (see :func:`parse`)."""
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise ConfigErrors([ConfigError(str(path), None, "no such inventory file")]) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigErrors([ConfigError(str(path), None, f"cannot read: {e}")]) from e
    return parse(text, str(path), known_images=known_images)
