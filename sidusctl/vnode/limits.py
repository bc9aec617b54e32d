"""A vnode's limits: memory (cgroup v1 or v2), CPU shares and sets, block IO throttling, and
the bandwidth and latency of its vifaces (tc), checked before any of them changes; plus the
latency-matrix and remote-address file parsers of the CLI and platform files."""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sidusctl.core.config import read_text
from sidusctl.core.errors import ConfigError, ConfigErrors
from sidusctl.core.log import get_logger
from sidusctl.subsys import cgroups
from sidusctl.subsys.cgroups import IoLimit, MemLimits
from sidusctl.subsys.net import tc
from sidusctl.vnode.model import VNODE_NAME_RE, VNode

log = get_logger("vnode")

T = TypeVar("T")


def set_limits(vn: VNode, *, mem: dict[str, Any] | None, cpus: float | None,
               cpuset: str | None, io: Sequence[dict[str, Any]] | None,
               bandwidth: dict[str, str | int] | None,
               latency: dict[str, float] | None) -> None:
    """Validate and store limits on ``vn`` (merging into what it has). ``cpus``: CPUs of CPU
    time, finite and 0 or more (0 cancels); ``latency``: ms per viface, finite (0 or less
    cancels). Raises before any field changes if something is wrong: a :class:`ConfigError`,
    :class:`ConfigErrors` listing every bad value when several are (memory, CPU, I/O,
    bandwidth, latency), or
    :class:`PrerequisiteError` for a controller or qdisc this host lacks."""
    errors: list[ConfigError] = []

    def checked(fn: Callable[[], T], default: T) -> T:
        try:
            return fn()
        except ConfigErrors as e:
            errors.extend(e.errors)
        except ConfigError as e:
            errors.append(e)
        return default

    no_io: dict[str, dict[str, Any]] = {}
    no_rates: dict[str, int | None] = {}
    no_lats: dict[str, float | None] = {}
    new_mem = checked(lambda: _mem(vn, mem), dict(vn.mem))
    checked(lambda: _cpus(vn, cpus), None)
    checked(lambda: _cpuset(vn, cpus, cpuset), None)
    new_io = checked(lambda: _io(vn, io), no_io)
    rates = checked(lambda: _rates(vn, bandwidth), no_rates)
    lats = checked(lambda: _latencies(vn, latency), no_lats)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)
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


def _mem(vn: VNode, mem: dict[str, Any] | None) -> dict[str, Any]:
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
    return new_mem


def _cpus(vn: VNode, cpus: float | None) -> None:
    if cpus is not None and not (math.isfinite(cpus) and cpus >= 0):
        raise ConfigError(f"vnode {vn.name}", "cpus", f"found {cpus}",
                          expected="a finite number of CPUs, 0 or more (0 cancels)")


def _cpuset(vn: VNode, cpus: float | None, cpuset: str | None) -> None:
    if cpuset is not None and cpuset != "":
        want = cgroups.parse_cpuset(cpuset)
        if not want <= cgroups.host_cpus():
            raise ConfigError(f"vnode {vn.name}", "cpuset",
                              f"CPUs {sorted(want - cgroups.host_cpus())} do not exist here",
                              expected=f"a subset of {sorted(cgroups.host_cpus())}")
    if cpus is not None or cpuset is not None:
        cgroups.require(1, "cpu" if cpus is not None else "cpuset", "a CPU limit")


