"""NFS exports of image roots: the text for other servers (the ``/etc/exports`` line for
nfs-kernel-server, exports(5); an nfs-ganesha configuration, ganesha-export-config(8)) and
serve-pxe's own running exports (:class:`NfsExports`), which change while it runs: a new
generation is exported before nodes are told about it, and an old one stays exported while
a running node may still read it.

The kernel server gets the SIDUS seed's options, read-only by network:
``/srv/nfsroot/sidus 10.13.20.0/24(ro,no_subtree_check,async,no_root_squash)``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

from sidusctl.core.errors import ConfigError, PrerequisiteError, SidusError
from sidusctl.core.log import get_logger
from sidusctl.core.run import run, which
from sidusctl.subsys import ganesha
from sidusctl.subsys.ganesha import Export, GaneshaConfig, render_config
from sidusctl.subsys.templates import render

log = get_logger("serve-pxe")

NfsMode = Literal["auto", "kernel", "ganesha", "off"]

SEED_OPTIONS = "ro,no_subtree_check,async,no_root_squash"


def check_clients(clients: Sequence[str], where: str = "--network") -> list[str]:
    """Validate client specs: IPv4 networks (``10.13.20.0/24``), addresses or ``*``.
    Returns them normalised; :class:`ConfigError` names the bad one."""
    out = []
    for c in clients:
        if c == "*":
            out.append(c)
            continue
        try:
            out.append(str(ipaddress.IPv4Network(c, strict=False)) if "/" in c
                       else str(ipaddress.IPv4Address(c)))
        except ValueError as e:
            raise ConfigError(where, None, f"invalid client {c!r}: {e}",
                              expected="an IPv4 network such as 10.13.20.0/24, an address or *") from e
    return out


def exports_line(path: Path | str, clients: Sequence[str], options: str = SEED_OPTIONS) -> str:
    """The exports(5) entry exporting ``path`` to ``clients`` (template exports/exports.j2)."""
    return render("exports/exports.j2",
                  exports=[{"path": str(path), "clients": check_clients(clients),
                            "options": options}])


def ganesha_config(path: Path | str, clients: Sequence[str], *, export_id: int = 1,
                   pseudo: str | None = None, bind_addr: str | None = None,
                   nfs_port: int = 2049, mnt_port: int = 20048) -> str:
    """A complete ganesha.conf exporting ``path`` read-only to ``clients`` (VFS FSAL)."""
    exp = Export(Path(path), export_id=export_id, pseudo=pseudo or str(path), access="RO",
                 clients=tuple(check_clients(clients)))
    return render_config(GaneshaConfig((exp,), bind_addr=bind_addr, nfs_port=nfs_port,
                                       mnt_port=mnt_port))


# -- serve-pxe's running exports ----------------------------------------------------------------

def kernel_nfs_running() -> bool:
    """True when the kernel NFS server is loaded and exportfs(8) is installed."""
    return Path("/proc/fs/nfsd/exports").exists() and which_or_none("exportfs") is not None


def which_or_none(cmd: str) -> str | None:
    """The path of ``cmd`` (a tool of Debian's nfs-kernel-server), or None when it is not
    installed."""
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


class NfsExports:
    """The read-only exports of a running serve-pxe, by key (``image/generation``, or
    ``image/squashfs`` for a squashfs directory): ``(directory, export path)``.
    :meth:`update` makes the exports exactly a new set, :meth:`add` adds to them; both are
    thread-safe and return once the server exports the new set. ``backend``: ``kernel``
    (exportfs(8) per path), ``ganesha`` (its configuration rewritten and SIGHUP: nfs-ganesha
    re-reads its exports without dropping the others; an export keeps its id for its
    lifetime, since ganesha refuses a new path under an old id) or ``off``."""

    def __init__(self, backend: str, clients: str, bind_addr: str,
                 server: ganesha.GaneshaServer | None = None) -> None:
        self.backend = backend
        self.clients = clients
        self.bind_addr = bind_addr
        self.server = server
        self.exports: dict[str, tuple[Path, str]] = {}
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()

    def paths(self) -> list[str]:
        """The export paths served now."""
        with self._lock:
            return sorted({p for _, p in self.exports.values()})

    def add(self, paths: Mapping[str, tuple[Path, str]]) -> None:
        """Export ``paths`` too (see :meth:`update`)."""
        with self._lock:
            self._apply({**self.exports, **paths})

    def update(self, paths: Mapping[str, tuple[Path, str]]) -> None:
        """Export exactly ``paths``: new ones added, those not named any more unexported.
        Two keys wanting one export path (a fixed ``network.nfs_root``) keep the one
        exported first. Errors are logged (a failed export is retried on the next call)."""
        with self._lock:
            self._apply(dict(paths))

    def _apply(self, want: dict[str, tuple[Path, str]]) -> None:
        by_pseudo: dict[str, str] = {}
        for k in [*self.exports, *want]:  # the ones already exported win
            if k in want and want[k][1] not in by_pseudo:
                by_pseudo[want[k][1]] = k
        keep = {k: want[k] for k in by_pseudo.values()}
        if keep == self.exports or self.backend == "off":
            self.exports = keep
            return
        if self.backend == "kernel":
            self._kernel(keep)
        else:
            self._ganesha(keep)

    def _kernel(self, keep: dict[str, tuple[Path, str]]) -> None:
        have = {str(d) for d, _ in self.exports.values()}
        want = {str(d) for d, _ in keep.values()}
        for d in sorted(want - have):
            try:
                run(["exportfs", "-i", "-o", SEED_OPTIONS, f"{self.clients}:{d}"],
                    what="exportfs")
            except SidusError as e:
                log.error("NFS: cannot export %s: %s", d, e)
                keep = {k: v for k, v in keep.items() if str(v[0]) != d}
        for d in sorted(have - want):
            with contextlib.suppress(SidusError):
                run(["exportfs", "-u", f"{self.clients}:{d}"], what="exportfs")
        self._log(keep)
        self.exports = keep

    def _ganesha(self, keep: dict[str, tuple[Path, str]]) -> None:
        srv = self.server
        assert srv is not None
        for d, pseudo in keep.values():
            ident = f"{d}\0{pseudo}"
            if ident not in self._ids:
                self._ids[ident] = max(self._ids.values(), default=0) + 1
        exports = tuple(ganesha.Export(d, export_id=self._ids[f"{d}\0{p}"], pseudo=p,
                                       access="RO", clients=(self.clients,))
                        for d, p in sorted(keep.values(), key=lambda v: v[1]))
        cfg = GaneshaConfig(exports, bind_addr=self.bind_addr,
                            recovery_root=srv.workdir / "recovery")
        before = srv.log_tail(100000).count("Reread exports complete")
        tmp = srv.config.with_name(".ganesha.conf.tmp")
        tmp.write_text(render_config(cfg))
        os.replace(tmp, srv.config)
        os.kill(srv.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while srv.log_tail(100000).count("Reread exports complete") <= before:
            if time.monotonic() > deadline or srv.proc.poll() is not None:
                log.error("NFS: nfs-ganesha did not confirm the new exports:\n%s",
                          srv.log_tail(10))
                break
            time.sleep(0.05)
        self._log(keep)
        self.exports = keep

    def _log(self, keep: dict[str, tuple[Path, str]]) -> None:
        added = sorted({p for _, p in keep.values()} - {p for _, p in self.exports.values()})
        gone = sorted({p for _, p in self.exports.values()} - {p for _, p in keep.values()})
        if added:
            log.info("NFS: now exporting %s", ", ".join(added))
        if gone:
            log.info("NFS: no longer exporting %s (no running node holds it)", ", ".join(gone))


@contextlib.contextmanager
def serve_exports(mode: NfsMode, paths: Mapping[str, tuple[Path, str]], clients: str,
                  bind_addr: str, workdir: Path | None = None) -> Iterator[NfsExports]:
    """Export each ``key: (directory, export path)`` of ``paths`` read-only to ``clients``
    (a CIDR network) until the block ends; yields the :class:`NfsExports` (``backend``:
    ``kernel``, ``ganesha`` or ``off``), which can change them meanwhile.

    ``kernel``: ``exportfs -i -o ro,... CLIENTS:PATH`` on the running nfs-kernel-server, undone
    with ``exportfs -u`` (the path exported is the directory itself). ``ganesha``: a private
    nfs-ganesha (:func:`sidusctl.subsys.ganesha.serve`) on ``bind_addr`` with the export path
    as NFSv4 pseudo path, its configuration, log and pid file in ``workdir`` (a ganesha left
    there by a killed serve-pxe is ended first: :func:`reap_stale_ganesha`). ``auto``:
    kernel if it runs, else ganesha. ``off``, or nothing to export at start: no server."""
    if mode == "off" or not paths:
        yield NfsExports("off", clients, bind_addr)
        return
    if mode == "auto":
        mode = "kernel" if kernel_nfs_running() else "ganesha"
    if mode == "kernel":
        if not kernel_nfs_running():
            raise PrerequisiteError("the kernel NFS server is not running (no /proc/fs/nfsd)",
                                    hint="start nfs-kernel-server, or use --nfs ganesha")
        ex = NfsExports("kernel", clients, bind_addr)
        try:
            ex.update(paths)
            yield ex
        finally:
            ex.update({})
        return
    ex = NfsExports("ganesha", clients, bind_addr)
    first: dict[str, tuple[Path, str]] = {}
    for k, v in paths.items():
        if v[1] not in {p for _, p in first.values()}:
            first[k] = v
    exports = []
    for i, (d, pseudo) in enumerate(first.values()):
        ex._ids[f"{d}\0{pseudo}"] = i + 1
        exports.append(ganesha.Export(d, export_id=i + 1, pseudo=pseudo, access="RO",
                                      clients=(clients,)))
    if workdir is not None:
        reap_stale_ganesha(workdir)
    with ganesha.serve(exports, bind_addr=bind_addr, workdir=workdir) as srv:
        ex.server = srv
        ex.exports = first
        yield ex
