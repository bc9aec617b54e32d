"""Platform files (TOML): the vnetworks and vnodes of an experiment, brought up and down in
one command. Two vnode forms are accepted in ``[[vnodes]]``: the Alevin-style list of Distem's
advanced guide (``name``, ``bandwidth``, ``cpu``) and full specs (every ``vnode create``
option). ``[defaults]`` fills what a vnode leaves out. See docs/vnode.md for an example.

Every key is checked once, here: a bad file gets one message naming the file, the key and
what was expected, before anything is created.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidusctl.core.errors import ConfigError, SidusError
from sidusctl.vnode.model import (
    check_vnet_name,
    check_vnode_name,
    parse_bps,
    parse_hierarchy,
    parse_mib,
)
from sidusctl.vnode.platform import IfaceSpec, Platform

NET_KEYS = {"name", "cidr", "mode", "root_interface", "vxlan_id", "vxlan_port", "vxlan_group",
            "vxlan_remote", "gateway"}
VNODE_KEYS = {"name", "count", "image", "fs", "vnetwork", "ifaces", "bandwidth", "latency", "cpu",
              "cpus", "cpuset", "mem", "io", "io_hierarchy", "ssh_pubkey", "ssh_privkey",
              "copy_host_keys", "start_command", "persistent_journal"}
IFACE_KEYS = {"name", "vnetwork", "address", "bandwidth", "latency"}
MEM_KEYS = {"hierarchy", "mem", "swap", "soft", "hard", "soft_limit", "hard_limit"}

Reporter = Callable[[str, str, int], None]


@dataclass
class VNodeSpec:
    """One vnode of a platform file, ready for :meth:`Platform.create`."""

    name: str
    image: str
    create: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlatformSpec:
    file: str
    vnetworks: list[dict[str, Any]]
    vnodes: list[VNodeSpec]


def _unknown(where: str, d: dict[str, Any], allowed: set[str], file: str) -> None:
    for k in d:
        if k not in allowed:
            raise ConfigError(file, f"{where}.{k}", "unknown key",
                              expected="one of " + ", ".join(sorted(allowed)))


def _read_text(file: str, key: str, path: object) -> str:
    try:
        return Path(str(path)).expanduser().read_text()
    except OSError as e:
        raise ConfigError(file, key, f"cannot read {path}: {e.strerror}") from e


def load(path: Path) -> PlatformSpec:
    """Parse and check ``path``; ConfigError naming the key on any problem."""
    f = str(path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f, None, f"not valid TOML: {e}") from e
    _unknown("", doc, {"defaults", "vnetworks", "vnodes"}, f)
    defaults = doc.get("defaults", {})
    _unknown("defaults", defaults, VNODE_KEYS - {"name", "count"}, f)
    nets = doc.get("vnetworks", [])
    if not isinstance(nets, list):
        raise ConfigError(f, "vnetworks", "must be an array of tables ([[vnetworks]])")
    for i, n in enumerate(nets):
        _unknown(f"vnetworks[{i}]", n, NET_KEYS, f)
        for req in ("name", "cidr"):
            if req not in n:
                raise ConfigError(f, f"vnetworks[{i}].{req}", "missing")
        check_vnet_name(str(n["name"]), f"{f}: vnetworks[{i}]")
    vnodes: list[VNodeSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(doc.get("vnodes", [])):
        where = f"vnodes[{i}]"
        _unknown(where, raw, VNODE_KEYS, f)
        d = {**defaults, **raw}
        if "name" not in d:
            raise ConfigError(f, f"{where}.name", "missing")
        if "image" not in d:
            raise ConfigError(f, f"{where}.image", "missing (and no [defaults] image)")
        count = int(d.get("count", 1))
        names = [str(d["name"])] if count == 1 and "count" not in d else \
            [f"{d['name']}{k}" for k in range(count)]
        for name in names:
            check_vnode_name(name, f"{f}: {where}")
            if name in seen:
                raise ConfigError(f, f"{where}.name", f"vnode {name!r} defined twice")
            seen.add(name)
            vnodes.append(VNodeSpec(name, str(d["image"]), _create_args(f, where, d)))
    return PlatformSpec(f, nets, vnodes)


def _create_args(f: str, where: str, d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"fs": str(d.get("fs", "auto"))}
    ifaces: list[IfaceSpec] = []
    bandwidth: dict[str, str] = {}
    latency: dict[str, float] = {}
    if "ifaces" in d:
        for j, i in enumerate(d["ifaces"]):
            _unknown(f"{where}.ifaces[{j}]", i, IFACE_KEYS, f)
            if "vnetwork" not in i:
                raise ConfigError(f, f"{where}.ifaces[{j}].vnetwork", "missing")
            name = str(i.get("name", f"if{j}"))
            ifaces.append(IfaceSpec(name, str(i["vnetwork"]), i.get("address")))
            if "bandwidth" in i:
                bandwidth[name] = str(i["bandwidth"])
            if "latency" in i:
                latency[name] = float(i["latency"])
    elif "vnetwork" in d:
        ifaces.append(IfaceSpec("if0", str(d["vnetwork"])))
    if "bandwidth" in d:  # Alevin-style: the output bandwidth of if0
        bandwidth.setdefault(ifaces[0].name if ifaces else "if0", str(d["bandwidth"]))
    if "latency" in d:
        latency.setdefault(ifaces[0].name if ifaces else "if0", float(d["latency"]))
    out["ifaces"] = ifaces
    out["bandwidth"] = bandwidth or None
    out["latency"] = latency or None
    cpus = d.get("cpus", d.get("cpu"))
    if cpus is not None:
        if not isinstance(cpus, (int, float)) or cpus < 0:
            raise ConfigError(f, f"{where}.cpus", f"invalid {cpus!r}", expected="a number of CPUs")
        out["cpus"] = float(cpus) if cpus else None
    if "cpuset" in d:
        out["cpuset"] = str(d["cpuset"])
    if "mem" in d:
        m = d["mem"]
        if not isinstance(m, dict):
            raise ConfigError(f, f"{where}.mem", "must be a table",
                              expected="{ hierarchy = 'v1', mem = 512, swap = 128 }")
        _unknown(f"{where}.mem", m, MEM_KEYS, f)
        mem: dict[str, Any] = {"hierarchy": parse_hierarchy(m.get("hierarchy", "v1"), f)}
        for src, dst in (("mem", "mem"), ("swap", "swap"), ("soft", "soft"), ("hard", "hard"),
                         ("soft_limit", "soft"), ("hard_limit", "hard")):
            if src in m:
                mem[dst] = parse_mib(m[src], f, f"{where}.mem.{src}")
        out["mem"] = mem
    if "io" in d:
        out["io"] = [{"device": str(x["device"]),
                      "read_bps": parse_bps(x["read_bps"], f, f"{where}.io") if "read_bps" in x else None,
                      "write_bps": parse_bps(x["write_bps"], f, f"{where}.io") if "write_bps" in x else None}
                     for x in d["io"]]
    if "io_hierarchy" in d:
        out["io_hierarchy"] = parse_hierarchy(d["io_hierarchy"], f)
    if "ssh_pubkey" in d:
        out["ssh_pubkey"] = _read_text(f, f"{where}.ssh_pubkey", d["ssh_pubkey"])
    if "ssh_privkey" in d:
        out["ssh_privkey"] = _read_text(f, f"{where}.ssh_privkey", d["ssh_privkey"])
    if "copy_host_keys" in d:
        out["copy_host_keys"] = bool(d["copy_host_keys"])
    if "persistent_journal" in d:
        out["persistent_journal"] = bool(d["persistent_journal"])
    if "start_command" in d:
        out["start_command"] = str(d["start_command"])
    return out


def up(p: Platform, spec: PlatformSpec, *, wait_ssh: bool = True,
       timeout: float = 180.0, progress: Reporter | None = None) -> dict[str, Any]:
    """Create the vnetworks (those that exist with the same CIDR are kept), create the vnodes
    (existing ones kept), start every READY one, then wait for SSH on all in parallel.
    Returns ``{"started": [...], "failed": {name: message}, "ssh": {name: seconds|None}}``."""
    def tick(stage: str, name: str, total: int) -> None:
        if progress:
            progress(stage, name, total)

    existing = {n.name: n for n in p.net_list()}
    for n in spec.vnetworks:
        name = str(n["name"])
        if name in existing:
            if existing[name].cidr != n["cidr"]:
                raise ConfigError(spec.file, f"vnetworks.{name}.cidr",
                                  f"vnetwork {name} exists with CIDR {existing[name].cidr}")
            continue
        p.net_create(name, str(n["cidr"]), **{k: v for k, v in n.items() if k not in ("name", "cidr")})
        tick("vnetworks", name, len(spec.vnetworks))
    have = {r["name"]: r for r in p.list()}
    for v in spec.vnodes:
        if v.name not in have:
            p.create(v.name, v.image, **v.create)
        tick("create", v.name, len(spec.vnodes))
    have = {r["name"]: r for r in p.list()}
    todo = [v.name for v in spec.vnodes if have[v.name]["state"] == "READY"]
    started: list[str] = [v.name for v in spec.vnodes if v.name not in todo]
    failed: dict[str, str] = {}
    # Starts run one after the other in this thread: each holds the store lock while it
    # snapshots and calls lxc-start -d (a fraction of a second), and pyroute2's namespace
    # switching is not thread-safe. The containers then boot concurrently, and the SSH wait
    # below probes them all in parallel.
    for vname in todo:
        try:
            p.start(vname)
            started.append(vname)
        except SidusError as e:
            failed[vname] = str(e)
        tick("start", vname, len(todo))
    res: dict[str, Any] = {"started": sorted(started), "failed": failed}
    if wait_ssh and started:
        res["ssh"] = p.wait(started, timeout=timeout,
                            progress=lambda n: tick("ssh", n, len(started)))
    return res


def down(p: Platform, spec: PlatformSpec) -> None:
    """Destroy the file's vnodes (stopping them) and delete its vnetworks; missing ones are
    skipped, so ``down`` after a half-done ``up`` cleans what there is."""
    have = {r["name"] for r in p.list()}
    for v in spec.vnodes:
        if v.name in have:
            p.destroy(v.name)
    nets = {n.name for n in p.net_list()}
    for n in spec.vnetworks:
        if n["name"] in nets:
            p.net_delete(str(n["name"]))
