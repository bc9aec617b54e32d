"""CLI: ``sidusctl pxe check|render|nfs-export``: the boot-loader tree and NFS exports for the
nodes of an inventory (nodes.toml)."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import click
from rich.table import Table

from sidusctl.cli.common import console, emit_json, get_ctx
from sidusctl.core.errors import ConfigError, Interrupted
from sidusctl.netboot import inventory as inv_mod
from sidusctl.netboot import nfs as nfs_exports
from sidusctl.netboot import pxewatch, secureboot
from sidusctl.netboot.tree import ImageFiles, export_path_for, make_root, write_tree
from sidusctl.subsys import ganesha
from sidusctl.subsys.imagestore import ImageStore


def _store() -> ImageStore:
    return ImageStore(get_ctx().state, recover=False)


def _load(nodes: str) -> inv_mod.Inventory:
    store = _store()
    return inv_mod.load(Path(nodes), known_images=[i.name for i in store.list()])


def _images(inv: inv_mod.Inventory) -> dict[str, ImageFiles]:
    store = _store()
    out = {}
    for name in inv.images():
        img = store.get(name)
        out[name] = ImageFiles(name, img.kernel, img.initrd,
                               export_path_for(inv, name, img.rootfs))
    return out


@click.group("pxe")
def pxe_group() -> None:
    """Network boot: pxelinux/iPXE/GRUB trees and NFS exports from a node inventory."""


@pxe_group.command("check")
@click.option("--nodes", "nodes", required=True, type=click.Path(dir_okay=False),
              help="The node inventory (nodes.toml).")
@click.option("--json", "as_json", is_flag=True)
def check_cmd(nodes: str, as_json: bool) -> None:
    """Validate an inventory and list its nodes (every problem at once, with line numbers)."""
    inv = _load(nodes)
    rows = [{"name": n.name, "mac": n.mac, "ip": str(n.ip), "image": n.image,
             "overlay": n.overlay, "group": n.group, "line": n.line} for n in inv.nodes]
    if as_json:
        emit_json({"file": inv.file, "subnet": str(inv.network.subnet),
                   "server": str(inv.network.server), "nodes": rows})
        return
    t = Table("name", "mac", "ip", "image", "overlay", "group")
    for r in rows:
        t.add_row(*(str(r[k] or "") for k in ("name", "mac", "ip", "image", "overlay", "group")))
    console.print(t)
    console.print(f"{inv.file}: {len(rows)} node(s), subnet {inv.network.subnet}, "
                  f"server {inv.network.server}")


@pxe_group.command("render")
@click.option("--nodes", "nodes", required=True, type=click.Path(dir_okay=False),
              help="The node inventory (nodes.toml).")
@click.option("--tftp-root", required=True, type=click.Path(file_okay=False),
              help="Directory served by TFTP (created if missing).")
@click.option("--signed-grub", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="The Debian-signed netboot GRUB placed as grubx64.efi instead "
              "of this host's (see serve-pxe --signed-grub).")
@click.option("--json", "as_json", is_flag=True)
def render_cmd(nodes: str, tftp_root: str, signed_grub: Path | None, as_json: bool) -> None:
    """Write pxelinux, iPXE and GRUB files, kernels and initrds for every node.

    Only files whose content changed are rewritten (atomically); files of an earlier render
    that no node needs any more are removed. Refused (exit 5) while serve-pxe serves the tree."""
    inv = _load(nodes)
    images = _images(inv)
    root = Path(tftp_root)
    if signed_grub is not None:
        secureboot.check_signed_grub(signed_grub)  # before anything is made
    make_root(root)
    # a running serve-pxe's tree is serve-pxe's: this render would replace its configurations
    # and remove the kernels of the generations its nodes hold (exit 5). Renders of one tree
    # take turns on the tree's own lock (write_tree).
    pxewatch.check_tree_free(root)
    with console.status("rendering boot tree...") as status:
        report = write_tree(root, inv, images, signed_grub=signed_grub,
                            progress=lambda rel: status.update(f"wrote {rel}"))
    if as_json:
        emit_json({"tftp_root": str(Path(tftp_root).absolute()), **report.as_dict()})
        return
    for label, items in (("created", report.created), ("updated", report.updated),
                         ("removed", report.removed)):
        for rel in items:
            console.print(f"  {label:8} {rel}", highlight=False)
    console.print(f"{tftp_root}: {len(report.created)} created, {len(report.updated)} updated, "
                  f"{len(report.unchanged)} unchanged, {len(report.removed)} removed "
                  f"({len(inv.nodes)} node(s))", highlight=False)


@pxe_group.command("nfs-export")
@click.argument("image")
@click.option("--network", "networks", multiple=True,
              help="Client network (CIDR) allowed to mount; repeatable. Default: the inventory's "
                   "subnet (--nodes).")
@click.option("--nodes", "nodes", type=click.Path(dir_okay=False), default=None,
              help="Take the client network and nfs_root from this inventory.")
@click.option("--serve", is_flag=True, help="Run nfs-ganesha for this root until Ctrl-C.")
@click.option("--bind", "bind_addr", default="127.0.0.1", show_default=True,
              help="Address nfs-ganesha listens on with --serve.")
@click.option("--json", "as_json", is_flag=True)
def nfs_export_cmd(image: str, networks: tuple[str, ...], nodes: str | None, serve: bool,
                   bind_addr: str, as_json: bool) -> None:
    """Print the /etc/exports line (nfs-kernel-server) and an nfs-ganesha config for IMAGE's
    root; with --serve, export it with nfs-ganesha in the foreground."""
    try:
        IPv4Address(bind_addr)
    except ValueError:
        raise click.BadParameter(f"{bind_addr!r} is not an IPv4 address",
                                 param_hint="--bind") from None
    img = _store().get(image)
    path = str(img.rootfs)
    clients = list(networks)
    if nodes:
        inv = _load(nodes)
        path = export_path_for(inv, image, img.rootfs)
        if not clients:
            clients = [str(inv.network.subnet)]
    if not clients:
        raise ConfigError("--network", None, "no client network given",
                          expected="--network CIDR (e.g. 10.13.20.0/24) or --nodes nodes.toml")
    line = nfs_exports.exports_line(path, clients)
    gconf = nfs_exports.ganesha_config(path, clients, bind_addr=bind_addr)
    if as_json and not serve:
        emit_json({"image": image, "path": path, "clients": clients, "exports": line,
                   "ganesha": gconf})
        return
    if not serve:
        click.echo("# --- /etc/exports (nfs-kernel-server) ---")
        click.echo(line, nl=False)
        click.echo("# --- ganesha.conf (nfs-ganesha) ---")
        click.echo(gconf, nl=False)
        return
    exp = ganesha.Export(img.rootfs, access="RO",
                         clients=tuple(nfs_exports.check_clients(clients)))
    try:
        with ganesha.serve([exp], bind_addr=bind_addr) as server:
            console.print(f"nfs-ganesha (pid {server.pid}) exports {img.rootfs} read-only to "
                          f"{', '.join(clients)} on {bind_addr}; Ctrl-C stops it",
                          highlight=False)
            rc = server.wait()
            console.print(f"nfs-ganesha exited with code {rc}:\n{server.log_tail()}",
                          style="red", highlight=False)
            raise SystemExit(1)
    except (KeyboardInterrupt, Interrupted):
        console.print("nfs-ganesha stopped", highlight=False)


@pxe_group.command("squashfs")
@click.argument("image")
@click.option("--generation", default="current", show_default=True,
              help="current, previous or a gen-<stamp> name.")
@click.option("--level", type=click.IntRange(1, 22), default=6, show_default=True,
              help="zstd compression level.")
@click.option("--force", is_flag=True, help="Pack again even if the tree did not change.")
@click.option("--list", "list_only", is_flag=True, help="List IMAGE's exports only.")
@click.option("--json", "as_json", is_flag=True)
def squashfs_cmd(image: str, generation: str, level: int, force: bool, list_only: bool,
                 as_json: bool) -> None:
    """Export a generation of IMAGE as one reproducible squashfs file (zstd) ending with its
    dm-verity hash tree, for nodes whose root is squashfs-nfs or squashfs-http (whose
    kernels check each block they read against it). Skipped when the tree did not change; named by
    the generation, so a running node's file is never overwritten. serve-pxe exports the
    generation it needs by itself; running this after a build makes its reload instant."""
    from sidusctl.netboot import squash
    state = get_ctx().state
    if list_only:  # what export() checks: a valid name (image_dir), an existing image
        _store().get(image)
    else:
        ex, how = squash.export(state, image, generation=generation, level=level, force=force)
        if not as_json:
            root = f", verity root hash {ex.verity.root_hash}" if ex.verity else ""
            console.print(f"{ex.path}: {how} ({ex.size} bytes, sha256 {ex.sha256}{root})",
                          highlight=False)
    exports = squash.list_exports(state, image)
    if as_json:
        emit_json({"image": image, "exports": [e.as_dict() for e in exports]})
        return
    if list_only:
        for e in exports:
            console.print(f"{e.file}  {e.size} bytes  sha256 {e.sha256}", highlight=False)


def register(cli: click.Group) -> None:
    """Add the ``pxe`` group to ``cli`` (called by :class:`sidusctl.cli.main.LazyGroup` on first use)."""
    cli.add_command(pxe_group)
