"""Squashfs images of a directory tree: ``mksquashfs`` (Debian package squashfs-tools) wrapped
so that the same tree always gives the same bytes.

Owns one file per call: written to a temporary name beside the destination, flushed, and
renamed into place, so a reader (a node downloading it, ganesha serving it) never sees a half
file. Reproducibility (squashfs-tools 4.5 ``-reproducible``): inodes are numbered in sorted
traversal order, ``-mkfs-time 0`` fixes the superblock time, and the files keep their own
times, owners, modes and extended attributes (``security.capability`` matters to a root
filesystem), which are part of "the same tree". zstd compression (squashfs format 4.0,
compressor id 6). :func:`tree_fingerprint` says cheaply (metadata only) whether a tree changed
since an export.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sidusctl.core.errors import SidusError
from sidusctl.core.log import get_logger
from sidusctl.core.run import run, which
from sidusctl.subsys.treecopy import file_sha256

log = get_logger("squashfs")

#: zstd level: 6 packs a Debian root about as small as 15 (within a few %) in half the time
DEFAULT_LEVEL = 6
#: the squashfs block size (bytes): mksquashfs's default, 128 KiB
BLOCK_SIZE = 131072
SQUASHFS_MAGIC = b"hsqs"  # little-endian 0x73717368, the superblock's first four bytes


@dataclass(frozen=True)
class SquashInfo:
    """An exported file: ``path``, ``size`` (bytes) and ``sha256`` (hex of the whole file)."""

    path: Path
    size: int
    sha256: str


def tree_fingerprint(tree: Path) -> str:
    """A SHA-256 (hex) over every entry of ``tree`` (not following symlinks, not crossing
    mount points): relative path, type and mode, owner, size, mtime in ns, symlink target.
    Metadata only, so cheap (a stat per file); any change a build or an update makes to the
    tree changes it. Raises :class:`SidusError` if ``tree`` is not a directory."""
    if not tree.is_dir():
        raise SidusError(f"{tree} is not a directory")
    h = hashlib.sha256()
    root_dev = tree.stat().st_dev
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            p = here / name
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            rel = str(p.relative_to(tree))
            target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else ""
            h.update(f"{rel}\0{st.st_mode:o}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0"
                     f"{st.st_mtime_ns}\0{target}\n".encode(errors="surrogateescape"))
        # do not descend into another filesystem (a leftover mount inside a rootfs)
        dirnames[:] = [d for d in dirnames if (here / d).lstat().st_dev == root_dev
                       and not (here / d).is_symlink()]
    return h.hexdigest()


def valid_exclude(pattern: str) -> bool:
    """Whether ``pattern`` can be an exclude of :func:`build`: not empty, relative to the
    tree (no leading ``/``) and not climbing out of it (no ``..`` component)."""
    return bool(pattern) and not pattern.startswith("/") and ".." not in pattern.split("/")


def _log_warnings(lines: Sequence[str]) -> None:
    """Log what mksquashfs said while packing, each distinct line once with how many times it
    came (it warns once per file). The usual one is "Unrecognised xattr prefix
    system.posix_acl_access": squashfs stores the ``user.``, ``trusted.`` and ``security.``
    extended attributes only (squashfs-tools' xattr support), so POSIX ACLs are not in the
    file, and a node sees the plain mode bits unless something sets them again at boot."""
    counts = collections.Counter(line.strip() for line in lines if line.strip())
    for line, n in counts.items():
        log.warning("mksquashfs: %s%s", line, f" ({n} times)" if n > 1 else "")


def build(tree: Path, dest: Path, *, level: int = DEFAULT_LEVEL,
          processors: int | None = None, exclude: Sequence[str] = ()) -> SquashInfo:
    """Pack ``tree`` into the squashfs file ``dest`` (zstd ``level`` 1-22; ``processors``:
    mksquashfs threads, default all), reproducibly: the same tree gives the same bytes.
    ``exclude``: patterns relative to ``tree`` left out of the file (mksquashfs ``-wildcards``:
    ``*`` and ``?`` match within one path component, so ``var/lib/apt/lists/*`` keeps the
    directory and drops what it holds). ``dest`` appears complete or not at all (temp file +
    fsync + rename). What mksquashfs warns about (POSIX ACLs, which squashfs cannot hold) is
    logged as warnings. Raises :class:`~sidusctl.core.errors.PrerequisiteError` without
    squashfs-tools, :class:`~sidusctl.core.errors.CommandError` if mksquashfs fails,
    :class:`SidusError` if ``tree`` is not a directory or a pattern is absolute, empty or
    climbs out of the tree."""
    if not tree.is_dir():
        raise SidusError(f"cannot export {tree}: not a directory")
    if not 1 <= level <= 22:
        raise SidusError(f"zstd level {level} is out of range (expected 1-22)")
    for pat in exclude:
        if not valid_exclude(pat):
            raise SidusError(f"exclude pattern {pat!r}: expected a path relative to the tree "
                             "(no leading '/', no '..')")
    exe = which("mksquashfs", "squashfs-tools")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    argv = [exe, str(tree), str(tmp), "-noappend", "-comp", "zstd",
            "-Xcompression-level", str(level), "-b", str(BLOCK_SIZE),
            "-reproducible", "-mkfs-time", "0", "-no-progress", "-quiet"]
    if processors:
        argv += ["-processors", str(processors)]
    if exclude:
        # -e and its list come last on mksquashfs's command line
        argv += ["-wildcards", "-e", *exclude]
    log.info("squashfs: packing %s into %s (zstd %d)", tree, dest, level)
    said: list[str] = []
    try:
        # -quiet leaves only mksquashfs's warnings and errors on its output
        run(argv, what="mksquashfs", on_line=said.append)
        _log_warnings(said)
        with open(tmp, "rb") as f:
            if f.read(4) != SQUASHFS_MAGIC:
                raise SidusError(f"mksquashfs wrote {tmp} without a squashfs superblock")
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    info = SquashInfo(dest, dest.stat().st_size, file_sha256(dest))
    log.info("squashfs: %s, %d bytes, sha256 %s", dest, info.size, info.sha256[:16])
    return info
