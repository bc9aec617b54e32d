"""Confined file I/O inside a root we do not trust (an imported image, a vnode's root).

An image may hold symlinks planted to make a writer on the host escape the root
(``/root/.ssh -> /root/.ssh`` of the host, ``etc -> /etc``). Every function here walks the
path one component at a time with ``openat(2)`` and ``O_NOFOLLOW`` from a directory fd of the
root, so nothing is ever opened, created or removed through a symlink, whatever the root
holds; symlinks are only ever created or inspected as the last component.

Paths are relative to the root (``etc/hosts``, leading ``/`` stripped by the caller); ``..``
components are refused. Errors: :class:`UnsafePathError` when a symlink or a non-directory
stands on the way (or a directory where a file must go); :class:`OSError` as the system calls
raise it otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from sidusctl.core.errors import StateError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(StateError):
    """A path inside an untrusted root goes through a symlink or a non-directory: the image
    is at fault, as with any bad input (exit 2)."""

    exit_code = 2


def split_rel(rel: str) -> list[str]:
    """``a/./b/`` -> ``["a", "b"]``; :class:`UnsafePathError` for an absolute path, a ``..``
    component, or nothing left."""
    if rel.startswith("/"):
        raise UnsafePathError(f"'{rel}' is an absolute path; a path below the root is needed")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePathError(f"'{rel}' contains a '..' component")
    if not parts:
        raise UnsafePathError("a path below the root is needed")
    return parts


@contextlib.contextmanager
def parent_fd(root: str | os.PathLike[str], rel: str, *, create: bool,
              dir_mode: int = 0o755) -> Iterator[int | None]:
    """An fd of the directory that holds ``rel``'s last component, reached without following
    any symlink. Missing directories are made (``dir_mode``, owner root) when ``create``;
    otherwise, or when the way is a symlink and not ``create``, None is yielded."""
    parts = split_rel(rel)
    fds = [os.open(os.fspath(root), _DIR_FLAGS)]
    try:
        for comp in parts[:-1]:
            try:
                fds.append(os.open(comp, _DIR_FLAGS, dir_fd=fds[-1]))
            except FileNotFoundError:
                if not create:
                    yield None
                    return
                os.mkdir(comp, dir_mode, dir_fd=fds[-1])
                fds.append(os.open(comp, _DIR_FLAGS, dir_fd=fds[-1]))
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                if not create:
                    yield None
                    return
                raise UnsafePathError(
                    f"cannot write '/{rel}' in the root: '{comp}' on its path is a symlink or "
                    "not a directory") from None
        yield fds[-1]
    finally:
        for fd in fds:
            os.close(fd)


def _last(rel: str) -> str:
    return split_rel(rel)[-1]


def read_file_in_root(root: str | os.PathLike[str], rel: str,
                      limit: int = 4 << 20) -> bytes | None:
    """At most ``limit`` bytes of the regular file ``rel`` in ``root``; None if it is missing,
    not a regular file, or reached through a symlink."""
    with parent_fd(root, rel, create=False) as dfd:
        if dfd is None:
            return None
        try:
            fd = os.open(_last(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            out = bytearray()
            while len(out) < limit and (chunk := os.read(fd, min(1 << 20, limit - len(out)))):
                out += chunk
            return bytes(out)
        finally:
            os.close(fd)


def _unlink_non_dir(dfd: int, name: str, rel: str, verb: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(name, dir_fd=dfd).st_mode):
            raise UnsafePathError(f"cannot {verb} '/{rel}' in the root: it is a directory")
        os.unlink(name, dir_fd=dfd)


def write_file_in_root(root: str | os.PathLike[str], rel: str, data: bytes, mode: int = 0o644,
                       *, uid: int = 0, gid: int = 0, dir_mode: int = 0o755) -> None:
    """Create or replace ``rel`` in ``root`` with ``data`` (owner ``uid``:``gid``, permission
    bits ``mode``), never through a symlink: a symlink standing at ``rel`` itself is replaced,
    not followed. Missing parent directories are made with ``dir_mode``."""
    name = _last(rel)
    with parent_fd(root, rel, create=True, dir_mode=dir_mode) as dfd:
        assert dfd is not None
        _unlink_non_dir(dfd, name, rel, "write")
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=dfd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def mkdir_in_root(root: str | os.PathLike[str], rel: str, mode: int = 0o755) -> None:
    """Make sure the directory ``rel`` exists in ``root`` (parents too, all with ``mode`` when
    made) and has exactly ``mode``; UnsafePathError if it or a parent is a symlink or a file."""
    with parent_fd(root, f"{rel.rstrip('/')}/x", create=True, dir_mode=mode) as dfd:
        assert dfd is not None  # the fd of rel itself: every component was made or checked
        os.fchmod(dfd, mode)


def symlink_in_root(root: str | os.PathLike[str], rel: str, target: str) -> None:
    """Create or replace the symlink ``rel`` -> ``target`` in ``root`` (``target`` is stored
    as given and never resolved here)."""
    name = _last(rel)
    with parent_fd(root, rel, create=True) as dfd:
        assert dfd is not None
        _unlink_non_dir(dfd, name, rel, "link")
        os.symlink(target, name, dir_fd=dfd)


def lexists_in_root(root: str | os.PathLike[str], rel: str) -> bool:
    """Whether ``rel`` exists in ``root`` (as anything, a symlink included), looked up
    without following symlinks on the way."""
    with parent_fd(root, rel, create=False) as dfd:
        if dfd is None:
            return False
        try:
            os.lstat(_last(rel), dir_fd=dfd)
            return True
        except OSError:
            return False
