"""The stage cache: the root as it stands after the package stage, kept under
``<state>/cache/stages/<key>/`` and restored by the next build whose package-stage inputs have
the same digest (the key), so that only the later stages run.

An entry is ``rootfs/`` (a btrfs subvolume when the state directory is on btrfs) and
``entry.json`` (:class:`EntryInfo`: the inputs, the tree digest of ``rootfs`` taken when it was
written, its size), written last; the whole entry is made under a temp name
(``.tmp-<key>-<pid>``) and renamed into place, so a half-written entry is never seen under its
key. At use the restored copy is digested again and compared: an entry that does not match
(damaged on disk, truncated by hand) is reported, deleted and rebuilt, never used. The cache
has a size limit (:data:`DEFAULT_MAX_BYTES` unless given): beyond it the least recently used
entries are evicted. A flock (``.lock``) serialises restores, writes and evictions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sidusctl import __version__
from sidusctl.core.errors import CommandError, StateError
from sidusctl.core.log import get_logger
from sidusctl.core.state import FileLock, write_json
from sidusctl.image.common import du
from sidusctl.subsys.manifest import Count, JsonObject, Record
from sidusctl.subsys.overlayroot import Materialized, OverlayRoot, materialize, mount_overlay
from sidusctl.subsys.treecopy import (
    copy_method,
    copy_tree,
    copy_tree_linking,
    create_dir_for_tree,
    remove_tree,
    tree_digest_files,
)

log = get_logger("stagecache")

DEFAULT_MAX_BYTES = 8 * 2**30


class EntryInfo(Record):
    """``entry.json`` of a cache entry: ``key``, the ``inputs`` it is the digest of, the
    ``tree_sha256`` of its rootfs (:func:`~sidusctl.subsys.treecopy.tree_digest`), ``entries``
    and ``bytes`` (on disk), the packages the stage ``purged``, when and by which sidusctl it
    was ``created``."""

    key: str
    inputs: JsonObject
    tree_sha256: str
    entries: Count
    bytes: Count
    purged: tuple[str, ...] = ()
    created: str
    sidusctl: str
    initrd_basis: str = ""
    """The key whose package stage decides the initrd of this root: the entry's own key, or,
    for a root made by a delta install that changed nothing an initramfs reads, its base's
    basis (see :meth:`StageCache.base_for`)."""


@dataclass(frozen=True)
class Entry:
    """One complete entry: its directory, :class:`EntryInfo` and last use (epoch seconds)."""

    dir: Path
    info: EntryInfo
    last_used: float

    @property
    def key(self) -> str:
        """The entry's cache key, as its ``entry.json`` records it."""
        return self.info.key


@dataclass(frozen=True)
class Restored:
    """What :meth:`StageCache.restore` did: ``info`` set when the root was restored (by
    ``method``); otherwise ``reason`` says why not, ``damaged`` when an entry existed but
    failed its check (and was deleted)."""

    reason: str
    info: EntryInfo | None = None
    method: str = ""
    damaged: bool = False
    files: Mapping[str, str] = field(default_factory=dict)
    """sha256 of each regular file of the restored tree as checked, by relative path."""
    copied_before_ns: int = 0
    """A ctime (ns) after the copy finished (copies only): files of the restored tree changed
    later have one at least as late."""
    overlay: OverlayRoot | None = None
    """Set when the root was restored as an overlay on the entry (``method`` "overlay"): the
    caller writes it out with :meth:`StageCache.finish_overlay` (or lets the build fail)."""


