"""Shared CLI plumbing: the context object, JSON output, error mapping, progress display."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from sidusctl.core.errors import PrerequisiteError
from sidusctl.core.paths import state_dir

console = Console(stderr=True)

#: ``serve`` and ``serve-pxe``: DhcpConfig.cache_threshold
lease_cache_option = click.option(
    "--lease-cache-threshold", type=click.FloatRange(0, 1, max_open=True), default=0.25,
    show_default=True,
    help="A REQUEST within this fraction of the lease time after the lease began gets the "
    "same lease, with its remaining time, and writes nothing (ISC dhcpd's "
    "dhcp-cache-threshold); 0: every ACK commits a new lease.")


@dataclass
class Ctx:
    """What the top-level options decided: ``state`` directory, ``debug`` flag."""

    state: Path
    debug: bool


def get_ctx() -> Ctx:
    """The :class:`Ctx` the top-level group stored; outside a ``sidusctl`` invocation (a
    command called directly), the default state directory and no debug."""
    obj = click.get_current_context().find_root().obj
    if isinstance(obj, Ctx):
        return obj
    return Ctx(state=state_dir(None), debug=False)


def need_root(what: str) -> None:
    """:class:`PrerequisiteError` unless we run as root (mounts, chroot, debootstrap need it)."""
    if os.geteuid() != 0:
        raise PrerequisiteError(
            f"{what} needs root privileges (mounts, chroot and debootstrap do); running as uid {os.geteuid()}",
            hint="run it with sudo",
        )


def emit_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout (the machine-readable channel)."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def human_size(n: int | float | None) -> str:
    """``n`` bytes in binary units for people: ``"512 B"``, ``"1.5 MiB"`` (one decimal from
    KiB up, TiB the largest); ``"-"`` for None (unknown)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
