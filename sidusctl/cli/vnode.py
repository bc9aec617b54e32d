"""CLI: ``sidusctl vnode ...``: the vnode store, vnetworks, vnodes, limits, platform files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from sidusctl.cli.common import console, emit_json, get_ctx, human_size, need_root
from sidusctl.core.config import read_text
from sidusctl.core.errors import ConfigError, SidusError
from sidusctl.core.units import parse_size
from sidusctl.vnode.limits import parse_matrix_file, parse_remote_addresses
from sidusctl.vnode.model import parse_bps, parse_hierarchy, parse_mib
from sidusctl.vnode.platform import Platform


def _platform() -> Platform:
    need_root("sidusctl vnode")
    return Platform(get_ctx().state)


def _pairs(values: tuple[str, ...], opt: str, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        k, sep, rest = v.partition(":")
        if not sep or not k or not rest:
            raise ConfigError(opt, None, f"invalid value {v!r}", expected=f"IFACE:{what}")
        out[k] = rest
    return out


def _limits(mem: str | None, swap: str | None, mem_soft: str | None, mem_hard: str | None,
            mem_hierarchy: str | None, cpus: float | None, cpuset: str | None,
            io: tuple[str, ...], bandwidth: tuple[str, ...], latency: tuple[str, ...]
            ) -> dict[str, Any]:
    memd: dict[str, Any] = {}
    if mem_hierarchy:
        memd["hierarchy"] = parse_hierarchy(mem_hierarchy, "--mem-hierarchy")
    elif mem_soft is not None or mem_hard is not None:
        memd["hierarchy"] = 2
    elif mem is not None:
        memd["hierarchy"] = 1
    for key, v, opt in (("mem", mem, "--mem"), ("swap", swap, "--swap"),
                        ("soft", mem_soft, "--mem-soft"), ("hard", mem_hard, "--mem-hard")):
        if v is not None:
            memd[key] = parse_mib(v, opt, key, zero=key == "swap")
    iol = []
    for spec in io:
        parts = spec.split(":")
        if len(parts) != 3 or not parts[0]:
            raise ConfigError("--io", None, f"invalid value {spec!r}",
                              expected="DEVICE:READ_BPS:WRITE_BPS (empty = unchanged, max = none)")
        iol.append({"device": parts[0],
                    "read_bps": parse_bps(parts[1], "--io", "read") if parts[1] else None,
                    "write_bps": parse_bps(parts[2], "--io", "write") if parts[2] else None})
    lat: dict[str, float] = {}
    for k, v in _pairs(latency, "--latency", "MS").items():
        try:
            lat[k] = float(v.removesuffix("ms"))
        except ValueError as e:
            raise ConfigError("--latency", None, f"invalid latency {v!r}",
                              expected="milliseconds") from e
    return {"mem": memd or None, "cpus": cpus, "cpuset": cpuset, "io": iol,
            "bandwidth": dict(_pairs(bandwidth, "--bandwidth", "RATE")) or None,
            "latency": lat or None}


def _limit_options(f: Any) -> Any:
    opts = [
        click.option("--mem", help="cgroup v1 hard memory limit, MiB ('max' cancels)."),
        click.option("--swap", help="Swap limit, MiB, 0 for none (v1: memsw = mem + swap; v2: memory.swap.max)."),
        click.option("--mem-soft", help="cgroup v2 soft limit (memory.high), MiB."),
        click.option("--mem-hard", help="cgroup v2 hard limit (memory.max), MiB."),
        click.option("--mem-hierarchy", type=click.Choice(["v1", "v2"]),
                     help="cgroup hierarchy of the memory limit (default: v2 if soft/hard given)."),
        click.option("--cpus", type=float, help="CPU time as a number of CPUs (CFS quota; 0 cancels)."),
        click.option("--cpuset", help="CPUs the vnode may use, e.g. 0-1,3."),
        click.option("--io", multiple=True, metavar="DEV:READ_BPS:WRITE_BPS",
                     help="Throttle a block device (bytes/s, k/M/G suffixes, 'max' cancels)."),
        click.option("--bandwidth", multiple=True, metavar="IFACE:RATE",
                     help="Bandwidth of a viface, both directions (tc units: 10mbit, 1gbit)."),
        click.option("--latency", multiple=True, metavar="IFACE:MS",
                     help="Latency of a viface, both directions (needs the netem qdisc)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _read_key(path: str | None) -> str | None:
    if path is None:
        return None
    return read_text(path, "key file")  # ConfigErrors: missing, unreadable, not text


@click.group("vnode")
def vnode_group() -> None:
    """Distem-style virtual nodes: LXC containers on btrfs snapshots, vnetworks, limits."""


@vnode_group.command("init")
@click.option("--btrfs-device", metavar="DEV", help="Format DEV as btrfs for the store (destroys it).")
@click.option("--btrfs-image", metavar="SIZE", help="Make a loop-backed btrfs file of SIZE (e.g. 20G).")
def init_cmd(btrfs_device: str | None, btrfs_image: str | None) -> None:
    """Prepare the vnode store (copy-on-write needs btrfs)."""
    fs = _platform().init(btrfs_device=btrfs_device,
                          btrfs_image=parse_size(btrfs_image, "--btrfs-image") if btrfs_image else None)
    console.print(f"vnode store ready ({fs}); fs 'cow' is "
                  f"{'available' if fs == 'btrfs' else 'NOT available (no btrfs)'}")


@vnode_group.command("deinit")
def deinit_cmd() -> None:
    """Unmount and delete the vnode store and vnetworks (destroy every vnode first)."""
    _platform().deinit()


@vnode_group.command("store")
@click.option("--json", "as_json", is_flag=True)
def store_cmd(as_json: bool) -> None:
    """Show the store: backing, filesystem, disk used, subvolumes."""
    info = _platform().store_info()
    if as_json:
        emit_json(info)
    else:
        for k, v in info.items():
            console.print(f"{k}: {human_size(v) if k == 'used_bytes' else v}")


# -- vnetworks ----------------------------------------------------------------------------------
@vnode_group.group("net")
def net_group() -> None:
    """Virtual networks (bridges, VXLAN)."""


@net_group.command("create")
@click.argument("name")
@click.argument("cidr")
@click.option("--mode", type=click.Choice(["classical", "vxlan"]), default="classical")
@click.option("--root-interface", help="Host interface carrying the vnetwork (VXLAN underlay).")
@click.option("--vxlan-id", type=int, help="VXLAN network identifier (VNI).")
@click.option("--vxlan-port", type=int, default=4789, show_default=True)
@click.option("--vxlan-group", help="Multicast group of the VXLAN peers.")
@click.option("--vxlan-remote", help="Unicast VXLAN peer (the other host).")
@click.option("--gateway", help="The host bridge's address in CIDR (default: the last usable).")
@click.option("--netns", help="Build the host side in this network namespace (an emulated host).")
def net_create(name: str, cidr: str, mode: str, root_interface: str | None,
               vxlan_id: int | None, vxlan_port: int, vxlan_group: str | None,
               vxlan_remote: str | None, gateway: str | None, netns: str | None) -> None:
    """Create vnetwork NAME on CIDR."""
    net = _platform().net_create(name, cidr, mode=mode, root_interface=root_interface,
                                 vxlan_id=vxlan_id, vxlan_port=vxlan_port,
                                 vxlan_group=vxlan_group, vxlan_remote=vxlan_remote,
                                 gateway=gateway, netns=netns)
    console.print(f"vnetwork {net.name}: {net.cidr} ({net.mode}), bridge {net.bridge}, "
                  f"gateway {net.gateway}")


@net_group.command("delete")
@click.argument("name")
def net_delete(name: str) -> None:
    """Delete vnetwork NAME."""
    _platform().net_delete(name)


@net_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def net_list(as_json: bool) -> None:
    """List vnetworks."""
    nets = _platform().net_list()
    if as_json:
        emit_json([n.to_dict() for n in nets])
        return
    t = Table("name", "cidr", "mode", "gateway", "vxlan")
    for n in nets:
        t.add_row(n.name, n.cidr, n.mode, str(n.gateway),
                  f"{n.vxlan_id}@{n.vxlan_group or n.vxlan_remote}" if n.mode == "vxlan" else "")
    console.print(t)


# -- vnodes -------------------------------------------------------------------------------------
@vnode_group.command("create")
@click.argument("name")
@click.option("--image", required=True, help="Image name (image store) or rootfs tarball path.")
@click.option("--fs", type=click.Choice(["auto", "cow", "distinct", "shared"]), default="auto",
              show_default=True, help="auto: cow on btrfs, else distinct; cow: error without btrfs.")
@click.option("--iface", multiple=True, metavar="IF:VNET[:IP]", help="A viface (repeatable).")
@click.option("--ssh-pubkey", type=click.Path(dir_okay=False), help="Add to authorized_keys.")
@click.option("--ssh-privkey", type=click.Path(dir_okay=False), help="Write to /root/.ssh/identity.")
@click.option("--copy-host-keys/--no-copy-host-keys", default=False, show_default=True,
              help="Copy the host's /root/.ssh/id* (PRIVATE keys) where absent. A risk: see docs.")
@click.option("--start-command", help="Run once booted; its exit code shows in status.")
@click.option("--persistent-journal", is_flag=True,
              help="Keep systemd-journald's logs on the vnode's disk (default: in RAM).")
@_limit_options
def create_cmd(name: str, image: str, fs: str, iface: tuple[str, ...], ssh_pubkey: str | None,
               ssh_privkey: str | None, copy_host_keys: bool, start_command: str | None,
               persistent_journal: bool, **lim: Any) -> None:
    """Create vnode NAME (state READY)."""
    limits = _limits(**lim)
    vn = _platform().create(name, image, fs=fs, ifaces=list(iface),
                            ssh_pubkey=_read_key(ssh_pubkey), ssh_privkey=_read_key(ssh_privkey),
                            copy_host_keys=copy_host_keys, start_command=start_command,
                            persistent_journal=persistent_journal, **limits)
    addrs = ", ".join(f"{i.name}={i.address}@{i.vnetwork}" for i in vn.ifaces)
    console.print(f"vnode {vn.name}: {vn.state}, fs {vn.fs}, {addrs or 'no viface'}")


def _each(names: tuple[str, ...], fn: Any, verb: str) -> None:
    """``fn(name)`` for each of ``names``, going on past a failure. With one name its error is
    raised; with several each is printed and the exit status is theirs when all share one
    (4 when every failure was an unknown vnode), else 1."""
    codes: set[int] = set()
    for n in names:
        try:
            vn = fn(n)
            if vn is not None:
                console.print(f"vnode {n}: {vn.state}")
            else:
                console.print(f"vnode {n}: {verb}")
        except SidusError as e:
            if len(names) == 1:
                raise
            codes.add(e.exit_code)
            console.print(f"sidusctl: error: {e}", style="red", markup=False)
    if codes:
        sys.exit(codes.pop() if len(codes) == 1 else 1)


@vnode_group.command("start")
@click.argument("names", nargs=-1, required=True)
def start_cmd(names: tuple[str, ...]) -> None:
    """Start vnodes (READY -> RUNNING)."""
    _each(names, _platform().start, "started")


@vnode_group.command("stop")
@click.argument("names", nargs=-1, required=True)
def stop_cmd(names: tuple[str, ...]) -> None:
    """Stop vnodes and delete their data from the host (-> READY)."""
    _each(names, _platform().stop, "stopped")


@vnode_group.command("freeze")
@click.argument("names", nargs=-1, required=True)
def freeze_cmd(names: tuple[str, ...]) -> None:
    """Freeze vnodes (RUNNING -> FROZEN)."""
    _each(names, _platform().freeze, "frozen")


@vnode_group.command("unfreeze")
@click.argument("names", nargs=-1, required=True)
def unfreeze_cmd(names: tuple[str, ...]) -> None:
    """Unfreeze vnodes (FROZEN -> RUNNING)."""
    _each(names, _platform().unfreeze, "running")


@vnode_group.command("destroy")
@click.argument("names", nargs=-1, required=True)
def destroy_cmd(names: tuple[str, ...]) -> None:
    """Forget vnodes (stopping them first)."""
    _each(names, _platform().destroy, "destroyed")


@vnode_group.command("console")
@click.argument("name")
@click.option("--log", "show_log", is_flag=True, help="Print the console log instead.")
def console_cmd(name: str, show_log: bool) -> None:
    """Attach to vnode NAME's console (Ctrl-a q to leave), or print its log."""
    p = _platform()
    if show_log:
        path = p.console_log(name)
        sys.stdout.write(path.read_text(errors="replace") if path.exists() else "")
        return
    # interactive: a tty program, run directly (the runner is for non-interactive commands)
    sys.exit(subprocess.call(p.console_argv(name)))


