"""``from sidusctl import vnode``: Distem-style virtual nodes, as a Python API.

Script a platform the way Distem users script its Ruby client::

    from pathlib import Path
    from sidusctl import vnode

    p = vnode.open("/var/lib/sidusctl")           # or vnode.Platform(Path(...))
    p.init(btrfs_image=20 * 2**30)                # once: a loop-backed btrfs store (cow roots)
    p.net_create("vnet", "10.144.0.0/22")         # a bridge; mode="vxlan", vxlan_id=... too
    key = Path("/root/.ssh/id_ed25519.pub").read_text()
    for i in range(10):
        p.create(f"node{i}", "minimal", ifaces=["if0:vnet"], ssh_pubkey=key,
                 mem={"hierarchy": 1, "mem": 512}, bandwidth={"if0": "100mbit"})
    for i in range(10):
        p.start(f"node{i}")
    print(p.wait(timeout=120))                    # {name: seconds until SSH answered | None}
    print(p.status())                             # {"hosts": {host: {name: {state, boot, exit_code}}}}
    p.update("node0", mem={"mem": 256})           # live
    p.get_image("node0", Path("/tmp/node0.tar.zst"))
    for i in range(10):
        p.destroy(f"node{i}")

Every method raises :class:`sidusctl.core.errors.SidusError` subclasses only: ConfigError (bad
value: names what and what was expected), NotFoundError (unknown vnode, vnetwork or image),
StateError (wrong state: start of a running vnode...), PrerequisiteError (the host lacks btrfs,
a cgroup controller, a qdisc). A failed call leaves the state as it was.

Platform files: :func:`load_platform` + :func:`up` / :func:`down` (see docs/vnode.md).

A platform file with ``[pnodes]`` spans many hosts; :class:`Cluster` drives it from the
frontend the same way the CLI does (each pnode runs the same sidusctl, reached over SSH through
ClusterShell)::

    spec = vnode.load_platform(Path("platform.toml"))
    with vnode.Cluster(spec, Path("/var/lib/sidusctl")) as c:
        print(c.check())                          # {pnode: [what it lacks]}
        c.init(btrfs_image=20 * 2**30)            # stores and images, on every pnode at once
        print(c.up(dry_run=True)["plan"])         # placement, addresses, VNIs, MTU
        c.up()
        print(c.exec("node[1-40]", ["hostname"])) # {vnode: {rc, stdout, stderr}}
        print(c.status())                         # {"hosts": {pnode: {...}}, "unreachable": {...}}
        c.down()
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidusctl.core.paths import state_dir

if TYPE_CHECKING:
    from sidusctl.vnode.cluster import Cluster, PnodeError
    from sidusctl.vnode.limits import parse_matrix_file
    from sidusctl.vnode.model import FROZEN, READY, RUNNING, IfaceSpec, VIface, VNetwork, VNode
    from sidusctl.vnode.platform import Platform
    from sidusctl.vnode.platform_file import PlatformSpec, down, up
    from sidusctl.vnode.platform_file import load as load_platform

#: name -> (module, attribute): imported on first use (PEP 562), so that a command that needs
#: one part (``sidusctl pnode facts`` or ``vnode status`` on a pnode) does not import the
#: frontend's (the cluster, ClusterShell's Task, the platform file's models); a pnode that is
#: a TCG guest spends seconds on the imports of each command
_LAZY = {
    "Cluster": ("cluster", "Cluster"), "PnodeError": ("cluster", "PnodeError"),
    "parse_matrix_file": ("limits", "parse_matrix_file"),
    "FROZEN": ("model", "FROZEN"), "READY": ("model", "READY"), "RUNNING": ("model", "RUNNING"),
    "VIface": ("model", "VIface"), "VNetwork": ("model", "VNetwork"),
    "VNode": ("model", "VNode"),
    "IfaceSpec": ("model", "IfaceSpec"), "Platform": ("platform", "Platform"),
    "PlatformSpec": ("platform_file", "PlatformSpec"), "down": ("platform_file", "down"),
    "up": ("platform_file", "up"), "load_platform": ("platform_file", "load"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def open(state: str | os.PathLike[str] | None = None) -> Platform:
    """The :class:`Platform` of state directory ``state`` (default: $SIDUSCTL_STATE or
    /var/lib/sidusctl)."""
    from sidusctl.vnode.platform import Platform
    return Platform(state_dir(state) if state is None else Path(state))


__all__ = ["FROZEN", "READY", "RUNNING", "Cluster", "IfaceSpec", "Platform", "PlatformSpec",
           "PnodeError", "VIface",
           "VNetwork", "VNode", "down", "load_platform", "open", "parse_matrix_file", "up"]
