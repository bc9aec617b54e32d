"""Atomic, locked persistence: JSON documents written by temp file + fsync + rename, and
``flock(2)`` locks that vanish with the process holding them (so a SIGKILLed command never
leaves a stale lock, and the next command can tell its leftovers are orphaned).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sidusctl.core.errors import BusyError, StateError


def fsync_dir(path: Path) -> None:
    """``fsync(2)`` the directory ``path``, so that a rename or unlink in it survives a crash."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def publish(tmp: Path, dest: Path, *, sync_data: bool = True) -> None:
    """Move the finished file (or symlink) ``tmp`` onto ``dest`` in the same directory,
    atomically: readers see the old ``dest`` or the new one, never a partial file; after a
    crash one of the two is on disk (data fsync unless ``sync_data`` is false or ``tmp`` is a
    symlink, rename(2), directory fsync). :class:`OSError` as the calls raise it; ``tmp`` is
    left for the caller to remove then."""
    if sync_data and not tmp.is_symlink():
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def atomic_copy(src: Path, dest: Path, *, mode: int | None = 0o644, link: bool = False) -> None:
    """Copy the file ``src`` to ``dest`` atomically (see :func:`publish`); with ``link``, a
    hard link when both are on one filesystem (the content is shared, never copied).
    ``mode`` None keeps the source's permission bits. OSError as the calls raise it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        linked = False
        if link:
            with contextlib.suppress(OSError):
                os.link(src, tmp)
                linked = True
        if not linked:
            shutil.copyfile(src, tmp)
            os.chmod(tmp, mode if mode is not None else src.stat().st_mode & 0o7777)
        publish(tmp, dest, sync_data=not linked)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`publish`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        publish(Path(tmp), path, sync_data=False)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode(), mode)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON document; :class:`StateError` if it is unreadable or corrupt."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise StateError(f"{path}: unreadable state file ({e})") from e


class FileLock:
    """An exclusive ``flock`` on ``path`` (created if needed).

    ``acquire(wait=False)`` raises :class:`BusyError` naming ``what`` if another process holds
    it. The lock file records the holder's pid for messages; the lock itself is the flock, so a
    dead holder never blocks anyone.
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    def acquire(self, wait: bool = False) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 32, 0).decode().strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                pid = f" (pid {holder})" if holder else ""
                raise BusyError(f"{self.what} is in use by another sidusctl process{pid}") from e
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def locked(path: Path, what: str, wait: bool = False) -> Iterator[FileLock]:
    """``with locked(path, "image 'minimal'"):`` — hold an exclusive lock for the block."""
    lock = FileLock(path, what).acquire(wait=wait)
    try:
        yield lock
    finally:
        lock.release()
