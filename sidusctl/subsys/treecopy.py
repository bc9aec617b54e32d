"""Whole directory trees: copying one by the cheapest way its filesystem offers, and a content
digest of one.

:func:`copy_tree` picks, in order: a btrfs snapshot (``src`` is a subvolume and ``dest``'s
parent is on the same btrfs), a reflink copy (``cp -a --reflink=always``, when a FICLONE probe
between the two directories succeeds: btrfs, XFS with reflink, bcachefs...), else a plain
``cp -a`` (owners, modes, xattrs, ACLs, hard links, sparse files kept). :func:`tree_digest` is a
sha256 over every entry's path, type, mode, owner, size, link target, device number, xattrs and
content (mtimes are left out): two trees with the same digest hold the same thing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
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


def copy_method(src: Path, dest_parent: Path) -> str:
    """How :func:`copy_tree` would copy ``src`` into ``dest_parent``: ``snapshot``, ``reflink``
    or ``copy``."""
    # (each subvolume has its own st_dev: whether both are on the same btrfs is found by trying)
    if btrfs.is_subvolume(src) and btrfs.is_btrfs(dest_parent):
        return "snapshot"
    if reflink_works(src, dest_parent):
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
    h = hashlib.sha256()
    entries = size = 0
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
                with open(p, "rb") as f:
                    rec += [str(st.st_size), hashlib.file_digest(f, "sha256").hexdigest()]
                size += st.st_size
            elif stat.S_ISLNK(mode):
                rec.append(os.readlink(p))
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                rec.append(str(st.st_rdev))
            with contextlib.suppress(OSError):
                for x in sorted(os.listxattr(p, follow_symlinks=False)):
                    rec.append(x + "=" + os.getxattr(p, x, follow_symlinks=False).hex())
            h.update("\0".join(rec).encode("utf-8", "surrogateescape") + b"\n")
            entries += 1
    return h.hexdigest(), entries, size


def file_sha256(path: Path) -> str:
    """sha256 (hex) of one file's content."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
