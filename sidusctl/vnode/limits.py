"""A vnode's limits: memory (cgroup v1 or v2), CPU shares and sets, block IO throttling, and
the bandwidth and latency of its vifaces (tc), checked before any of them changes; plus the
size and latency-matrix file parsers of the CLI and platform files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sidusctl.core.errors import ConfigError
from sidusctl.core.log import get_logger
from sidusctl.subsys import cgroups
from sidusctl.subsys.cgroups import IoLimit, MemLimits
from sidusctl.subsys.net import tc
from sidusctl.vnode.model import VNode

log = get_logger("vnode")


def set_limits(vn: VNode, *, mem: dict[str, Any] | None, cpus: float | None,
                cpuset: str | None, io: Sequence[dict[str, Any]] | None,
                bandwidth: dict[str, str | int] | None,
                latency: dict[str, float] | None) -> None:
    """Validate and store limits on ``vn`` (merging into what it has). Raises before any
    field changes if something is wrong."""
    new_mem = dict(vn.mem)
    if mem:
        if "hierarchy" in mem and new_mem.get("hierarchy") not in (None, mem["hierarchy"]) \
                and any(k in new_mem for k in ("mem", "soft", "hard", "swap")):
            log.info("vnode %s: memory hierarchy changes from v%s to v%s", vn.name,
                     new_mem.get("hierarchy"), mem["hierarchy"])
        new_mem.update({k: v for k, v in mem.items() if v is not None})
    ml = MemLimits(**new_mem)
    ml.settings()
    ml.check_host()
    if cpus is not None and cpus < 0:
        raise ConfigError(f"vnode {vn.name}", "cpus", f"{cpus} is negative",
                          expected="a number of CPUs (0 cancels)")
    if cpus is not None or cpuset is not None:
        cgroups.require(1, "cpu" if cpus is not None else "cpuset", "a CPU limit")
    if cpuset is not None and cpuset != "":
        want = cgroups.parse_cpuset(cpuset)
        if not want <= cgroups.host_cpus():
            raise ConfigError(f"vnode {vn.name}", "cpuset",
                              f"CPUs {sorted(want - cgroups.host_cpus())} do not exist here",
                              expected=f"a subset of {sorted(cgroups.host_cpus())}")
    new_io = {d["device"]: dict(d) for d in vn.io}
    for d in io or ():
        lim = IoLimit(**d)
        lim.majmin()
        cur = new_io.setdefault(lim.device, {"device": lim.device})
        cur.update({k: v for k, v in d.items() if v is not None})
    cgroups.io_settings([IoLimit(**d) for d in new_io.values()], vn.io_hierarchy)
    if new_io:
        cgroups.require(vn.io_hierarchy, "blkio" if vn.io_hierarchy == 1 else "io",
                        "IO throttling")
    rates: dict[str, int | None] = {}
    for ifn, rate in (bandwidth or {}).items():
        if not any(i.name == ifn for i in vn.ifaces):
            raise ConfigError(f"vnode {vn.name}", "bandwidth", f"no viface {ifn!r}")
        rates[ifn] = None if str(rate) in ("", "max", "none") else tc.parse_rate(
            rate, f"vnode {vn.name}: bandwidth of {ifn}")
    lats: dict[str, float | None] = {}
    for ifn, ms in (latency or {}).items():
        if not any(i.name == ifn for i in vn.ifaces):
            raise ConfigError(f"vnode {vn.name}", "latency", f"no viface {ifn!r}")
        lats[ifn] = None if ms is None or float(ms) <= 0 else float(ms)
    if any(v is not None for v in lats.values()):
        tc.require_qdisc("netem")
    # all valid: apply to the model
    vn.mem = new_mem
    if cpus is not None:
        vn.cpus = cpus or None
    if cpuset is not None:
        vn.cpuset = cpuset or None
    vn.io = list(new_io.values())
    for i in vn.ifaces:
        if i.name in rates:
            i.bandwidth = rates[i.name]
        if i.name in lats:
            i.latency_ms = lats[i.name]

def cgroup_settings(vn: VNode) -> list[tuple[int, str, str]]:
    """Every cgroup file ``vn``'s limits set: ``(hierarchy 1 or 2, file name, value)``, memory
    then CPU then block I/O (:mod:`sidusctl.subsys.cgroups`)."""
    out = vn.mem_limits().settings()
    out += cgroups.cpu_settings(vn.cpus, vn.cpuset)
    out += cgroups.io_settings(vn.io_limits(), vn.io_hierarchy)
    return out


def parse_matrix_file(path: Path) -> tuple[list[str], list[list[float]]]:
    """A latency matrix file: first line the vnode names, then one row of milliseconds per
    vnode (whitespace or comma separated; ``#`` comments)."""
    rows = [ln.split("#", 1)[0].replace(",", " ").split()
            for ln in path.read_text().splitlines()]
    rows = [r for r in rows if r]
    if not rows:
        raise ConfigError(str(path), None, "empty latency matrix")
    names = rows[0]
    try:
        m = [[float(x) for x in r] for r in rows[1:]]
    except ValueError as e:
        raise ConfigError(str(path), None, f"not a number: {e}", expected="milliseconds") from e
    return names, m


def parse_size(text: str) -> int:
    """``20G``, ``512M``, ``1T`` or bytes -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(t)
    except ValueError as e:
        raise ConfigError("--btrfs-image", None, f"invalid size {text!r}",
                          expected="a size such as 20G or 512M") from e