def stage_key(inputs: Mapping[str, object]) -> str:
    """The cache key of a stage's inputs: sha256 of their canonical JSON, 32 hex digits."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def explain_miss(inputs: Mapping[str, object], earlier: Mapping[str, object] | None,
                 where: str) -> str:
    """Why the package stage has to run, by comparing its ``inputs`` with those ``earlier``
    recorded by the generation ``where``: ``key 'packages' changed (added: less)``..."""
    if not earlier:
        return ("no cache entry for these inputs (" + (f"{where} records none to compare with"
                if where else "no earlier build of this image") + ")")
    changed = []
    for k in sorted(set(inputs) | set(earlier)):
        a, b = earlier.get(k), inputs.get(k)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            added = [x for x in b if x not in a]
            removed = [x for x in a if x not in b]
            detail = ", ".join(filter(None, (f"added: {' '.join(map(str, added))}" if added else "",
                                             f"removed: {' '.join(map(str, removed))}" if removed else "")))
            changed.append(f"key '{k}' changed ({detail or 'order'})")
        elif k == "releases" and isinstance(a, dict) and isinstance(b, dict):
            new = sorted(s for s in b if a.get(s) != b[s])
            changed.append(f"the archive published a new InRelease for {', '.join(new)}")
        elif k == "stage_version":
            changed.append("the package stage's code changed (new sidusctl)")
        else:
            changed.append(f"key '{k}' changed ({a!r} -> {b!r})")
    if not changed:
        return f"same inputs as {where}, but no cache entry for them (pruned or evicted)"
    return "; ".join(changed) + f" since {where}"


class StageCache:
    """The entries under ``<state_dir>/cache/stages``; ``max_bytes``: the size limit."""

    def __init__(self, state_dir: Path, max_bytes: int | None = None) -> None:
        self.dir = state_dir / "cache" / "stages"
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        lk = FileLock(self.dir / ".lock", "the stage cache").acquire(wait=True)
        try:
            yield
        finally:
            lk.release()

    # -- queries ----------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Complete entries, most recently used first (temp directories and entries without a
        readable ``entry.json`` are not listed)."""
        out = []
        for d in sorted(self.dir.iterdir()) if self.dir.is_dir() else []:
            if d.name.startswith(".") or not d.is_dir():
                continue
            try:
                info = EntryInfo.parse((d / "entry.json").read_bytes(), str(d / "entry.json"))
            except (OSError, StateError):
                continue
            used = d / "used"
            last = used.stat().st_mtime if used.exists() else (d / "entry.json").stat().st_mtime
            out.append(Entry(d, info, last))
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def base_for(self, inputs: Mapping[str, object]) -> Entry | None:
        """The entry a delta install of ``inputs`` can start from, or None: one whose inputs
        are the same in every key but ``packages``, and whose packages are a strict subset of
        those of ``inputs`` (so installing the missing ones on its root gives the stage's
        result). Of several, the one with the most packages, then the most recently used."""
        want = inputs.get("packages")
        if not isinstance(want, list):
            return None
        rest = {k: v for k, v in inputs.items() if k != "packages"}
        best: Entry | None = None
        for e in self.entries():  # most recently used first
            have = e.info.inputs.get("packages")
            if not isinstance(have, list) or not set(have) < set(want):
                continue
            if {k: v for k, v in e.info.inputs.items() if k != "packages"} != rest:
                continue
            if best is None or len(have) > len(best.info.inputs["packages"]):  # type: ignore[arg-type]
                best = e
        return best

    def total_bytes(self) -> int:
        """The size on disk of all complete entries in bytes, as their ``entry.json`` recorded it
        at write (nothing is measured)."""
        return sum(e.info.bytes for e in self.entries())

    # -- use ----------------------------------------------------------------------------------
    def restore(self, key: str, dest: Path, layers: Path | None = None) -> Restored:
        """Copy the entry ``key``'s root to ``dest`` (which must not exist) and check it against
        the digest recorded at write. A damaged entry is deleted (and ``dest`` removed).

        ``layers`` (a path that does not exist, on the entry's filesystem): where the cheapest
        copy would be a plain ``cp -a`` (no snapshot, no reflink) and ``dest`` is on the
        entry's filesystem, the entry is checked in place instead and mounted read-only as the
        lower layer of an overlay on ``dest`` (overlayfs), its upper and work directories under
        ``layers``: nothing is copied; ``Restored.overlay`` is set and the entry is pinned (not
        evicted) until :meth:`finish_overlay` or :meth:`release_overlay`. If the overlay cannot
        be mounted, the entry is copied. Raises OSError if the entry cannot be read."""
        d = self.dir / key
        with self._locked():
            if not d.is_dir():
                return Restored(reason="no cache entry for these inputs")
            try:
                info = EntryInfo.parse((d / "entry.json").read_bytes(), str(d / "entry.json"))
            except (OSError, StateError) as e:
                self._remove(d)
                return Restored(reason=f"cache entry {key} was damaged ({e}): deleted",
                                damaged=True)
            (d / "used").touch()
            # (the write-out hard-links from the entry: only within one filesystem)
            overlay = (layers is not None
                       and copy_method(d / "rootfs", dest.parent, probe_from=d) == "copy"
                       and d.stat().st_dev == dest.parent.stat().st_dev)
            if overlay:
                self._pin(d)  # (kept from eviction while it is a lower layer)
        if overlay:
            assert layers is not None
            try:
                return self._restore_overlay(d, info, dest, layers)
            except CommandError as e:
                log.warning("no overlay on cache entry %s (%s): copying it", key, e)
                with contextlib.suppress(CommandError):
                    remove_tree(layers)
        return self._restore_copy(d, info, dest)

    def _restore_copy(self, d: Path, info: EntryInfo, dest: Path) -> Restored:
        key = info.key
        with self._locked():
            if not d.is_dir():
                return Restored(reason=f"cache entry {key} was deleted meanwhile")
            try:
                method = copy_tree(d / "rootfs", dest)
            except CommandError as e:
                remove_tree(dest)
                self._remove(d)
                return Restored(reason=f"cache entry {key} was damaged (copy failed: {e}): deleted",
                                damaged=True)
            mark = _ctime_now(dest.parent)
        check = tree_digest_files(dest)
        digest, entries = check.sha256, check.entries
        if digest != info.tree_sha256 or entries != info.entries:
            remove_tree(dest)
            with self._locked():
                self._remove(d)
            return Restored(reason=f"cache entry {key} was damaged (its tree digest {digest[:12]} "
                                   f"differs from {info.tree_sha256[:12]} recorded when it was "
                                   "written): deleted", damaged=True)
        return Restored(reason=f"restored from cache entry {key} ({method})", info=info,
                        method=method, files=check.files, copied_before_ns=mark)

    def _restore_overlay(self, d: Path, info: EntryInfo, dest: Path, layers: Path) -> Restored:
        key = info.key
        check = tree_digest_files(d / "rootfs")
        if check.sha256 != info.tree_sha256 or check.entries != info.entries:
            with self._locked():
                self._unpin(d)
                self._remove(d)
            return Restored(reason=f"cache entry {key} was damaged (its tree digest "
                                   f"{check.sha256[:12]} differs from {info.tree_sha256[:12]} "
                                   "recorded when it was written): deleted", damaged=True)
        try:
            ov = mount_overlay(d / "rootfs", layers, dest)
        except BaseException:
            self._unpin(d)
            raise
        return Restored(reason=f"restored from cache entry {key} (overlay)", info=info,
                        method="overlay", files=check.files, overlay=ov)

    def finish_overlay(self, res: Restored) -> Materialized:
        """Unmount the overlay of an overlay restore (:meth:`restore` with ``layers``) and
        write its merged tree as a plain directory on its mount point: files the build did not
        change are hard-links of the entry's (which must then never be written in place:
        :func:`~sidusctl.subsys.treecopy.unshare_tree`), the others are the upper layer's
        own inodes; then delete the layers and unpin the entry. Raises OSError (the caller
        removes the partial tree)."""
        ov = res.overlay
        assert ov is not None and res.info is not None
        try:
            ov.umount()
            made = materialize(ov.lower, ov.upper, ov.merged, link_upper=True)
            remove_tree(ov.layers)
            log.info("root written out from the overlay on cache entry %s: %d file(s) linked "
                     "from it, %d from the build (%d bytes)", res.info.key, made.linked,
                     made.from_upper, made.bytes_from_upper)
            return made
        finally:
            self._unpin(self.dir / res.info.key)

    def release_overlay(self, res: Restored) -> None:
        """After a failed build: unmount the overlay of ``res`` (if still mounted) and unpin
        its entry; the layers go with the failed generation."""
        if res.overlay is not None and res.info is not None:
            try:
                res.overlay.umount()
            finally:
                self._unpin(self.dir / res.info.key)

    def _pin(self, d: Path) -> None:
        (d / f"pin-{os.getpid()}").touch()

    def _unpin(self, d: Path) -> None:
        with contextlib.suppress(OSError):
            (d / f"pin-{os.getpid()}").unlink()

    @staticmethod
    def _pinned(d: Path) -> bool:
        """True when a live process has ``d`` mounted as an overlay's lower layer."""
        for p in d.glob("pin-*"):
            pid = p.name.removeprefix("pin-")
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                return True
        return False

    def save(self, key: str, inputs: JsonObject, root: Path, purged: tuple[str, ...],
             initrd_basis: str = "", base: Restored | None = None) -> Entry:
        """Store a copy of ``root`` as entry ``key`` (written under a temp name, renamed), then
        evict least recently used entries beyond the size limit. ``initrd_basis``: see
        :attr:`EntryInfo.initrd_basis` (default: ``key``). ``base``: the restore ``root`` began
        as (a delta install); where the copy would be a plain ``cp -a`` (no snapshot, no
        reflink), the files ``root`` still holds unchanged from it are hard-linked from its entry
        (:func:`~sidusctl.subsys.treecopy.copy_tree_linking`) and not read again for the digest:
        the new entry costs what the delta changed. Such entries share inodes, so a file damaged
        by hand in one is found damaged in every entry that holds it; and the size of each
        counts its linked files (the limit then evicts early, never late). Raises CommandError
        or OSError if the copy fails (full disk); the temp entry is then removed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-{key}-{os.getpid()}"
        final = self.dir / key
        try:
            tmp.mkdir()
            rootfs = tmp / "rootfs"
            method = ("overlay" if base is not None and base.overlay is not None
                      else copy_method(root, tmp))
            known: dict[str, str] = {}
            if method == "snapshot":
                copy_tree(root, rootfs, method)
            else:
                # a subvolume on btrfs (so later restores can snapshot it), filled by reflink
                create_dir_for_tree(rootfs)
                base_root = (self.dir / base.info.key / "rootfs"
                             if base is not None and base.info is not None else None)
                if base is not None and base.overlay is not None:
                    # ``root`` is the overlay on the base entry: its lower files are linked,
                    # its upper ones (still the build's to change) copied
                    made = materialize(base.overlay.lower, base.overlay.upper, rootfs,
                                       link_upper=False, lower_files=base.files)
                    known = made.known
                    log.info("stage cache entry %s: %d file(s) hard-linked from %s, %d copied "
                             "(%d bytes)", key, made.linked, base.overlay.lower.parent.name,
                             made.from_upper, made.bytes_from_upper)
                elif method == "copy" and base is not None and base_root is not None \
                        and base_root.is_dir():
                    linked = copy_tree_linking(root, rootfs, base_root, base.files,
                                               base.copied_before_ns)
                    known = linked.known
                    log.info("stage cache entry %s: %d file(s) hard-linked from %s, %d copied "
                             "(%d bytes)", key, linked.linked, base_root.parent.name,
                             linked.copied, linked.bytes_copied)
                else:
                    copy_tree(root, rootfs, method)
            check = tree_digest_files(rootfs, known)
            digest, entries = check.sha256, check.entries
            info = EntryInfo(key=key, inputs=inputs, tree_sha256=digest, entries=entries,
                             bytes=du(rootfs), purged=purged, sidusctl=__version__,
                             initrd_basis=initrd_basis or key,
                             created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            write_json(tmp / "entry.json", info.to_json())
            (tmp / "used").touch()
            with self._locked():
                if final.exists():
                    self._remove(final)
                os.rename(tmp, final)
                self._evict(keep={key})
        except BaseException:
            with contextlib.suppress(Exception):
                self._remove(tmp)
            raise
        return Entry(final, info, time.time())

    # -- eviction ---------------------------------------------------------------------------
    def prune(self, max_bytes: int | None = None) -> list[Entry]:
        """Evict least recently used entries until the total is at most ``max_bytes`` (default:
        the cache's limit) and delete temp directories of dead writers. Returns the evicted."""
        with self._locked():
            return self._evict(keep=set(), max_bytes=max_bytes)

    def _evict(self, keep: set[str], max_bytes: int | None = None) -> list[Entry]:
        limit = self.max_bytes if max_bytes is None else max_bytes
        for d in self.dir.iterdir():
            if d.name.startswith(".tmp-"):
                pid = d.name.rsplit("-", 1)[-1]
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    self._remove(d)
        entries = self.entries()
        total = sum(e.info.bytes for e in entries)
        evicted = []
        for e in reversed(entries):  # least recently used first
            if total <= limit:
                break
            if e.key in keep or self._pinned(e.dir):
                continue
            log.info("stage cache: evicting %s (%d bytes, last used %s)", e.key, e.info.bytes,
                     time.ctime(e.last_used))
            self._remove(e.dir)
            total -= e.info.bytes
            evicted.append(e)
        return evicted

    def remove(self, key: str) -> None:
        """Delete entry ``key`` (nothing if absent). Raises StateError if a running build has
        it mounted as an overlay's lower layer."""
        with self._locked():
            if self._pinned(self.dir / key):
                raise StateError(f"stage cache entry {key} is in use by a running build "
                                 "(the lower layer of its root); not deleting it")
            self._remove(self.dir / key)

    def _remove(self, d: Path) -> None:
        if (d / "rootfs").exists():
            remove_tree(d / "rootfs")
        if d.exists():
            remove_tree(d)


def _ctime_now(directory: Path) -> int:
    """The ctime (ns) a change made now in ``directory``'s filesystem gets (the kernel's coarse
    clock, which stamps ctimes: not ``time.time_ns()``)."""
    probe = directory / f".sidusctl-ctime-{os.getpid()}"
    probe.touch()
    try:
        return probe.lstat().st_ctime_ns
    finally:
        probe.unlink()
