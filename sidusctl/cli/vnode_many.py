"""CLI: the ``sidusctl vnode`` commands that act on many vnodes at once, on this host or, for a
platform file with ``[pnodes]``, on every pnode through ClusterShell: ``up``, ``down``,
``status``, ``exec``, ``wait``. Node sets (``node[1-40]``) name vnodes wherever a name does."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from sidusctl.cli.common import console, emit_json, get_ctx, need_root
from sidusctl.subsys.fanout import expand, fold
from sidusctl.vnode.platform import Platform
from sidusctl.vnode.platform_file import PlatformSpec, load


class Seconds(click.FloatRange):
    """A click type: a finite number of seconds, 0 or more (``click.FloatRange(0)`` lets
    ``nan`` and ``inf`` through); click's usage error (exit 2) for anything else."""

    name = "seconds"

    def __init__(self) -> None:
        super().__init__(0)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        """``value`` as a float; a usage error if it is negative or not finite."""
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return rv


def _platform() -> Platform:
    need_root("sidusctl vnode")
    return Platform(get_ctx().state)


def _cluster(spec: PlatformSpec) -> Any:
    from sidusctl.vnode.cluster import Cluster

    return Cluster(spec, get_ctx().state)


@contextlib.contextmanager
def pnode_outcome(as_json: bool, key: str | None = None) -> Iterator[None]:
    """Around a multi-host command: with ``--json``, when some pnodes fail
    (:class:`~sidusctl.vnode.cluster.PnodeError`), what the others did still reaches stdout as
    the command's JSON, with ``"problems": {pnode: why}``, before the error goes to stderr with
    its exit code: a script learns which pnodes need another try. The error's report is put
    under ``key`` (``{"pnodes": {pnode: "down"}}`` for ``key="pnodes"``; ``{}`` when it has
    none), or merged when ``key`` is None (``vnode up``'s report, a dict; a failure before
    any pnode acted has none: only ``problems`` then)."""
    from sidusctl.vnode.cluster import PnodeError

    try:
        yield
    except PnodeError as e:
        if as_json:
            done = e.report if e.report is not None else {}
            emit_json({**(done if key is None else {key: done}), "problems": e.problems})
        raise


