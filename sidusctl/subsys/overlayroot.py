"""A build root as an overlay on a read-only tree, and that root written out as a plain tree
that hard-links every file it did not change: the stage cache's restore on a filesystem
without snapshots or reflinks (ext4, XFS without reflink), where a copy of the whole root
costs seconds to tens of seconds.

:func:`mount_overlay` mounts ``overlay`` (Linux Documentation/filesystems/overlayfs.rst) with
the cache entry as ``lowerdir`` and an empty ``upperdir``: every write during the build lands
in the upper layer (copy-up), the entry is never written. :func:`materialize` then reads the
two layers by overlayfs' own rules (a whiteout, a character device 0/0, hides a lower entry; an
upper directory marked ``trusted.overlay.opaque=y`` hides the lower directory's entries; an
upper entry wins over a lower one of the same name) and writes the merged tree into a plain
directory: directories, symlinks and device nodes made anew, regular files hard-linked from the
lower layer when the upper has no copy, and from the upper (or copied from it) otherwise.
The mount options that keep those rules complete: ``redirect_dir=off`` (a renamed directory
is copied, never a redirect xattr), ``metacopy=off`` (a copy-up copies the data, never a
metadata-only inode), ``index=off`` and ``xino=off``.

The tree written out shares inodes with the lower layer: those files must never be written in
place afterwards (see :func:`~sidusctl.subsys.treecopy.unshare_tree`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sidusctl.core.log import get_logger
from sidusctl.subsys.mounts import mount, umount_tree
from sidusctl.subsys.treecopy import copy_meta, make_special

log = get_logger("overlayroot")

OPTIONS = ("redirect_dir=off", "metacopy=off", "index=off", "xino=off")
_OVERLAY_XATTR = "trusted.overlay."


@dataclass(frozen=True)
class OverlayRoot:
    """A mounted overlay: ``lower`` (read-only, never written), ``upper`` and ``work`` (both
    under ``layers``, on the filesystem of ``lower``) and the mount point ``merged``."""

    lower: Path
    layers: Path
    merged: Path

    @property
    def upper(self) -> Path:
        """The upper layer, ``<layers>/upper``: every write to ``merged`` lands there."""
        return self.layers / "upper"

    @property
    def work(self) -> Path:
        """overlayfs' work directory, ``<layers>/work``."""
        return self.layers / "work"

    def umount(self) -> None:
        """Unmount ``merged`` and anything mounted below it (a chroot session left nothing
        there, but a failed one might have)."""
        umount_tree(self.merged)


def mount_overlay(lower: Path, layers: Path, merged: Path) -> OverlayRoot:
    """Mount an overlay of ``lower`` on ``merged`` (created if missing, must be empty), with
    its upper and work directories made under ``layers`` (which must not exist, and must be on
    the filesystem of ``lower``: the materialized tree hard-links across them). The upper root
    gets ``lower``'s owner, mode and xattrs: overlayfs shows the upper root's. Raises
    :class:`~sidusctl.core.errors.CommandError` if the mount fails (no overlay support, an
    upper filesystem without xattrs)."""
    ov = OverlayRoot(lower, layers, merged)
    layers.mkdir(mode=0o700)
    ov.upper.mkdir()
    ov.work.mkdir()
    copy_meta(str(lower), str(ov.upper), os.lstat(lower))
    merged.mkdir(exist_ok=True)
    mount("overlay", merged, "overlay",
          [f"lowerdir={lower}", f"upperdir={ov.upper}", f"workdir={ov.work}", *OPTIONS])
    return ov


@dataclass
class Materialized:
    """What :func:`materialize` wrote: regular files ``linked`` from the lower layer,
    ``from_upper`` (hard-linked or copied, ``bytes_from_upper`` of them), and ``known``: the
    content digests (from ``lower_files``) of the files linked from the lower layer, by path
    relative to the root (for :func:`~sidusctl.subsys.treecopy.tree_digest_files`)."""

    linked: int = 0
    from_upper: int = 0
    bytes_from_upper: int = 0
    known: dict[str, str] = field(default_factory=dict)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, _OVERLAY_XATTR + "opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def _strip_overlay_xattrs(path: str) -> None:
    with contextlib.suppress(OSError):
        for x in os.listxattr(path, follow_symlinks=False):
            if x.startswith(_OVERLAY_XATTR):
                os.removexattr(path, x, follow_symlinks=False)


