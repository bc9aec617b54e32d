"""Who owns a lab's prefix, and what a lab that was killed left behind.

A :class:`~sidusctl.netboot.lab.PxeLab` undoes everything it made when it ends, on errors,
Ctrl-C and SIGTERM included. A SIGKILL (``kill -9``, the OOM killer, a CI runner's timeout)
gives it no chance: its namespace stays, and in it serve-pxe, nfs-ganesha and the qemu guests
go on running, with the lab's work directory beside them. The next lab with the same prefix
then found the namespace and stopped ("already exists").

So each lab holds, for its lifetime, an exclusive ``flock(2)`` on
``/run/lock/sidusctl-lab-<prefix>.lock`` (the kernel drops it when the process dies, however it
dies), and writes in it its pid and its work directory; a lab that ends cleanly empties the file.
A new lab that gets the lock and finds the file not empty knows the last one was killed and
reclaims what it left: every process in the namespace is ended, the namespace deleted (its
bridge and taps go with it), its work directory removed; a warning names them. A lab that cannot
get the lock is refused: another one with that prefix is running. A namespace of that name that
no lab recorded is not ours to delete and is refused as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from sidusctl.core.errors import SidusError
from sidusctl.core.log import get_logger
from sidusctl.core.run import run
from sidusctl.subsys.net import links

log = get_logger("lab")

#: where the lock files live (FHS 3.0, section 5.9: /run/lock, cleared at each boot)
LOCK_DIR = Path("/run/lock")
#: files a lab's work directory holds (:class:`~sidusctl.netboot.lab.PxeLab`): one of them
#: must be there before a recorded directory is removed
LAB_FILES = ("nodes.toml", "serve-pxe.log", "state")


@dataclass
class LabClaim:
    """The lock on a lab prefix: ``path`` of the lock file, ``fd`` its open descriptor
    (holding the ``flock``), ``reclaimed`` what the previous, killed lab had left and was
    removed (human-readable items; empty when nothing was)."""

    path: Path
    fd: int
    reclaimed: list[str]

    def release(self) -> None:
        """Empty the file (this lab ended cleanly) and drop the lock; idempotent."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # drops the flock
        self.fd = -1


def claim(prefix: str, netns: str, workdir: Path, *, lock_dir: Path = LOCK_DIR,
          kill_processes: bool = True) -> LabClaim:
    """Take ``prefix``'s lock for a lab whose namespace is ``netns`` and work directory
    ``workdir`` (absolute), reclaiming a killed lab's leftovers first (see the module
    docstring).

    :class:`SidusError` when another live process holds the lock (its pid in the message), or
    when ``netns`` exists though no killed lab recorded it (someone else's namespace)."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"sidusctl-lab-{prefix}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _record(fd)[0] or "?"
            raise SidusError(f"another lab with prefix {prefix!r} is running (pid {pid}; "
                             f"lock {path})",
                             hint="wait for it to end, or give this one another prefix") \
                from None
        pid, recorded = _record(fd)
        reclaimed: list[str] = []
        if pid:
            reclaimed = _reclaim(netns, recorded, workdir, pid, kill_processes=kill_processes)
        elif links.netns_exists(netns):
            raise SidusError(f"network namespace {netns} already exists, and no lab recorded "
                             "it (not ours to delete)",
                             hint=f"remove it with: ip netns del {netns}, or use another prefix")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{workdir}\n".encode(), 0)
        return LabClaim(path, fd, reclaimed)
    except BaseException:
        os.close(fd)
        raise


def _record(fd: int) -> tuple[str, Path | None]:
    """(pid, work directory) a lab wrote into its lock file; ("", None) for an empty one."""
    lines = os.pread(fd, 4096, 0).decode(errors="replace").splitlines()
    pid = lines[0].strip() if lines and lines[0].strip().isdigit() else ""
    wd = Path(lines[1].strip()) if len(lines) > 1 and lines[1].strip().startswith("/") else None
    return pid, wd


def _reclaim(netns: str, recorded: Path | None, workdir: Path, pid: str, *,
             kill_processes: bool) -> list[str]:
    """Remove what the killed lab ``pid`` left: ``netns`` with its processes, the work
    directory ``recorded``. What was removed, as phrases for the warning."""
    done: list[str] = []
    if links.netns_exists(netns):
        if kill_processes:
            kill_netns_processes(netns)
        links.remove_netns(netns)
        done.append(f"network namespace {netns} and its processes")
    if (recorded is not None and recorded.is_dir() and not recorded.is_symlink()
            and recorded != Path("/") and any((recorded / f).exists() for f in LAB_FILES)):
        shutil.rmtree(recorded, ignore_errors=True)
        if recorded.exists():
            log.warning("could not remove all of %s (the killed lab's work directory)",
                        recorded)
        else:
            done.append(f"work directory {recorded}")
    if done:
        log.warning("the last lab here (pid %s) was killed without cleaning up; removed its %s",
                    pid, " and ".join(done))
    return done


def kill_netns_processes(netns: str, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every process in network namespace ``netns``, waiting up to
    ``grace`` seconds after each signal for them to end (a zombie has ended)."""
    try:
        pids = [int(p) for p in run(["ip", "netns", "pids", netns], capture=True, check=False,
                                    what="ip netns pids").stdout.split()]
    except SidusError:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: it exists and is not a zombie (dead, its parent yet to reap it;
    proc(5), /proc/PID/stat's third field)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]