def _progress(as_json: bool) -> tuple[Any, Callable[[str, str, int], None]]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    t0 = time.monotonic()
    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    console=console, disable=not console.is_terminal or as_json)
    tasks: dict[str, Any] = {}

    def on(stage: str, name: str, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = prog.add_task(stage, total=total)
        prog.advance(tasks[stage])
        if not console.is_terminal and not as_json:
            console.print(f"[{time.monotonic() - t0:6.1f}s] {stage}: {name}", highlight=False)
    return prog, on


def _print_plan(report: dict[str, Any]) -> None:
    plan = report["plan"]
    t = Table("vnode", "pnode", "addresses")
    for v, p in plan["placement"].items():
        t.add_row(v, p, " ".join(f"{n}={a}" for n, a in plan["addresses"].get(v, {}).items()))
    console.print(t)
    console.print(f"VNIs: {plan['vni']}, MTU {plan['mtu']}", markup=False)


def up_cmd(file: str, wait_ssh: bool, timeout: float, dry_run: bool, as_json: bool) -> None:
    """Create the vnetworks and vnodes of a platform file and start them (on every pnode of
    its [pnodes] section at once, when it has one; --dry-run prints the plan only)."""
    spec = load(Path(file))
    t0 = time.monotonic()
    if spec.pnodes is not None:
        with pnode_outcome(as_json), _cluster(spec) as cl:
            report = cl.up(dry_run=dry_run, wait_ssh=wait_ssh, timeout=timeout,
                           progress=None if as_json else lambda m: console.print(m, markup=False))
        if as_json:
            emit_json(report)
        else:
            _print_plan(report)
            if not dry_run:
                n = sum(len(a.get("started", [])) for a in report["pnodes"].values())
                console.print(f"platform up in {time.monotonic() - t0:.1f} s: {n} vnode(s) "
                              f"running on {len(report['pnodes'])} pnode(s)")
        return
    if dry_run:
        from sidusctl.vnode.platform_file import check_images
        from sidusctl.vnode.store import Store

        check_images(Store(get_ctx().state), spec)  # reads only; needs no root
        emit_json({"vnodes": [v.name for v in spec.vnodes]}) if as_json else \
            console.print(f"{len(spec.vnodes)} vnode(s) on this host: "
                          + ", ".join(v.name for v in spec.vnodes), markup=False)
        return
    from sidusctl.vnode.platform_file import up

    p = _platform()
    prog, on = _progress(as_json)
    with prog:
        res = up(p, spec, wait_ssh=wait_ssh, timeout=timeout, progress=on)
    if as_json:
        emit_json(res)
    else:
        console.print(f"platform up in {time.monotonic() - t0:.1f} s: "
                      f"{len(res['started'])} vnode(s) running, {len(res['failed'])} failed")
        for n, err in res["failed"].items():
            console.print(f"  {n}: {err}", style="red", markup=False)
    if res["failed"] or any(v is None for v in res.get("ssh", {}).values()):
        sys.exit(1)


def down_cmd(file: str, as_json: bool) -> None:
    """Stop and destroy the vnodes of a platform file and delete its vnetworks (on every
    reachable pnode, when it has [pnodes]). --json: {"pnodes": {pnode: "down"}, "problems":
    {pnode: why}} with [pnodes], else {"vnodes": [...], "vnetworks": [...]} (what was
    removed)."""
    spec = load(Path(file))
    if spec.pnodes is not None:
        with pnode_outcome(as_json, "pnodes"), _cluster(spec) as cl:
            done = cl.down()
        if as_json:
            emit_json({"pnodes": done, "problems": {}})
        else:
            console.print(f"platform down on {len(done)} pnode(s)")
        return
    from sidusctl.vnode.platform_file import down

    removed = down(_platform(), spec)
    if as_json:
        emit_json(removed)
    else:
        console.print(f"platform down: {len(removed['vnodes'])} vnode(s) and "
                      f"{len(removed['vnetworks'])} vnetwork(s) removed")


def status_cmd(names: tuple[str, ...], platform: str | None, as_json: bool) -> None:
    """State, boot status and start-command exit code per host and vnode (DETER's shape);
    with --platform, per pnode of that platform file (unreachable ones listed)."""
    if platform:
        with _cluster(load(Path(platform))) as cl:
            s = cl.status()
        if names:
            want = set(expand(list(names)))
            s["hosts"] = {h: {n: d for n, d in v.items() if n in want}
                          for h, v in s["hosts"].items()}
    else:
        s = _platform().status(expand(list(names)) if names else [])
    if as_json:
        emit_json(s)
    else:
        t = Table("host", "vnode", "state", "boot", "exit code", "addresses")
        for host, nodes in s["hosts"].items():
            for n, d in nodes.items():
                t.add_row(host, n, d["state"], str(d["boot"]), str(d["exit_code"]),
                          " ".join(a for a in d["addresses"] if a))
        for host, why in s.get("unreachable", {}).items():
            t.add_row(host, "-", "UNREACHABLE", "-", "-", why)
        console.print(t)
    if s.get("unreachable"):
        sys.exit(1)


def _local_exec(names: list[str], argv: list[str]) -> dict[str, dict[str, Any]]:
    p = _platform()

    def one(n: str) -> tuple[str, dict[str, Any]]:
        r = p.exec(n, argv)
        return n, {"rc": r.returncode, "stdout": r.stdout, "stderr": r.tail}
    with ThreadPoolExecutor(max_workers=min(16, len(names))) as ex:
        return dict(ex.map(one, names))


def exec_cmd(nodes: str, argv: tuple[str, ...], platform: str | None, as_json: bool) -> None:
    """Run a command in vnode NODES (a name or a node set such as node[1-40]). One vnode: its
    output and exit code. Several: run in parallel, identical outputs folded as clush -b does,
    exit code the highest; --json gives {vnode: {rc, stdout, stderr}}."""
    names = expand(nodes)
    if platform:
        with _cluster(load(Path(platform))) as cl:
            res = cl.exec(nodes, list(argv))
    elif len(names) == 1 and not as_json:
        r = _platform().exec(names[0], list(argv))
        sys.stdout.write(r.stdout)
        if r.tail:
            sys.stderr.write(r.tail + "\n")
        sys.exit(r.returncode)
    else:
        res = _local_exec(names, list(argv))
    if as_json:
        emit_json(res)
    else:
        for nodeset, text in fold({n: r["stdout"] for n, r in res.items()}):
            sys.stdout.write(f"---------------\n{nodeset}\n---------------\n{text}")
            if text and not text.endswith("\n"):
                sys.stdout.write("\n")
        for n, r in res.items():
            if r["rc"] != 0 and r["stderr"]:
                console.print(f"{n}: exit {r['rc']}: {r['stderr'].strip()}", markup=False)
    codes = [r["rc"] for r in res.values()]
    sys.exit(255 if None in codes else max(codes, default=0))


def wait_cmd(names: tuple[str, ...], timeout: float, platform: str | None, as_json: bool) -> None:
    """Wait until the vnodes (default: all running) answer on SSH."""
    if platform:
        with _cluster(load(Path(platform))) as cl:
            res = cl.wait(timeout=timeout)
    else:
        res = _platform().wait(expand(list(names)) if names else [], timeout=timeout)
    if as_json:
        emit_json(res)
    else:
        for n, secs in sorted(res.items()):
            console.print(f"{n}: " + (f"ssh up after {secs:.1f} s" if secs is not None
                                      else f"no ssh within {timeout:.0f} s"))
    if any(v is None for v in res.values()):
        sys.exit(1)


_PLATFORM = click.option("--platform", type=click.Path(exists=True, dir_okay=False),
                         help="A platform file with [pnodes]: act on its pnodes.")
_JSON = click.option("--json", "as_json", is_flag=True)


def attach(group: click.Group) -> None:
    """Add these commands to the ``vnode`` group."""
    file_arg = click.argument("file", type=click.Path(exists=True, dir_okay=False))
    group.command("up")(file_arg(
        click.option("--wait/--no-wait", "wait_ssh", default=True, show_default=True,
                     help="Wait until every vnode answers SSH.")(
            click.option("--timeout", type=Seconds(), default=180, show_default=True,
                         help="Seconds.")(
                click.option("--dry-run", is_flag=True,
                             help="Print the plan (placement, addresses), create nothing.")(
                    _JSON(up_cmd))))))
    group.command("down")(file_arg(_JSON(down_cmd)))
    group.command("status")(click.argument("names", nargs=-1)(_PLATFORM(_JSON(status_cmd))))
    group.command("exec", context_settings={"ignore_unknown_options": True})(
        click.argument("nodes")(click.argument("argv", nargs=-1, required=True,
                                               type=click.UNPROCESSED)(
            _PLATFORM(_JSON(exec_cmd)))))
    group.command("wait")(click.argument("names", nargs=-1)(
        click.option("--timeout", type=Seconds(), default=120, show_default=True,
                     help="Seconds.")(_PLATFORM(_JSON(wait_cmd)))))
