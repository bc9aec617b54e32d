"""The vnode store under ``<state>/vnode/``::

    vnode/
        .lock              flock: every change of state.json happens under it
        state.json         vnetworks, vnodes, store settings (atomic writes)
        btrfs.img          loop-backed btrfs file (``vnode init --btrfs-image SIZE``), if any
        store/             the filesystem root: btrfs (cow possible) or a plain directory
            images/<key>/  each image unpacked once (a subvolume on btrfs), key = content hash
            shared/<key>/  the one copy shared by the ``shared``-mode vnodes of this host
            vnodes/<name>/rootfs   a running vnode's root (snapshot or copy), deleted at stop
        lxc/<name>/        LXC config, console log and LXC log of each vnode

The store's btrfs (an image file or a device) is mounted again on demand (after a reboot).

Host sysctls: many containers need higher inotify limits (:data:`sidusctl.subsys.lxc.HOST_SYSCTLS`).
``init`` and ``ready`` (every vnode start) raise them, logging each change at info level first,
and record the previous values in ``state.json`` (``store.host_sysctls``:
``{key: {"before": old, "set": new}}``); ``deinit`` puts the previous values back, each only if
the host still holds the value we set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import shutil
import time
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidusctl.core.errors import (
    BusyError,
    ConfigError,
    NotFoundError,
    PrerequisiteError,
    StateError,
)
from sidusctl.core.log import get_logger
from sidusctl.core.run import run
from sidusctl.core.state import FileLock, ensure_dir, read_json, write_error, write_json
from sidusctl.subsys import btrfs, lxc, mounts
from sidusctl.subsys.cgroups import IoLimit, MemLimits
from sidusctl.subsys.imagestore import Image, ImageStore
from sidusctl.subsys.tarball import COMPRESSIONS, check_rootfs_tar, extract_rootfs_tar
from sidusctl.vnode.model import VIface, VNetwork, VNode

log = get_logger("vnode.store")
_SYSCTLS = "host_sysctls"  # key in State.store


@dataclass
class State:
    """The decoded state.json: ``store`` settings, ``vnetworks`` and ``vnodes`` by name."""

    store: dict[str, Any]
    vnetworks: dict[str, VNetwork]
    vnodes: dict[str, VNode]
    hashes: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """The state.json document: ``version`` 1, ``store``, ``hashes``, and each vnetwork and
        vnode as its ``to_dict()``, by name."""
        return {"version": 1, "store": self.store, "hashes": self.hashes,
                "vnetworks": {k: v.to_dict() for k, v in self.vnetworks.items()},
                "vnodes": {k: v.to_dict() for k, v in self.vnodes.items()}}

    @classmethod
    def from_dict(cls, d: Any, where: str = "state.json") -> State:
        """The state of a state.json document (a missing key: empty); ``version`` is not read.
        :class:`StateError` naming ``where`` (the file) and the key when the document is not
        of that shape: not an object, ``store``/``hashes``/``vnetworks``/``vnodes`` not
        objects, an entry (or a vnode's viface) with an unknown or missing key."""
        if not isinstance(d, dict):
            raise StateError(f"{where}: not a vnode state (a JSON object expected, "
                             f"found {type(d).__name__})")
        for key in ("store", "hashes", "vnetworks", "vnodes"):
            if not isinstance(d.get(key, {}), dict):
                raise StateError(f"{where}: {key}: a JSON object expected, found "
                                 f"{type(d[key]).__name__}")
        return cls(store=dict(d.get("store", {})), hashes=dict(d.get("hashes", {})),
                   vnetworks={k: _entry(where, f"vnetworks.{k}", VNetwork, v)
                              for k, v in d.get("vnetworks", {}).items()},
                   vnodes={k: _entry(where, f"vnodes.{k}", VNode, v)
                           for k, v in d.get("vnodes", {}).items()})


def _check_keys(where: str, key: str, cls: type[Any], v: object) -> None:
    """StateError unless ``v`` is a dict with every required field of dataclass ``cls``
    and no other key."""
    if not isinstance(v, dict):
        raise StateError(f"{where}: {key}: a JSON object expected, found {type(v).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    for k in v:
        if k not in names:
            raise StateError(f"{where}: {key}: unexpected key {k!r}")
    for k in required:
        if k not in v:
            raise StateError(f"{where}: {key}: missing key {k!r}")
    hints = _hints(cls)
    for k, value in v.items():
        if k != "ifaces" and not _of_type(hints[k], value):
            tp = hints[k]
            shown = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
            raise StateError(f"{where}: {key}.{k}: found {value!r:.60}, expected {shown}")


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _of_type(tp: Any, v: object) -> bool:
    """Whether JSON value ``v`` fits field type ``tp`` (str, int, finite float, bool, None,
    unions of them, list, dict; anything else is not checked)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_of_type(a, v) for a in typing.get_args(tp))
    if tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return (isinstance(v, int | float) and not isinstance(v, bool)
                and math.isfinite(v))
    if tp is str:
        return isinstance(v, str)
    if (origin or tp) in (list, dict):
        return isinstance(v, origin or tp)
    return True


def _entry(where: str, key: str, cls: type[VNetwork] | type[VNode], v: object) -> Any:
    """``cls.from_dict(v)`` after :func:`_check_keys` (and, for a vnode, of each viface);
    StateError naming ``where`` and ``key`` for anything it cannot decode."""
    _check_keys(where, key, cls, v)
    assert isinstance(v, dict)
    if cls is VNode:
        ifaces = v.get("ifaces", [])
        if not isinstance(ifaces, list):
            raise StateError(f"{where}: {key}.ifaces: a JSON list expected, found "
                             f"{type(ifaces).__name__}")
        for i, iface in enumerate(ifaces):
            _check_keys(where, f"{key}.ifaces[{i}]", VIface, iface)
        # the limits' own fields, as set_limits stores them (MemLimits, IoLimit)
        if "mem" in v:
            _check_keys(where, f"{key}.mem", MemLimits, v["mem"])
        for i, io in enumerate(v.get("io") or []):
            _check_keys(where, f"{key}.io[{i}]", IoLimit, io)
    try:
        return cls.from_dict(v)
    except (TypeError, AttributeError, KeyError, ValueError) as e:
        raise StateError(f"{where}: {key}: cannot decode ({e})") from e


def load_btrfs_module() -> None:
    """Load the btrfs module when the kernel has it as one (Debian's kernels do): until
    something mounts a btrfs, /proc/filesystems does not list it, and a pnode freshly booted
    from the network has mounted none. Quiet and harmless where btrfs is built in, loaded
    already, or absent (:func:`sidusctl.subsys.btrfs.require` then says so)."""
    modprobe = shutil.which("modprobe") or ("/usr/sbin/modprobe"
                                            if Path("/usr/sbin/modprobe").exists() else None)
    if modprobe is not None:
        run([modprobe, "-q", "btrfs"], check=False, what="modprobe btrfs")


def check_init_args(btrfs_device: str | None, btrfs_image: int | None) -> None:
    """:class:`ConfigError` for ``vnode init`` arguments that cannot work: both a device and
    an image, or a device that is not a block device. Reads only: call it before any change."""
    if btrfs_device and btrfs_image:
        raise ConfigError("vnode init", "btrfs", "give --btrfs-device or --btrfs-image, not both")
    if btrfs_device and not Path(btrfs_device).is_block_device():
        raise ConfigError("vnode init", "--btrfs-device", f"{btrfs_device} is not a block device")


class Store:
    """The vnode store of one state directory (see the module doc for the layout)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.base = state_dir / "vnode"
        self.root = self.base / "store"
        self.lxcpath = self.base / "lxc"
        self.state_file = self.base / "state.json"
        self.lock_file = self.base / ".lock"
        self.image_file = self.base / "btrfs.img"

    # -- state -----------------------------------------------------------------------------
    def load(self) -> State:
        """The state from ``state.json``, empty if the file does not exist; the lock is not taken
        (:meth:`read` and :meth:`transaction` take it). :class:`StateError` naming the file if
        it is unreadable or not a vnode state (:meth:`State.from_dict`)."""
        try:
            d = read_json(self.state_file)
        except FileNotFoundError:
            d = {}
        return State.from_dict(d, str(self.state_file))

    def save(self, st: State) -> None:
        """Write ``st`` to ``state.json`` atomically; the caller holds the lock
        (:meth:`transaction`)."""
        write_json(self.state_file, st.to_dict())

    @contextlib.contextmanager
    def transaction(self) -> Iterator[State]:
        """Hold the lock, yield the state, save it if the block succeeds (not if it raises).
        One exception: host sysctls the block raised (:meth:`raise_host_sysctls`) are recorded
        even when it raises, so that ``deinit`` still puts them back. :class:`StateError`
        when the store's directory cannot be made (:func:`ensure_dir`) or the state is bad."""
        with self.locked():
            st = self.load()
            try:
                yield st
            except BaseException:
                self._keep_sysctls(st)
                raise
            self.save(st)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock for the block, waiting for it; a command that has to wait
        says so once, naming the holder's pid. :class:`StateError` when the store's
        directory or the lock file cannot be made."""
        ensure_dir(self.base)
        lock = FileLock(self.lock_file, "the vnode store")
        try:
            lock.acquire()
        except BusyError as e:
            log.info("waiting for the vnode store: %s", e.message)
            lock.acquire(wait=True)
        try:
            yield
        finally:
            lock.release()

    def _keep_sysctls(self, st: State) -> None:
        rec = st.store.get(_SYSCTLS)
        if not rec:
            return
        disk = self.load()
        if disk.store.get(_SYSCTLS) != rec:
            disk.store[_SYSCTLS] = rec
            self.save(disk)

    def read(self) -> State:
        """The state, read under the lock (a consistent snapshot). :class:`StateError` as
        :meth:`transaction` raises it."""
        with self.locked():
            return self.load()

    # -- filesystem ------------------------------------------------------------------------
    def init(self, st: State, *, btrfs_device: str | None = None,
             btrfs_image: int | None = None) -> str:
        """Prepare ``store/``: format ``btrfs_device`` or a ``btrfs_image``-byte loop file and
        mount it there, or use it as is. Returns ``btrfs`` or ``plain``. The arguments are
        checked (:func:`check_init_args`) before anything changes. A loop file that cannot
        be made (:class:`WriteError`) or formatted (CommandError: mkfs.btrfs on a full disk)
        is removed."""
        check_init_args(btrfs_device, btrfs_image)
        sysctls = st.store.get(_SYSCTLS)
        if st.vnodes and (btrfs_device or btrfs_image):
            raise StateError(f"the vnode store has {len(st.vnodes)} vnode(s); destroy them "
                             "before formatting a new store")
        ensure_dir(self.root)
        if btrfs_device or btrfs_image:
            load_btrfs_module()
            btrfs.require()
            self.unmount()
            if btrfs_device:
                btrfs.mkfs(Path(btrfs_device))
                st.store = {"backing": "device", "device": btrfs_device}
            else:
                assert btrfs_image is not None
                self.image_file.unlink(missing_ok=True)
                try:
                    with open(self.image_file, "wb") as f:
                        f.truncate(btrfs_image)
                    btrfs.mkfs(self.image_file)
                except OSError as e:
                    self.image_file.unlink(missing_ok=True)
                    raise write_error(e, self.image_file) from e
                except BaseException:
                    # a file mkfs could not format (a full disk) is no store: not left behind
                    self.image_file.unlink(missing_ok=True)
                    raise
                st.store = {"backing": "image", "image": str(self.image_file), "size": btrfs_image}
            self.ensure_mounted(st)
        else:
            st.store = {"backing": "dir"}
        st.store["fs"] = "btrfs" if btrfs.is_btrfs(self.root) else "plain"
        if sysctls:  # a second init keeps what the first one must restore
            st.store[_SYSCTLS] = sysctls
        self.raise_host_sysctls(st)
        for sub in ("images", "shared", "vnodes"):
            (self.root / sub).mkdir(exist_ok=True)
        return str(st.store["fs"])

    def raise_host_sysctls(self, st: State) -> None:
        """Raise the host limits vnodes need (:func:`sidusctl.subsys.lxc.raise_host_sysctls`,
        logged at info before each change) and record in ``st.store["host_sysctls"]`` the value
        each had, for :meth:`deinit`. A value recorded earlier is kept: after a reboot the
        kernel's default comes back, and that is still what ``deinit`` must restore."""
        changed = lxc.raise_host_sysctls()
        if changed:
            rec = dict(st.store.get(_SYSCTLS) or {})
            for key, v in changed.items():
                old = rec.get(key)
                before = old["before"] if isinstance(old, dict) and "before" in old else v["before"]
                rec[key] = {"before": before, "set": v["set"]}
            st.store[_SYSCTLS] = rec

    def restore_host_sysctls(self, st: State) -> None:
        """Put back the host sysctls recorded by :meth:`raise_host_sysctls` (each only if it
        still holds the value we set; see :func:`sidusctl.subsys.lxc.restore_host_sysctls`)
        and forget them."""
        rec = st.store.pop(_SYSCTLS, None)
        if isinstance(rec, dict) and rec:
            lxc.restore_host_sysctls(rec)

    def ensure_mounted(self, st: State) -> None:
        """Mount the store's btrfs if it is device- or image-backed and not mounted (reboot)."""
        backing = st.store.get("backing")
        if backing not in ("image", "device") or mounts.is_mountpoint(self.root):
            return
        src = st.store["image"] if backing == "image" else st.store["device"]
        if not Path(src).exists():
            raise StateError(f"the vnode store's btrfs {src} is missing",
                             hint="run 'sidusctl vnode init' again")
        ensure_dir(self.root)
        opts = ["loop"] if backing == "image" else []
        mounts.mount(src, self.root, "btrfs", opts)

    def unmount(self) -> None:
        """Unmount the store's root and anything below it, if the root is a mount point."""
        if self.root.exists() and mounts.is_mountpoint(self.root):
            mounts.umount_tree(self.root)

    def is_btrfs(self, st: State) -> bool:
        """Whether the store's root is on btrfs, after mounting a device- or image-backed store
        (:meth:`ensure_mounted`, whose errors go through)."""
        self.ensure_mounted(st)
        return self.root.exists() and btrfs.is_btrfs(self.root)

    def ready(self, st: State) -> None:
        """Make sure the store exists (a plain directory if ``init`` was never run)."""
        if not st.store or set(st.store) == {_SYSCTLS}:
            self.init(st)
        else:
            self.raise_host_sysctls(st)
        self.ensure_mounted(st)
        for sub in ("images", "shared", "vnodes"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- images ----------------------------------------------------------------------------
    def resolve_image(self, st: State, image: str) -> tuple[str, Path, str]:
        """``image`` (a name in the image store, or a rootfs tarball path) ->
        ``(key, source, kind)`` where kind is ``tarball`` or ``rootfs``. The key is the sha256
        of the tarball (cached by path, size and mtime) or, for a rootfs-only image, of its
        manifest and generation. NotFoundError if neither exists."""
        img = self.find_image(image)
        if isinstance(img, Path):
            return self._file_key(st, img), img, "tarball"
        if img.tarball is not None:
            return self._file_key(st, img.tarball), img.tarball, "tarball"
        h = hashlib.sha256()
        h.update(str(img.dir).encode())
        if img.manifest_path.exists():
            h.update(img.manifest_path.read_bytes())
        return h.hexdigest()[:32], img.rootfs, "rootfs"

    def find_image(self, image: str) -> Path | Image:
        """``image`` as :meth:`resolve_image` reads it, nothing hashed: a tarball path (one with
        a ``/`` or a compression suffix) as its resolved path, else the image store's
        :class:`Image` of that name. NotFoundError if it does not exist, ConfigError for a path
        that is no regular file (a directory)."""
        if "/" in image or any(image.endswith(s) for s in COMPRESSIONS):
            p = Path(image)
            if not p.is_file():
                if p.exists():
                    raise ConfigError(image, None, "is not a regular file",
                                      expected="a rootfs tarball (.tar, .tar.gz, .tar.xz, "
                                               ".tar.zst) or an image name")
                raise NotFoundError(f"image tarball {image} does not exist")
            check_rootfs_tar(p)
            return p.resolve()
        store = ImageStore(self.state_dir, recover=False)
        try:
            return store.get(image)
        except (NotFoundError, ConfigError) as e:
            raise NotFoundError(f"unknown image {image!r}: not in the image store "
                                f"{store.root} and not a tarball path") from e

    def _file_key(self, st: State, path: Path) -> str:
        s = path.stat()
        stamp = f"{path}:{s.st_size}:{s.st_mtime_ns}"
        if stamp in st.hashes:
            return st.hashes[stamp]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(4 << 20):
                h.update(chunk)
        key = h.hexdigest()[:32]
        st.hashes[stamp] = key
        return key

    def cached_image(self, key: str) -> Path:
        """Where image ``key`` is unpacked: ``store/images/<key>`` (not checked to exist)."""
        return self.root / "images" / key

    def unpack(self, st: State, key: str, source: Path, kind: str) -> Path:
        """The image ``key`` unpacked in the cache (unpacked now if it is not yet); on btrfs a
        subvolume, so that cow vnodes are snapshots of it. Returns its directory."""
        dest = self.cached_image(key)
        done = dest.parent / f"{key}.complete"
        if done.exists() and dest.is_dir():
            return dest
        self._remove_tree(dest)
        t0 = time.monotonic()
        if self.is_btrfs(st):
            btrfs.subvolume_create(dest)
        else:
            dest.mkdir(parents=True)
        try:
            if kind == "tarball":
                extract_rootfs_tar(source, dest)
            else:
                run(["cp", "-a", "--reflink=auto", f"{source}/.", str(dest)],
                    what=f"copy of {source}")
        except BaseException:
            self._remove_tree(dest)
            raise
        done.write_text(f"{source}\n")
        log.info("image %s unpacked into the vnode cache in %.1f s", key[:12],
                 time.monotonic() - t0)
        return dest

    # -- vnode roots -----------------------------------------------------------------------
    def vnode_dir(self, name: str) -> Path:
        """Vnode ``name``'s own directory, ``store/vnodes/<name>`` (its ``rootfs`` while it
        runs)."""
        return self.root / "vnodes" / name

    def shared_root(self, key: str) -> Path:
        """The one root of image ``key`` that ``shared``-mode vnodes use: ``store/shared/<key>``."""
        return self.root / "shared" / key

    def make_root(self, st: State, vn: VNode) -> Path:
        """Give ``vn`` its root per its fs mode; returns the rootfs path."""
        src = self.cached_image(vn.image_key)
        if vn.fs == "shared":
            shared = self.shared_root(vn.image_key)
            if not (shared.parent / f"{vn.image_key}.complete").exists():
                self._remove_tree(shared)
                self._copy(st, src, shared)
                (shared.parent / f"{vn.image_key}.complete").write_text("")
            return shared
        d = self.vnode_dir(vn.name)
        self.remove_root(st, vn)  # what a killed command left (an export snapshot...)
        d.mkdir(parents=True, exist_ok=True)
        root = d / "rootfs"
        if vn.fs == "cow":
            if not self.is_btrfs(st):
                raise PrerequisiteError("fs mode 'cow' needs the vnode store on btrfs",
                                        hint="sidusctl vnode init --btrfs-image SIZE")
            btrfs.snapshot(src, root)
        else:
            self._copy(st, src, root)
        return root

    def _copy(self, st: State, src: Path, dest: Path) -> None:
        # distinct means a real private copy: no reflinks even on btrfs.
        if self.is_btrfs(st):
            btrfs.subvolume_create(dest)
        else:
            dest.mkdir(parents=True)
        run(["cp", "-a", "--reflink=never", f"{src}/.", str(dest)], what=f"copy of {src}")

    def rootfs_of(self, vn: VNode) -> Path:
        """Where ``vn``'s root is: its image's shared root in ``shared`` mode, else
        ``<vnode_dir>/rootfs``; not checked to exist."""
        if vn.fs == "shared":
            return self.shared_root(vn.image_key)
        return self.vnode_dir(vn.name) / "rootfs"

    def shared_users(self, st: State, vn: VNode) -> list[str]:
        """The other ``shared``-mode vnodes of ``vn``'s image that use its shared root: those
        recorded RUNNING or FROZEN, or, when none is, those whose container LXC has in any
        state but stopped (a command killed after lxc-start, before it recorded the start,
        leaves one recorded READY). Sorted names."""
        others = [o for o in st.vnodes.values()
                  if o.fs == "shared" and o.name != vn.name and o.image_key == vn.image_key]
        users = [o.name for o in others if o.state != "READY"]
        if not users and others:
            # one lxc-ls for all of them (a host may have thousands of shared vnodes)
            active = set(lxc.list_active(self.lxcpath))
            users = [o.name for o in others if o.name in active]
        return sorted(users)

    def remove_root(self, st: State, vn: VNode) -> None:
        """Delete ``vn``'s own data: its directory, with its snapshot or copy and any other
        subvolume in it (a read-only export snapshot a killed ``get-image`` left). A shared
        root stays while another vnode uses it (:meth:`shared_users`). :class:`StateError`
        naming what could not be deleted (a mount below it, a failed deletion)."""
        if vn.fs == "shared":
            users = self.shared_users(st, vn)
            if users:
                log.debug("shared root of %s kept: used by %s", vn.name, ", ".join(users))
            else:
                (self.root / "shared" / f"{vn.image_key}.complete").unlink(missing_ok=True)
                self._remove_tree(self.shared_root(vn.image_key))
        self._remove_tree(self.vnode_dir(vn.name))

    def _remove_tree(self, path: Path) -> None:
        """Delete ``path`` and everything below it: each btrfs subvolume in it (read-only
        ones too) deleted as such, the rest removed. :class:`StateError` naming the path when
        a mount is below it or something could not be deleted (nothing is skipped silently)."""
        if not path.exists() and not path.is_symlink():
            return
        if mounts.mounts_under(path):
            mounts.umount_tree(path)
        if mounts.mounts_under(path):
            raise StateError(f"{path} still has mounts below it; not deleting it")
        try:
            if path.is_dir() and not path.is_symlink() and btrfs.is_btrfs(path):
                self._remove_subvolumes(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        except OSError as e:
            raise StateError(f"cannot delete {path}: {e.strerror or e}"
                             + (f" ({e.filename})" if e.filename else ""),
                             hint=f"see what holds it (btrfs subvolume list {self.root})") from e

    def _remove_subvolumes(self, path: Path, depth: int = 1) -> None:
        # a subvolume is deleted whole (btrfs deletes the read-only ones too: see
        # btrfs.subvolume_delete; its inode is 256, as btrfs.is_subvolume says, on a
        # filesystem the caller knows is btrfs). The store makes subvolumes only at the top
        # of a vnode's directory (its rootfs, export snapshots), so a plain directory is
        # searched ``depth`` levels down, not through a copied root's whole tree
        if os.lstat(path).st_ino == 256:
            btrfs.subvolume_delete(path)
            return
        if depth <= 0:
            return
        with os.scandir(path) as it:
            dirs = [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
        for d in dirs:
            self._remove_subvolumes(d, depth - 1)

    def disk_used(self) -> int | None:
        """Bytes allocated on the store's btrfs filesystem (statvfs after a sync); None
        when the store's root does not exist or is not btrfs (a plain directory shares its
        filesystem with the host, whose use would not be the store's)."""
        if not self.root.exists():
            return None
        return btrfs.used_bytes(self.root) if btrfs.is_btrfs(self.root) else None

    def deinit(self, st: State) -> None:
        """Unmount the store and delete its files (no vnode may remain); restore the host
        sysctls the store raised (:meth:`restore_host_sysctls`)."""
        if st.vnodes:
            raise StateError(f"{len(st.vnodes)} vnode(s) remain: destroy them first")
        self.restore_host_sysctls(st)
        self.unmount()
        self.image_file.unlink(missing_ok=True)
        if self.root.exists() and not mounts.mounts_under(self.root):
            for sub in ("images", "shared", "vnodes"):
                p = self.root / sub
                if p.exists():
                    for child in p.iterdir():
                        if child.is_dir():
                            self._remove_tree(child)
                        else:
                            child.unlink()
            shutil.rmtree(self.root, ignore_errors=True)
        st.store = {}
        st.hashes = {}
        os.sync()
