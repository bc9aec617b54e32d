"""Platform files (TOML): the vnetworks and vnodes of an experiment, brought up and down in
one command. Two vnode forms are accepted in ``[[vnodes]]``: the Alevin-style list of Distem's
advanced guide (``name``, ``bandwidth``, ``cpu``) and full specs (every ``vnode create``
option). ``[defaults]`` fills what a vnode leaves out. See docs/vnode.md for an example.

Every key is checked once, here, by the typed models below (:mod:`sidusctl.core.config`): a
bad file gets every problem listed with file, line, key, what was found and what was expected,
before anything is created.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from sidusctl.core.config import Checker, Frozen, as_tuple, parse_toml, read_text
from sidusctl.core.errors import ConfigError
from sidusctl.subsys import fanout
from sidusctl.subsys.net import links, tc
from sidusctl.vnode.model import (
    VNET_NAME_RE,
    VNODE_NAME_RE,
    IfaceSpec,
    VNetwork,
    parse_bps,
    parse_hierarchy,
    parse_mib,
)

# -- the file's shape -------------------------------------------------------------------------

def _check(fn: Callable[..., object], expected: str) -> AfterValidator:
    """A validator that calls ``fn`` on the value and keeps the value as written (the
    conversion happens once, in :func:`_create_args`); any failure means ``expected``."""
    def f(v: Any) -> Any:
        try:
            fn(v)
        except (ConfigError, ValueError, OSError):
            raise ValueError(expected) from None
        return v
    return AfterValidator(f)


def _vnet_name(v: str) -> str:
    if not VNET_NAME_RE.match(v):
        raise ValueError("a vnetwork name: lower-case letters, digits and '-', 1-12 characters")
    return v


def _cidr(v: str) -> str:
    try:
        ipaddress.IPv4Network(v, strict=True)
    except ValueError as e:
        raise ValueError(f"an IPv4 network such as 10.144.0.0/22 ({e})") from None
    return v


def _address(v: str) -> str:
    try:
        ipaddress.IPv4Address(v)
    except ValueError:
        raise ValueError("an IPv4 address such as 10.144.0.9") from None
    return v


_MIB = "MiB (a positive integer) or 'max'"
_BPS = "bytes per second, e.g. 1048576, 10M or 'max'"
Mib = Annotated[int | str, _check(lambda v: parse_mib(v, "", ""), _MIB)]
#: a swap limit may be 0: no swap at all
SwapMib = Annotated[int | str, _check(lambda v: parse_mib(v, "", "", zero=True),
                                      "MiB (0 or more) or 'max'")]
Bps = Annotated[int | str, _check(lambda v: parse_bps(v, "", ""), _BPS)]
Hierarchy = Annotated[int | str, _check(lambda v: parse_hierarchy(v), "v1 or v2")]


def _finite(v: float) -> None:
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(v)


Number = Annotated[float, _check(_finite, "a finite number, 0 or more")]


def _rate(v: int | str) -> None:
    if str(v).strip().lower() not in ("", "max", "none"):  # those cancel a limit
        tc.parse_rate(str(v))


#: a tc rate, as ``vnode create --bandwidth`` takes it (:func:`sidusctl.subsys.net.tc.parse_rate`)
Rate = Annotated[int | str, _check(_rate, "a tc rate such as 100mbit, 1gbit or 12.5mbps "
                                          "(8 bit/s to 34 Gbit/s), or 'max'")]
IfName = Annotated[str, _check(links.check_ifname, "a Linux interface name: 1-15 characters "
                                                    "without '/', ':' or spaces")]
Path_ = Annotated[str, _check(lambda v: Path(v).expanduser().read_text(),
                              "a readable file (the key)")]


class VNetworkSpec(Frozen):
    """One ``[[vnetworks]]`` table (the ``vnode net create`` options)."""

    name: Annotated[str, AfterValidator(_vnet_name)]
    cidr: Annotated[str, AfterValidator(_cidr)]
    mode: Literal["classical", "vxlan"] = "classical"
    root_interface: str | None = None
    vxlan_id: Annotated[int, Field(gt=0, lt=2**24)] | None = None
    vxlan_port: Annotated[int, Field(gt=0, lt=65536)] = 4789
    vxlan_group: Annotated[str, AfterValidator(_address)] | None = None
    vxlan_remote: Annotated[str, AfterValidator(_address)] | None = None
    vxlan_remotes: Annotated[tuple[Annotated[str, AfterValidator(_address)], ...],
                             BeforeValidator(as_tuple)] = ()
    vxlan_local: Annotated[str, AfterValidator(_address)] | None = None
    mtu: Annotated[int, Field(ge=576, le=65535)] | None = None
    gateway: Annotated[str, AfterValidator(_address)] | None = None

    def options(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`Platform.net_create` besides name and cidr."""
        return self.model_dump(exclude={"name", "cidr"})


