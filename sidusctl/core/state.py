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
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sidusctl.core.errors import BusyError, StateError, WriteError
from sidusctl.core.log import get_logger

#: the errno values of a file system that cannot take what is written to it: full, over a
#: quota, read-only
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


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


def write_error(e: OSError, path: Path) -> WriteError:
    """The :class:`WriteError` for ``path``, which could not be written because of ``e`` (a
    full or read-only file system, most often): it names the path and the system's reason."""
    return WriteError(f"cannot write {path} ({e.strerror or e})", e)


def atomic_copy(src: Path, dest: Path, *, mode: int | None = 0o644, link: bool = False) -> None:
    """Copy the file ``src`` to ``dest`` atomically (see :func:`publish`); with ``link``, a
    hard link when both are on one filesystem (the content is shared, never copied).
    ``mode`` None keeps the source's permission bits. :class:`WriteError` naming ``dest``
    when it cannot be written (a full or read-only filesystem: ``dest`` is then as it was,
    and no temp file is left); OSError as the calls raise it when ``src`` cannot be read."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
    except OSError as e:
        raise write_error(e, dest) from e
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
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename == str(src) and e.filename2 is None:
            raise  # src could not be read: no failure to write dest
        raise write_error(e, dest) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644, *,
                       durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`publish`). ``durable=False``:
    readers still see the old file or the new one, never a part, but nothing is forced to
    disk (no fsync): for a file rewritten every few seconds that is worthless after a power
    cut, such as a server's status. :class:`WriteError` naming ``path`` when it cannot be
    written (a full or read-only filesystem): ``path`` is then as it was, and no temp file
    is left."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, path) from e
    # named before it exists, so that an exception at any point after its creation (SIGTERM's
    # Interrupted, Ctrl-C) removes it: mkstemp's name was lost to one raised as it returned
    tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp"))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError as e:  # another's (2**-32): not ours to remove
        raise write_error(e, path) from e
    except BaseException as e:
        with contextlib.suppress(OSError):  # not made (ENOENT), or a read-only fs (EROFS)
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(e, path) from e
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if durable:
            publish(Path(tmp), path, sync_data=False)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(e, path) from e
        raise


def atomic_write_text(path: Path, text: str, mode: int = 0o644, *,
                      durable: bool = True) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text (:class:`WriteError` likewise)."""
    atomic_write_bytes(path, text.encode(), mode, durable=durable)


def write_json(path: Path, obj: Any, *, compact: bool = False, durable: bool = True) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically (``durable``: see
    :func:`atomic_write_bytes`); ``compact``: on one line, without spaces, for files
    rewritten every few seconds (the standard library encodes indented JSON in Python,
    compact JSON in C: 3.5x faster on a 500-node status). :class:`WriteError` naming
    ``path`` when it cannot be written (the old file is then as it was)."""
    text = (json.dumps(obj, sort_keys=True, separators=(",", ":")) if compact
            else json.dumps(obj, indent=2, sort_keys=True))
    atomic_write_text(path, text + "\n", durable=durable)


def ensure_dir(path: Path) -> Path:
    """``mkdir -p path``; returns ``path``. :class:`StateError` naming ``path`` and the
    system's reason when it cannot be made or is not a directory (a regular file on the way,
    a read-only or pseudo filesystem such as ``/proc``, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StateError(f"{path}: cannot create the directory ({e.strerror or e})") from e
    return path


