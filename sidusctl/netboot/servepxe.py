"""serve-pxe: the node inventory turned into the running netboot servers of one interface.

Owns the glue from ``nodes.toml`` (:mod:`sidusctl.netboot.inventory`) to a
:class:`~sidusctl.serve.supervisor.ServeConfig`: one DHCP reservation per node (RFC 2131
static allocation: chaddr → yiaddr, option 12 host name), the boot file by client type
(RFC 4578 option 93; iPXE, option 77 ``iPXE``, gets ``http://SERVER/boot.ipxe`` with
``--http`` and ``pxelinux.0`` like any BIOS PXE client without it), the TFTP root rendered
by :func:`sidusctl.netboot.tree.write_tree`, a DNS zone with the nodes' A/PTR records, the NFS
exports of the generations the inventory's nodes boot and run (the kernel NFS server through
``exportfs`` where it runs, nfs-ganesha otherwise: :class:`sidusctl.netboot.nfs.NfsExports`)
and, for iPXE clients and squashfs roots, a small read-only HTTP server over the TFTP root
bound to the interface's address, which also takes the nodes' boot reports.

:class:`PxeLoader` is called once at start (a bad inventory raises before any socket is
opened) and again on SIGHUP, in a worker thread (:meth:`Supervisor.reload`: packing a new
squashfs does not pause DHCP); :func:`watch_file` sends that SIGHUP when the inventory or an
image's ``current`` changes.
:func:`serve` runs them under :class:`~sidusctl.netboot.pxesupervisor.PxeSupervisor`, which adds
the per-node status and the generations running nodes hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Literal

from sidusctl.core.errors import ConfigError, ConfigErrors, Interrupted, PrerequisiteError
from sidusctl.core.log import background, get_logger
from sidusctl.core.state import FileLock
from sidusctl.netboot import inventory as inv_mod
from sidusctl.netboot import pxewatch, secureboot, squash
from sidusctl.netboot.inventory import Inventory
from sidusctl.netboot.nfs import NfsExports, NfsMode, serve_exports
from sidusctl.netboot.tree import (
    IPXE_EFI_DIRS,
    ImageFiles,
    SquashRef,
    export_path_for,
    make_root,
    write_tree,
)
from sidusctl.serve import http as http_mod
from sidusctl.serve import supervisor
from sidusctl.serve.dhcp_config import BootPolicy, DhcpConfig, interface_ipv4
from sidusctl.serve.dns import DnsConfig, Zone
from sidusctl.serve.tftp import TftpConfig
from sidusctl.subsys.imagestore import ImageStore

log = get_logger("serve-pxe")

EfiLoader = Literal["grub", "ipxe", "shim"]
REPORT_PATH = "/sidus/report"


@dataclass(frozen=True)
class PxeOptions:
    """What serve-pxe was asked: ``nodes`` (inventory path), the one ``interface``, the
    ``state`` directory (leases and status under ``<state>/serve``), the ``tftp_root`` to render
    into, ``proxy`` (proxyDHCP), ``http`` with ``http_port``, ``nfs`` backend, ``lease_time``
    (seconds) and ``lease_cache_threshold`` (:class:`DhcpConfig`'s ``cache_threshold``),
    ``dns_upstream`` ``(host, port)`` for names outside the cluster domain and
    ``efi_loader``, what x86-64 UEFI clients get: ``grub`` (grubnetx64.efi) or ``ipxe``
    (ipxe.efi, which then asks again as an iPXE client and runs boot.ipxe) or ``shim``
    (Debian's signed chain for Secure Boot: :mod:`sidusctl.netboot.secureboot`). With the HTTP
    server on, UEFI HTTP Boot clients get the same loader as an ``http://`` URL.
    ``signed_grub``: the Debian-signed GRUB shim loads, instead of the host package's
    (:func:`sidusctl.netboot.secureboot.chain`)."""

    nodes: Path
    interface: str
    state: Path
    tftp_root: Path
    proxy: bool = False
    http: bool = False
    http_port: int = 80
    nfs: NfsMode = "auto"
    lease_time: int = 3600
    lease_cache_threshold: float = 0.25
    dns_upstream: tuple[str, int] | None = None
    efi_loader: EfiLoader = "grub"
    http_max_clients: int = 512
    http_per_client: int = 4
    tftp_max_transfers: int = 2000
    tftp_per_client: int = 8
    retain: int = squash.DEFAULT_RETAIN
    hold_time: float = 900.0
    signed_grub: Path | None = None

    @property
    def serve_dir(self) -> Path:
        """``<state>/serve``, where serve-pxe keeps its leases and status."""
        return self.state / "serve"

    def http_base(self, server: IPv4Address) -> str:
        """The HTTP server's base URL at ``server``: ``http://ADDR``, with ``:PORT`` unless the port
        is 80, no trailing slash."""
        port = "" if self.http_port == 80 else f":{self.http_port}"
        return f"http://{server}{port}"


def wants_http(inv: Inventory) -> bool:
    """Whether a node of ``inv`` downloads its root over HTTP (``squashfs-http``)."""
    return any(n.root == "squashfs-http" for n in inv.nodes)


def squash_images(inv: Inventory, root: str | None = None) -> list[str]:
    """The images some node boots from a squashfs (``root`` given: from that root source)."""
    return [i for i in inv.images()
            if any(n.image == i and n.root != "nfs" and (root is None or n.root == root)
                   for n in inv.nodes)]


def load_inventory(opts: PxeOptions) -> tuple[Inventory, dict[str, ImageFiles], dict[str, Path]]:
    """Parse ``opts.nodes`` against the built images: the inventory, each image's kernel/
    initrd/export path (and squashfs export, exported now if a node needs it and the
    generation has none: :func:`sidusctl.netboot.squash.export`), and each image's rootfs on
    this host. :class:`ConfigErrors` (exit 2) lists every problem with file and line."""
    store = ImageStore(opts.state, recover=False)
    inv = inv_mod.load(opts.nodes, known_images=[i.name for i in store.list()])
    files: dict[str, ImageFiles] = {}
    roots: dict[str, Path] = {}
    http_on = opts.http or wants_http(inv)
    sq_images = squash_images(inv)
    for name in inv.images():
        img = store.get(name)
        roots[name] = img.rootfs
        ref = None
        if name in sq_images:
            ex, how = squash.export(opts.state, name)
            log.info("squashfs: %s %s %s (%d bytes)", name, ex.generation, how, ex.size)
            url = (f"{opts.http_base(inv.network.server)}/squashfs/{name}/{ex.file}"
                   if http_on else None)
            ref = SquashRef(ex.file, ex.sha256, ex.size, url,
                            f"{inv.network.server}:{squash.squash_dir(opts.state, name)}/{ex.file}",
                            None if ex.verity is None else ex.verity.kernel_arg())
        files[name] = ImageFiles(name, img.kernel, img.initrd,
                                 export_path_for(inv, name, img.rootfs), ref,
                                 generation=img.dir.name)
    return inv, files, roots


def nfs_paths(opts: PxeOptions, inv: Inventory, files: dict[str, ImageFiles],
              roots: dict[str, Path]) -> dict[str, tuple[Path, str]]:
    """What serve-pxe exports over NFS for ``inv``: each generation an ``nfs`` node boots
    (key ``image/gen-...``: its rootfs and export path) and the squashfs directory of each
    image a ``squashfs-nfs`` node boots (key ``image/squashfs``)."""
    out: dict[str, tuple[Path, str]] = {}
    for i in inv.images():
        if any(n.image == i and n.root == "nfs" for n in inv.nodes):
            out[f"{i}/{files[i].generation}"] = (roots[i], files[i].export_path)
    for i in squash_images(inv, "squashfs-nfs"):
        d = squash.squash_dir(opts.state, i)
        out[f"{i}/squashfs"] = (d, str(d))
    return out


class PxeLoader:
    """``load()`` for :func:`supervisor.run`: inventory → rendered TFTP tree → ServeConfig.
    Keeps the last good ``inventory`` and image ``roots`` for the status and the NFS export."""

    def __init__(self, opts: PxeOptions) -> None:
        self.opts = opts
        self.inventory: Inventory | None = None
        self.roots: dict[str, Path] = {}
        self.files: dict[str, ImageFiles] = {}
        #: serve-pxe's NFS exports, once they run: a new generation is exported before the
        #: tree names it
        self.nfs: NfsExports | None = None
        #: whether serve-pxe's HTTP server runs (None until it is decided, after the first
        #: load): a reload that needs it when it does not is refused
        self.http_on: bool | None = None
        #: set as serve-pxe stops (the supervisor's ``stopping``): a reload still running
        #: then changes nothing more
        self.stopping = threading.Event()
        #: the TFTP root's serve lock (:func:`pxewatch.hold_tree`), taken by the first load
        self.tree_lock: FileLock | None = None

    def ipxe_script(self, server: IPv4Address) -> str | None:
        """What an iPXE client (option 77 ``iPXE``) is told to boot. With ``--http``: the
        script ``http://SERVER[:PORT]/boot.ipxe`` (kernel and initrd then come over HTTP).
        Without, and with ``efi_loader`` ``ipxe``: ``boot.ipxe`` over TFTP. Otherwise None, i.e.
        the boot file of its architecture (``pxelinux.0`` for BIOS), like any PXE ROM: iPXE
        runs pxelinux.0 through its PXE API, and pxelinux fetches its config, kernel and
        initrd over TFTP. (No loop: the boot file is not iPXE itself.)"""
        if self.opts.http:
            port = "" if self.opts.http_port == 80 else f":{self.opts.http_port}"
            return f"http://{server}{port}/boot.ipxe"
        if self.opts.efi_loader == "ipxe":
            # UEFI clients get ipxe.efi itself: giving its iPXE the same file again would loop,
            # so every iPXE client gets the script, over TFTP (its files then come over TFTP)
            return "boot.ipxe"
        return None

    def __call__(self) -> supervisor.ServeConfig:
        """Load the inventory and write what it names: every check first (the inventory,
        the interface's address, the DHCP and DNS configurations, the servers a reload
        needs), then the NFS exports and the boot tree, so that a refused configuration
        changes nothing served. :class:`ConfigError`/:class:`ConfigErrors` (exit 2);
        :class:`Interrupted` when serve-pxe stops meanwhile."""
        o = self.opts
        inv, files, roots = load_inventory(o)
        net = inv.network
        have, _ = interface_ipv4(o.interface)
        if have != net.server:
            raise ConfigError(inv.file, "network.server",
                              f"{net.server} is not the address of interface {o.interface} "
                              f"(it has {have})",
                              expected=f"the server address on {o.interface}, or --interface "
                                       "naming the interface that carries it",
                              line=net.server_line)
        http_on = o.http or wants_http(inv)
        exports = nfs_paths(o, inv, files, roots)
        self._check_servers(inv, exports)
        efi_file = secureboot.efi_boot_file(o.efi_loader)
        reservations = tuple(inv.reservations())
        dhcp = DhcpConfig(
            interface=o.interface, lease_file=o.serve_dir / "leases.sqlite",
            reservations=reservations,
            boot=BootPolicy(bios="pxelinux.0", efi_x64=efi_file,
                            ipxe_script=self.ipxe_script(net.server),
                            http_x64=secureboot.http_boot_file(o.http_base(net.server),
                                                               o.efi_loader)
                            if http_on else None),
            server_ip=net.server, subnet=net.subnet,
            dns_servers=(net.server,) if net.domain else (), domain=net.domain,
            lease_time=o.lease_time, cache_threshold=o.lease_cache_threshold,
            unknown="ignore", proxy=o.proxy)
        dhcp.validate(inv.file)
        dns = None
        if net.domain:
            zone = Zone(net.domain, tuple((r.hostname or "", r.ip) for r in reservations))
            zone.validate(inv.file)
            dns = DnsConfig(zone=zone, interface=o.interface, address=str(net.server),
                            upstream=o.dns_upstream)
        # what follows changes what is served
        self._go_on()
        if self.tree_lock is None:  # the first load: no other serve-pxe may serve the tree
            make_root(o.tftp_root)
            self.tree_lock = pxewatch.hold_tree(o.tftp_root)
        for name in squash_images(inv):
            squash.squash_dir(o.state, name).mkdir(parents=True, exist_ok=True)
        if self.nfs is not None:
            self.nfs.add(exports)
        # the tree first: DHCP must never point a node at a file that is not there yet
        self._go_on()
        report_url = f"{o.http_base(net.server)}{REPORT_PATH}" if http_on else None
        report = write_tree(o.tftp_root, inv, files, report_url=report_url,
                            shim=o.efi_loader == "shim", signed_grub=o.signed_grub,
                            retain_boot=True)
        # the GRUB write_tree just placed (a missing source was refused there)
        if o.efi_loader == "shim" and http_on and \
                not secureboot.grub_boots_over_http(o.tftp_root / secureboot.SIGNED_GRUB_NAME):
            log.warning("UEFI HTTP Boot clients under --efi-loader shim will stop at "
                        "'grub>': the signed GRUB %s cannot find its configuration after "
                        "an HTTP boot (Debian 12's 2.06); give --signed-grub with Debian "
                        "13's (scripts/fetch-signed-grub). PXE clients are not affected",
                        o.signed_grub or "of grub-efi-amd64-signed")
        # (without GRUB's EFI modules the tree has no grubnetx64.efi: write_tree warned, BIOS
        # machines still boot; iPXE asked for by name is refused when it is not there)
        if o.efi_loader == "ipxe" and not (o.tftp_root / efi_file).is_file():
            raise PrerequisiteError(f"--efi-loader ipxe: {efi_file} is not in the TFTP root "
                                    f"{o.tftp_root} ({', '.join(IPXE_EFI_DIRS)} has none)",
                                    hint="apt-get install ipxe")
        changed = len(report.created) + len(report.updated) + len(report.removed)
        log.info("TFTP root %s: %d file(s) written or removed, %d unchanged", o.tftp_root,
                 changed, len(report.unchanged))
        self.inventory, self.files, self.roots = inv, files, roots
        return supervisor.ServeConfig(
            dhcp=dhcp, tftp=TftpConfig(root=o.tftp_root, interface=o.interface,
                                       max_transfers=o.tftp_max_transfers,
                                       max_per_client=o.tftp_per_client),
            dns=dns, status_file=o.serve_dir / "status.json")

    def _go_on(self) -> None:
        if self.stopping.is_set():
            raise Interrupted("SIGTERM")  # serve-pxe stops: the reload changes nothing more

    def _check_servers(self, inv: Inventory, exports: dict[str, tuple[Path, str]]) -> None:
        """On a reload: :class:`ConfigErrors` naming each node whose root needs a server
        this serve-pxe did not start (HTTP for ``squashfs-http``, NFS for ``nfs`` and
        ``squashfs-nfs`` when no node needed it at start), which the tree would otherwise
        name in vain; a restart starts it."""
        if self.http_on is None:  # the first load: serve() starts what it needs
            return
        errors: list[ConfigError] = []
        no_nfs = (self.nfs is not None and self.nfs.backend == "off"
                  and self.opts.nfs != "off" and bool(exports))
        for n in inv.nodes:
            if n.root == "squashfs-http" and not self.http_on:
                server = "its HTTP server"
            elif n.root != "squashfs-http" and no_nfs:
                server = "an NFS server"
            else:
                continue
            errors.append(ConfigError(
                inv.file, "root", f"node {n.name!r}: root {n.root!r} needs {server}, which "
                "this serve-pxe did not start (no node needed it when it started)",
                expected="a restart of serve-pxe, which starts it"
                         + (" (or --http)" if server != "an NFS server" else ""),
                line=n.line))
        if errors:
            raise ConfigErrors(errors)

    def http_config(self, server: IPv4Address) -> http_mod.HttpConfig:
        """The HTTP server: the TFTP root, each image's squashfs exports under
        ``/squashfs/<image>/``, the node reports at ``/sidus/report``, the limits."""
        o = self.opts
        inv = self.inventory
        images = inv.images() if inv else []
        return http_mod.HttpConfig(
            root=o.tftp_root, address=str(server), port=o.http_port, interface=o.interface,
            mounts=tuple((f"/squashfs/{i}/", squash.squash_dir(o.state, i)) for i in images),
            max_clients=o.http_max_clients, per_client=o.http_per_client,
            post_paths=(REPORT_PATH,))


# -- the whole thing -------------------------------------------------------------------------------

def serve(opts: PxeOptions) -> None:
    """Run serve-pxe until SIGTERM/SIGINT. The inventory, the interface and the TFTP tree
    are checked and written before any server starts (:class:`ConfigErrors`, exit 2);
    SIGHUP, an inventory change or a new generation of one of its images re-reads it (a bad
    one is logged and the running configuration stays) in a worker thread while the old one
    keeps answering. The NFS server and the HTTP server are set up once, at start (HTTP also
    without ``--http`` when a node's root is ``squashfs-http``); the NFS exports follow the
    generations: a new one is exported before the tree names it, an old one until no node
    holds it (:meth:`~sidusctl.netboot.pxesupervisor.PxeSupervisor.prune`), also across a
    restart (``holds.json``). One serve-pxe per state directory, TFTP root and interface
    (:func:`sidusctl.netboot.pxewatch.claim` and ``hold_tree``: :class:`BusyError` before
    anything another serve-pxe serves is written)."""
    with pxewatch.claim(opts.serve_dir, opts.interface):
        loader = PxeLoader(opts)
        try:
            _serve(loader)
        finally:
            if loader.tree_lock is not None:
                loader.tree_lock.release()


def _serve(loader: PxeLoader) -> None:
    from sidusctl.netboot.pxesupervisor import PxeSupervisor  # it builds on this module
    opts = loader.opts
    store = ImageStore(opts.state, recover=False)
    watcher = pxewatch.Watcher(
        opts.nodes,
        links=lambda: {i: store.image_dir(i) / "current"
                       for i in (loader.inventory.images() if loader.inventory else [])},
        loaded=lambda: {i: f.generation for i, f in loader.files.items() if f.generation})
    # a SIGHUP before the supervisor installs its handler must not kill us (default
    # action): it is reloaded once the servers run, as are the changes made meanwhile
    signal.signal(signal.SIGHUP, watcher.hup)
    sup = PxeSupervisor(loader)  # calls loader(): everything validated here
    inv = loader.inventory
    assert inv is not None
    server = str(inv.network.server)
    paths = nfs_paths(opts, inv, loader.files, loader.roots)
    for i, gens in sup.keep().items():
        # generations nodes booted before a restart stay exported
        if any(n.image == i and n.root == "nfs" for n in inv.nodes):
            for g in gens:
                root = store.image_dir(i) / g / "rootfs"
                if f"{i}/{g}" not in paths and root.is_dir():
                    paths[f"{i}/{g}"] = (root.resolve(),
                                         export_path_for(inv, i, root.resolve()))
    http_on = opts.http or wants_http(inv)
    loader.http_on = http_on
    with serve_exports(opts.nfs, paths, str(inv.network.subnet), server,
                       opts.serve_dir / "ganesha") as nfs:
        loader.nfs = nfs
        if nfs.backend != "off":
            log.info("NFS: %s exports %s", nfs.backend, ", ".join(nfs.paths()))
        else:
            log.info("NFS: off%s", "" if opts.nfs == "off" else
                     " (no node's root needs it; a reload that adds one is refused until "
                     "serve-pxe restarts)")

        async def main() -> None:
            def on_file(ip: str, path: str, size: int) -> None:
                sup.inbox.post("http", ip, path)

            with contextlib.ExitStack() as stack:
                if http_on:
                    sup.http = stack.enter_context(http_mod.serve(
                        loader.http_config(inv.network.server), on_file=on_file,
                        on_post=sup.on_post))
                # the inventory, and each image's current link (a build, update or import
                # flips it)
                watcher.start()
                try:
                    await sup.serve()
                finally:
                    watcher.stop()

        with background():  # the log written from a thread of its own (no lock per line)
            asyncio.run(main())
