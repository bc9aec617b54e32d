"""Squashfs exports of image generations, for the ``squashfs-nfs`` and ``squashfs-http`` roots.

Owns ``<state>/netboot/squashfs/<image>/``::

    gen-<stamp>.squashfs     one generation's root, packed by :mod:`sidusctl.subsys.squashfs`,
                             then its dm-verity hash tree (:mod:`sidusctl.subsys.verity`)
    gen-<stamp>.json         its record: size, sha256, verity parameters, tree fingerprint,
                             creation time
    .lock                    held while an export, a prune or a removal runs

Each file is named by the generation it packs, so a new build never overwrites a file a node
is reading: nodes booted from an older generation keep reading theirs (over HTTP or NFS) until
:func:`prune` removes it, which serve-pxe does only for generations no running node holds and
beyond a retention count. An export is skipped when its record says the generation's tree
has not changed since (:func:`sidusctl.subsys.squashfs.tree_fingerprint`, with the packing
parameters: level, block size, :data:`EXCLUDE`); a new generation whose tree is identical to an
exported one gets a hard link to that file (same tree, same bytes).

What a netbooted node never reads is left out (:data:`EXCLUDE`, after LTSP's
``image.excludes``; a recipe replaces the list with ``[netboot] squashfs_exclude``, which the
generation's manifest records): every node of a squashfs-http root downloads the whole file
and its kernel checks each block it reads against the file's hash tree, so each MiB left out
is a MiB less per node per boot.

The hash tree follows the squashfs in the same file (one download, one name per
generation): a squashfs-http node whose initramfs has dm-verity reads the image through it,
checking only the blocks it reads (``sidus.verity=``); others check the whole file's SHA-256
(``sidus.sha256=``) before they mount it. Squashfs ignores what follows its own bytes, so the
same file loop-mounts as it is (squashfs-nfs).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidusctl.core.errors import BusyError, NotFoundError, SidusError, StateError
from sidusctl.core.log import get_logger
from sidusctl.core.state import (
    FileLock,
    ensure_dir,
    locked,
    read_json,
    remove_left_files,
    write_error,
    write_json,
)
from sidusctl.subsys import squashfs
from sidusctl.subsys import verity as dm_verity
from sidusctl.subsys.imagestore import Image, ImageStore

log = get_logger("squashfs")

SUFFIX = ".squashfs"
#: generations kept by :func:`prune` even when no node holds them (the newest first)
DEFAULT_RETAIN = 2
#: left out of every export (mksquashfs -wildcards patterns, relative to the root):
#: the image's own kernel and initrd (a netbooted node gets both from serve-pxe; in
#: ``minimal`` 46 MB that do not compress), and apt's package lists and caches (LTSP leaves
#: the lists out too; ``apt update`` on a node makes them again, in its writable layer).
#: In ``minimal``: a 280 MiB export becomes 186 MiB. The ``nfs`` root serves the whole tree.
EXCLUDE = ("boot/vmlinuz-*", "boot/initrd.img-*", "var/lib/apt/lists/*", "var/cache/apt/*.bin")


@dataclass(frozen=True)
class Export:
    """One exported generation: ``image``, ``generation`` (``gen-<stamp>``), ``path`` of the
    squashfs file, ``size`` (bytes), ``sha256`` (hex), ``fingerprint`` of the tree it packs
    (with the packing parameters), ``created`` (Unix time), ``exclude``: the patterns left
    out (empty for a record written before exports had excludes)."""

    image: str
    generation: str
    path: Path
    size: int
    sha256: str
    fingerprint: str
    created: float
    exclude: tuple[str, ...] = ()
    verity: dm_verity.VerityInfo | None = None

    @property
    def file(self) -> str:
        """The file's name, ``<generation>.squashfs``."""
        return self.path.name

    def as_dict(self) -> dict[str, Any]:
        """The record for JSON: every field plus ``file``, ``path`` as a string, ``exclude`` as a
        list, ``verity`` as its ``as_dict()`` (None without a hash tree)."""
        return {"image": self.image, "generation": self.generation, "file": self.file,
                "path": str(self.path), "size": self.size, "sha256": self.sha256,
                "fingerprint": self.fingerprint, "created": self.created,
                "exclude": list(self.exclude),
                "verity": None if self.verity is None else self.verity.as_dict()}


def squash_dir(state: Path, image: str) -> Path:
    """``<state>/netboot/squashfs/<image>``: where ``image``'s exports live."""
    return state / "netboot" / "squashfs" / image


def _record(d: Path, generation: str) -> Path:
    return d / f"{generation}.json"


def _load(image: str, d: Path, generation: str) -> Export | None:
    """The export of ``generation`` if its record and file are both there and agree."""
    try:
        raw = read_json(_record(d, generation))
        path = d / f"{generation}{SUFFIX}"
        tree = raw.get("verity")
        ex = Export(image, generation, path, int(raw["size"]), str(raw["sha256"]),
                    str(raw["fingerprint"]), float(raw["created"]),
                    tuple(str(x) for x in raw.get("exclude", ())),
                    None if tree is None else dm_verity.VerityInfo.from_dict(tree))
        if path.stat().st_size != ex.size:
            return None
        return ex
    except (OSError, KeyError, TypeError, ValueError, AttributeError, StateError):
        return None


