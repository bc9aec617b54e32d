"""nfs-ganesha, the userspace NFS server, run for a few exports as a context manager.

Owns one ``ganesha.nfsd`` process (and, when asked, the ``rpcbind`` it registers with: the
kernel's NFSv3 client and klibc's ``nfsmount`` find MOUNT through the portmapper, RFC 1833).
Both can run inside a network namespace (``netns=``) so that nothing listens on the host's own
interfaces. On any exit, Ctrl-C and SIGTERM included, the processes are stopped (SIGTERM, then
SIGKILL: :func:`sidusctl.core.run.stop`) and the scratch directory removed; started with
:func:`sidusctl.core.run.spawn`, they also die with the process that started them (SIGKILL
included), so a killed serve-pxe leaves neither behind. Sources: ganesha-config(8),
ganesha-export-config(8), ganesha-core-config(8).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from sidusctl.core.errors import CommandError, ConfigError, PrerequisiteError, SidusError
from sidusctl.core.log import get_logger
from sidusctl.core.run import Child, run, spawn, which
from sidusctl.subsys.templates import render

log = get_logger("ganesha")

NFS_PROGRAM = 100003
MOUNT_PROGRAM = 100005


@dataclass(frozen=True)
class Export:
    """One export: the server directory ``path``, its NFSv4 ``pseudo`` path (default: same),
    ``access`` ``RO`` or ``RW``, ``clients`` (addresses or CIDR networks; ``*`` for all)."""

    path: Path
    export_id: int = 1
    pseudo: str = ""
    access: str = "RO"
    clients: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        if self.access not in ("RO", "RW"):
            raise SidusError(f"ganesha export access must be RO or RW, not {self.access!r}")
        if not self.pseudo:
            object.__setattr__(self, "pseudo", str(self.path))


@dataclass(frozen=True)
class GaneshaConfig:
    """Server-wide settings: listen address ``bind_addr`` (an IPv4 address, None: every
    address; anything else is a :class:`ConfigError`), ``nfs_port`` (2049), ``mnt_port``
    (MOUNT protocol port, fixed so that it can be forwarded; 20048 as nfs-utils' mountd)."""

    exports: tuple[Export, ...]
    bind_addr: str | None = "127.0.0.1"
    nfs_port: int = 2049
    mnt_port: int = 20048
    log_level: str = "EVENT"
    recovery_root: Path = field(default=Path("/var/lib/nfs/ganesha"))

    def __post_init__(self) -> None:
        # written into the config as is: anything but an address would inject text
        if self.bind_addr is not None:
            try:
                IPv4Address(self.bind_addr)
            except ValueError:
                raise ConfigError("nfs-ganesha bind address", None,
                                  f"{self.bind_addr!r} is not an IPv4 address",
                                  expected="an IPv4 address such as 127.0.0.1") from None


def render_config(cfg: GaneshaConfig) -> str:
    """The ``ganesha.conf`` text for ``cfg`` (template ``ganesha/ganesha.conf.j2``)."""
    ids = [e.export_id for e in cfg.exports]
    if len(set(ids)) != len(ids):
        raise SidusError(f"ganesha export ids must be unique, got {ids}")
    return render(
        "ganesha/ganesha.conf.j2",
        bind_addr=cfg.bind_addr,
        nfs_port=cfg.nfs_port,
        mnt_port=cfg.mnt_port,
        log_level=cfg.log_level,
        recovery_root=str(cfg.recovery_root),
        exports=[
            {"export_id": e.export_id, "path": str(e.path), "pseudo": e.pseudo,
             "access": e.access, "clients": list(e.clients)}
            for e in cfg.exports
        ],
    )


class GaneshaServer:
    """A running nfs-ganesha: ``config`` (path of its ganesha.conf), ``log_file``, ``pid``;
    ``proc`` and ``rpcbind`` (None when an existing one is used) are its processes."""

    def __init__(self, workdir: Path, proc: Child, rpcbind: Child | None) -> None:
        self.workdir = workdir
        self.config = workdir / "ganesha.conf"
        self.log_file = workdir / "ganesha.log"
        self.proc = proc
        self.rpcbind = rpcbind

    @property
    def pid(self) -> int:
        """The pid of :attr:`proc`, the child started to run ganesha.nfsd."""
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of ganesha's log file, newline-joined; ``""`` if it cannot be
        read."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait(self) -> int:
        """Block until ganesha exits (``--serve`` in the foreground); its exit code."""
        rc = self.proc.wait()
        assert rc is not None
        return rc


def _netns_prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def _registered(netns: str | None, host: str) -> set[int]:
    """RPC programs registered with the portmapper at ``host`` (rpcinfo(8))."""
    try:
        res = run([*_netns_prefix(netns), "rpcinfo", "-p", host], capture=True, timeout=10,
                  what="rpcinfo")
    except CommandError:
        return set()
    progs = set()
    for line in res.stdout.splitlines()[1:]:
        f = line.split()
        if f and f[0].isdigit():
            progs.add(int(f[0]))
    return progs


@contextlib.contextmanager
def serve(
    exports: Sequence[Export],
    *,
    bind_addr: str | None = "127.0.0.1",
    nfs_port: int = 2049,
    mnt_port: int = 20048,
    netns: str | None = None,
    start_rpcbind: bool = True,
    workdir: Path | None = None,
    ready_timeout: float = 30.0,
) -> Iterator[GaneshaServer]:
    """Run ``ganesha.nfsd -F`` for ``exports`` until the block ends.

    ``bind_addr``: listen address; None listens on every address, which is right only inside
    a namespace (``netns``: run there with ``ip netns exec``; ganesha cannot resolve an address
    where only loopback is up, so pass None there). ``start_rpcbind``: start
    a private ``rpcbind -f`` first unless one already answers at ``bind_addr`` (NFSv3 needs
    it). Returns once MOUNT and NFS are registered with the portmapper (or NFS answers, when
    no rpcbind is used). Raises :class:`PrerequisiteError` if nfs-ganesha or its VFS FSAL is
    not installed, :class:`SidusError` with the log tail if it does not come up within
    ``ready_timeout`` seconds.
    """
    gan = which("ganesha.nfsd", "nfs-ganesha")
    if not any(Path(d, "ganesha", "libfsalvfs.so").exists()
               for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib")):
        raise PrerequisiteError("nfs-ganesha's VFS backend is missing",
                                hint="apt-get install nfs-ganesha-vfs")
    for e in exports:
        if not Path(e.path).is_dir():
            raise SidusError(f"cannot export {e.path}: not a directory")
    own_workdir = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="sdt-ganesha-")) if workdir is None else workdir
    wd.mkdir(parents=True, exist_ok=True)
    cfg = GaneshaConfig(tuple(exports), bind_addr=bind_addr, nfs_port=nfs_port,
                        mnt_port=mnt_port, recovery_root=wd / "recovery")
    (wd / "recovery").mkdir(exist_ok=True)
    (wd / "ganesha.conf").write_text(render_config(cfg))
    pre = _netns_prefix(netns)
    probe = bind_addr or "127.0.0.1"
    rpcb: Child | None = None
    proc: Child | None = None
    try:
        if start_rpcbind and not _registered(netns, probe):
            rpcbind = which("rpcbind", "rpcbind")
            log.debug("starting rpcbind%s", f" in netns {netns}" if netns else "")
            (wd / "rpcbind.log").write_bytes(b"")
            # rpcbind drops root for its own user, and the kernel then forgets the spawner's
            # parent-death signal. So it runs in a PID namespace of its own whose init (a
            # root shell, which keeps it) dies with `unshare`, which dies with us: the kernel
            # then kills everything in the namespace, rpcbind included.
            rpcb = spawn([*pre, which("unshare", "util-linux"), "--pid", "--fork",
                          "--kill-child=SIGKILL", "sh", "-c", '"$@"; exit $?', "sh",
                          rpcbind, "-f"], stderr=wd / "rpcbind.log", what="rpcbind")
            deadline = time.monotonic() + 10
            while not _registered(netns, probe):
                if rpcb.poll() is not None or time.monotonic() > deadline:
                    raise SidusError("rpcbind did not start: "
                                     + (wd / "rpcbind.log").read_text(errors="replace")[-500:])
                time.sleep(0.2)
        argv = [*pre, gan, "-F", "-f", str(wd / "ganesha.conf"), "-L", str(wd / "ganesha.log"),
                "-p", str(wd / "ganesha.pid"), "-N", cfg.log_level]
        proc = spawn(argv, what="ganesha.nfsd")
        server = GaneshaServer(wd, proc, rpcb)
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise SidusError(f"ganesha.nfsd exited with code {proc.returncode}:\n"
                                 + server.log_tail())
            if start_rpcbind:
                if {NFS_PROGRAM, MOUNT_PROGRAM} <= _registered(netns, probe):
                    break
            elif "NFS SERVER INITIALIZED" in server.log_tail(200):
                break
            if time.monotonic() > deadline:
                raise SidusError(f"ganesha.nfsd did not come up within {ready_timeout:.0f} s:\n"
                                 + server.log_tail())
            time.sleep(0.3)
        log.info("nfs-ganesha serving %s on %s:%d", ", ".join(str(e.path) for e in exports),
                 bind_addr or "*", nfs_port)
        yield server
    finally:
        if proc is not None:
            proc.stop()
        if rpcb is not None:
            rpcb.stop()
        if own_workdir:
            shutil.rmtree(wd, ignore_errors=True)