@vnode_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def list_cmd(as_json: bool) -> None:
    """List vnodes with their true state."""
    rows = _platform().list()
    if as_json:
        emit_json(rows)
        return
    t = Table("vnode", "state", "fs", "image", "vifaces", "note")
    for r in rows:
        t.add_row(r["name"], r["state"], r["fs"], r["image"],
                  " ".join(f"{i['name']}={i['address']}" for i in r["ifaces"]), r["note"] or "")
    console.print(t)


@vnode_group.command("cache-image")
@click.argument("images", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
def cache_image_cmd(images: tuple[str, ...], as_json: bool) -> None:
    """Unpack IMAGES (image-store names or tarball paths) into the vnode image cache now, so
    that the first vnode made from each does not wait for it (`pnode init` runs this on
    every pnode)."""
    p = _platform()
    done = {i: str(p.cache_image(i)) for i in images}
    if as_json:
        emit_json(done)
        return
    for i, d in done.items():
        console.print(f"{i}: cached in {d}", markup=False)


@vnode_group.command("get-image")
@click.argument("name")
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("--platform", type=click.Path(exists=True, dir_okay=False),
              help="A platform file with [pnodes]: dump it on its pnode, bring it here.")
def get_image_cmd(name: str, dest: str, platform: str | None) -> None:
    """Dump vnode NAME's root to the tarball DEST (.tar.zst, .tar.gz...)."""
    if platform:
        from sidusctl.vnode.cluster import Cluster
        from sidusctl.vnode.platform_file import load

        with Cluster(load(Path(platform)), get_ctx().state) as cl:
            size = cl.get_image(name, Path(dest))
    else:
        size = _platform().get_image(name, Path(dest))
    console.print(f"{dest}: {human_size(size)}")


@vnode_group.command("update")
@click.argument("name")
@_limit_options
def update_cmd(name: str, **lim: Any) -> None:
    """Change limits of vnode NAME (live if it runs)."""
    vn = _platform().update(name, **_limits(**lim))
    console.print(f"vnode {vn.name}: limits updated")


@vnode_group.command("latency-matrix")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--platform", type=click.Path(exists=True, dir_okay=False),
              help="A platform file with [pnodes]: each pnode shapes its own vnodes.")
