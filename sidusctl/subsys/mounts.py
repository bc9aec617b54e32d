"""Mounts: the only module that calls mount(8)/umount(8).

Reads the kernel's view from ``/proc/self/mountinfo`` (proc(5)); mounts through
:func:`mounted` (a context manager that undoes its mount on any exit) or :class:`MountStack`
(several mounts undone in reverse order). Unmounting tries a plain umount a few times (busy
filesystems are usually busy for a moment only), then ``umount --lazy`` as a last resort, and
says so in the log.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sidusctl.core.errors import CommandError, SidusError
from sidusctl.core.log import get_logger
from sidusctl.core.run import run

log = get_logger("mounts")


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo: ``target`` (path), ``fstype``, ``source``, ``options``."""

    mount_id: int
    parent_id: int
    target: str
    fstype: str
    source: str
    options: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 1 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountinfo() -> list[MountInfo]:
    """Every mount in this mount namespace, in mount order."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            lf = left.split()
            rf = right.split()
            result.append(
                MountInfo(
                    mount_id=int(lf[0]),
                    parent_id=int(lf[1]),
                    target=_unescape(lf[4]),
                    fstype=rf[0],
                    source=_unescape(rf[1]) if len(rf) > 1 else "",
                    options=lf[5],
                )
            )
    return result


def mounts_under(path: Path | str) -> list[str]:
    """Mount points at or below ``path``, deepest first (the order to unmount them in)."""
    base = os.path.realpath(path)
    prefix = base.rstrip("/") + "/"
    targets = [m.target for m in mountinfo() if m.target == base or m.target.startswith(prefix)]
    # Deepest first; for the same path, the last mounted (on top) first.
    seen: list[str] = []
    for t in reversed(targets):
        seen.append(t)
    return sorted(seen, key=lambda t: t.count("/"), reverse=True)


def is_mountpoint(path: Path | str) -> bool:
    """Whether something is mounted on ``path`` (symbolic links resolved), by this mount
    namespace's ``/proc/self/mountinfo`` (proc(5)), so bind mounts count too."""
    p = os.path.realpath(path)
    return any(m.target == p for m in mountinfo())


def mount(
    source: str,
    target: Path | str,
    fstype: str | None = None,
    options: Sequence[str] = (),
    bind: bool = False,
    rbind: bool = False,
) -> None:
    """mount(8) ``source`` on ``target``. Raises :class:`CommandError` on failure."""
    argv = ["mount"]
    if bind:
        argv.append("--bind")
    if rbind:
        argv.append("--rbind")
    if fstype:
        argv += ["-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    argv += [source, os.fspath(target)]
    run(argv, what=f"mount of {source} on {target}")
    if rbind:
        # Keep umounts of the copy from propagating back to the host's tree.
        run(["mount", "--make-rslave", os.fspath(target)])


def umount(target: Path | str, *, attempts: int = 5) -> bool:
    """Unmount ``target``. Returns True if a plain umount worked, False if it had to be lazy
    (logged as a warning). Raises :class:`SidusError` only if even the lazy umount fails."""
    t = os.fspath(target)
    for i in range(attempts):
        try:
            run(["umount", t], what=f"umount {t}")
            return True
        except CommandError as e:
            if "not mounted" in e.output_tail or "no mount point" in e.output_tail:
                return True
            time.sleep(0.2 * (i + 1))
    try:
        run(["umount", "--lazy", t], what=f"umount --lazy {t}")
    except CommandError as e:
        raise SidusError(f"could not unmount {t}, even lazily: {e.output_tail.strip()}") from e
    log.warning("%s was busy: unmounted lazily (umount --lazy) as a last resort", t)
    return False


def umount_tree(path: Path | str) -> list[str]:
    """Unmount everything at or below ``path``, deepest first; returns what was unmounted.
    Mounts still there after 20 rounds (each can reveal a mount stacked under another) are
    logged as a warning, not raised: this runs in clean-ups, whose own error comes first.
    :class:`SidusError` as :func:`umount`."""
    done = []
    # Loop: an unmount can reveal a mount it was hiding (stacked mounts on one point).
    for _ in range(20):
        targets = mounts_under(path)
        if not targets:
            break
        for t in targets:
            umount(t)
            done.append(t)
    else:
        if left := mounts_under(path):
            log.warning("still mounted under %s after 20 rounds of umount: %s", path,
                        ", ".join(left))
    return done


@contextlib.contextmanager
def mounted(
    source: str,
    target: Path | str,
    fstype: str | None = None,
    options: Sequence[str] = (),
    bind: bool = False,
    rbind: bool = False,
    mkdir: bool = True,
) -> Iterator[Path]:
    """Mount for the duration of the block; unmounted (with anything mounted below it) on any
    exit, exceptions and interrupts included."""
    tgt = Path(target)
    if mkdir:
        tgt.mkdir(parents=True, exist_ok=True)
    mount(source, tgt, fstype, options, bind=bind, rbind=rbind)
    try:
        yield tgt
    finally:
        umount_tree(tgt)


class MountStack:
    """Mounts made one by one and undone together, last first: ``with MountStack() as ms:``."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()

    def mount(self, source: str, target: Path | str, fstype: str | None = None,
              options: Sequence[str] = (), bind: bool = False, rbind: bool = False) -> Path:
        """Mount as :func:`mounted` does (``target`` created if missing), until :meth:`close`;
        returns ``target`` as a Path. :class:`CommandError` if the mount fails."""
        return self._stack.enter_context(
            mounted(source, target, fstype, options, bind=bind, rbind=rbind)
        )

    def close(self) -> None:
        """Unmount everything mounted through this stack, last first (with anything mounted below
        each); idempotent."""
        self._stack.close()

    def __enter__(self) -> MountStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
