"""The plan of a multi-host platform: which pnode runs which vnode, with which addresses, and
the platform file each pnode gets for its share. Pure: no host is contacted here (the
measured capacities come in as arguments), so the same file and the same facts always give
the same plan, and ``vnode up --dry-run`` prints exactly what ``up`` will do.

Addresses on a vnetwork spanning pnodes (one VXLAN segment, RFC 7348):

- the first host addresses of its CIDR go to the pnodes' bridges, in pnode order (pnode k's
  bridge is its vnodes' gateway and how it reaches them for SSH);
- vnode addresses written in the file are kept; the others are given in file order from the
  addresses that follow, skipping those taken. Every address is unique across the platform;
- one VNI per vnetwork: the file's ``vxlan_id``, else one derived from the vnetwork's name
  (CRC-32 folded into 1..2^24-1), the same on every pnode;
- the MTU leaves 50 bytes of the smallest root-interface MTU for the VXLAN encapsulation
  (outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8).
"""

from __future__ import annotations

import ipaddress
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidusctl.core.errors import ConfigError
from sidusctl.vnode.placement import Capacity, Demand, place
from sidusctl.vnode.platform_file import PlatformSpec, VNodeSpec

VXLAN_OVERHEAD = 50


@dataclass(frozen=True)
class PnodeInfo:
    """One pnode as the plan needs it: ``name``, ``address`` (underlay IPv4, what VXLAN peers
    send to), ``root_interface`` (the interface holding that address), ``mtu`` of it."""

    name: str
    address: str
    root_interface: str | None
    mtu: int = 1500


@dataclass
class Plan:
    """``placement``: vnode -> pnode; ``addresses``: vnode -> {vnetwork: address};
    ``gateways``: vnetwork -> {pnode: bridge address}; ``vni``: vnetwork -> VNI; ``mtu``;
    ``files``: pnode -> the table of its own platform file (TOML-ready)."""

    placement: dict[str, str]
    addresses: dict[str, dict[str, str]] = field(default_factory=dict)
    gateways: dict[str, dict[str, str]] = field(default_factory=dict)
    vni: dict[str, int] = field(default_factory=dict)
    mtu: int = 1450
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def vnodes_on(self, pnode: str) -> list[str]:
        """The vnodes placed on ``pnode``, in placement order."""
        return [v for v, p in self.placement.items() if p == pnode]

    def to_json(self) -> dict[str, Any]:
        """``placement``, ``addresses``, ``gateways``, ``vni`` and ``mtu`` for JSON output (not
        ``files``); the plan's own dicts, not copies."""
        return {"placement": self.placement, "addresses": self.addresses,
                "gateways": self.gateways, "vni": self.vni, "mtu": self.mtu}


def derived_vni(name: str) -> int:
    """A VNI from a vnetwork name: CRC-32 folded into 1..16777215 (24 bits, RFC 7348 5)."""
    return zlib.crc32(name.encode()) % (2**24 - 1) + 1


def _vnetworks_of(table: Mapping[str, Any]) -> list[str]:
    if table.get("ifaces"):
        return [str(i["vnetwork"]) for i in table["ifaces"]]
    return [str(table["vnetwork"])] if table.get("vnetwork") else []


def make_plan(spec: PlatformSpec, pnodes: Sequence[PnodeInfo], capacity: Sequence[Capacity],
              images: Mapping[str, str], *, need_store_mib: int = 0) -> Plan:
    """The plan of ``spec`` over ``pnodes`` (their order is the file's), given their measured
    ``capacity`` and ``images`` (image as written in the file -> its path on every pnode).
    :class:`~sidusctl.vnode.placement.PlacementError` when the vnodes do not fit;
    :class:`ConfigError` when a vnetwork runs out of addresses or an address repeats."""
    demands = [Demand(v.name, cpus=v.cpus(), mem_mib=v.mem_mib(), host=v.host)
               for v in spec.vnodes]
    placement = place(demands, capacity, policy=spec.placement.policy,
                      max_per_pnode=spec.placement.max_per_pnode, need_store_mib=need_store_mib)
    placement = {v.name: placement[v.name] for v in spec.vnodes}  # file order
    mtus = [p.mtu for p in pnodes] or [1500]
    plan = Plan(placement, mtu=min(mtus) - VXLAN_OVERHEAD)
    _addresses(spec, pnodes, plan)
    for p in pnodes:
        plan.files[p.name] = _pnode_file(spec, p, pnodes, plan, images)
    return plan


