"""Whole directory trees: copying one by the cheapest way its filesystem offers, and a content
digest of one.

:func:`copy_tree` picks, in order: a btrfs snapshot (``src`` is a subvolume and ``dest``'s
parent is on the same btrfs), a reflink copy (``cp -a --reflink=always``, when a FICLONE probe
between the two directories succeeds: btrfs, XFS with reflink, bcachefs...), else a plain
``cp -a`` (owners, modes, xattrs, ACLs, hard links, sparse files kept). :func:`tree_digest` is a
sha256 over every entry's path, type, mode, owner, size, link target, device number, xattrs and
content (mtimes are left out): two trees with the same digest hold the same thing.
:func:`copy_tree_linking` copies a changed copy of a tree by hard-linking from the original
what did not change (the stage cache's delta entries where there are no reflinks).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sidusctl.core.errors import CommandError
from sidusctl.core.log import get_logger
from sidusctl.core.run import run, which
from sidusctl.subsys import btrfs

log = get_logger("treecopy")

FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int)
METHODS = ("snapshot", "reflink", "copy")


def reflink_works(src_dir: Path, dest_dir: Path) -> bool:
    """True when a file in ``src_dir`` can be cloned (FICLONE) into ``dest_dir``: same
    filesystem, and one that shares extents. Both directories must exist."""
    a = src_dir / f".sidusctl-reflink-probe-{os.getpid()}"
    b = dest_dir / f".sidusctl-reflink-probe-{os.getpid()}.clone"
    try:
        a.write_bytes(b"x" * 4096)
        with open(a, "rb") as fa, open(b, "wb") as fb:
            fcntl.ioctl(fb.fileno(), FICLONE, fa.fileno())
        return True
    except OSError:
        return False
    finally:
        for p in (a, b):
            with contextlib.suppress(OSError):
                p.unlink()


def copy_method(src: Path, dest_parent: Path, probe_from: Path | None = None) -> str:
    """How :func:`copy_tree` would copy ``src`` into ``dest_parent``: ``snapshot``, ``reflink``
    or ``copy``. The reflink probe writes (and deletes) a file in ``probe_from`` (default
    ``src`` itself; a directory on ``src``'s filesystem when ``src`` must not be written, e.g.
    an overlay's lower layer)."""
    # (each subvolume has its own st_dev: whether both are on the same btrfs is found by trying)
    if btrfs.is_subvolume(src) and btrfs.is_btrfs(dest_parent):
        return "snapshot"
    if reflink_works(probe_from or src, dest_parent):
        return "reflink"
    return "copy"


def copy_tree(src: Path, dest: Path, method: str | None = None) -> str:
    """Copy the tree ``src`` to ``dest`` and return the method used (see :func:`copy_method`).
    ``dest`` must not exist (its parent must), or be an empty directory (then ``src``'s
    content is copied into it: never a snapshot). Raises :class:`CommandError` if the copy fails (a
    full disk included); a partial ``dest`` is then left for the caller to remove."""
    method = method or copy_method(src, dest.parent)
    if method == "snapshot":
        try:
            btrfs.snapshot(src, dest)
            return method
        except CommandError as e:  # another btrfs filesystem
            log.debug("no snapshot of %s to %s (%s); copying", src, dest, e)
            method = "reflink" if reflink_works(src, dest.parent) else "copy"
    cp = which("cp", "coreutils")
    source = f"{src}/." if dest.is_dir() else str(src)
    flag = "--reflink=always" if method == "reflink" else "--reflink=never"
    try:
        run([cp, "-a", flag, "--", source, str(dest)], what=f"cp -a {flag}")
    except CommandError:
        if method != "reflink":
            raise
        # a filesystem that clones one file may still refuse another (an unusual extent)
        log.debug("reflink copy of %s refused; copying", src)
        if dest.is_dir() and source.endswith("/."):
            for p in dest.iterdir():
                run(["rm", "-rf", "--one-file-system", "--", str(p)], check=False)
        else:
            run(["rm", "-rf", "--one-file-system", "--", str(dest)], check=False)
        run([cp, "-a", "--", source, str(dest)], what="cp -a")
        method = "copy"
    return method


def create_dir_for_tree(path: Path) -> None:
    """Create ``path`` as a btrfs subvolume when its parent is on btrfs (so that it can be
    snapshotted later), else as a plain directory."""
    if btrfs.is_btrfs(path.parent):
        with contextlib.suppress(CommandError):
            btrfs.subvolume_create(path)
            return
    path.mkdir()


def remove_tree(path: Path) -> None:
    """Delete ``path`` (a btrfs subvolume or a plain directory tree); never crosses into another
    filesystem mounted below it."""
    if not path.exists() and not path.is_symlink():
        return
    if btrfs.is_subvolume(path):
        btrfs.subvolume_delete(path)
        return
    run(["rm", "-rf", "--one-file-system", "--", str(path)], what=f"rm -rf {path}")


def tree_digest(root: Path) -> tuple[str, int, int]:
    """sha256 (hex) over the tree ``root`` (see the module doc), the number of entries and the
    bytes of regular files read. Reads every file: about 1 s per GiB here. Raises OSError if an
    entry vanishes while it is read."""
    d = tree_digest_files(root)
    return d.sha256, d.entries, d.bytes_read


@dataclass(frozen=True)
class TreeDigest:
    """What :func:`tree_digest_files` found: the tree's ``sha256`` (hex), its number of
    ``entries``, the ``bytes_read`` of content, and ``files``: the sha256 (hex) of each regular
    file's content by path relative to the root."""

    sha256: str
    entries: int
    bytes_read: int
    files: dict[str, str]


def tree_digest_files(root: Path, known: Mapping[str, str] | None = None) -> TreeDigest:
    """:func:`tree_digest` of ``root``, with each regular file's content digest. ``known``:
    content digests (by relative path) the caller vouches for (files hard-linked to ones
    digested before): those files are not read again. Raises OSError as :func:`tree_digest`."""
    h = hashlib.sha256()
    files: dict[str, str] = {}
    entries = size = 0
    known = known or {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = sorted(dirnames + filenames)
        for n in names:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            mode = st.st_mode
            rec = [rel, oct(mode), str(st.st_uid), str(st.st_gid)]
            if stat.S_ISREG(mode):
                sha = known.get(rel)
                if sha is None:
                    with open(p, "rb") as f:
                        sha = hashlib.file_digest(f, "sha256").hexdigest()
                    size += st.st_size
                files[rel] = sha
                rec += [str(st.st_size), sha]
            elif stat.S_ISLNK(mode):
                rec.append(os.readlink(p))
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                rec.append(str(st.st_rdev))
            with contextlib.suppress(OSError):
                for x in sorted(os.listxattr(p, follow_symlinks=False)):
                    rec.append(x + "=" + os.getxattr(p, x, follow_symlinks=False).hex())
            h.update("\0".join(rec).encode("utf-8", "surrogateescape") + b"\n")
            entries += 1
    return TreeDigest(h.hexdigest(), entries, size, files)


@dataclass(frozen=True)
class LinkedCopy:
    """What :func:`copy_tree_linking` did: ``linked`` files hard-linked from the base,
    ``copied`` files (and their ``bytes_copied``), and ``known``: the content digests of the
    linked files, by path relative to the root (for :func:`tree_digest_files`)."""

    linked: int
    copied: int
    bytes_copied: int
    known: dict[str, str]


def copy_tree_linking(src: Path, dest: Path, base: Path, base_files: Mapping[str, str],
                      copied_before_ns: int) -> LinkedCopy:
    """Copy the tree ``src`` into the empty directory ``dest`` as ``cp -a`` would (types,
    modes, owners, xattrs, mtimes, hard links within the tree), except that each regular file
    ``src`` holds unchanged from the tree ``base`` is hard-linked from ``base`` instead of
    copied: on a filesystem without snapshots or reflinks, a second tree that differs from a
    first by a few files costs those files, not a second copy.

    ``src`` must be a copy of ``base`` (``cp -a``: its files' ctimes are when they were copied),
    finished before ``copied_before_ns`` (a ctime in ns on the same clock), possibly changed
    since; ``base_files``: the content digests of ``src``'s files as copied (by relative path:
    the :class:`TreeDigest` files of its check). A file counts as unchanged when its inode's
    ctime is before ``copied_before_ns`` (any write, truncate, chmod, chown, xattr change or
    rename moves the ctime, and no call sets it back: ``stat(2)``), it has a digest in
    ``base_files``, and the file at the same path in ``base`` is a regular file of the same
    size, mode, owner and mtime. Both trees must be on one filesystem, and ``base``'s files must
    never be written in place afterwards (they are shared). Raises OSError on any failure; a
    partial ``dest`` is left for the caller to remove."""
    linked = copied = nbytes = 0
    known: dict[str, str] = {}
    seen: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) in src -> its first rel path
    dirs: list[tuple[str, os.stat_result, str]] = [(str(dest), os.lstat(src), str(src))]
    stack = [""]
    while stack:
        reldir = stack.pop()
        with os.scandir(os.path.join(src, reldir)) as it:
            children = sorted(it, key=lambda e: e.name)
        for ent in children:
            rel = os.path.join(reldir, ent.name)
            p, d = ent.path, os.path.join(dest, rel)
            st = ent.stat(follow_symlinks=False)
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                os.mkdir(d, 0o700)
                dirs.append((d, st, p))
                stack.append(rel)
                continue
            if stat.S_ISREG(mode):
                ino = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and ino in seen:
                    first = seen[ino]
                    os.link(os.path.join(dest, first), d)
                    if first in known:
                        known[rel] = known[first]
                    continue
                seen[ino] = rel
                sha = base_files.get(rel)
                if sha is not None and st.st_ctime_ns < copied_before_ns and \
                        _same_file(os.path.join(base, rel), st):
                    os.link(os.path.join(base, rel), d)
                    known[rel] = sha
                    linked += 1
                    continue
                shutil.copyfile(p, d, follow_symlinks=False)
                copied += 1
                nbytes += st.st_size
            else:
                make_special(p, d, st)
            copy_meta(p, d, st)
    for d, st, p in reversed(dirs):  # children first: their creation moved the mtimes
        copy_meta(p, d, st)
    return LinkedCopy(linked, copied, nbytes, known)


def make_special(src: str, dest: str, st: os.stat_result) -> None:
    """Create ``dest`` as the symlink, device node, fifo or socket ``src`` is (``st``: its
    lstat), without owner, mode bits beyond the type's or times (:func:`copy_meta` does
    those). Raises OSError."""
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dest)
    else:  # character and block devices, fifos, sockets
        os.mknod(dest, st.st_mode, st.st_rdev)