class IfaceFile(Frozen):
    """One entry of a vnode's ``ifaces``: the viface's ``name`` (default ``ifN``), the
    ``vnetwork`` it joins, its ``address`` (default: one given in file order), ``bandwidth``
    (a tc rate such as ``"100mbit"``) and ``latency`` in ms."""

    name: IfName | None = None
    vnetwork: str
    address: Annotated[str, AfterValidator(_address)] | None = None
    bandwidth: Rate | None = None
    latency: Number | None = None


class MemFile(Frozen):
    """A vnode's ``mem`` table, MiB (docs/vnode.md, "Memory"): ``hierarchy`` ``"v1"`` or
    ``"v2"``; v1 ``mem`` (hard, OOM kill) and ``swap``; v2 ``soft``/``soft_limit``
    (memory.high) and ``hard``/``hard_limit`` (memory.max)."""

    hierarchy: Hierarchy = "v1"
    mem: Mib | None = None
    swap: SwapMib | None = None
    soft: Mib | None = None
    hard: Mib | None = None
    soft_limit: Mib | None = None
    hard_limit: Mib | None = None


class IoFile(Frozen):
    """One entry of a vnode's ``io``: a block device's path (``/dev/sda``) and its read and
    write limits in bytes per second."""

    device: str
    read_bps: Bps | None = None
    write_bps: Bps | None = None


class VNodeFile(Frozen):
    """One ``[[vnodes]]`` table or ``[defaults]``: every key optional here; ``name`` and
    ``image`` are required once the defaults are merged."""

    name: str | None = None
    count: Annotated[int, Field(ge=1, le=4096)] | None = None
    image: str | None = None
    fs: Literal["auto", "cow", "distinct", "shared"] | None = None
    vnetwork: str | None = None
    ifaces: Annotated[tuple[IfaceFile, ...], BeforeValidator(as_tuple)] | None = None
    bandwidth: Rate | None = None
    latency: Number | None = None
    cpu: Number | None = None
    cpus: Number | None = None
    cpuset: str | None = None
    mem: MemFile | None = None
    io: Annotated[tuple[IoFile, ...], BeforeValidator(as_tuple)] | None = None
    io_hierarchy: Hierarchy | None = None
    ssh_pubkey: Path_ | None = None
    ssh_privkey: Path_ | None = None
    copy_host_keys: bool | None = None
    start_command: str | None = None
    persistent_journal: bool | None = None
    host: str | None = None


class VNodeSpec(Frozen):
    """One vnode of a platform file, ready for :meth:`Platform.create` (``create`` holds its
    keyword arguments, built from a validated :class:`VNodeFile`). ``host``: the pnode it
    must run on, if the file says; ``table``: its defaults-merged table as validated (what a
    multi-host frontend writes into a pnode's own platform file)."""

    name: str
    image: str
    create: dict[str, Any] = Field(default_factory=dict)
    host: str | None = None
    table: dict[str, Any] = Field(default_factory=dict)

    def cpus(self) -> float:
        """Declared cores (0 when none): what placement counts."""
        return float(self.create.get("cpus") or 0)

    def mem_mib(self) -> int:
        """Declared memory limit in MiB (0 when none or ``max``): what placement counts."""
        m = (self.create.get("mem") or {}).get("mem")
        return m if isinstance(m, int) else 0


class PnodeHost(Frozen):
    """Per-host overrides of ``[pnodes.host.NAME]``."""

    address: str | None = None
    ssh_port: Annotated[int, Field(gt=0, lt=65536)] | None = None
    state_dir: str | None = None
    root_interface: str | None = None


class PnodesFile(Frozen):
    """``[pnodes]``: the physical nodes a platform spans (see :mod:`sidusctl.vnode.cluster`).
    ``hosts``: a ClusterShell node set (``pn[1-3]``) or a list of them; ``sidusctl``: the
    command that runs sidusctl on a pnode (split like a shell would); ``ssh_options``: extra
    ssh/scp options (argv words); ``connect_timeout``: seconds."""

    hosts: str | Annotated[tuple[str, ...], BeforeValidator(as_tuple)]
    user: str = "root"
    ssh_port: Annotated[int, Field(gt=0, lt=65536)] = 22
    state_dir: str = "/var/lib/sidusctl"
    root_interface: str | None = None
    sidusctl: str = "sidusctl"
    ssh_options: Annotated[tuple[str, ...], BeforeValidator(as_tuple)] = ()
    connect_timeout: Annotated[float, Field(gt=0, le=120)] = 5.0
    fanout: Annotated[int, Field(ge=1, le=4096)] = 64
    host: dict[str, PnodeHost] = Field(default_factory=dict)


