"""Processes inside a directory tree: what the SIDUS seed does with
``lsof | grep $SIDUS | awk | xargs kill``, done properly.

A process belongs to a tree when its root (``/proc/PID/root``, i.e. it was chrooted there), its
working directory or its executable lies in it (proc(5)). They get SIGTERM, then SIGKILL after a
grace period; we never signal ourselves or our ancestors.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from sidusctl.core.log import get_logger
from sidusctl.core.paths import proc_link_within

log = get_logger("procs")


def _ancestors() -> set[int]:
    pids = set()
    pid = os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def pids_in_root(root: Path | str, cmdline: bool = False) -> list[int]:
    """Pids whose root, cwd or exe lies in ``root`` (realpath), excluding us and our parents.
    With ``cmdline``, also those naming a path inside ``root`` in their arguments (the orphaned
    children of a killed debootstrap: wget, dpkg), used by crash recovery only."""
    prefix = os.path.realpath(root).rstrip("/") + "/"
    skip = _ancestors()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in skip:
            continue
        for what in ("root", "cwd", "exe"):
            try:
                target = os.readlink(f"/proc/{pid}/{what}")
            except OSError:
                continue
            if proc_link_within(target, prefix):
                found.append(pid)
                break
        else:
            if cmdline:
                try:
                    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                pre = prefix.encode()
                if any(a.startswith(pre) or (b"=" + pre) in a for a in args[1:]):
                    found.append(pid)
    return found


def kill_in_root(root: Path | str, grace: float = 3.0, cmdline: bool = False) -> list[int]:
    """SIGTERM every process in ``root`` (see :func:`pids_in_root`); SIGKILL the ones still
    there after ``grace`` seconds. Returns the pids signalled (logged with their names)."""
    pids = pids_in_root(root, cmdline)
    if not pids:
        return []
    for pid in pids:
        name = ""
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        log.info("stopping stray process %d (%s) inside %s", pid, name, root)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not [p for p in pids if _alive(p)]:
            return pids
        time.sleep(0.1)
    for pid in pids_in_root(root, cmdline):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pids_in_root(root, cmdline):
        time.sleep(0.1)
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False
