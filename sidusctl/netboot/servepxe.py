"""serve-pxe: the node inventory turned into the running netboot servers of one interface.

Owns the glue from ``nodes.toml`` (:mod:`sidusctl.netboot.inventory`) to a
:class:`~sidusctl.serve.supervisor.ServeConfig`: one DHCP reservation per node (RFC 2131
static allocation: chaddr → yiaddr, option 12 host name), the boot file by client type
(RFC 4578 option 93; iPXE, option 77 ``iPXE``, gets ``http://SERVER/boot.ipxe`` with
``--http`` and ``pxelinux.0`` like any BIOS PXE client without it), the TFTP root rendered
by :func:`sidusctl.netboot.tree.write_tree`, a DNS zone with the nodes' A/PTR records, the NFS export
of every image the inventory uses (the kernel NFS server through ``exportfs`` where it runs,
nfs-ganesha otherwise) and, for iPXE clients, a small read-only HTTP server over the TFTP root
bound to the interface's address.

:class:`PxeLoader` is called once at start (a bad inventory raises before any socket is
opened) and again on SIGHUP; :func:`watch_file` sends that SIGHUP when the inventory changes.
:class:`PxeSupervisor` adds the per-node status (DHCP seen, files fetched, booted) to the
supervisor's ``status.json``, which ``sidusctl pxe status`` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Literal

from sidusctl.core.errors import ConfigError, PrerequisiteError, SidusError
from sidusctl.core.log import get_logger
from sidusctl.core.run import run, which
from sidusctl.netboot import inventory as inv_mod
from sidusctl.netboot.inventory import Inventory
from sidusctl.netboot.tree import (
    GRUB_EFI_NAME,
    IPXE_EFI_DIRS,
    IPXE_EFI_NAME,
    ImageFiles,
    export_path_for,
    write_tree,
)
from sidusctl.serve import supervisor
from sidusctl.serve.dhcp import BootPolicy, DhcpConfig, interface_ipv4
from sidusctl.serve.dns import DnsConfig, Zone
from sidusctl.serve.tftp import TftpConfig
from sidusctl.subsys import ganesha
from sidusctl.subsys.imagestore import ImageStore

log = get_logger("serve-pxe")

NfsMode = Literal["auto", "kernel", "ganesha", "off"]
EfiLoader = Literal["grub", "ipxe"]
SEED_NFS_OPTIONS = "ro,no_subtree_check,async,no_root_squash"
_SO_BINDTODEVICE = 25


@dataclass(frozen=True)
class PxeOptions:
    """What serve-pxe was asked: ``nodes`` (inventory path), the one ``interface``, the
    ``state`` directory (leases and status under ``<state>/serve``), the ``tftp_root`` to render
    into, ``proxy`` (proxyDHCP), ``http`` with ``http_port``, ``nfs`` backend, ``lease_time``
    (seconds), ``dns_upstream`` ``(host, port)`` for names outside the cluster domain and
    ``efi_loader``, what x86-64 UEFI clients get: ``grub`` (grubnetx64.efi) or ``ipxe``
    (ipxe.efi, which then asks again as an iPXE client and runs boot.ipxe)."""

    nodes: Path
    interface: str
    state: Path
    tftp_root: Path
    proxy: bool = False
    http: bool = False
    http_port: int = 80
    nfs: NfsMode = "auto"
    lease_time: int = 3600
    dns_upstream: tuple[str, int] | None = None
    efi_loader: EfiLoader = "grub"

    @property
    def serve_dir(self) -> Path:
        return self.state / "serve"


def load_inventory(opts: PxeOptions) -> tuple[Inventory, dict[str, ImageFiles], dict[str, Path]]:
    """Parse ``opts.nodes`` against the built images: the inventory, each image's kernel/
    initrd/export path, and each image's rootfs on this host. :class:`ConfigErrors` (exit 2)
    lists every problem with file and line."""
    store = ImageStore(opts.state, recover=False)
    inv = inv_mod.load(opts.nodes, known_images=[i.name for i in store.list()])
    files: dict[str, ImageFiles] = {}
    roots: dict[str, Path] = {}
    for name in inv.images():
        img = store.get(name)
        roots[name] = img.rootfs
        files[name] = ImageFiles(name, img.kernel, img.initrd,
                                 export_path_for(inv, name, img.rootfs))
    return inv, files, roots


class PxeLoader:
    """``load()`` for :func:`supervisor.run`: inventory → rendered TFTP tree → ServeConfig.
    Keeps the last good ``inventory`` and image ``roots`` for the status and the NFS export."""

    def __init__(self, opts: PxeOptions) -> None:
        self.opts = opts
        self.inventory: Inventory | None = None
        self.roots: dict[str, Path] = {}
        self.files: dict[str, ImageFiles] = {}

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
        o = self.opts
        inv, files, roots = load_inventory(o)
        net = inv.network
        have, _ = interface_ipv4(o.interface)
        if have != net.server:
            raise ConfigError(inv.file, "network.server",
                              f"{net.server} is not the address of interface {o.interface} "
                              f"(it has {have})",
                              expected=f"the server address on {o.interface}, or --interface "
                                       "naming the interface that carries it")
        # the tree first: DHCP must never point a node at a file that is not there yet
        report = write_tree(o.tftp_root, inv, files)
        # (without GRUB's EFI modules the tree has no grubnetx64.efi: write_tree warned, BIOS
        # machines still boot; iPXE asked for by name is refused when it is not there)
        efi_file = IPXE_EFI_NAME if o.efi_loader == "ipxe" else GRUB_EFI_NAME
        if o.efi_loader == "ipxe" and not (o.tftp_root / efi_file).is_file():
            raise PrerequisiteError(f"--efi-loader ipxe: {efi_file} is not in the TFTP root "
                                    f"{o.tftp_root} ({', '.join(IPXE_EFI_DIRS)} has none)",
                                    hint="apt-get install ipxe")
        changed = len(report.created) + len(report.updated) + len(report.removed)
        log.info("TFTP root %s: %d file(s) written or removed, %d unchanged", o.tftp_root,
                 changed, len(report.unchanged))
        reservations = tuple(inv.reservations())
        dhcp = DhcpConfig(
            interface=o.interface, lease_file=o.serve_dir / "leases.sqlite",
            reservations=reservations,
            boot=BootPolicy(bios="pxelinux.0", efi_x64=efi_file,
                            ipxe_script=self.ipxe_script(net.server)),
            server_ip=net.server, subnet=net.subnet,
            dns_servers=(net.server,) if net.domain else (), domain=net.domain,
            lease_time=o.lease_time, unknown="ignore", proxy=o.proxy)
        dhcp.validate(inv.file)
        dns = None
        if net.domain:
            zone = Zone(net.domain, tuple((r.hostname or "", r.ip) for r in reservations))
            zone.validate(inv.file)
            dns = DnsConfig(zone=zone, interface=o.interface, address=str(net.server),
                            upstream=o.dns_upstream)
        self.inventory, self.files, self.roots = inv, files, roots
        return supervisor.ServeConfig(
            dhcp=dhcp, tftp=TftpConfig(root=o.tftp_root, interface=o.interface),
            dns=dns, status_file=o.serve_dir / "status.json")


# -- per-node status ------------------------------------------------------------------------------

# a per-MAC file names its client: pxelinux.cfg/01-<mac>, ipxe/<mac>.ipxe, grub/grub.cfg-01-<mac>
_MAC_FILE_RE = re.compile(r"^(?:pxelinux\.cfg/01-|ipxe/|grub/grub\.cfg-01-)"
                          r"((?:[0-9a-f]{2}-){5}[0-9a-f]{2})(?:\.ipxe)?$")


class PxeSupervisor(supervisor.Supervisor):
    """The supervisor plus what each node did: ``acks`` (times of DHCP ACKs by MAC),
    ``proxied`` (times of proxyDHCP replies by MAC), ``fetched`` (files delivered by TFTP or
    HTTP, by client IP, with the time) and ``ip_mac`` (client IP → MAC, learnt from the
    per-MAC files a client asks for: in proxy mode the site's DHCP server gives the
    addresses, so a node's files come from an address the inventory does not know)."""

    def __init__(self, loader: PxeLoader) -> None:
        self.loader = loader
        self.acks: dict[str, list[float]] = {}
        self.proxied: dict[str, float] = {}
        self.fetched: dict[str, dict[str, float]] = {}
        self.ip_mac: dict[str, str] = {}
        super().__init__(loader)

    def _event(self, kind: str, who: str, what: str) -> None:
        super()._event(kind, who, what)
        now = time.time()
        if kind == "ack":
            self.acks.setdefault(who, []).append(now)
            del self.acks[who][:-20]
        elif kind == "proxy":
            self.proxied[who] = now
        elif kind in ("sent", "http"):
            name = what.lstrip("/")
            self.fetched.setdefault(who, {})[name] = now
            m = _MAC_FILE_RE.match(name)
            if m:
                self.ip_mac[who] = m.group(1).replace("-", ":")

    def node_status(self) -> list[dict[str, Any]]:
        """One entry per node: ``dhcp`` (address acknowledged, or None), ``proxy_dhcp`` (time
        of the last proxyDHCP reply, or None), ``files`` fetched (from its reserved address,
        or from any address that asked for its per-MAC files), ``booted``: kernel and initrd
        fetched and then a DHCP ACK again (the booted kernel's own ``ip=dhcp``), which is as
        far as the servers can see (never in proxy mode: that ACK is the site server's)."""
        inv = self.loader.inventory
        if inv is None:
            return []
        out = []
        for n in inv.nodes:
            acks = self.acks.get(n.mac, [])
            got: dict[str, float] = {}
            ips = {str(n.ip)} | {ip for ip, mac in self.ip_mac.items() if mac == n.mac}
            for ip in sorted(ips):
                for f, t in self.fetched.get(ip, {}).items():
                    got[f] = max(t, got.get(f, 0.0))
            kernel, initrd = f"vmlinuz-{n.image}", f"initrd.img-{n.image}"
            loaded = max(got[kernel], got[initrd]) if kernel in got and initrd in got else None
            booted = loaded is not None and any(t > loaded for t in acks)
            out.append({"name": n.name, "mac": n.mac, "ip": str(n.ip), "image": n.image,
                        "dhcp": str(n.ip) if acks else None,
                        "dhcp_last": acks[-1] if acks else None,
                        "proxy_dhcp": self.proxied.get(n.mac),
                        "addresses": sorted(ips - {str(n.ip)}),
                        "files": sorted(got, key=lambda f: got[f]), "booted": booted})
        return out

    def status(self) -> dict[str, Any]:
        st = super().status()
        inv = self.loader.inventory
        st["pxe"] = {"inventory": inv.file if inv else None,
                     "interface": self.loader.opts.interface, "nodes": self.node_status()}
        return st


# -- HTTP for iPXE ----------------------------------------------------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    """GET/HEAD of files under the TFTP root; no directory listings, no writes."""

    report: Callable[[str, str], None] | None = None
    server_version = "sidusctl"

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        self.send_error(404, "no directory listings")
        return None

    def do_GET(self) -> None:
        super().do_GET()
        if self.report is not None and getattr(self, "_sent_ok", False):
            self.report(self.client_address[0], self.path.split("?", 1)[0])

    def send_response(self, code: int, message: str | None = None) -> None:
        self._sent_ok = code == 200
        super().send_response(code, message)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("HTTP %s: %s", self.client_address[0], format % args)


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], handler: Any, interface: str) -> None:
        self.interface = interface
        super().__init__(addr, handler)

    def server_bind(self) -> None:
        # bound to the device as well as the address, like the DHCP/TFTP/DNS sockets
        self.socket.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, self.interface.encode())
        super().server_bind()