class PlacementFile(Frozen):
    """``[placement]``: ``pack`` fills a pnode before the next, ``spread`` balances them;
    ``max_per_pnode`` caps the vnodes of one pnode (DETER's packing factor)."""

    policy: Literal["pack", "spread"] = "pack"
    max_per_pnode: Annotated[int, Field(ge=1)] | None = None


class PlatformSpec(Frozen):
    """A platform file, checked and with its defaults merged: the ``file``'s path, its
    vnetworks and vnodes in file order, its ``[pnodes]`` (None: one host) and
    ``[placement]``."""

    file: str
    vnetworks: tuple[VNetworkSpec, ...]
    vnodes: tuple[VNodeSpec, ...]
    pnodes: PnodesFile | None = None
    placement: PlacementFile = PlacementFile()
    #: pnode names of ``pnodes.hosts``, expanded (empty for a one-host file)
    pnode_names: tuple[str, ...] = ()


_TOP = ("defaults", "vnetworks", "vnodes", "pnodes", "placement")


def load(path: Path) -> PlatformSpec:
    """Parse and check ``path``: :class:`ConfigErrors` listing every problem (file, line, key,
    found, expected) before anything is created."""
    f = str(path)
    text = read_text(path, "platform file")
    doc = parse_toml(text, f)
    c = Checker(f, text)
    for k in doc:
        if k not in _TOP:
            c.error((k,), "unknown key", "one of " + ", ".join(_TOP))
    defaults_raw = doc.get("defaults", {})
    defaults: dict[str, Any] = {}
    if isinstance(defaults_raw, dict):
        for k in ("name", "count"):
            if k in defaults_raw:
                c.error(("defaults", k), "unknown key", "a vnode key other than name and count")
        dv = c.validate(VNodeFile, {k: v for k, v in defaults_raw.items()
                                    if k not in ("name", "count")}, ("defaults",))
        defaults = dv.model_dump(exclude_none=True) if dv else {}
    else:
        c.error(("defaults",), "must be a table", "[defaults]")
    nets: list[VNetworkSpec] = []
    nets_raw = doc.get("vnetworks", [])
    if not isinstance(nets_raw, list):
        c.error(("vnetworks",), "must be an array of tables", "[[vnetworks]]")
        nets_raw = []
    declared: dict[str, int] = {}  # every vnetwork name written (valid or not): its index
    for i, n in enumerate(nets_raw):
        nv = c.validate(VNetworkSpec, n, ("vnetworks", i))
        name = n.get("name") if isinstance(n, dict) else None
        if isinstance(name, str) and name in declared:
            c.error(("vnetworks", i, "name"), f"vnetwork {name!r} defined twice", "unique names")
        elif isinstance(name, str):
            declared[name] = i
        if nv is not None and not any(x.name == nv.name for x in nets):
            nets.append(nv)
    pnodes: PnodesFile | None = None
    pnode_names: list[str] = []
    if "pnodes" in doc:
        pnodes = c.validate(PnodesFile, doc["pnodes"], ("pnodes",))
        if pnodes is not None:
            try:
                pnode_names = fanout.expand(pnodes.hosts)
            except ConfigError as e:
                c.error(("pnodes", "hosts"), e.problem, e.expected)
            for h in pnodes.host:
                if pnode_names and h not in pnode_names:
                    c.error(("pnodes", "host", h), f"{h!r} is not one of the hosts",
                            fanout.fold_names(pnode_names))
            if not pnode_names and pnodes.hosts == ():
                c.error(("pnodes", "hosts"), "empty", "at least one pnode")
    _check_vnetworks(c, nets, declared, one_host="pnodes" not in doc)
    placement = c.validate(PlacementFile, doc.get("placement", {}), ("placement",))
    vnodes: list[VNodeSpec] = []
    seen: set[str] = set()
    reported: set[tuple[str | int, ...]] = set()
    vnodes_raw = doc.get("vnodes", [])
    if not isinstance(vnodes_raw, list):
        c.error(("vnodes",), "must be an array of tables", "[[vnodes]]")
        vnodes_raw = []
    for i, raw in enumerate(vnodes_raw):
        loc: tuple[str | int, ...] = ("vnodes", i)
        v = c.validate(VNodeFile, raw, loc)
        if v is None:  # its shape problems are recorded; what it refers to is checked still
            if isinstance(raw, dict):
                _check_refs(c, loc, raw, {**defaults, **raw}, {n.name: n for n in nets},
                            declared, reported)
            continue
        d = {**defaults, **v.model_dump(exclude_none=True)}
        if "name" not in d:
            c.error((*loc, "name"), "missing", "a vnode name", line=c.line(loc))
        if "image" not in d:
            c.error((*loc, "image"), "missing (and no [defaults] image)",
                    "an image name or tarball path", line=c.line(loc))
        _check_refs(c, loc, raw, d, {n.name: n for n in nets}, declared, reported)
        if "name" not in d or "image" not in d:
            continue
        host = d.get("host")
        if host is not None and pnodes is None:
            c.error((*loc, "host"), f"host {host!r} without a [pnodes] section",
                    "a [pnodes] section listing the hosts")
        elif host is not None and pnode_names and host not in pnode_names:
            c.error((*loc, "host"), f"{host!r} is not one of the pnodes",
                    fanout.fold_names(pnode_names))
        if "[" in d["name"]:
            if "count" in d:
                c.error((*loc, "count"), "count with a node set name",
                        "either name = 'node[1-40]' or name + count")
                continue
            try:
                names = fanout.expand(d["name"])
            except ConfigError as e:
                c.error((*loc, "name"), e.problem, e.expected)
                continue
        else:
            count = d.get("count", 1)
            names = [d["name"]] if "count" not in d else [f"{d['name']}{k}" for k in range(count)]
        table = {k: val for k, val in d.items() if k not in ("name", "count", "host")}
        for name in names:
            if not VNODE_NAME_RE.match(name):
                c.error((*loc, "name"), f"invalid vnode name {name!r}",
                        "a host name: lower-case letters, digits and '-', 1-32 chars")
                break
            if name in seen:
                c.error((*loc, "name"), f"vnode {name!r} defined twice", "unique names")
                break
            seen.add(name)
            vnodes.append(VNodeSpec(name=name, image=d["image"], create=_create_args(d),
                                    host=host, table=table))
    c.done()
    return PlatformSpec(file=f, vnetworks=tuple(nets), vnodes=tuple(vnodes), pnodes=pnodes,
                        placement=placement or PlacementFile(), pnode_names=tuple(pnode_names))