def _addresses(spec: PlatformSpec, pnodes: Sequence[PnodeInfo], plan: Plan) -> None:
    fixed: dict[str, dict[str, str]] = {}
    for v in spec.vnodes:
        for i in v.table.get("ifaces") or []:
            if i.get("address"):
                fixed.setdefault(str(i["vnetwork"]), {})[v.name] = str(i["address"])
    for net in spec.vnetworks:
        plan.vni[net.name] = net.vxlan_id or derived_vni(net.name)
        hosts = ipaddress.IPv4Network(net.cidr).hosts()
        gw: dict[str, str] = {}
        for p in pnodes:
            a = next(hosts, None)
            if a is None:
                raise ConfigError(spec.file, f"vnetworks.{net.name}.cidr",
                                  f"{net.cidr} has too few addresses for {len(pnodes)} pnodes")
            gw[p.name] = str(a)
        plan.gateways[net.name] = gw
        taken = set(gw.values())
        mine = fixed.get(net.name, {})
        for vname, addr in mine.items():
            if addr in taken:
                raise ConfigError(spec.file, f"vnodes.{vname}.ifaces",
                                  f"address {addr} on {net.name} is used twice (pnode bridges "
                                  f"take {', '.join(gw.values())})", expected="unique addresses")
            taken.add(addr)
        for v in spec.vnodes:
            if net.name not in _vnetworks_of(v.table):
                continue
            got = mine.get(v.name) or next((str(a) for a in hosts if str(a) not in taken), None)
            if got is None:
                raise ConfigError(spec.file, f"vnetworks.{net.name}.cidr",
                                  f"{net.cidr} has no address left for vnode {v.name}",
                                  expected="a larger network")
            taken.add(got)
            plan.addresses.setdefault(v.name, {})[net.name] = got


def _vnode_table(v: VNodeSpec, plan: Plan, images: Mapping[str, str]) -> dict[str, Any]:
    t = {k: val for k, val in v.table.items() if k not in ("vnetwork",)}
    t = {"name": v.name, **t, "image": images.get(v.image, v.image)}
    nets = _vnetworks_of(v.table)
    ifaces = [dict(i) for i in v.table.get("ifaces") or []] or \
        [{"name": "if0", "vnetwork": n} for n in nets]
    for i in ifaces:
        i["address"] = plan.addresses[v.name][str(i["vnetwork"])]
    if ifaces:
        t["ifaces"] = ifaces
        # Alevin-style bandwidth/latency of if0 moved onto the iface written out
        for k in ("bandwidth", "latency"):
            if k in t:
                ifaces[0].setdefault(k, t.pop(k))
    return t


def _pnode_file(spec: PlatformSpec, me: PnodeInfo, pnodes: Sequence[PnodeInfo], plan: Plan,
                images: Mapping[str, str]) -> dict[str, Any]:
    nets = []
    for net in spec.vnetworks:
        d: dict[str, Any] = {"name": net.name, "cidr": net.cidr, "mode": "vxlan",
                             "vxlan_id": plan.vni[net.name], "vxlan_port": net.vxlan_port,
                             "gateway": plan.gateways[net.name][me.name], "mtu": plan.mtu,
                             "vxlan_local": me.address}
        peers = [p.address for p in pnodes if p.name != me.name]
        if net.vxlan_group:
            d["vxlan_group"] = net.vxlan_group
        elif peers:
            d["vxlan_remotes"] = peers
        else:
            d["mode"] = "classical"
            del d["vxlan_id"], d["vxlan_port"], d["vxlan_local"]
        root = net.root_interface or me.root_interface
        if root and d["mode"] == "vxlan":
            d["root_interface"] = root
        nets.append(d)
    vnodes = [_vnode_table(v, plan, images) for v in spec.vnodes
              if plan.placement[v.name] == me.name]
    return {"vnetworks": nets, "vnodes": vnodes}
