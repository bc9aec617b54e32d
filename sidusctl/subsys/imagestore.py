"""The image store: built and imported images under ``<state>/images/<name>/``.

Layout (one directory per image)::

    images/<name>/
        .lock                 flock held by whoever builds, updates or removes the image
        gen-<stamp>/          one complete generation: rootfs/, manifest.json, exports
        current -> gen-...    the generation in use (replaced atomically on success)
        previous -> gen-...   the one before (kept for rollback)
        .building-<stamp>/    a generation under construction (removed if it fails)
        holds/<holder>.json   generations someone still needs, each until a Unix time
                              ({"gen-...": until}): serve-pxe holds those running nodes booted

Generations other than ``current`` and ``previous`` are deleted when a new one is promoted
(and by :meth:`ImageStore.prune`), except those held: a hold expires by itself, so one left
by a dead holder delays the deletion by at most its own duration.

A new generation becomes ``current`` only when it is complete; a failed or interrupted one is
removed, and one left by a SIGKILLed process is found and removed by :meth:`ImageStore.recover`
the next time anyone opens the store.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidusctl.core.errors import BusyError, ConfigError, NotFoundError, StateError, WriteError
from sidusctl.core.log import get_logger
from sidusctl.core.state import (
    NO_ROOM,
    FileLock,
    ensure_dir,
    publish,
    read_json,
    write_error,
    write_json,
)
from sidusctl.subsys import procs, tarball
from sidusctl.subsys.manifest import Manifest, StageRecord, as_manifest
from sidusctl.subsys.mounts import mounts_under, umount_tree

log = get_logger("store")

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
HOLDER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")


def check_name(name: str, where: str = "image name") -> str:
    """Image names: lower-case letters, digits, ``.``, ``_``, ``-``; at most 63 characters."""
    if not NAME_RE.match(name):
        raise ConfigError(where, None, f"invalid name {name!r}",
                          expected="lower-case letters, digits, '.', '_' or '-', 1-63 characters")
    return name


@dataclass(frozen=True)
class Image:
    """One generation of an image: ``dir`` holds ``rootfs/``, ``manifest.json`` and exports."""

    name: str
    dir: Path

    @property
    def rootfs(self) -> Path:
        """The generation's root tree, ``<dir>/rootfs``."""
        return self.dir / "rootfs"

    @property
    def manifest_path(self) -> Path:
        """The generation's manifest file, ``<dir>/manifest.json`` (it may be missing)."""
        return self.dir / "manifest.json"

    @property
    def manifest(self) -> Manifest:
        """The generation's :class:`Manifest` (read on each access); kind ``?`` if it has no
        ``manifest.json``. StateError naming the file if it is corrupt."""
        try:
            return Manifest.load(self.manifest_path)
        except FileNotFoundError:
            return Manifest.missing(self.name)

    def stage_record(self, name: str) -> StageRecord | None:
        """The build record of stage ``name`` in this generation's manifest; None when the
        manifest has none (or is unreadable: a build then runs the stage instead of reusing)."""
        try:
            return next((r for r in self.manifest.build_stages if r.name == name), None)
        except StateError:
            return None

    @property
    def kernel(self) -> Path:
        """The exported kernel's path, ``<dir>/vmlinuz-<name>`` (not checked to exist)."""
        return self.dir / f"vmlinuz-{self.name}"

    @property
    def initrd(self) -> Path:
        """The exported initrd's path, ``<dir>/initrd.img-<name>`` (not checked to exist)."""
        return self.dir / f"initrd.img-{self.name}"

    @property
    def tarball(self) -> Path | None:
        """The generation's rootfs tarball, ``<dir>/<name>.tar.<comp>``, the first that exists of
        the canonical suffixes; None if there is none."""
        for suffix in tarball.canonical_suffixes():
            p = self.dir / f"{self.name}{suffix}"
            if p.exists():
                return p
        return None