@click.option("--remote-addresses", type=click.Path(exists=True, dir_okay=False),
              help="JSON {vnode: address} of the matrix's vnodes that run on other hosts "
                   "(destinations only; what the frontend of a multi-host platform sends).")
@click.option("--json", "as_json", is_flag=True,
              help='{"pnodes": {pnode: "applied"}, "problems": {pnode: why}} with '
                   '--platform, else {"shaped": [vnode, ...]}.')
def latency_matrix_cmd(file: str, platform: str | None, remote_addresses: str | None,
                       as_json: bool) -> None:
    """Apply Distem's latency matrix (first line: vnode names; then rows in ms)."""
    names, m = parse_matrix_file(Path(file))
    if platform:
        from sidusctl.cli.vnode_many import pnode_outcome
        from sidusctl.vnode.cluster import Cluster
        from sidusctl.vnode.platform_file import load

        with pnode_outcome(as_json, "pnodes"), \
                Cluster(load(Path(platform)), get_ctx().state) as cl:
            done = cl.latency_matrix(names, m)
        if as_json:
            emit_json({"pnodes": {h: "applied" for h in done}, "problems": {}})
        else:
            console.print(f"latency matrix applied on {', '.join(done)}")
        return
    remote = parse_remote_addresses(Path(remote_addresses)) if remote_addresses else None
    shaped = _platform().latency_matrix(names, m, remote=remote)
    if as_json:
        emit_json({"shaped": shaped})


def register(cli: click.Group) -> None:
    """Add the ``vnode`` group, with the many-vnode commands of
    :mod:`sidusctl.cli.vnode_many`, to ``cli``."""
    from sidusctl.cli import vnode_many

    vnode_many.attach(vnode_group)
    cli.add_command(vnode_group)