def list_exports(state: Path, image: str) -> list[Export]:
    """The complete exports of ``image``, oldest first (by generation name: ``gen-<stamp>``
    sorts by time)."""
    d = squash_dir(state, image)
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob(f"gen-*{SUFFIX}")):
        ex = _load(image, d, p.name[:-len(SUFFIX)])
        if ex is not None:
            out.append(ex)
    return out


def find(state: Path, image: str, generation: str) -> Export | None:
    """The export of ``image``'s ``generation`` (``gen-<stamp>``), or None."""
    return _load(image, squash_dir(state, image), generation)


def export(state: Path, image: str, *, generation: str = "current",
           level: int = squashfs.DEFAULT_LEVEL, force: bool = False) -> tuple[Export, str]:
    """Export ``image``'s ``generation`` (``current``, ``previous`` or a ``gen-<stamp>``
    name) as a squashfs file; returns ``(export, how)``, ``how`` being ``built``,
    ``unchanged`` (the record matches the tree: nothing done) or ``linked`` (an identical
    tree was exported already: hard link). ``force`` rebuilds. Raises
    :class:`~sidusctl.core.errors.NotFoundError` for an unknown image or generation,
    :class:`~sidusctl.core.errors.StateError` naming what could not be written (a full
    or read-only state directory), :class:`~sidusctl.core.errors.NotFoundError` or
    :class:`~sidusctl.core.errors.BusyError` when the generation was removed or changed while
    it was packed (``image rm``, a new generation's prune: nothing is exported then), and
    what :func:`sidusctl.subsys.squashfs.build` raises. Waits while another export or a
    prune of the image runs; removes the temp files of one killed meanwhile."""
    img = _generation(state, image, generation)
    gen = img.dir.name
    d = ensure_dir(squash_dir(state, image))
    with locked(d / ".lock", f"squashfs exports of '{image}'", wait=True):
        _remove_temp_files(d)
        exclude = exclude_of(img)
        fp = _fingerprint(img.rootfs, level, exclude)
        have = _load(image, d, gen)
        if have is not None and have.fingerprint == fp and not force:
            log.info("squashfs: %s %s unchanged (%s)", image, gen, have.path)
            return have, "unchanged"
        dest = d / f"{gen}{SUFFIX}"
        twin = next((e for e in list_exports(state, image)
                     if e.fingerprint == fp and e.generation != gen), None)
        how = "built"
        if twin is not None and not force:
            tmp = d / f".{dest.name}.link-{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.link(twin.path, tmp)
            os.replace(tmp, dest)
            size, sha256, tree = twin.size, twin.sha256, twin.verity
            how = "linked"
            log.info("squashfs: %s %s has the same tree as %s: linked", image, gen,
                     twin.generation)
        else:
            size, sha256, tree = _build(img, dest, level, exclude, fp)
        ex = Export(image, gen, dest, size, sha256, fp, time.time(), exclude, tree)
        rec = ex.as_dict()
        del rec["path"]
        write_json(_record(d, gen), rec)
        return ex, how


def _remove_temp_files(d: Path) -> None:
    """Remove the temp files (``.gen-*`` and ``..gen-*``: the packed file before its hash
    tree, mksquashfs's output, a link, a record being written) of exports killed before they
    could, hundreds of MiB each. Called with the directory's lock held: every export and
    prune holds it, so any temp file there is a dead holder's."""
    remove_left_files([d], ".*gen-*", "an export")


def _changed(img: Image, level: int, exclude: tuple[str, ...], fp: str) -> SidusError | None:
    """The error to raise when generation ``img`` is no longer the tree fingerprinted as
    ``fp``: removed (``image rm``, a prune) or changed while it was packed; None if it is the
    same."""
    what = f"generation {img.dir.name} of image '{img.name}'"
    if not img.rootfs.is_dir():
        return NotFoundError(f"{what} was removed while it was being packed (by another "
                             "sidusctl command); nothing exported")
    try:
        same = _fingerprint(img.rootfs, level, exclude) == fp
    except (OSError, SidusError):
        same = False
    if same:
        return None
    return BusyError(f"{what} changed while it was being packed (another sidusctl command "
                     "changed or removed it); nothing exported", hint="run it again")


