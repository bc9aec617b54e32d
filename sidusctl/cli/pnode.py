"""CLI: ``sidusctl pnode ...``: the physical nodes of a multi-host platform.

``facts`` runs on a pnode (the frontend calls it there through ClusterShell); ``check`` and
``init`` run on the frontend against every pnode of a platform file's ``[pnodes]`` at once,
as Distem's distem-bootstrap prepares a reservation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from sidusctl.cli.common import console, emit_json, get_ctx, need_root


@click.group("pnode")
def pnode_group() -> None:
    """Physical nodes of multi-host platforms: facts, check, init."""


@pnode_group.command("facts")
@click.option("--json", "as_json", is_flag=True)
def facts_cmd(as_json: bool) -> None:
    """What this host offers as a pnode (cores, memory, store, kernel features), measured."""
    from sidusctl.vnode import pnode

    need_root("sidusctl pnode facts")  # the kernel probes create links and qdiscs
    f = pnode.facts(get_ctx().state)
    if as_json:
        emit_json(f)
        return
    for k in ("version", "cores", "mem_mib", "store", "kernel", "cgroup", "tools"):
        console.print(f"{k}: {f[k]}", markup=False)


def _cluster(file: str):  # type: ignore[no-untyped-def]
    # imported here: `pnode facts`, which every pnode runs, needs neither
    from sidusctl.vnode.cluster import Cluster
    from sidusctl.vnode.platform_file import load

    return Cluster(load(Path(file)), get_ctx().state)


@pnode_group.command("check")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def check_cmd(file: str, as_json: bool) -> None:
    """Check every pnode of platform FILE in parallel: SSH as root, the same sidusctl, a
    ready vnode store, the kernel features and cgroup controllers the file needs. One line
    per pnode that falls short; exit 1 if any does."""
    with _cluster(file) as cl:
        res = cl.check()
    if as_json:
        emit_json(res)
    else:
        t = Table("pnode", "ready", "missing")
        for h, short in res.items():
            t.add_row(h, "no" if short else "yes", "; ".join(short))
        console.print(t)
    if any(res.values()):
        sys.exit(1)


@pnode_group.command("init")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--btrfs-image", "btrfs_image", metavar="SIZE",
              help="Make each pnode's store a btrfs loop file of SIZE (e.g. 4G) where it is "
                   "not btrfs yet (cow vnodes need btrfs).")
@click.option("--json", "as_json", is_flag=True)
def init_cmd(file: str, btrfs_image: str | None, as_json: bool) -> None:
    """Prepare every pnode of platform FILE in parallel: its vnode store, and the platform's
    images (sent once, checked by sha256, skipped where already there)."""
    from sidusctl.core.units import parse_size

    with _cluster(file) as cl:
        res = cl.init(btrfs_image=parse_size(btrfs_image, "--btrfs-image") if btrfs_image else None)
    if as_json:
        emit_json(res)
    else:
        for h, what in res.items():
            console.print(f"{h}: {what}", markup=False)


def register(cli: click.Group) -> None:
    """Add the ``pnode`` group to ``cli`` (called by :class:`sidusctl.cli.main.LazyGroup` on first use)."""
    cli.add_command(pnode_group)