def _same_file(path: str, st: os.stat_result) -> bool:
    try:
        b = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISREG(b.st_mode) and b.st_mode == st.st_mode and b.st_size == st.st_size
            and b.st_mtime_ns == st.st_mtime_ns and b.st_uid == st.st_uid
            and b.st_gid == st.st_gid)


def copy_meta(src: str, dest: str, st: os.stat_result, skip_prefix: str | None = None) -> None:
    """Owner, mode, xattrs (ACLs and file capabilities included; not those named
    ``skip_prefix``...), then times, of ``src`` (whose lstat is ``st``) onto ``dest``, in the
    order that keeps them: chown clears set-id bits and capabilities."""
    link = stat.S_ISLNK(st.st_mode)
    os.chown(dest, st.st_uid, st.st_gid, follow_symlinks=False)
    if not link:
        os.chmod(dest, stat.S_IMODE(st.st_mode))
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:  # a filesystem without xattrs has none to keep
        names = []
    for x in names:
        if skip_prefix is not None and x.startswith(skip_prefix):
            continue
        os.setxattr(dest, x, os.getxattr(src, x, follow_symlinks=False), follow_symlinks=False)
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def file_sha256(path: Path) -> str:
    """sha256 (hex) of one file's content."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def unshare_tree(root: Path) -> int:
    """Give every regular file of ``root`` that shares its inode with a path outside the tree
    (a hard link from a stage cache entry or another generation: its link count exceeds the
    links found in the tree) an inode of its own: a copy (content, owner, mode, xattrs, times)
    renamed over each of its paths, hard links within the tree kept. After it, writing into
    ``root`` in place changes nothing outside. Returns the number of files copied. The
    directories' mtimes are kept. Raises OSError on failure (a full disk): each file is then
    still whole, either shared or copied."""
    groups: dict[tuple[int, int], list[str]] = {}
    nlink: dict[tuple[int, int], int] = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for n in filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                ino = (st.st_dev, st.st_ino)
                groups.setdefault(ino, []).append(p)
                nlink[ino] = st.st_nlink
    copied = 0
    for ino, paths in groups.items():
        if nlink[ino] <= len(paths):
            continue
        dirs = {os.path.dirname(p): os.lstat(os.path.dirname(p)) for p in paths}
        first = paths[0]
        st = os.lstat(first)
        tmp = first + ".sidusctl-unshare"
        try:
            shutil.copyfile(first, tmp, follow_symlinks=False)
            copy_meta(first, tmp, st)
            os.rename(tmp, first)
            for p in paths[1:]:
                os.link(first, tmp)
                os.rename(tmp, p)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        for d, dst in dirs.items():
            os.utime(d, ns=(dst.st_atime_ns, dst.st_mtime_ns))
        copied += 1
    return copied