class Generation:
    """A generation under construction (see :meth:`ImageStore.new_generation`)."""

    def __init__(self, name: str, dir: Path) -> None:
        self.name = name
        self.dir = dir
        self.image = Image(name, dir)

    @property
    def rootfs(self) -> Path:
        """The root being built, ``<dir>/rootfs``."""
        return self.dir / "rootfs"

    def write_manifest(self, manifest: Manifest | Mapping[str, object]) -> None:
        """Write ``manifest.json`` (a mapping is validated into a :class:`Manifest` first;
        StateError if it does not fit)."""
        as_manifest(manifest, str(self.dir / "manifest.json")).save(self.dir / "manifest.json")


class ImageStore:
    """Images under ``<state_dir>/images``. Opening the store recovers orphans (see module doc)."""

    def __init__(self, state_dir: Path, recover: bool = True) -> None:
        self.state_dir = state_dir
        self.root = state_dir / "images"
        if recover and self.root.is_dir():
            self.recover()

    # -- queries ---------------------------------------------------------------------------
    def image_dir(self, name: str) -> Path:
        """The image's directory, ``<state>/images/<name>`` (not checked to exist);
        :class:`ConfigError` if ``name`` is not a valid image name."""
        return self.root / check_name(name)

    def lock(self, name: str) -> FileLock:
        """A :class:`FileLock` (not yet taken) on the image's ``.lock``, named ``image 'NAME'`` in
        messages; :class:`ConfigError` for an invalid name."""
        return FileLock(self.image_dir(name) / ".lock", f"image '{name}'")

    def get(self, name: str, generation: str = "current") -> Image:
        """The ``current`` (or ``previous``) generation of ``name``; NotFoundError if none,
        StateError naming the link if it cannot be resolved (a symlink loop)."""
        link = self.image_dir(name) / generation
        target = _generation_of(link)
        if target is None:
            known = ", ".join(i.name for i in self.list()) or "none"
            raise NotFoundError(f"no image named '{name}' in {self.root} (built images: {known})")
        return Image(name, target)

    def exists(self, name: str) -> bool:
        """Whether ``name`` has a ``current`` generation with a ``rootfs``; :class:`ConfigError` for
        an invalid name."""
        try:
            self.get(name)
            return True
        except NotFoundError:
            return False

    def list(self) -> list[Image]:
        """The ``current`` generation of every image that has one, in name order (``[]`` without
        an images directory). An image whose ``current`` cannot be resolved (a symlink loop)
        is left out with a warning, as one whose ``current`` leads nowhere is left out."""
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            try:
                target = _generation_of(d / "current")
            except StateError as e:
                log.warning("skipping image '%s': %s", d.name, e)
                continue
            if target is not None:
                out.append(Image(d.name, target))
        return out

    # -- holds -----------------------------------------------------------------------------
    def set_holds(self, name: str, holder: str, holds: Mapping[str, float]) -> None:
        """Replace what ``holder`` (letters, digits, ``._@-``) holds of image ``name``:
        ``{generation: until}`` (``gen-<stamp>`` names, Unix times). An empty mapping drops
        the holder's file. Written atomically; needs no lock (each holder owns its file).
        :class:`StateError` (:class:`WriteError` when the file system is full or read-only)
        naming the file or directory that could not be written."""
        if not HOLDER_RE.match(holder):
            raise ConfigError("holder", None, f"invalid holder name {holder!r}",
                              expected="letters, digits, '.', '_', '@' or '-'")
        f = self.image_dir(name) / "holds" / f"{holder}.json"
        clean = {g: float(t) for g, t in holds.items() if g.startswith("gen-") and "/" not in g}
        if not clean:
            f.unlink(missing_ok=True)
            return
        ensure_dir(f.parent)
        write_json(f, clean)

    def held(self, name: str, now: float | None = None) -> dict[str, float]:
        """The generations of ``name`` some holder still holds: ``{generation: until}`` (the
        latest time over all holders), expired holds left out. Unreadable files are ignored."""
        now = time.time() if now is None else now
        out: dict[str, float] = {}
        d = self.image_dir(name) / "holds"
        for f in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                raw = read_json(f)
            except (OSError, ValueError, StateError):
                continue
            if not isinstance(raw, dict):
                continue
            for g, t in raw.items():
                if isinstance(t, int | float) and t > now and str(g).startswith("gen-"):
                    out[str(g)] = max(float(t), out.get(str(g), 0.0))
        return out

    def generations(self, name: str) -> builtins.list[str]:
        """The complete generations of ``name`` on disk (``gen-*`` directories), oldest
        first."""
        d = self.image_dir(name)
        return sorted(p.name for p in d.glob("gen-*") if p.is_dir()) if d.is_dir() else []

    def prune(self, name: str) -> builtins.list[str]:
        """Delete the generations of ``name`` that are neither ``current``, ``previous`` nor
        held (:meth:`held`); the names deleted. Skipped (returns []) while another process
        holds the image's lock (a build or an update: it prunes when it promotes), and for an
        image directory that is a symlink (a lab's link to another store: that store's own
        builds prune it)."""
        d = self.image_dir(name)
        if not d.is_dir() or d.is_symlink():
            return []
        lk = self.lock(name)
        try:
            lk.acquire()
        except StateError:
            return []
        try:
            return self._prune_unlocked(name)
        finally:
            lk.release()

    def _prune_unlocked(self, name: str) -> builtins.list[str]:
        d = self.image_dir(name)
        keep = {os.readlink(d / ln).rstrip("/").rsplit("/", 1)[-1]
                for ln in ("current", "previous") if (d / ln).is_symlink()}
        held = self.held(name)
        removed = []
        for p in sorted(d.glob("gen-*")):
            # a generation that is a symlink (a test's, a site's) is not ours to delete
            if p.name in keep or p.is_symlink() or not p.is_dir():
                continue
            if p.name in held:
                log.info("keeping %s of '%s': held until %s", p.name, name,
                         time.strftime("%H:%M:%S", time.localtime(held[p.name])))
                continue
            self._discard(p)
            removed.append(p.name)
            log.info("removed generation %s of '%s' (not current, previous or held)", p.name,
                     name)
        return removed

    # -- changes ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def new_generation(self, name: str, lock: FileLock | None = None) -> Iterator[Generation]:
        """Yield an empty generation of ``name``. If the block completes, it becomes
        ``current`` (the old current becomes ``previous``; the one before is deleted). On any
        exception it is removed (after its mounts are undone) and the old current stays.
        :class:`WriteError` naming the path and the image when the store's file system
        cannot take the generation (full, over quota, read-only), in the block or while
        publishing it: nothing of it is left then, and the old current stays."""
        own_lock = lock is None
        lk = lock or self.lock(name).acquire()
        try:
            d = self.image_dir(name)
            base = stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
            n = 0
            # a second generation made by this process within the second gets a name of its
            # own: renamed onto the first's, it failed (ENOTEMPTY) and was left behind
            while os.path.lexists(d / f"gen-{stamp}") or os.path.lexists(d / f".building-{stamp}"):
                n += 1
                stamp = f"{base}-{n}"
            building = d / f".building-{stamp}"
            final = d / f"gen-{stamp}"
            try:
                building.mkdir(parents=True)
            except OSError as e:
                raise self._not_written(name, e, building) from e
            gen = Generation(name, building)
            try:
                yield gen
            except BaseException as e:
                self._discard(building)
                self._remove_if_empty(name)
                if isinstance(e, OSError) and e.errno in NO_ROOM:
                    raise self._not_written(name, e, building) from e
                raise
            try:
                os.rename(building, final)
                self._promote(name, final)
            except OSError as e:
                if _generation_of(self.image_dir(name) / "current") == final.resolve():
                    log.warning("image '%s': generation %s is current, but: %s", name,
                                final.name, e)
                    return
                # not current: nobody uses it, and a later promotion would keep it as previous
                self._discard(building)
                self._discard(final)
                self._remove_if_empty(name)
                raise self._not_written(name, e, final) from e
        finally:
            if own_lock:
                lk.release()

    def _not_written(self, name: str, e: OSError, where: Path) -> WriteError:
        """The :class:`WriteError` for a generation of ``name`` that could not be written at
        ``where`` (or at the path the failed call names)."""
        if not isinstance(e, WriteError):
            e = write_error(e, Path(e.filename2 or e.filename or where))
        return WriteError(f"{e.message}: no new generation of image '{name}'; it is as it "
                          "was", e)

    def _remove_if_empty(self, name: str) -> None:
        """After a refused first build/import: delete ``images/<name>/`` if nothing but its
        ``.lock`` is left (a failed attempt must not leave an empty image behind)."""
        d = self.image_dir(name)
        with contextlib.suppress(OSError):
            if {p.name for p in d.iterdir()} <= {".lock"}:
                (d / ".lock").unlink(missing_ok=True)
                d.rmdir()

    def _promote(self, name: str, final: Path) -> None:
        d = self.image_dir(name)
        cur = d / "current"
        prev = d / "previous"
        if cur.is_symlink():
            _symlink_atomic(os.path.basename(os.readlink(cur)), prev)
        _symlink_atomic(final.name, cur)
        # the old previous goes, unless held (a running node booted it): then a later
        # promotion or prune() deletes it once the hold has expired
        self._prune_unlocked(name)

    def rollback(self, name: str) -> Image:
        """Make ``previous`` current again (and current previous); the new current.
        NotFoundError for an unknown image (nothing is created for it) or one without
        ``previous``; StateError naming the link if ``current`` is missing or either link
        does not lead to a generation with a ``rootfs`` (nothing is changed then), or if
        ``<state>/images`` is not a directory; :class:`WriteError` naming ``current`` if the
        file system cannot take the new link (nothing is changed then; when only
        ``previous`` cannot be written, a warning says so and both lead to the new current)."""
        if self.root.exists() and not self.root.is_dir():
            raise StateError(f"{self.root}: not a directory (the image store)")
        d = self.image_dir(name)
        if not d.is_dir():
            raise NotFoundError(f"no image named '{name}' in {self.root}")
        with self.lock(name):
            cur, prev = d / "current", d / "previous"
            if not prev.is_symlink():
                raise NotFoundError(f"image '{name}' has no previous generation to roll back to")
            for link in (cur, prev):
                if not link.is_symlink():
                    raise StateError(f"{link}: missing: image '{name}' is broken, not rolled "
                                     "back")
                if _generation_of(link) is None:
                    raise StateError(f"{link} -> {os.readlink(link)}: no such generation "
                                     f"(no rootfs there): image '{name}' not rolled back")
            a, b = os.readlink(cur), os.readlink(prev)
            try:
                _symlink_atomic(b, cur)
            except OSError as e:
                raise WriteError(f"cannot write {cur} ({e.strerror or e}): image '{name}' not "
                                 "rolled back", e) from e
            try:
                _symlink_atomic(a, prev)
            except OSError as e:  # rolled back; previous leads to the current one
                log.warning("image '%s' rolled back, but %s could not be written (%s)", name,
                            prev, e.strerror or e)
        return self.get(name)

    def check_removable(self, name: str, now: float | None = None) -> None:
        """:class:`BusyError` if a holder (serve-pxe, for the nodes that booted them) still
        holds generations of ``name`` (:meth:`held`): deleting them would take the root from
        under running nodes. The message names the generations and when the last hold ends."""
        # a generation already gone (deleted by hand, or image rm --force) protects nothing
        held = {g: t for g, t in self.held(name, now).items()
                if (self.image_dir(name) / g).is_dir()}
        if held:
            until = time.strftime("%H:%M:%S", time.localtime(max(held.values())))
            raise BusyError(f"image '{name}' is held for nodes that booted it or were just "
                            f"told to ({', '.join(sorted(held))}), until {until} at the "
                            "latest: their roots are still served",
                            hint="stop those nodes (their holds end --hold-time after they "
                                 f"were last seen), or: sidusctl image rm --force {name}")

    def remove(self, name: str, *, force: bool = False) -> None:
        """Delete every generation of ``name``: refused while another process holds its lock,
        and, unless ``force``, while nodes hold some of its generations
        (:meth:`check_removable`: :class:`BusyError`). The image's directory goes too, lock
        file included, while the lock is held: a build or import of the same name that takes
        the lock afterwards starts a new directory, where one starting between the release
        and the deletion lost its generation."""
        d = self.image_dir(name)
        if not d.is_dir():
            raise NotFoundError(f"no image named '{name}' in {self.root}")
        with self.lock(name):
            if not force:
                self.check_removable(name)
            self._discard_contents(d)
            shutil.rmtree(d, ignore_errors=True)

    def _discard(self, path: Path, orphans: bool = False) -> None:
        if not path.exists():
            return
        # orphans: an unfinished build's directory, which nobody but the dead build uses, so a
        # process naming a path inside it (debootstrap's orphaned wget, dpkg) is its leftover
        procs.kill_in_root(path, cmdline=orphans)
        if mounts_under(path):
            umount_tree(path)
        # Never follow a mount we failed to undo: rmtree would delete the host's files.
        if mounts_under(path):
            raise StateError(f"{path} still has mounts below it; not deleting it")
        _rmtree(path)

    def _discard_contents(self, d: Path) -> None:
        for p in d.iterdir():
            if p.name == ".lock":
                continue
            if p.is_symlink():
                p.unlink()
            elif p.is_dir():
                self._discard(p)
            else:
                p.unlink()

    # -- crash recovery --------------------------------------------------------------------
    def recover(self) -> builtins.list[str]:
        """Clean what SIGKILLed commands left: for each image whose lock nobody holds, delete
        unfinished ``.building-*`` generations (their processes killed, mounts undone first),
        repair generations left with a dead chroot session's record (:func:`repair_root`), and
        undo any other mount below the image. Processes of others that merely use a finished
        generation are left alone. Returns a line per action (also logged as warnings)."""
        actions: builtins.list[str] = []
        for d in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if not d.is_dir():
                continue
            lk = FileLock(d / ".lock", f"image '{d.name}'")
            try:
                lk.acquire()
            except StateError:
                continue  # a live process owns it
            try:
                # Only what a dead sidusctl left is touched: unfinished builds, and generations
                # holding a dead chroot session's record. A finished generation is in use by
                # others (qemu guests booted from its kernel, NFS servers exporting its root, a
                # shell cd'ed into it), and their processes are not ours to kill.
                for gen in sorted(d.iterdir()):
                    if gen.name.startswith(".building-"):
                        self._discard(gen, orphans=True)
                        actions.append(f"removed unfinished build {gen}")
                    elif gen.is_dir() and gen.name.startswith("gen-"):
                        from sidusctl.subsys.chroot import repair_root

                        actions += repair_root(gen / "rootfs")
                undone = umount_tree(d) if mounts_under(d) else []
                if undone:
                    actions.append(f"unmounted {len(undone)} leftover mount(s) under {d}")
            finally:
                lk.release()
        for a in actions:
            log.warning("recovered: %s", a)
        return actions


def _generation_of(link: Path) -> Path | None:
    """The generation directory the symlink ``link`` (``current``, ``previous``) leads to, if
    it is a symlink and the directory has a ``rootfs``; None otherwise. StateError naming
    ``link`` if it cannot be resolved (a symlink loop)."""
    if not link.is_symlink():
        return None
    try:
        target = link.resolve()
    except (RuntimeError, OSError) as e:  # a loop: RuntimeError before Python 3.13
        raise StateError(f"{link}: cannot be resolved ({e}): a broken image") from e
    return target if (target / "rootfs").is_dir() else None


def _symlink_atomic(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    publish(tmp, link)


def _rmtree(path: Path) -> None:
    # Files made immutable (chattr +i) by some packages would stop rmtree; a root build may
    # also contain read-only directories. onerror: make writable and retry once.
    def _retry(func: Any, p: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o755)
            func(p)

    shutil.rmtree(path, onerror=_retry)
