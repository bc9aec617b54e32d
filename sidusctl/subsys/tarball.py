"""Rootfs tarballs: what LXC (``lxc-create -t local``), Distem (``tar xf`` into the vnode's
directory) and ``sidusctl vnode`` extract as-is.

Written with GNU tar: numeric owners, xattrs (all namespaces, file capabilities included), ACLs,
device nodes, fifos, hard links and sparse files kept; compressed with zstd (multi-threaded) or
gzip (pigz when present), chosen by the destination's suffix. Written to a temp file and renamed,
so a reader never sees half a tarball.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from sidusctl.core.errors import ConfigError
from sidusctl.core.run import run, which

COMPRESSIONS = {".tar.zst": "zstd", ".tar.gz": "gzip", ".tgz": "gzip", ".tar.xz": "xz", ".tar": "none"}


def compression_for(dest: Path) -> str:
    """``zstd``, ``gzip``, ``xz`` or ``none`` from the file name; ConfigError otherwise."""
    for suffix, comp in COMPRESSIONS.items():
        if dest.name.endswith(suffix):
            return comp
    raise ConfigError(str(dest), None, "unknown tarball suffix",
                      expected="one of " + ", ".join(COMPRESSIONS))


def _compressor(comp: str, level: int | None = None) -> list[str]:
    if comp == "zstd":
        return [which("zstd", "zstd"), "-T0", f"-{level or 3}", "-q"]
    if comp == "gzip":
        return [shutil.which("pigz") or which("gzip", "gzip"), "-6"]
    if comp == "xz":
        return [which("xz", "xz-utils"), "-T0", "-6"]
    return []


TAR_FLAGS = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--sparse",
             "--one-file-system"]


def write_rootfs_tar(rootfs: Path, dest: Path, level: int | None = None) -> int:
    """Archive the tree ``rootfs`` (entries named ``./...``) into ``dest``; returns its size in
    bytes. ``level``: zstd compression level (default 3). Raises :class:`CommandError` if tar
    fails (full disk included)."""
    comp = compression_for(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    argv = [which("tar", "tar"), *TAR_FLAGS, "-C", str(rootfs), "-cf", str(tmp)]
    c = _compressor(comp, level)
    if c:
        argv[1:1] = ["--use-compress-program", " ".join(c)]
    try:
        run([*argv, "."], what="tar (rootfs export)")
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return dest.stat().st_size


def extract_rootfs_tar(src: Path, dest: Path) -> None:
    """Extract a rootfs tarball made by :func:`write_rootfs_tar` (or LXC/Distem-style) into
    ``dest``, keeping owners, modes, xattrs and devices."""
    dest.mkdir(parents=True, exist_ok=True)
    comp = compression_for(src)
    argv = [which("tar", "tar"), "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls",
            "--same-permissions", "--same-owner", "-C", str(dest), "-xf", str(src)]
    c = _compressor(comp)
    if c:
        argv[1:1] = ["--use-compress-program", c[0]]
    run(argv, what="tar (rootfs extract)")