@contextlib.contextmanager
def http_server(root: Path, address: str, port: int, interface: str,
                report: Callable[[str, str], None] | None = None) -> Iterator[_HttpServer]:
    """A read-only HTTP/1.0 server over ``root`` on ``address:port`` (bound to ``interface``)
    in a thread, for iPXE clients (kernels and initrds much faster than over TFTP).
    ``report(client_ip, path)`` is called for each file delivered. Stopped at block exit."""
    root_s = str(root)

    class Handler(_Handler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=root_s, **kw)

    Handler.report = staticmethod(report) if report else None
    try:
        srv = _HttpServer((address, port), Handler, interface)
    except OSError as e:
        raise SidusError(f"HTTP server: cannot listen on {address}:{port} ({e.strerror})") from e
    t = threading.Thread(target=srv.serve_forever, name="sidusctl-http", daemon=True)
    t.start()
    log.info("HTTP serving %s on %s:%d", root, address, port)
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


# -- NFS ------------------------------------------------------------------------------------------

def kernel_nfs_running() -> bool:
    """True when the kernel NFS server is loaded and exportfs(8) is installed."""
    return Path("/proc/fs/nfsd/exports").exists() and which_or_none("exportfs") is not None


def which_or_none(cmd: str) -> str | None:
    try:
        return which(cmd, "nfs-kernel-server")
    except PrerequisiteError:
        return None


