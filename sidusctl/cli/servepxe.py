"""CLI: ``sidusctl serve-pxe`` (DHCP, TFTP, DNS, NFS and HTTP for the nodes of an inventory, in
one process on one interface), ``sidusctl pxe export`` (the inventory as configuration files
for dnsmasq, ISC dhcpd, Kea, tftpd-hpa and /etc/exports) and ``sidusctl pxe status``."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from sidusctl.cli.common import (
    PORT,
    console,
    emit_json,
    get_ctx,
    lease_cache_option,
    lease_time_option,
    parse_dns_upstream,
)
from sidusctl.core.errors import Interrupted, NotFoundError, SidusError, StateError
from sidusctl.core.state import atomic_write_bytes
from sidusctl.netboot import inventory as inv_mod
from sidusctl.netboot import pxestatus, secureboot
from sidusctl.netboot.daemons import FORMATS, ExportOptions, render_export
from sidusctl.netboot.tree import export_path_for
from sidusctl.serve import supervisor
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
@lease_time_option
@click.option("--boot-bios", default="pxelinux.0", show_default=True,
              help="Boot file for BIOS PXE clients (option 93 = 0).")
@click.option("--boot-efi64", default="grubnetx64.efi", show_default=True,
              help="Boot file for x86-64 UEFI clients (option 93 = 7 or 9).")
@click.option("--ipxe-script", default="boot.ipxe", show_default=True,
              help="What iPXE clients (user class 'iPXE') get: a TFTP path or an http:// URL.")
@click.option("--proxy", is_flag=True,
              help="dnsmasq as proxyDHCP next to the site's DHCP server (dnsmasq only).")
@click.option("--efi-loader", type=click.Choice(["grub", "ipxe", "shim"]), default=None,
              help="Set --boot-efi64 to that loader's file: grubnetx64.efi, ipxe.efi or "
              "shimx64.efi (Secure Boot: shim, then Debian's signed GRUB).")
@click.option("--http-base", default=None, metavar="http://SERVER[:PORT]",
              help="The HTTP server serving the TFTP root: UEFI HTTP Boot clients (option 60 "
              "'HTTPClient') get option 60 HTTPClient and <base>/<UEFI boot file>.")
def export_cmd(nodes: str, fmt: str, out: Path | None, tftp_root: str, interface: str | None,
               lease_time: int, boot_bios: str, boot_efi64: str, ipxe_script: str,
               proxy: bool, efi_loader: str | None, http_base: str | None) -> None:
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
    if efi_loader is not None:
        boot_efi64 = secureboot.efi_boot_file(efi_loader)
    opts = ExportOptions(tftp_root=tftp_root, interface=interface, lease_time=lease_time,
                         boot_bios=boot_bios, boot_efi64=boot_efi64, ipxe_script=ipxe_script,
                         proxy=proxy,
                         http_boot_url=f"{http_base.rstrip('/')}/{boot_efi64}" if http_base
                         else None)
    text = render_export(inv, fmt, opts, paths)
    if out is None:
        click.echo(text, nl=False)
        return
    try:
        atomic_write_bytes(out, text.encode(), mode=0o644)
    except OSError as e:
        raise SidusError(f"cannot write {out}: {e.strerror}") from e


@click.command("serve-pxe")
@click.option("--nodes", "nodes", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The node inventory (nodes.toml).")
@click.option("--interface", "-i", required=True,
              help="The one interface to serve; it must carry the inventory's server address.")
@click.option("--proxy", is_flag=True, help="proxyDHCP next to the site's DHCP server: answer "
              "PXE clients only, give no addresses.")
@click.option("--http", is_flag=True, help="Also serve the TFTP root over HTTP: iPXE clients "
              "(DHCP option 77 'iPXE', e.g. qemu's NIC ROM) get http://SERVER/boot.ipxe and "
              "fetch kernel and initrd over HTTP. Without --http, iPXE clients get pxelinux.0 "
              "over TFTP like any BIOS PXE client.")
@click.option("--http-port", type=PORT, default=80, show_default=True)
@click.option("--tftp-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the boot tree is rendered and served (default: <state>/serve-pxe/tftp).")
@click.option("--nfs", type=click.Choice(["auto", "kernel", "ganesha", "off"]), default="auto",
              show_default=True, help="NFS export of the images: the kernel server if it runs "
              "(auto), nfs-ganesha, or none (the roots are exported elsewhere).")
@lease_time_option
@lease_cache_option
@click.option("--dns-upstream", default=None, callback=parse_dns_upstream,
              metavar="IP[:PORT]",
              help="IP[:PORT] names outside the cluster domain are forwarded to (default: refused).")
@click.option("--efi-loader", type=click.Choice(["grub", "ipxe", "shim"]), default="grub",
              show_default=True, help="What x86-64 UEFI clients (option 93 = 7 or 9) get: "
              "grubnetx64.efi, ipxe.efi (Debian package ipxe), which then runs boot.ipxe, or "
              "shim: Debian's signed shimx64.efi -> grubx64.efi chain for Secure Boot "
              "(packages shim-signed, shim-helpers-amd64-signed, grub-efi-amd64-signed). With "
              "the HTTP server on, UEFI HTTP Boot clients get the same loader by http://.")
@click.option("--http-max-clients", type=click.IntRange(1, 100000), default=512,
              show_default=True, help="HTTP connections at once; more get 503 (logged).")
@click.option("--http-per-client", type=click.IntRange(1, 1000), default=4, show_default=True,
              help="HTTP connections at once from one address; more get 503 (logged).")
@click.option("--tftp-max-transfers", type=click.IntRange(1, 100000), default=2000,
              show_default=True, help="TFTP transfers at once; more get 'server busy'.")
@click.option("--tftp-per-client", type=click.IntRange(1, 1000), default=8, show_default=True,
              help="TFTP transfers at once from one address.")
@click.option("--retain", type=click.IntRange(0, 1000), default=2, show_default=True,
              help="Squashfs generations kept per image even when no running node holds them.")
@click.option("--hold-time", type=click.FloatRange(0), default=900.0, show_default=True,
              help="Seconds a node not seen any more keeps the generation it booted served.")
@click.option("--signed-grub", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="With --efi-loader shim: the Debian-signed netboot GRUB to "
              "serve as grubx64.efi instead of this host's (grub-efi-amd64-signed). UEFI HTTP "
              "Boot under Secure Boot needs Debian 13's (GRUB 2.12): scripts/fetch-signed-grub.")
def serve_pxe_cmd(nodes: Path, interface: str, proxy: bool, http: bool, http_port: int,
                  tftp_root: Path | None, nfs: str, lease_time: int,
                  lease_cache_threshold: float, dns_upstream: tuple[str, int] | None,
                  efi_loader: str,
                  http_max_clients: int,
                  http_per_client: int, tftp_max_transfers: int, tftp_per_client: int,
                  retain: int, hold_time: float, signed_grub: Path | None) -> None:
    """Boot the inventory's nodes: DHCP (full or proxy), TFTP, DNS, NFS (and HTTP) on one
    interface, until SIGTERM. SIGHUP, or a change of the inventory file, reloads it.

    Boot files: BIOS PXE clients (option 93 = 0) get pxelinux.0, which reads
    pxelinux.cfg/01-<mac>; x86-64 UEFI clients get grubnetx64.efi (grub/grub.cfg-01-<mac>) or,
    with --efi-loader ipxe, ipxe.efi. iPXE clients (option 77) get the iPXE script
    http://SERVER/boot.ipxe with --http (chaining to ipxe/<mac>.ipxe), boot.ipxe over TFTP
    with --efi-loader ipxe, and otherwise the boot file of their architecture. Proven with
    qemu guests (docs/serve-pxe.md)."""
    from sidusctl.netboot import servepxe as pxe

    state = get_ctx().state
    if signed_grub is not None:
        secureboot.check_signed_grub(signed_grub)
    opts = pxe.PxeOptions(nodes=nodes.absolute(), interface=interface, state=state,
                          tftp_root=(tftp_root or state / "serve-pxe" / "tftp").absolute(),
                          proxy=proxy, http=http, http_port=http_port,
                          nfs=nfs,  # type: ignore[arg-type]
                          lease_time=lease_time, lease_cache_threshold=lease_cache_threshold,
                          dns_upstream=dns_upstream,
                          efi_loader=efi_loader,  # type: ignore[arg-type]
                          http_max_clients=http_max_clients, http_per_client=http_per_client,
                          tftp_max_transfers=tftp_max_transfers,
                          tftp_per_client=tftp_per_client, retain=retain, hold_time=hold_time,
                          signed_grub=signed_grub.absolute() if signed_grub else None)
    pxe.serve(opts)


def _read_pxe_status() -> tuple[dict[str, Any], dict[str, Any]]:
    path, st = supervisor.read_status(get_ctx().state, "serve-pxe")
    pxe = st.get("pxe")
    if not isinstance(pxe, dict):
        raise StateError(f"{path} was written by 'sidusctl serve run', not serve-pxe "
                         "(see 'sidusctl serve status')")
    pxestatus.check_status(path, pxe)
    return st, pxe


STAGE_LABELS = {"dhcp": "DHCP", "boot-files": "boot files", "kernel": "kernel+initrd",
                "root": "root", "booted": "booted"}


def _watch_table(st: dict[str, Any], pxe: dict[str, Any], slowest: int,
                 now: float | None = None) -> Table:
    """The live view: counts by stage, what the servers refused (HTTP 503, TFTP "busy"),
    DHCP datagrams that waited more than a second in the server's socket, internal errors
    if any, then the slowest nodes: those not booted yet, longest since
    their first DHCP ACK first, then (room left) the booted ones that took longest."""
    nodes = pxe.get("nodes", [])
    now = time.time() if now is None else now
    counts = {k: 0 for k in ("none", *STAGE_LABELS)}
    for n in nodes:
        counts[n.get("stage") or "none"] += 1
    t = Table(title=f"serve-pxe pid {st.get('pid')} on {pxe.get('interface')}: "
                    f"{len(nodes)} node(s)", show_edge=False)
    t.add_column("stage")
    t.add_column("nodes", justify="right")
    t.add_row("not seen", str(counts["none"]))
    for k, label in STAGE_LABELS.items():
        t.add_row(label, str(counts[k]))
    failed = [n for n in nodes if n.get("failed")]
    if failed:
        t.add_row("[red]failed[/red]", str(len(failed)))
    http, tftp = st.get("http") or {}, st.get("tftp") or {}
    t.add_row("refused", f"HTTP {http.get('refused', 0)}, TFTP {tftp.get('refused', 0)}")
    dhcp = st.get("dhcp") or {}
    if "late" in dhcp:  # the server's own lag: datagrams that waited in its socket
        t.add_row("DHCP late", f"{dhcp['late']} (longest wait {dhcp.get('wait_max_ms', 0)} ms)")
    if st.get("internal_errors"):
        t.add_row("[red]internal errors[/red]", str(st["internal_errors"]))

    def stage_time(n: dict[str, Any], stage: str, default: float) -> float:
        v = (n.get("stages") or {}).get(stage)
        return float(v) if isinstance(v, int | float) else default

    waiting = sorted((n for n in nodes if n.get("stage") not in (None, "booted")),
                     key=lambda n: stage_time(n, "dhcp", now))
    for n in waiting[:slowest]:
        t.add_row(f"  slow: {n['name']}", f"{STAGE_LABELS.get(n['stage'], n['stage'])}, "
                                          f"{now - stage_time(n, 'dhcp', now):.0f} s")
    booted = sorted(((stage_time(n, "booted", now) - stage_time(n, "dhcp", now), n)
                     for n in nodes if n.get("stage") == "booted"), key=lambda x: -x[0])
    for took, n in booted[:max(0, slowest - len(waiting))]:
        t.add_row(f"  slowest: {n['name']}", f"booted in {took:.1f} s")
    return t


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="A live table of the nodes by boot stage (Ctrl-C "
              "ends it).")
@click.option("--interval", type=click.FloatRange(0.2), default=1.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--slowest", type=click.IntRange(0), default=5, show_default=True,
              help="How many of the slowest nodes --watch lists.")
@click.option("--count", type=click.IntRange(1), default=None,
              help="With --watch: stop after this many refreshes (scripts, tests).")
def status_cmd(as_json: bool, watch: bool, interval: float, slowest: int,
               count: int | None) -> None:
    """What each node of the running (or last) serve-pxe did: DHCP, files fetched, the
    generation it booted and the one its next boot gets, its boot stage; "booted" as the
    node reported it itself, with what its kernel said: Secure Boot (on, off, bios), the
    lockdown mode (none, integrity, confidentiality) and any module it could not load."""
    st, pxe = _read_pxe_status()
    if watch:
        from rich.live import Live
        try:
            with Live(_watch_table(st, pxe, slowest), console=console, refresh_per_second=4,
                      transient=False) as live:
                done = 0
                while count is None or done < count:
                    time.sleep(interval)
                    st, pxe = _read_pxe_status()
                    live.update(_watch_table(st, pxe, slowest))
                    done += 1
        except (KeyboardInterrupt, Interrupted):
            pass
        return
    running = _alive(st.get("pid"))
    if as_json:
        emit_json({"pid": st.get("pid"), "running": running, "updated": st.get("updated"),
                   "inventory": pxe.get("inventory"), "interface": pxe.get("interface"),
                   "held": pxe.get("held", {}), "http": st.get("http"),
                   "tftp": st.get("tftp"), "dhcp": st.get("dhcp"),
                   "internal_errors": st.get("internal_errors"),
                   "reload": st.get("reload"), "nodes": pxe.get("nodes", [])})
        return
    age = time.time() - float(st.get("updated", 0))
    click.echo(f"serve-pxe pid {st.get('pid')} ({'running' if running else 'not running'}) on "
               f"{pxe.get('interface')}, {pxe.get('inventory')}; status {age:.0f} s old")
    reload = st.get("reload")
    if reload is not None:
        at = time.strftime("%H:%M:%S", time.localtime(reload["at"]))
        click.echo(f"last reload {at}: " + ("applied" if reload["ok"] else
                   f"REFUSED, the previous configuration stays in force: {reload['error']}"))
    for n in pxe.get("nodes", []):
        files = n.get("files") or []
        shown = ", ".join(files[-4:]) + (f" (+{len(files) - 4})" if len(files) > 4 else "")
        if n.get("dhcp"):
            dhcp = f"DHCP ACK {n['dhcp']}"
        elif n.get("proxy_dhcp"):
            addrs = n.get("addresses") or []
            dhcp = "proxyDHCP" + (f" (at {', '.join(addrs)})" if addrs else "")
        else:
            dhcp = "no DHCP yet"
        gen = ""
        if n.get("generation") or n.get("next"):
            gen = (f"  {n.get('root', 'nfs')}: runs {n.get('generation') or '-'}, "
                   f"next {n.get('next') or '-'}")
        kernel = ""
        if n.get("secure_boot") or n.get("lockdown"):
            kernel = (f"  secure boot {n.get('secure_boot') or '?'}, "
                      f"lockdown {n.get('lockdown') or '?'}")
        if n.get("modules_failed"):
            kernel += f"  MODULES NOT LOADED: {n['modules_failed']}"
        click.echo(f"{n['name']:<12} {n['mac']}  {n['ip']:<15} {dhcp:<22} "
                   f"files: {shown or '-'}  booted: {'yes' if n.get('booted') else 'no'}"
                   f"{gen}{kernel}")


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def register(cli: click.Group) -> None:
    """Add ``pxe export`` and ``pxe status`` to the ``pxe`` group and ``serve-pxe`` to ``cli``;
    RuntimeError if the ``pxe`` group is not registered yet."""
    pxe = cli.commands.get("pxe")
    if not isinstance(pxe, click.Group):
        raise RuntimeError("sidusctl.cli.servepxe must be registered after sidusctl.cli.pxe")
    pxe.add_command(export_cmd)
    pxe.add_command(status_cmd)
    cli.add_command(serve_pxe_cmd)
