"""Rootfs tarballs: what LXC (``lxc-create -t local``), Distem (``tar xf`` into the vnode's
directory) and ``sidusctl vnode`` extract as-is.

Written with GNU tar: numeric owners, xattrs (all namespaces, file capabilities included), ACLs,
device nodes, fifos, hard links and sparse files kept; compressed with zstd (multi-threaded) or
gzip (pigz when present), chosen by the destination's suffix. Written to a temp file and renamed,
so a reader never sees half a tarball.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from sidusctl.core.errors import ConfigError
from sidusctl.core.log import get_logger
from sidusctl.core.run import PIPE, run, spawn, which
from sidusctl.core.state import publish

log = get_logger("tarball")

# The one table of tarball names: suffix -> compressor. The first suffix of each compressor is
# its canonical one (what sidusctl writes).
COMPRESSIONS = {".tar.zst": "zstd", ".tar.gz": "gzip", ".tgz": "gzip", ".tar.xz": "xz", ".tar": "none"}


def tar_suffix(dest: Path) -> str:
    """The tarball suffix ``dest`` ends with (a key of :data:`COMPRESSIONS`); ConfigError
    naming the known ones otherwise."""
    for suffix in COMPRESSIONS:
        if dest.name.endswith(suffix):
            return suffix
    raise ConfigError(str(dest), None, "unknown tarball suffix",
                      expected="one of " + ", ".join(COMPRESSIONS))


def compression_for(dest: Path) -> str:
    """``zstd``, ``gzip``, ``xz`` or ``none`` from the file name; ConfigError otherwise."""
    return COMPRESSIONS[tar_suffix(dest)]


def suffix_for(compression: str) -> str:
    """The canonical suffix of ``compression`` (``zstd`` -> ``.tar.zst``); KeyError if unknown."""
    return next(s for s, c in COMPRESSIONS.items() if c == compression)


def canonical_suffixes() -> list[str]:
    """One suffix per compressor, in table order (``.tar.zst``, ``.tar.gz``, ``.tar.xz``,
    ``.tar``): the names sidusctl looks for beside an image."""
    return [suffix_for(c) for c in dict.fromkeys(COMPRESSIONS.values())]


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
        publish(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return dest.stat().st_size


#: how each compression's data begins: gzip (RFC 1952 section 2.3.1), xz (the .xz file
#: format, section 2.1.1.1), zstd (RFC 8878 section 3.1.1); a plain tar has ``ustar`` at offset
#: 257 of its first header (POSIX.1-2001 pax, and GNU tar's ``ustar  ``)
_MAGIC = {"gzip": (0, b"\x1f\x8b"), "xz": (0, b"\xfd7zXZ\x00"), "zstd": (0, b"\x28\xb5\x2f\xfd"),
          "none": (257, b"ustar")}


def check_rootfs_tar(src: Path) -> None:
    """:class:`ConfigError` naming ``src`` unless its first bytes are those of the compression
    its suffix names (:data:`COMPRESSIONS`): garbage, or a tarball under a wrong suffix, is
    refused before anything is unpacked. Reads 512 bytes; a damaged tarball with a right
    header is still found by tar itself."""
    comp = compression_for(src)
    offset, magic = _MAGIC[comp]
    try:
        with open(src, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise ConfigError(str(src), None, f"cannot be read: {e.strerror}") from None
    if head[offset:offset + len(magic)] != magic:
        kind = "a plain tar" if comp == "none" else f"{comp}-compressed"
        raise ConfigError(str(src), None, f"is not {kind} (its first bytes say otherwise)",
                          expected="a rootfs tarball whose suffix names its compression: "
                                   + ", ".join(COMPRESSIONS))


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


class BackgroundCompress:
    """Compress a finished plain tarball ``X.tar`` into ``X.tar.<zst|gz|xz>`` (``dest``, its
    suffix choosing the compressor as for :func:`write_rootfs_tar`) in a child process, while
    the caller goes on. :meth:`finish` waits, renames the hidden temp file ``.<dest>.tmp`` to
    ``dest`` and removes the plain tar (if the compressor fails: a warning, the plain tar is
    kept); :meth:`abandon` (error, Ctrl-C, SIGTERM) kills the child, removes the temp file and
    keeps the plain tar. ConfigError if ``dest`` has no known compressed suffix."""

    def __init__(self, src: Path, dest: Path, level: int | None = None) -> None:
        argv = _compressor(compression_for(dest), level)
        if not argv:
            raise ConfigError(str(dest), None, "not a compressed tarball name",
                              expected="a .tar.zst, .tar.gz, .tgz or .tar.xz name")
        self.src, self.dest, self.tool = src, dest, Path(argv[0]).name
        self.tmp = dest.with_name(f".{dest.name}.tmp")
        with open(self.tmp, "wb") as fo:
            self.proc = spawn([*argv, "-c"], stdin=src, stdout=fo, stderr=PIPE,
                              what=self.tool)

    def finish(self) -> None:
        """Wait for the compressor; on success rename the temp file to ``dest`` and delete the plain
        tar; if it failed (a warning, not an error), delete the temp file and keep the plain tar."""
        _, err = self.proc.popen.communicate()
        if self.proc.returncode == 0:
            publish(self.tmp, self.dest)
            self.src.unlink(missing_ok=True)
            return
        self.tmp.unlink(missing_ok=True)
        log.warning("%s left uncompressed: %s exited %s: %s", self.src, self.tool,
                    self.proc.returncode, err.decode(errors="replace").strip())

    def abandon(self) -> None:
        """Stop the compressor without grace (SIGTERM, then SIGKILL to its group) and delete the
        temp file; the plain tar stays. Idempotent."""
        self.proc.stop(grace=0)
        self.tmp.unlink(missing_ok=True)
