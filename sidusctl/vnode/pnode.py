"""What this host offers as a pnode (a physical node of a multi-host platform), measured here.

``sidusctl pnode facts --json`` prints :func:`facts` on each pnode; the frontend gathers them
through ClusterShell to place vnodes (cores, memory, free store space) and to check that every
pnode can run what the platform file asks for (:func:`shortfalls`). Kernel features are
probed for real (a throw-away link or qdisc is created and deleted), not guessed from module
lists, which containers and monolithic kernels do not have.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from sidusctl import __version__
from sidusctl.core.errors import SidusError
from sidusctl.core.run import output
from sidusctl.subsys import cgroups
from sidusctl.subsys.net import links, tc
from sidusctl.vnode.store import Store

QDISCS = ("htb", "tbf", "netem")
CONTROLLERS = ("cpu", "cpuset", "memory", "blkio")


def _mem_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def _probe(fn: Any, *args: str) -> bool:
    try:
        fn(*args)
        return True
    except SidusError:
        return False


def interfaces() -> dict[str, dict[str, Any]]:
    """This network namespace's interfaces: name -> ``mtu`` (bytes) and IPv4 ``addresses``."""
    out: dict[str, dict[str, Any]] = {}
    for link in json.loads(output(["ip", "-j", "addr", "show"]) or "[]"):
        out[link["ifname"]] = {"mtu": link.get("mtu"),
                               "addresses": [a["local"] for a in link.get("addr_info", [])
                                             if a.get("family") == "inet"]}
    return out


def facts(state_dir: Path) -> dict[str, Any]:
    """This host as a pnode: ``version`` (sidusctl's), ``cores`` (usable CPUs), ``mem_mib``,
    ``store`` (``ready``: ``vnode init`` ran; ``fs``: btrfs or plain; ``free_mib``),
    ``kernel`` (``vxlan`` and each qdisc of :data:`QDISCS`: bool), ``cgroup`` (``v1`` and
    ``v2``: lists of the controllers available), ``tools`` (lxc-start, btrfs: bool),
    ``interfaces`` (see :func:`interfaces`)."""
    store = Store(state_dir)
    st = store.read()
    root = store.root if store.root.exists() else state_dir
    while not root.exists():
        root = root.parent
    usage = shutil.disk_usage(root)
    return {
        "version": __version__,
        "cores": len(os.sched_getaffinity(0)),
        "mem_mib": _mem_mib(),
        "store": {"ready": bool(st.store), "fs": st.store.get("fs"),
                  "free_mib": usage.free // (1 << 20)},
        "kernel": {"vxlan": _probe(links.require_kind, "vxlan"),
                   **{q: _probe(tc.require_qdisc, q) for q in QDISCS}},
        "cgroup": {"v1": [c for c in CONTROLLERS if cgroups.v1_has(c)],
                   "v2": [c for c in (*CONTROLLERS, "io") if cgroups.v2_has(c)]},
        "tools": {"lxc": shutil.which("lxc-start") is not None,
                  "btrfs": shutil.which("btrfs") is not None},
        "interfaces": interfaces(),
    }


def shortfalls(f: dict[str, Any], *, version: str, need_cow: bool, need_qdiscs: set[str],
               need_controllers: set[tuple[int, str]]) -> list[str]:
    """What pnode facts ``f`` lack for a platform: a different sidusctl ``version``, a store
    not ready (or not btrfs when ``need_cow``), missing VXLAN, a missing qdisc of
    ``need_qdiscs``, a missing ``(hierarchy, controller)`` of ``need_controllers``, no LXC.
    One short sentence each; empty when the pnode has all."""
    out = []
    if f.get("version") != version:
        out.append(f"sidusctl {f.get('version')} installed, {version} needed")
    s = f.get("store", {})
    if not s.get("ready"):
        out.append("vnode store not initialised (sidusctl pnode init)")
    elif need_cow and s.get("fs") != "btrfs":
        out.append("vnode store is not btrfs (cow vnodes need it: pnode init makes one)")
    k = f.get("kernel", {})
    if not k.get("vxlan"):
        out.append("kernel cannot create vxlan links")
    out += [f"kernel lacks the {q} qdisc" for q in sorted(need_qdiscs) if not k.get(q)]
    cg = f.get("cgroup", {})
    out += [f"no cgroup v{h} {c} controller" for h, c in sorted(need_controllers)
            if c not in cg.get(f"v{h}", [])]
    if not f.get("tools", {}).get("lxc"):
        out.append("LXC is not installed (lxc-start)")
    return out