def reap_stale_ganesha(workdir: Path, grace: float = 5.0) -> int | None:
    """End the nfs-ganesha a previous serve-pxe started with ``workdir`` and left behind
    (serve-pxe killed with SIGKILL: its ganesha, in its own session, keeps running and holds
    the NFS port). Only a live ``ganesha.nfsd`` whose command line names
    ``workdir/ganesha.conf`` is ended (SIGTERM, then SIGKILL); returns its pid, or None."""
    try:
        pid = int((workdir / "ganesha.pid").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    if not cmdline or not cmdline[0].endswith(b"ganesha.nfsd") or \
            str(workdir / "ganesha.conf").encode() not in cmdline:
        return None
    log.warning("NFS: ending nfs-ganesha pid %d left by an earlier serve-pxe (%s)", pid, workdir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not Path(f"/proc/{pid}").exists():
            break
    return pid


@contextlib.contextmanager
def nfs_exports(mode: NfsMode, paths: Sequence[tuple[Path, str]], clients: str,
                bind_addr: str, workdir: Path | None = None) -> Iterator[str]:
    """Export each ``(rootfs, export path)`` read-only to ``clients`` (a CIDR network) until
    the block ends; yields the backend used (``kernel``, ``ganesha`` or ``off``).

    ``kernel``: ``exportfs -i -o ro,... CLIENTS:PATH`` on the running nfs-kernel-server, undone
    with ``exportfs -u`` (the path exported is the rootfs itself). ``ganesha``: a private
    nfs-ganesha (:func:`sidusctl.subsys.ganesha.serve`) on ``bind_addr`` with the export path
    as NFSv4 pseudo path, its configuration, log and pid file in ``workdir`` (a ganesha left
    there by a killed serve-pxe is ended first: :func:`reap_stale_ganesha`). ``auto``:
    kernel if it runs, else ganesha."""
    if mode == "off" or not paths:
        yield "off"
        return
    if mode == "auto":
        mode = "kernel" if kernel_nfs_running() else "ganesha"
    if mode == "kernel":
        if not kernel_nfs_running():
            raise PrerequisiteError("the kernel NFS server is not running (no /proc/fs/nfsd)",
                                    hint="start nfs-kernel-server, or use --nfs ganesha")
        done: list[str] = []
        try:
            for rootfs, _ in paths:
                spec = f"{clients}:{rootfs}"
                run(["exportfs", "-i", "-o", SEED_NFS_OPTIONS, spec], what="exportfs")
                done.append(spec)
            yield "kernel"
        finally:
            for spec in done:
                with contextlib.suppress(SidusError):
                    run(["exportfs", "-u", spec], what="exportfs")
        return
    exports = [ganesha.Export(rootfs, export_id=i + 1, pseudo=export, access="RO",
                              clients=(clients,))
               for i, (rootfs, export) in enumerate(paths)]
    if workdir is not None:
        reap_stale_ganesha(workdir)
    with ganesha.serve(exports, bind_addr=bind_addr, workdir=workdir):
        yield "ganesha"


# -- the whole thing -------------------------------------------------------------------------------

def watch_file(path: Path, stop: threading.Event, interval: float = 1.0) -> threading.Thread:
    """A thread sending this process SIGHUP when ``path``'s mtime, size or inode changes."""

    def sig() -> tuple[int, int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def loop() -> None:
        last = sig()
        while not stop.wait(interval):
            now = sig()
            if now != last and now is not None:
                log.info("%s changed: reloading", path)
                os.kill(os.getpid(), signal.SIGHUP)
            last = now

    t = threading.Thread(target=loop, name="sidusctl-watch", daemon=True)
    t.start()
    return t


def serve(opts: PxeOptions) -> None:
    """Run serve-pxe until SIGTERM/SIGINT. The inventory, the interface and the TFTP tree
    are checked and written before any server starts (:class:`ConfigErrors`, exit 2);
    SIGHUP or an inventory change re-reads it (a bad one is logged and the running
    configuration stays); the NFS exports and the HTTP server are set up once, at start."""
    # a SIGHUP before the supervisor installs its handler must not kill us (default action)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    loader = PxeLoader(opts)
    sup = PxeSupervisor(loader)  # calls loader(): everything validated here
    inv = loader.inventory
    assert inv is not None
    server = str(inv.network.server)
    paths = [(loader.roots[i], loader.files[i].export_path) for i in inv.images()]
    stop = threading.Event()
    with nfs_exports(opts.nfs, paths, str(inv.network.subnet), server,
                     opts.serve_dir / "ganesha") as backend:
        log.info("NFS: %s", backend if backend == "off" else
                 f"{backend} exports {', '.join(p for _, p in paths)}")

        async def main() -> None:
            loop = asyncio.get_running_loop()

            def report(ip: str, path: str) -> None:
                loop.call_soon_threadsafe(sup._event, "http", ip, path)

            with contextlib.ExitStack() as stack:
                if opts.http:
                    stack.enter_context(http_server(opts.tftp_root, server, opts.http_port,
                                                    opts.interface, report))
                watch_file(opts.nodes, stop)
                try:
                    await sup.serve()
                finally:
                    stop.set()

        asyncio.run(main())