def read_json(path: Path) -> Any:
    """Read a JSON document; :class:`FileNotFoundError` if there is none, :class:`StateError`
    naming ``path`` if it is unreadable or corrupt (not JSON, not UTF-8, or nested too deeply
    for the decoder)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise StateError(f"{path}: unreadable state file ({e})") from e
    except RecursionError as e:  # "[[[[...": no file sidusctl writes nests that deep
        raise StateError(f"{path}: unreadable state file (JSON nested too deeply)") from e


class FileLock:
    """An exclusive ``flock`` on ``path`` (created if needed).

    ``acquire(wait=False)`` raises :class:`BusyError` naming ``what`` if another process holds
    it. The lock file records the holder's pid for messages (and a ``note`` of the holder's,
    such as the directory it works in); the lock itself is the flock, so a dead holder never
    blocks anyone. :meth:`release` empties the file, so a new holder that finds a record
    (:attr:`left_behind`) knows the last one died holding the lock: killed (SIGKILL, the OOM
    killer) before it could undo what it had made. With ``remove=True`` it also deletes the
    file, so that clean holders leave nothing behind (a lock taken on a file deleted meanwhile
    is taken again on the new one: :meth:`acquire` checks the path still names its file).
    """

    def __init__(self, path: Path, what: str, *, remove: bool = False) -> None:
        self.path = path
        self.what = what
        self.remove = remove
        self._fd: int | None = None
        #: ``(pid, note)`` a holder that died holding the lock recorded; None when the last
        #: holder released it (or there was none). Set by :meth:`acquire`.
        self.left_behind: tuple[int, str] | None = None

    def acquire(self, wait: bool = False, note: str = "") -> FileLock:
        """Take the lock (``wait``: until it is free), record this pid and ``note`` (one line)
        in the file, set :attr:`left_behind`; :class:`BusyError` naming the holder's pid if
        another process holds it and not ``wait``; :class:`StateError` naming the path when
        the lock file's directory cannot be made or the file cannot be opened, or when a
        ``note`` cannot be recorded (a full disk; without a note the lock is taken
        unrecorded, so that commands that free space still run on a full disk)."""
        while True:
            # in the loop: a holder may remove the directory too (image rm, a squashfs
            # export's directory), and a waiter then takes a lock in a new one
            ensure_dir(self.path.parent)
            fd = self._open_locked(wait)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed it as we took it: take the new one
        self.left_behind = _record(os.pread(fd, 4096, 0))
        record = f"{os.getpid()}\n{note}\n".encode()
        try:
            # written over the old record, then cut to length: on a full disk an old record's
            # block is reused, and a failed write leaves the old record as it was
            os.pwrite(fd, record, 0)
            os.ftruncate(fd, len(record))
        except OSError as e:
            if note:
                # the caller needs the note to undo what a SIGKILLed holder leaves
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                raise StateError(f"{self.path}: cannot record the holder in the lock file "
                                 f"({e.strerror or e})") from e
            # the flock is the lock; the pid is only for others' messages, and a full disk
            # must not stop the commands that free space (image rm, prune)
            get_logger("state").debug("%s: holder not recorded (%s)", self.path,
                                      e.strerror or e)
        self._fd = fd
        return self

    def _open_locked(self, wait: bool) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StateError(f"{self.path}: cannot open the lock file ({e.strerror or e})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 32, 0).decode().partition("\n")[0].strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                pid = f" (pid {holder})" if holder else ""
                raise BusyError(f"{self.what} is in use by another sidusctl process{pid}") from e
            raise
        return fd

    def release(self) -> None:
        """Empty the file (this holder ended cleanly; with ``remove``, delete it) and drop the
        lock; idempotent."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                if self.remove:
                    self.path.unlink()  # while held: a waiter then sees another file
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        """True from a successful :meth:`acquire` until :meth:`release`."""
        return self._fd is not None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


#: where locks that outlive no boot live (FHS 3.0, section 5.9: /run/lock, cleared at boot)
RUN_LOCK_DIR = Path("/run/lock")


def remove_left_dir(path: Path | None, markers: tuple[str, ...]) -> list[str]:
    """Remove the directory ``path`` a dead lock holder recorded (:attr:`FileLock.left_behind`)
    when it is one: a real directory (not a link, not ``/``) holding at least one of
    ``markers`` (names the holder makes in it), so that a damaged record never removes
    something else. ``["work directory PATH"]`` when it was removed, else ``[]`` (a warning is
    logged when it could not be removed whole)."""
    if (path is None or not path.is_absolute() or path == Path("/") or path.is_symlink()
            or not path.is_dir() or not any((path / m).exists() for m in markers)):
        return []
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        get_logger("state").warning("could not remove all of %s (left by a killed process)",
                                    path)
        return []
    return [f"work directory {path}"]


def remove_left_files(dirs: Iterable[Path], pattern: str, what: str) -> list[Path]:
    """Remove the regular files matching the glob ``pattern`` in each of ``dirs`` (those that
    exist): temp files a killed writer left (``what`` says which, in the warning logged per
    file). Only for a caller that holds the lock every such writer holds, so that none of
    them belongs to a live process. The files removed."""
    out: list[Path] = []
    for d in dirs:
        for p in d.glob(pattern) if d.is_dir() else ():
            if p.is_file() and not p.is_symlink():
                get_logger("state").warning("removing %s, left by %s that was killed", p, what)
                p.unlink(missing_ok=True)
                out.append(p)
    return out


def _record(raw: bytes) -> tuple[int, str] | None:
    """``(pid, note)`` from a lock file's text (``PID\\nNOTE\\n``); None for an empty one or
    one whose first line is not a pid."""
    first, _, rest = raw.decode(errors="replace").partition("\n")
    if not first.strip().isdigit():
        return None
    return int(first), rest.rstrip("\n")


@contextlib.contextmanager
def locked(path: Path, what: str, wait: bool = False) -> Iterator[FileLock]:
    """``with locked(path, "image 'minimal'"):`` — hold an exclusive lock for the block."""
    lock = FileLock(path, what).acquire(wait=wait)
    try:
        yield lock
    finally:
        lock.release()


def damaged(path: Path, key: str, value: object, expected: str) -> StateError:
    """The :class:`StateError` for a state file ``path`` (one sidusctl itself writes) whose
    ``key`` holds ``value`` where ``expected`` belongs: it names all four, the value cut to
    60 characters."""
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return StateError(f"{path}: key '{key}': found {shown}, expected {expected} "
                      "(a damaged status file)")