def _check_vnetworks(c: Checker, nets: list[VNetworkSpec], declared: dict[str, int], *,
                     one_host: bool) -> None:
    """Record what :meth:`Platform.net_create` would refuse half-way through ``up``: CIDRs
    that overlap and, in a one-host file (a multi-host frontend makes its own VXLAN settings),
    what :meth:`VNetwork.validate` refuses (VXLAN settings)."""
    for k, n in enumerate(nets):
        i = declared[n.name]
        for other in nets[:k]:
            if ipaddress.IPv4Network(n.cidr).overlaps(ipaddress.IPv4Network(other.cidr)):
                c.error(("vnetworks", i, "cidr"), f"{n.cidr} overlaps vnetwork {other.name} "
                        f"({other.cidr})", "CIDRs that do not overlap")
        if one_host:
            opts = n.options()
            opts["vxlan_remotes"] = list(opts["vxlan_remotes"])
            try:
                VNetwork(name=n.name, cidr=n.cidr, **opts).validate()
            except ConfigError as e:
                c.error(("vnetworks", i, e.key or "name"), e.problem, e.expected)


def _check_refs(c: Checker, loc: tuple[str | int, ...], raw: Any, d: dict[str, Any],
                nets: dict[str, VNetworkSpec], declared: dict[str, int],
                reported: set[tuple[str | int, ...]]) -> None:
    """Record the cross-references of one defaults-merged vnode ``d`` (``raw``: its table as
    written) that :meth:`Platform.create` would refuse half-way through ``up``: a vnetwork
    that is not one of the file's, a viface name given twice, an address outside its
    vnetwork, a bandwidth or latency without a viface. A problem of ``[defaults]`` is
    recorded once (``reported``). ``d`` may hold values that failed their own check (recorded
    already): those of the wrong type are skipped."""
    def at(*key: str | int) -> tuple[str | int, ...]:
        return (*loc, *key) if isinstance(raw, dict) and key[0] in raw else ("defaults", *key)

    def err(where: tuple[str | int, ...], problem: str, expected: str) -> None:
        if where not in reported:
            reported.add(where)
            c.error(where, problem, expected)

    known = "one of the file's [[vnetworks]]: " + (", ".join(declared) or "none")
    if "ifaces" in d:
        names: set[str] = set()
        ifaces = d["ifaces"] if isinstance(d["ifaces"], (list, tuple)) else []
        for j, i in enumerate(ifaces):
            if not isinstance(i, dict):
                continue
            net, name, addr = i.get("vnetwork"), i.get("name") or f"if{j}", i.get("address")
            if isinstance(net, str) and net not in declared:
                err(at("ifaces", j, "vnetwork"), f"unknown vnetwork {net!r}", known)
            if isinstance(name, str) and name in names:
                err(at("ifaces", j, "name"), f"viface {name!r} given twice", "unique names")
            names.add(str(name))
            try:
                a = ipaddress.IPv4Address(addr) if isinstance(addr, str) else None
            except ValueError:
                a = None
            if a is not None and isinstance(net, str) and net in nets:
                netw = ipaddress.IPv4Network(nets[net].cidr)
                if a not in netw or a in (netw.network_address, netw.broadcast_address):
                    err(at("ifaces", j, "address"), f"{addr} is outside vnetwork {net} "
                        f"({netw})", f"a host address of {netw}")
    elif "vnetwork" in d:
        if isinstance(d["vnetwork"], str) and d["vnetwork"] not in declared:
            err(at("vnetwork"), f"unknown vnetwork {d['vnetwork']!r}", known)
    else:
        for k in ("bandwidth", "latency"):
            if k in d:
                err(at(k), f"{k} of a vnode without a viface", "a vnetwork or ifaces as well")