def _build(img: Image, dest: Path, level: int, exclude: tuple[str, ...],
           fp: str) -> tuple[int, str, dm_verity.VerityInfo]:
    """Pack ``img``'s rootfs and append the hash tree, on a temp name renamed to ``dest`` when
    complete; the file's size, SHA-256 and verity parameters. The salt is the packed
    squashfs's SHA-256: the same tree still gives the same bytes. :class:`WriteError`
    naming ``dest`` when the hash tree cannot be written (the temp file is removed);
    :class:`NotFoundError` or :class:`BusyError` when the tree is no longer the one
    fingerprinted as ``fp`` once packed (removed or changed meanwhile by another command:
    the file would hold part of it), ``dest`` then as it was."""
    tmp = dest.with_name(f".{dest.name}.verity-{os.getpid()}")
    try:
        try:
            info = squashfs.build(img.rootfs, tmp, level=level, exclude=exclude)
        except SidusError as e:  # mksquashfs fails when files vanish under it
            gone = _changed(img, level, exclude, fp)
            if gone is None:
                raise
            raise gone from e
        changed = _changed(img, level, exclude, fp)
        if changed is not None:
            raise changed
        try:
            tree, sha256 = dm_verity.append_tree(tmp, bytes.fromhex(info.sha256))
            os.replace(tmp, dest)
        except OSError as e:  # the hash tree did not fit: a full disk
            raise write_error(e, dest) from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    size = dest.stat().st_size
    log.info("squashfs: %s, %d bytes with its hash tree (%d blocks), sha256 %s, verity root %s",
             dest, size, tree.tree_blocks, sha256[:16], tree.root_hash[:16])
    return size, sha256, tree


def exclude_of(img: Image) -> tuple[str, ...]:
    """What the exports of generation ``img`` leave out: its recipe's ``[netboot]
    squashfs_exclude`` as its manifest recorded it, else :data:`EXCLUDE` (no such key: a
    recipe that does not set it, an imported image, a generation built before the key
    existed; and, with a warning, a manifest that cannot be read: nodes still get a root)."""
    try:
        recipe = img.manifest.recipe
    except StateError as e:
        log.warning("squashfs: %s; leaving out the default list (%s)", e, ", ".join(EXCLUDE))
        return EXCLUDE
    netboot = recipe.values.get("netboot") if recipe is not None else None
    listed = netboot.get("squashfs_exclude") if isinstance(netboot, dict) else None
    if isinstance(listed, list | tuple):
        return tuple(str(x) for x in listed)
    return EXCLUDE


def _fingerprint(rootfs: Path, level: int, exclude: tuple[str, ...]) -> str:
    """The tree's fingerprint with what else decides the file's bytes (zstd level, block
    size, the hash tree's algorithm and block size, the patterns left out): an export made
    with other parameters, or before exports had a hash tree, is not "unchanged"."""
    tree = f"verity-{dm_verity.ALGORITHM}-{dm_verity.BLOCK}"
    packing = f"zstd-{level}\0b{squashfs.BLOCK_SIZE}\0{tree}\0" + "\0".join(exclude)
    return hashlib.sha256(f"{squashfs.tree_fingerprint(rootfs)}\0{packing}".encode()).hexdigest()


def _generation(state: Path, image: str, generation: str) -> Image:
    store = ImageStore(state, recover=False)
    if generation in ("current", "previous"):
        return store.get(image, generation)
    d = store.image_dir(image) / generation
    if not generation.startswith("gen-") or not (d / "rootfs").is_dir():
        raise NotFoundError(f"image '{image}' has no generation {generation!r} "
                            f"(in {store.image_dir(image)})")
    return Image(image, d.resolve())


def prune(state: Path, image: str, keep: set[str], retain: int = DEFAULT_RETAIN) -> list[str]:
    """Remove ``image``'s exports that are neither in ``keep`` (generation names: the current
    one, and those running nodes booted) nor among the ``retain`` newest; the generations
    removed. Skipped (returns []) while an export of the image runs."""
    d = squash_dir(state, image)
    if not d.is_dir():
        return []
    lock = FileLock(d / ".lock", f"squashfs exports of '{image}'")
    try:
        lock.acquire()
    except BusyError:
        return []
    removed: list[str] = []
    try:
        _remove_temp_files(d)
        exports = list_exports(state, image)
        newest = {e.generation for e in exports[-retain:]} if retain > 0 else set()
        for e in exports:
            if e.generation in keep or e.generation in newest:
                continue
            with contextlib.suppress(FileNotFoundError):
                e.path.unlink()
            with contextlib.suppress(FileNotFoundError):
                _record(d, e.generation).unlink()
            removed.append(e.generation)
            log.info("squashfs: removed %s of %s (no running node holds it)", e.file, image)
    finally:
        lock.release()
    return removed


def remove_all(state: Path, image: str) -> list[str]:
    """Remove every export of ``image`` and its directory (``image rm``: the generations they
    pack are gone, and no prune runs for an image the store no longer has); the generations
    removed, oldest first. Waits while an export or a prune of the image runs, and says so
    (a warning: an export of a generation removed under it fails soon, when mksquashfs finds
    its files gone); the directory goes while its lock is held, so an export that was waiting
    for it finds no directory and no image. :class:`StateError` naming the path if the lock
    file cannot be opened."""
    d = squash_dir(state, image)
    if not d.is_dir():
        return []
    lock = FileLock(d / ".lock", f"a squashfs export of '{image}'")
    try:
        lock.acquire()
    except BusyError as e:
        log.warning("%s; waiting for it to end before removing the image's exports", e)
        lock.acquire(wait=True)
    try:
        removed = [e.generation for e in list_exports(state, image)]
        shutil.rmtree(d, ignore_errors=True)
    finally:
        lock.release()
    for g in removed:
        log.info("squashfs: removed %s%s of %s (image removed)", g, SUFFIX, image)
    return removed