def _io(vn: VNode, io: Sequence[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
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
    return new_io


def _rates(vn: VNode, bandwidth: dict[str, str | int] | None) -> dict[str, int | None]:
    rates: dict[str, int | None] = {}
    for ifn, rate in (bandwidth or {}).items():
        if not any(i.name == ifn for i in vn.ifaces):
            raise ConfigError(f"vnode {vn.name}", "bandwidth", f"no viface {ifn!r}")
        rates[ifn] = None if str(rate) in ("", "max", "none") else tc.parse_rate(
            rate, f"vnode {vn.name}: bandwidth of {ifn}")
    return rates


def _latencies(vn: VNode, latency: dict[str, float] | None) -> dict[str, float | None]:
    lats: dict[str, float | None] = {}
    for ifn, ms in (latency or {}).items():
        if not any(i.name == ifn for i in vn.ifaces):
            raise ConfigError(f"vnode {vn.name}", "latency", f"no viface {ifn!r}")
        if ms is not None and not math.isfinite(float(ms)):
            raise ConfigError(f"vnode {vn.name}", "latency", f"found {ms} for {ifn}",
                              expected="a finite number of milliseconds (0 cancels)")
        lats[ifn] = None if ms is None or float(ms) <= 0 else float(ms)
    if any(v is not None for v in lats.values()):
        tc.require_qdisc("netem")
    return lats


def cgroup_settings(vn: VNode) -> list[tuple[int, str, str]]:
    """Every cgroup file ``vn``'s limits set: ``(hierarchy 1 or 2, file name, value)``, memory
    then CPU then block I/O (:mod:`sidusctl.subsys.cgroups`)."""
    out = vn.mem_limits().settings()
    out += cgroups.cpu_settings(vn.cpus, vn.cpuset)
    out += cgroups.io_settings(vn.io_limits(), vn.io_hierarchy)
    return out


_MS = "0 or more milliseconds (a finite number)"


def parse_matrix_file(path: Path) -> tuple[list[str], list[list[float]]]:
    """A latency matrix file: first line the vnode names, then one row of milliseconds per
    vnode (whitespace or comma separated; ``#`` comments): ``(names, rows)``, a square matrix
    of finite, non-negative floats. :class:`ConfigErrors` listing every problem (file, line):
    unreadable or undecodable file, repeated name, a value that is not such a number, a row
    of the wrong length, the wrong number of rows."""
    f = str(path)
    text = read_text(path, "latency matrix file")
    rows = [(n, ln.split("#", 1)[0].replace(",", " ").split())
            for n, ln in enumerate(text.splitlines(), 1)]
    rows = [(n, r) for n, r in rows if r]
    if not rows:
        raise ConfigErrors([ConfigError(f, None, "empty latency matrix",
                                        expected="a line of vnode names, then one row of "
                                                 "milliseconds per vnode")])
    errors: list[ConfigError] = []
    line0, names = rows[0]
    for x in sorted({x for x in names if names.count(x) > 1}):
        errors.append(ConfigError(f, None, f"vnode {x!r} named twice", expected="unique names",
                                  line=line0))
    m: list[list[float]] = []
    for n, words in rows[1:]:
        row: list[float] = []
        for w in words:
            try:
                v = float(w)
            except ValueError:
                v = math.nan
            if not (math.isfinite(v) and v >= 0):
                errors.append(ConfigError(f, None, f"found {w!r}", expected=_MS, line=n))
            row.append(v)
        if len(words) != len(names):
            errors.append(ConfigError(f, None, f"{len(words)} values for {len(names)} vnodes",
                                      expected=f"{len(names)} values", line=n))
        m.append(row)
    if len(m) != len(names):
        errors.append(ConfigError(f, None, f"{len(m)} rows for {len(names)} vnodes",
                                  expected=f"a {len(names)}x{len(names)} matrix"))
    if errors:
        raise ConfigErrors(errors)
    return names, m


def check_matrix(names: Sequence[str], matrix: Sequence[Sequence[float]],
                 remote: Mapping[str, str] | None = None) -> dict[str, str]:
    """Check a latency matrix given to :meth:`Platform.latency_matrix`: unique ``names``,
    ``matrix`` square (one row of ``len(names)`` values per name), each value finite and 0 or
    more ms; ``remote`` (vnode name -> IPv4 address) valid. Returns ``remote`` as a dict;
    :class:`ConfigErrors` listing every problem (file ``latency matrix``)."""
    f, n = "latency matrix", len(names)
    errors: list[ConfigError] = []
    for x in sorted({x for x in names if list(names).count(x) > 1}):
        errors.append(ConfigError(f, "names", f"vnode {x!r} named twice", expected="unique names"))
    if len(matrix) != n or any(len(r) != n for r in matrix):
        errors.append(ConfigError(f, None, f"{len(matrix)} rows of "
                                  f"{sorted({len(r) for r in matrix})} values for {n} vnodes",
                                  expected=f"a {n}x{n} matrix"))
    for i, r in enumerate(matrix):
        for j, v in enumerate(r):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                errors.append(ConfigError(f, f"[{i}][{j}]", f"found {v!r}", expected=_MS))
    out = dict(remote or {})
    errors += _address_problems(f, out)
    if errors:
        raise ConfigErrors(errors)
    return out


def _address_problems(f: str, doc: Mapping[Any, Any]) -> list[ConfigError]:
    errors = []
    for k, v in doc.items():
        if not isinstance(k, str) or not VNODE_NAME_RE.match(k):
            errors.append(ConfigError(f, str(k), "not a vnode name",
                                      expected="lower-case letters, digits and '-', 1-32 chars"))
        try:
            ipaddress.IPv4Address(v if isinstance(v, str) else "")
        except ValueError:
            errors.append(ConfigError(f, str(k), f"found {v!r}",
                                      expected="an IPv4 address such as 10.144.0.9"))
    return errors


def parse_remote_addresses(path: Path) -> dict[str, str]:
    """The ``--remote-addresses`` file of ``vnode latency-matrix``: a JSON object
    ``{vnode name: IPv4 address}``. :class:`ConfigErrors` naming the file (and line, for a JSON
    syntax error) for an unreadable file, bad JSON, another JSON type, a key that is not a vnode
    name or a value that is not an IPv4 address (all of them listed)."""
    f = str(path)
    text = read_text(path, "remote addresses file")
    shape = 'a JSON object {"vnode": "IPv4 address", ...}'
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigErrors([ConfigError(f, None, f"not valid JSON: {e.msg}", expected=shape,
                                        line=e.lineno)]) from e
    if not isinstance(doc, dict):
        raise ConfigErrors([ConfigError(f, None, f"found a JSON {type(doc).__name__}",
                                        expected=shape)])
    errors = _address_problems(f, doc)
    if errors:
        raise ConfigErrors(errors)
    return {str(k): str(v) for k, v in doc.items()}