def materialize(lower: Path, upper: Path, dest: Path, *, link_upper: bool,
                lower_files: Mapping[str, str] | None = None) -> Materialized:
    """Write the merged view of the overlay layers ``lower`` + ``upper`` (mounted with
    :data:`OPTIONS`, or not mounted at all: the layers are read, never written) into ``dest``
    (an empty directory, or absent). Regular files the upper layer does not hold are
    hard-linked from ``lower``; those it holds are hard-linked from it with ``link_upper``
    (their ``trusted.overlay.*`` xattrs removed: only when the overlay is unmounted and its
    upper layer is then discarded), else copied. Types, modes, owners, xattrs (but overlayfs'
    own), mtimes and hard links within the tree are kept, as ``cp -a`` would.
    ``lower_files``: content digests of ``lower``'s files, passed on in the result for those
    linked. All three must be on one filesystem. Raises OSError on any failure; a partial
    ``dest`` is left for the caller to remove."""
    res = Materialized()
    lower_files = lower_files or {}
    seen: dict[tuple[int, int], str] = {}  # an upper inode copied (not linked) -> first path
    dest.mkdir(exist_ok=True)
    root_src = str(upper)
    dirs: list[tuple[str, os.stat_result, str]] = [(str(dest), os.lstat(root_src), root_src)]
    # (relative dir, read its lower side, read its upper side)
    stack: list[tuple[str, bool, bool]] = [("", True, True)]
    while stack:
        reldir, has_lower, has_upper = stack.pop()
        ups: dict[str, os.DirEntry[str]] = {}
        opaque = False
        if has_upper:
            udir = os.path.join(upper, reldir)
            with os.scandir(udir) as it:
                ups = {e.name: e for e in it}
            opaque = _is_opaque(udir)
        lows: dict[str, os.DirEntry[str]] = {}
        if has_lower and not opaque:
            with os.scandir(os.path.join(lower, reldir)) as it:
                lows = {e.name: e for e in it}
        for name in sorted(ups.keys() | lows.keys()):
            rel = os.path.join(reldir, name)
            d = os.path.join(dest, rel)
            ue, le = ups.get(name), lows.get(name)
            if ue is not None:
                st = ue.stat(follow_symlinks=False)
                if _is_whiteout(st):
                    continue
                if stat.S_ISDIR(st.st_mode):
                    os.mkdir(d, 0o700)
                    dirs.append((d, st, ue.path))
                    # (an opaque upper directory hides the lower one: seen when it is read)
                    stack.append((rel, le is not None and le.is_dir(follow_symlinks=False),
                                  True))
                    continue
                if stat.S_ISREG(st.st_mode):
                    res.from_upper += 1
                    res.bytes_from_upper += st.st_size
                    if link_upper:
                        os.link(ue.path, d)
                        _strip_overlay_xattrs(d)
                        continue
                    ino = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and ino in seen:
                        os.link(os.path.join(dest, seen[ino]), d)
                        continue
                    seen[ino] = rel
                    shutil.copyfile(ue.path, d, follow_symlinks=False)
                else:
                    make_special(ue.path, d, st)
                copy_meta(ue.path, d, st, skip_prefix=_OVERLAY_XATTR)
                continue
            assert le is not None
            st = le.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(d, 0o700)
                dirs.append((d, st, le.path))
                stack.append((rel, True, False))
                continue
            if stat.S_ISREG(st.st_mode):
                os.link(le.path, d)
                res.linked += 1
                sha = lower_files.get(rel)
                if sha is not None:
                    res.known[rel] = sha
                continue
            make_special(le.path, d, st)
            copy_meta(le.path, d, st)
    for d, st, p in reversed(dirs):  # children first: their creation moved the mtimes
        copy_meta(p, d, st, skip_prefix=_OVERLAY_XATTR)
    return res
