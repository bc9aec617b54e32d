"""Shared CLI plumbing: the context object, JSON output, error mapping, progress display."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from ipaddress import IPv4Address
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

#: ``serve``, ``serve-pxe`` and ``pxe export``: DHCP option 51, checked before anything starts
lease_time_option = click.option(
    "--lease-time", type=click.IntRange(60, 2**31 - 1), default=3600, show_default=True,
    help="Seconds (DHCP option 51, RFC 2132 section 9.2), 60 or more.")

#: a TCP or UDP port a server listens on
PORT = click.IntRange(1, 65535)


def parse_dns_upstream(ctx: click.Context, param: click.Parameter,
                       value: str | None) -> tuple[str, int] | None:
    """Click callback of ``--dns-upstream``: ``IP[:PORT]`` (PORT 1-65535, default 53) ->
    ``(ip, port)``; ``none`` or no value -> None; otherwise a usage error (exit 2) naming
    the value."""
    if value is None or value == "none":
        return None
    host, sep, port = value.partition(":")
    try:
        ip = str(IPv4Address(host))
        n = int(port) if sep else 53
    except ValueError:
        ip, n = "", 0
    if not 1 <= n <= 65535:
        raise click.BadParameter(f"{value!r} is not an IPv4 address with an optional port in "
                                 "1-65535", ctx, param)
    return ip, n


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