def _create_args(d: dict[str, Any]) -> dict[str, Any]:
    """:meth:`Platform.create` keyword arguments from a validated, defaults-merged vnode."""
    out: dict[str, Any] = {"fs": d.get("fs", "auto")}
    ifaces: list[IfaceSpec] = []
    bandwidth: dict[str, str] = {}
    latency: dict[str, float] = {}
    if "ifaces" in d:
        for j, i in enumerate(d["ifaces"]):
            name = str(i.get("name") or f"if{j}")
            ifaces.append(IfaceSpec(name, i["vnetwork"], i.get("address")))
            if i.get("bandwidth") is not None:
                bandwidth[name] = str(i["bandwidth"])
            if i.get("latency") is not None:
                latency[name] = float(i["latency"])
    elif "vnetwork" in d:
        ifaces.append(IfaceSpec("if0", d["vnetwork"]))
    if "bandwidth" in d:  # Alevin-style: the output bandwidth of if0
        bandwidth.setdefault(ifaces[0].name if ifaces else "if0", str(d["bandwidth"]))
    if "latency" in d:
        latency.setdefault(ifaces[0].name if ifaces else "if0", float(d["latency"]))
    out["ifaces"] = ifaces
    out["bandwidth"] = bandwidth or None
    out["latency"] = latency or None
    cpus = d.get("cpus", d.get("cpu"))
    if cpus is not None:
        out["cpus"] = float(cpus) if cpus else None
    if "cpuset" in d:
        out["cpuset"] = d["cpuset"]
    if "mem" in d:
        m = d["mem"]
        mem: dict[str, Any] = {"hierarchy": parse_hierarchy(m.get("hierarchy", "v1"))}
        for src, dst in (("mem", "mem"), ("swap", "swap"), ("soft", "soft"), ("hard", "hard"),
                         ("soft_limit", "soft"), ("hard_limit", "hard")):
            if m.get(src) is not None:
                mem[dst] = parse_mib(m[src], "", src, zero=src == "swap")
        out["mem"] = mem
    if "io" in d:
        out["io"] = [{"device": x["device"],
                      "read_bps": parse_bps(x["read_bps"], "", "io") if x.get("read_bps") is not None else None,
                      "write_bps": parse_bps(x["write_bps"], "", "io") if x.get("write_bps") is not None else None}
                     for x in d["io"]]
    if "io_hierarchy" in d:
        out["io_hierarchy"] = parse_hierarchy(d["io_hierarchy"])
    for k in ("ssh_pubkey", "ssh_privkey"):
        if k in d:
            out[k] = Path(d[k]).expanduser().read_text()
    for k in ("copy_host_keys", "persistent_journal", "start_command"):
        if k in d:
            out[k] = d[k]
    return out


# up and down, re-exported here (their place before): importing platform_updown needs nothing
# of this module at run time
from sidusctl.vnode.platform_updown import Reporter as Reporter  # noqa: E402
from sidusctl.vnode.platform_updown import check_images as check_images  # noqa: E402
from sidusctl.vnode.platform_updown import down as down  # noqa: E402
from sidusctl.vnode.platform_updown import up as up  # noqa: E402
