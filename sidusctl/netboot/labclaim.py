"""Who owns a lab's prefix, and what a lab that was killed left behind.

A :class:`~sidusctl.netboot.lab.PxeLab` undoes everything it made when it ends, on errors,
Ctrl-C and SIGTERM included. A SIGKILL (``kill -9``, the OOM killer, a CI runner's timeout)
gives it no chance: its namespace stays, with whatever still runs in it, and its work directory
beside it. The next lab with the same prefix then found the namespace and stopped ("already
exists").

So each lab holds, for its lifetime, a :class:`~sidusctl.core.state.FileLock` on
``/run/lock/sidusctl-lab-<prefix>.lock`` (a ``flock(2)``: the kernel drops it when the process
dies, however it dies) whose note is its work directory; a lab that ends cleanly releases it,
which removes the file. A new lab that gets the lock and finds a record knows the last one was
killed and reclaims what it left: every process in the namespace is ended, the namespace deleted
(its bridge and taps go with it), its work directory removed; a warning names them. A lab that
cannot get the lock is refused: another one with that prefix is running. A namespace of that
name that no lab recorded is not ours to delete and is refused as before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from sidusctl.core.errors import SidusError
from sidusctl.core.log import get_logger
from sidusctl.core.run import run
from sidusctl.core.state import RUN_LOCK_DIR, FileLock, remove_left_dir
from sidusctl.subsys.net import links

log = get_logger("lab")

#: where the lock files live
LOCK_DIR = RUN_LOCK_DIR
#: files a lab's work directory holds (:class:`~sidusctl.netboot.lab.PxeLab`): one of them
#: must be there before a recorded directory is removed
LAB_FILES = ("nodes.toml", "serve-pxe.log", "state")


def claim(prefix: str, netns: str, workdir: Path, *, lock_dir: Path = LOCK_DIR,
          kill_processes: bool = True) -> FileLock:
    """Take ``prefix``'s lock (:class:`~sidusctl.core.state.FileLock`, its note the work
    directory) for a lab whose namespace is ``netns`` and work directory ``workdir``
    (absolute), reclaiming a killed lab's leftovers first (see the module docstring). The
    held lock; its :meth:`~sidusctl.core.state.FileLock.release` marks a clean end.

    :class:`~sidusctl.core.errors.BusyError` when another live process holds the lock (its pid
    in the message); :class:`SidusError` when ``netns`` exists though no killed lab recorded it
    (someone else's namespace)."""
    lock = FileLock(lock_dir / f"sidusctl-lab-{prefix}.lock", f"the lab prefix {prefix!r}",
                    remove=True)
    lock.acquire(note=str(workdir))
    try:
        if lock.left_behind is not None:
            pid, note = lock.left_behind
            reclaim(netns, Path(note) if note.startswith("/") else None, pid,
                    kill_processes=kill_processes)
        elif links.netns_exists(netns):
            raise SidusError(f"network namespace {netns} already exists, and no lab recorded "
                             "it (not ours to delete)",
                             hint=f"remove it with: ip netns del {netns}, or use another prefix")
    except BaseException:
        lock.release()
        raise
    return lock


def reclaim(netns: str, recorded: Path | None, pid: int, *,
            kill_processes: bool = True) -> list[str]:
    """Remove what the killed lab ``pid`` left: ``netns`` with its processes, the work
    directory ``recorded`` (if it holds one of :data:`LAB_FILES`). What was removed, as phrases,
    also logged as a warning."""
    done: list[str] = []
    if links.netns_exists(netns):
        if kill_processes:
            kill_netns_processes(netns)
        links.remove_netns(netns)
        done.append(f"network namespace {netns} and its processes")
    done += remove_left_dir(recorded, LAB_FILES)
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
