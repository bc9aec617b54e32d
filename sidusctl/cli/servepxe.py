"""CLI: ``sidusctl serve-pxe`` (DHCP, TFTP, DNS, NFS and HTTP for the nodes of an inventory, in
one process on one interface), ``sidusctl pxe export`` (the inventory as configuration files
for dnsmasq, ISC dhcpd, Kea, tftpd-hpa and /etc/exports) and ``sidusctl pxe status``."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from sidusctl.boot import inventory as inv_mod
from sidusctl.boot.pxe import export_path_for
from sidusctl.cli.common import get_ctx
from sidusctl.core.errors import NotFoundError, SidusError
from sidusctl.core.state import atomic_write_bytes
from sidusctl.serve.export import FORMATS, ExportOptions, render_export
from sidusctl.subsys.imagestore import ImageStore


@click.command("export")
@click.option("--nodes", "nodes", required=True, type=click.Path(dir_okay=False),
              help="The node inventory (nodes.toml).")
@click.option("--format", "fmt", required=True, type=click.Choice(FORMATS),
              help="Which daemon's configuration to write.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file (atomically) instead of stdout.")
@click.option("--tftp-root", default="/srv/tftp", show_default=True,
              help="Directory the TFTP daemon serves (where 'pxe render' wrote the tree).")
@click.option("--interface", default=None,
              help="Interface the DHCP daemon serves (dnsmasq, kea; default: not restricted).")
@click.option("--lease-time", type=int, default=3600, show_default=True, help="Seconds.")
@click.option("--boot-bios", default="pxelinux.0", show_default=True,
              help="Boot file for BIOS PXE clients (option 93 = 0).")
@click.option("--boot-efi64", default="grubnetx64.efi", show_default=True,
              help="Boot file for x86-64 UEFI clients (option 93 = 7 or 9).")
@click.option("--ipxe-script", default="boot.ipxe", show_default=True,
              help="What iPXE clients (user class 'iPXE') get: a TFTP path or an http:// URL.")
@click.option("--proxy", is_flag=True,
              help="dnsmasq as proxyDHCP next to the site's DHCP server (dnsmasq only).")
def export_cmd(nodes: str, fmt: str, out: Path | None, tftp_root: str, interface: str | None,
               lease_time: int, boot_bios: str, boot_efi64: str, ipxe_script: str,
               proxy: bool) -> None:
    """Write the inventory as a configuration file for a production daemon.

    Formats: dnsmasq (dhcp-host, dhcp-boot, TFTP), isc-dhcp (dhcpd.conf host blocks, boot
    file by option 93), kea (kea-dhcp4 JSON, reservations, client classes), tftpd-hpa
    (/etc/default/tftpd-hpa), exports (/etc/exports lines for the images used)."""
    inv = inv_mod.load(Path(nodes))
    paths: dict[str, str] = {}
    if fmt == "exports":
        store = ImageStore(get_ctx().state, recover=False)
        for image in inv.images():
            if inv.network.nfs_root:
                paths[image] = inv.network.nfs_root.replace("{image}", image)
                continue
            with contextlib.suppress(NotFoundError):  # render_export names what is missing
                paths[image] = export_path_for(inv, image, store.get(image).rootfs)
    opts = ExportOptions(tftp_root=tftp_root, interface=interface, lease_time=lease_time,
                         boot_bios=boot_bios, boot_efi64=boot_efi64, ipxe_script=ipxe_script,
                         proxy=proxy)
    text = render_export(inv, fmt, opts, paths)
    if out is None:
        click.echo(text, nl=False)
        return
    try:
        atomic_write_bytes(out, text.encode(), mode=0o644)
    except OSError as e:
        raise SidusError(f"cannot write {out}: {e.strerror}") from e


def register(cli: click.Group) -> None:
    pxe = cli.commands.get("pxe")
    if not isinstance(pxe, click.Group):
        raise RuntimeError("sidusctl.cli.servepxe must be registered after sidusctl.cli.pxe")
    pxe.add_command(export_cmd)
