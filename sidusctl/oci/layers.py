"""Layer application: OCI/Docker layer tars applied onto a rootfs directory, bottom layer first,
streamed (never read whole into memory), every write confined to the target root.

What the OCI image spec (image-spec v1.1, ``layer.md``) asks and what this module does:

- Layers are tar archives, plain, gzip or zstd compressed (detected by magic bytes,
  :mod:`sidusctl.oci.streams`). Each layer's blob digest (compressed bytes) is checked
  against the manifest descriptor and its uncompressed digest against
  ``config.rootfs.diff_ids[i]`` while streaming.
- ``<dir>/.wh.<name>`` deletes ``<dir>/<name>`` of lower layers; ``<dir>/.wh..wh..opq`` deletes
  every lower-layer child of ``<dir>``. Neither hides entries of its own layer, wherever the
  whiteout sits in the tar (entries of the current layer are tracked by path).
- A non-directory entry replaces whatever is at its path (unlinked first, so hard-link peers
  keep their content); a directory over a directory merges (metadata from the new header).
- Hard links may name files of lower layers. Numeric uid/gid, mode (setuid/setgid/sticky
  included), mtimes, xattrs (``SCHILY.xattr.*`` and ``LIBARCHIVE.xattr.*`` PAX records),
  character/block devices and fifos are kept (``security.selinux`` labels are not: they belong
  to the build host's policy).

Safety: every path is walked component by component from an ``O_DIRECTORY`` fd of the root
with ``O_NOFOLLOW``; nothing is ever opened through a symlink. Entry names or hard-link
targets that are absolute or contain ``..``, an entry below a symlink (from any layer), a
hard link to a missing path or a directory, and a whiteout naming ``.``/``..`` make
:class:`UnsafeImageError`; the caller discards the partial rootfs.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import os
import shutil
import stat
import tarfile
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

import zstandard

from sidusctl.core.errors import WriteError
from sidusctl.core.state import NO_ROOM
from sidusctl.oci import ImageError, UnsafeImageError
from sidusctl.oci.streams import CHUNK, HashingReader, Readable, decompressor

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"
WH_META = ".wh..wh."  # aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): ignored

# SELinux labels describe the build host's policy, not the image (umoci skips them too)
IGNORED_XATTRS = frozenset({"security.selinux"})


@dataclass
class LayerStats:
    """What applying one layer did: ``digest`` (blob) and ``diff_id`` (uncompressed) as
    computed, ``compression``, byte counts, entries written and paths whited out."""

    index: int
    digest: str = ""
    diff_id: str = ""
    compression: str = ""
    compressed_bytes: int = 0
    uncompressed_bytes: int = 0
    entries: int = 0
    whiteouts: int = 0


def split_name(name: str, what: str = "entry") -> list[str]:
    """Tar member name -> path components under the root. ``./`` prefixes and empty or ``.``
    components are dropped; absolute names and ``..`` components raise UnsafeImageError."""
    if name.startswith("/"):
        raise UnsafeImageError(f"{what} '{name}' is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeImageError(f"{what} '{name}' contains a '..' component")
    return parts


def _xattrs(m: tarfile.TarInfo) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for k, v in m.pax_headers.items():
        if k.startswith("SCHILY.xattr."):
            out[k[len("SCHILY.xattr."):]] = v.encode("utf-8", "surrogateescape")
        elif k.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(k[len("LIBARCHIVE.xattr."):])
            out[name] = base64.b64decode(v + "=" * (-len(v) % 4))
    return out


@dataclass
class _DirCache:
    """Open directory fds keyed by path tuple; flushed whenever something is removed."""

    fds: dict[tuple[str, ...], int] = field(default_factory=dict)

    def clear(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def drop(self, prefix: tuple[str, ...]) -> None:
        """Forget (and close) the fds of ``prefix`` and everything below it."""
        n = len(prefix)
        for k in [k for k in self.fds if k[:n] == prefix]:
            with contextlib.suppress(OSError):
                os.close(self.fds.pop(k))


class LayerApplier:
    """Applies layers onto ``root`` (an existing, normally empty directory), in order.

    Usage: ``with LayerApplier(root) as a: a.apply(stream, ...)`` for each layer, bottom
    first. On leaving the block the recorded directory mtimes are restored (creating children
    changes a directory's mtime). Every error is an :class:`ImageError` naming the layer and
    the entry; the caller discards ``root``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        self.root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        self._cache = _DirCache()
        self._dir_times: dict[tuple[str, ...], int] = {}
        self._upper: set[tuple[str, ...]] = set()
        self._upper_anc: set[tuple[str, ...]] = set()
        self._layer = ""

    def __enter__(self) -> LayerApplier:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self._restore_dir_times()
        finally:
            self._cache.clear()
            os.close(self.root_fd)

    # -- path walking ---------------------------------------------------------------------
    def _dir_fd(self, parts: tuple[str, ...], create: bool) -> int | None:
        """fd of the directory ``parts`` (never through a symlink). Missing directories are
        made (0755, root) when ``create``, else None is returned."""
        if not parts:
            return self.root_fd
        fd = self._cache.fds.get(parts)
        if fd is not None:
            return fd
        parent = self._dir_fd(parts[:-1], create)
        if parent is None:
            return None
        name = parts[-1]
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(name, 0o755, dir_fd=parent)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            p = "/".join(parts)
            st = os.lstat(name, dir_fd=parent)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(name, dir_fd=parent)
                raise UnsafeImageError(
                    f"{self._layer}: a path goes through '{p}', a symlink (-> {target}); "
                    "writing through symlinks could escape the rootfs") from None
            if not create:
                return None
            raise ImageError(
                f"{self._layer}: '{p}' is used as a directory but is not one") from None
        self._cache.fds[parts] = fd
        return fd

    def _lstat(self, dfd: int, name: str) -> os.stat_result | None:
        try:
            return os.lstat(name, dir_fd=dfd)
        except FileNotFoundError:
            return None

    def _remove(self, dfd: int, parts: tuple[str, ...], st: os.stat_result) -> None:
        name = parts[-1]
        if stat.S_ISDIR(st.st_mode):
            self._cache.drop(parts)
            shutil.rmtree(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)

    # -- whiteouts --------------------------------------------------------------------------
    def _remove_lower(self, dfd: int, parts: tuple[str, ...]) -> int:
        """Delete what lower layers put at ``parts``, keeping this layer's entries."""
        name = parts[-1]
        st = self._lstat(dfd, name)
        if st is None:
            return 0
        if parts in self._upper or parts in self._upper_anc:
            if not stat.S_ISDIR(st.st_mode):
                return 0
            sub = self._dir_fd(parts, create=False)
            assert sub is not None
            n = 0
            for child in os.listdir(sub):
                n += self._remove_lower(sub, (*parts, child))
            return n
        self._remove(dfd, parts, st)
        return 1

    def _whiteout(self, parts: list[str], member: str) -> int:
        base = parts[-1]
        dparts = tuple(parts[:-1])
        dfd = self._dir_fd(dparts, create=False)
        if base == WH_OPAQUE:
            if dfd is None:
                return 0
            n = 0
            for child in os.listdir(dfd):
                n += self._remove_lower(dfd, (*dparts, child))
            return n
        if base.startswith(WH_META):
            return 0
        target = base[len(WH_PREFIX):]
        if target in ("", ".", ".."):
            raise UnsafeImageError(f"{self._layer}: whiteout '{member}' names '{target}'")
        if dfd is None:
            return 0
        return self._remove_lower(dfd, (*dparts, target))

    # -- entries ----------------------------------------------------------------------------
    def _metadata(self, dfd: int, name: str, m: tarfile.TarInfo, fd: int | None = None,
                  is_link: bool = False) -> None:
        # Order matters: chown clears setuid/setgid bits and file capabilities, so it goes first.
        if fd is not None:
            os.fchown(fd, m.uid, m.gid)
            os.fchmod(fd, stat.S_IMODE(m.mode))
        else:
            os.chown(name, m.uid, m.gid, dir_fd=dfd, follow_symlinks=False)
            if not is_link:
                os.chmod(name, stat.S_IMODE(m.mode), dir_fd=dfd)
        xattrs = _xattrs(m)
        if xattrs:
            target: int | str = fd if fd is not None else f"/proc/self/fd/{dfd}/{name}"
            for k, v in xattrs.items():
                if k in IGNORED_XATTRS:
                    continue
                try:
                    if isinstance(target, int):
                        os.setxattr(target, k, v)
                    else:
                        os.setxattr(target, k, v, follow_symlinks=False)
                except OSError as e:
                    raise ImageError(f"{self._layer}: cannot set xattr {k} on '{m.name}': "
                                     f"{e.strerror}") from e
        mtime_ns = int(m.mtime * 1_000_000_000)
        if fd is not None:
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        else:
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=dfd, follow_symlinks=False)

    def _clear_xattrs(self, fd: int) -> None:
        for k in os.listxattr(fd):
            with contextlib.suppress(OSError):
                os.removexattr(fd, k)

    def _entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo, parts: list[str]) -> None:
        key = tuple(parts)
        self._upper.add(key)
        for i in range(len(parts)):
            self._upper_anc.add(key[:i])
        if not parts:  # the root itself ("./"): owner and mode only
            if m.isdir():
                os.fchown(self.root_fd, m.uid, m.gid)
                os.fchmod(self.root_fd, stat.S_IMODE(m.mode))
                self._dir_times[()] = int(m.mtime * 1_000_000_000)
            return
        dfd = self._dir_fd(key[:-1], create=True)
        assert dfd is not None
        name = parts[-1]
        st = self._lstat(dfd, name)
        if m.isdir():
            if st is not None and not stat.S_ISDIR(st.st_mode):
                self._remove(dfd, key, st)
                st = None
            if st is None:
                os.mkdir(name, 0o700, dir_fd=dfd)
            fd = self._dir_fd(key, create=False)
            assert fd is not None
            if st is not None:
                self._clear_xattrs(fd)
            self._metadata(dfd, name, m, fd=fd)
            self._dir_times[key] = int(m.mtime * 1_000_000_000)
            return
        if m.islnk():
            tparts = split_name(m.linkname, f"{self._layer}: hard link '{m.name}' target")
            if tparts == parts:
                return
            tdfd = self._dir_fd(tuple(tparts[:-1]), create=False)
            tst = self._lstat(tdfd, tparts[-1]) if tdfd is not None and tparts else None
            if tst is None or stat.S_ISDIR(tst.st_mode):
                raise UnsafeImageError(
                    f"{self._layer}: hard link '{m.name}' -> '{m.linkname}': the target is "
                    f"{'a directory' if tst is not None else 'missing'} in the rootfs")
            if st is not None:
                if stat.S_ISDIR(st.st_mode) and tparts[:len(parts)] == parts:
                    raise ImageError(f"{self._layer}: hard link '{m.name}' replaces the "
                                     f"directory holding its own target '{m.linkname}'")
                self._remove(dfd, key, st)
            assert tdfd is not None
            os.link(tparts[-1], name, src_dir_fd=tdfd, dst_dir_fd=dfd, follow_symlinks=False)
            return
        if st is not None:
            self._remove(dfd, key, st)
        if m.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=dfd)
            try:
                src = tf.extractfile(m)
                if src is not None and m.size:
                    left = m.size
                    while left > 0:
                        buf = src.read(min(CHUNK, left))
                        if not buf:
                            raise ImageError(f"{self._layer}: '{m.name}' is truncated")
                        _write_all(fd, buf)
                        left -= len(buf)
                self._metadata(dfd, name, m, fd=fd)
            finally:
                os.close(fd)
        elif m.issym():
            os.symlink(m.linkname, name, dir_fd=dfd)
            self._metadata(dfd, name, m, is_link=True)
        elif m.ischr() or m.isblk():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=dfd)
            self._metadata(dfd, name, m)
        elif m.isfifo():
            os.mkfifo(name, 0o600, dir_fd=dfd)
            self._metadata(dfd, name, m)
        else:
            raise ImageError(f"{self._layer}: '{m.name}' has an unsupported tar type {m.type!r}")

    def _restore_dir_times(self) -> None:
        self._cache.clear()
        # A recorded directory may since have been deleted or replaced (by a file, or by a
        # symlink on its path): only directories still reachable without symlinks get theirs.
        for parts, ns in sorted(self._dir_times.items(), key=lambda kv: -len(kv[0])):
            if not parts:
                os.utime(self.root_fd, ns=(ns, ns))
                continue
            try:
                dfd = self._dir_fd(parts[:-1], create=False)
            except ImageError:
                continue
            if dfd is None:
                continue
            st = self._lstat(dfd, parts[-1])
            if st is not None and stat.S_ISDIR(st.st_mode):
                os.utime(parts[-1], ns=(ns, ns), dir_fd=dfd, follow_symlinks=False)
        self._cache.clear()

    # -- one layer --------------------------------------------------------------------------
    def apply(self, blob: Readable, *, index: int, label: str = "", digest: str | None = None,
              diff_id: str | None = None, size: int | None = None, whiteouts: bool = True,
              on_bytes: Callable[[int], None] | None = None) -> LayerStats:
        """Apply one layer blob (a stream of its bytes, compressed or not).

        ``digest``/``size``: the manifest descriptor's (checked on the compressed bytes);
        ``diff_id``: ``config.rootfs.diff_ids[index]`` (checked on the uncompressed tar);
        ``whiteouts=False`` for a flat ``docker export`` tarball; ``on_bytes(n)`` is called as
        compressed bytes are read. Raises ImageError / UnsafeImageError.
        """
        self._layer = f"layer {index + 1}" + (f" ({label})" if label else "")
        self._upper = set()
        self._upper_anc = set()
        raw = HashingReader(blob)
        raw.on_read = on_bytes
        stats = LayerStats(index=index)
        try:
            stats.compression, stream = decompressor(raw)
            tarred = HashingReader(stream)
            with tarfile.open(fileobj=tarred, mode="r:",  # type: ignore[call-overload]
                              errors="surrogateescape") as tf:
                for m in _members(tf):
                    tf.members.clear()  # tarfile keeps every header otherwise
                    if len(self._cache.fds) > 256:
                        self._cache.clear()
                    parts = split_name(m.name, f"{self._layer}: entry")
                    if whiteouts and parts and parts[-1].startswith(WH_PREFIX):
                        stats.whiteouts += self._whiteout(parts, m.name)
                        continue
                    try:
                        self._entry(tf, m, parts)
                    except ImageError:
                        raise
                    except OSError as e:
                        if e.errno in NO_ROOM:  # the store's disk, not the image, is at fault
                            raise WriteError(f"{self._layer}: cannot write '{m.name}' in "
                                             f"{self.root} ({e.strerror or e})", e) from e
                        raise ImageError(f"{self._layer}: cannot write '{m.name}': "
                                         f"{e.strerror or e}") from e
                    stats.entries += 1
            tarred.drain()
            raw.drain()
        except (tarfile.TarError, EOFError, zstandard.ZstdError, zlib.error,
                io.UnsupportedOperation) as e:
            raise ImageError(f"{self._layer} is truncated or corrupt: {e}") from e
        except OSError as e:
            if isinstance(e, ImageError | WriteError):
                raise
            raise ImageError(f"{self._layer}: read error: {e}") from e
        stats.digest, stats.diff_id = raw.digest, tarred.digest
        stats.compressed_bytes, stats.uncompressed_bytes = raw.bytes, tarred.bytes
        if size is not None and raw.bytes != size:
            raise ImageError(f"{self._layer}: blob is {raw.bytes} bytes, the manifest says {size}")
        if digest and digest.startswith("sha256:") and raw.digest != digest:
            raise ImageError(f"{self._layer}: blob digest {raw.digest} does not match the "
                             f"manifest's {digest}")
        if diff_id and stats.diff_id != diff_id:
            raise ImageError(f"{self._layer}: uncompressed digest {stats.diff_id} does not match "
                             f"the config's diff_id {diff_id}")
        return stats


def _write_all(fd: int, buf: bytes) -> None:
    view = memoryview(buf)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while True:
        m = tf.next()
        if m is None:
            return
        yield m


def apply_layers(root: str | os.PathLike[str],
                 layers: list[tuple[IO[bytes], dict[str, object]]]) -> list[LayerStats]:
    """Convenience: apply ``(stream, kwargs for LayerApplier.apply)`` pairs in order."""
    out = []
    with LayerApplier(root) as a:
        for i, (f, kw) in enumerate(layers):
            out.append(a.apply(f, index=i, **kw))  # type: ignore[arg-type]
    return out
