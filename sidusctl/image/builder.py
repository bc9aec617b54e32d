"""Recipe → image: the build's order of stages, the stage cache around them, the manifest.

Stages (reported through :class:`Reporter`): ``bootstrap`` and ``packages`` (see
:mod:`~sidusctl.image.bootstrap` and :mod:`~sidusctl.image.stages`), skipped when the stage
cache (:mod:`~sidusctl.image.stagecache`) holds the root as it stands after them for the same
inputs; ``configure`` (the later stages: locales ... initramfs), ``manifest`` (dpkg-query),
``export`` (kernel, initrd, tarball: :mod:`~sidusctl.image.exports`). Every build records one
:class:`StageRecord` per stage (ran, reused or skipped, and why) in the manifest. The new
generation replaces the previous one only if every stage succeeds; on any error or interrupt
it is removed and the previous image is untouched.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from sidusctl import __version__
from sidusctl.core.errors import CommandError, NotFoundError, StateError
from sidusctl.core.log import get_logger
from sidusctl.core.run import run
from sidusctl.image.bootstrap import Bootstrapper, prune
from sidusctl.image.common import (
    BACKENDS,
    BuildOptions,
    Quiet,
    Reporter,
    clean_root_debs,
    default_cache,
    du,
    make_cache,
    package_list,
    preflight,
    release_digest,
)
from sidusctl.image.exports import copy_out, export_kernel, export_tarball
from sidusctl.image.recipe import Recipe
from sidusctl.image.sources import host_sources
from sidusctl.image.stagecache import Restored, StageCache, explain_miss, stage_key
from sidusctl.image.stages import Configurer, package_inputs, release_suites
from sidusctl.image.update import update
from sidusctl.subsys.chroot import ChrootSession
from sidusctl.subsys.imagestore import Generation, Image, ImageStore
from sidusctl.subsys.manifest import (
    Exports,
    JsonObject,
    Manifest,
    Package,
    RecipeInfo,
    Sizes,
    StageRecord,
)
from sidusctl.subsys.treecopy import tree_digest

log = get_logger("build")

STAGES = ("bootstrap", "packages", "configure", "manifest", "export")

__all__ = ["BACKENDS", "STAGES", "BuildOptions", "Builder", "Reporter", "build", "default_cache",
           "export_kernel", "prune", "update"]
_prune = prune  # the name tests and older callers know


class Builder:
    """Builds ``recipe`` into ``store``. ``reporter`` gets progress; see :func:`build`.
    ``records``: after :meth:`run`, one :class:`StageRecord` per stage."""

    def __init__(self, store: ImageStore, recipe: Recipe, opts: BuildOptions,
                 reporter: Reporter | None = None) -> None:
        self.store = store
        self.recipe = recipe
        self.opts = opts
        self.rep: Reporter = reporter or Quiet()
        self.cache = opts.cache or default_cache(store)
        hs = host_sources()
        self.mirror = recipe.mirror or hs.archive
        self.security = hs.security if not recipe.mirror else ""
        self.timings: dict[str, float] = {}
        self.records: list[StageRecord] = []
        self.purged: tuple[str, ...] = ()
        self.boot = Bootstrapper(recipe, opts, self.mirror, self.cache, self.rep)
        self.conf = Configurer(recipe, self.rep, self.mirror, self.security)
        self.stage_cache = StageCache(store.state_dir, opts.cache_max_bytes)
        self.tree_sha256: str | None = None
        #: the restore a delta install began from (its entry lends the new one unchanged files)
        self.delta_base: Restored | None = None
        #: the restore the root is an overlay of, if any (written out after the later stages)
        self.overlay: Restored | None = None

    def _check_packages(self, s: ChrootSession, packages: list[str]) -> None:
        self.conf.check_packages(s, packages)

    def _timed(self, name: str) -> contextlib.AbstractContextManager[None]:
        builder = self

        @contextlib.contextmanager
        def cm() -> Any:
            builder.rep.stage(name, STAGES.index(name) + 1 if name in STAGES else 0, len(STAGES))
            t0 = time.monotonic()
            try:
                yield
            finally:
                builder.timings[name] = round(time.monotonic() - t0, 3)

        return cm()

    def run(self) -> Image:
        """Run the build (see :func:`build` for its errors) and return the new current
        :class:`Image`, its files also copied to ``opts.out`` when set. On any error the bootstrap
        cache's background compression is abandoned and a stage-cache overlay released."""
        r = self.recipe
        preflight(r, self.opts)
        make_cache(self.cache)
        t_start = time.monotonic()
        try:
            self._stages(r, t_start)
        except BaseException:
            if self.boot.compress is not None:
                self.boot.compress.abandon()
            if self.overlay is not None:
                self.stage_cache.release_overlay(self.overlay)
            raise
        if self.boot.compress is not None:
            self.boot.compress.finish()
        image = self.store.get(r.name)
        if self.opts.out:
            copy_out(image, self.opts.out)
        return image

    def _previous(self) -> Image | None:
        """The image's current generation (to compare with and reuse from), if readable."""
        try:
            img = self.store.get(self.recipe.name)
            img.manifest  # noqa: B018 (a corrupt manifest: nothing to reuse)
            return img
        except (NotFoundError, StateError):
            return None

    def _package_key(self) -> tuple[JsonObject | None, str | None, str]:
        """(inputs, key, why there is none) of the package stage."""
        r = self.recipe
        if not self.mirror:
            return None, None, "the mirror is the backend's default, unknown here: no cache key"
        releases = {}
        for archive, suite in release_suites(r, self.security):
            d = release_digest(self.mirror if archive == "mirror" else self.security, suite)
            if d is None:
                return None, None, f"the InRelease of {suite} could not be fetched: no cache key"
            releases[suite] = d
        inputs: JsonObject = package_inputs(r, self.opts.backend, self.mirror, self.security,
                                            releases)  # type: ignore[assignment]
        return inputs, stage_key(inputs), ""

    def _stages(self, r: Recipe, t_start: float) -> None:
        with self.store.new_generation(r.name) as gen:
            prev = self._previous()
            inputs, key, no_key = self._package_key()
            restored = self._restore(gen, key) if key is not None and self.opts.stage_cache else None
            basis = key  # the package-stage key the initrd's inputs are decided by
            if restored is not None and restored.info is not None:
                basis = restored.info.initrd_basis or key
            else:
                why = ("--no-cache: a clean build" if not self.opts.stage_cache else
                       no_key if key is None else
                       restored.reason if restored is not None and restored.damaged else
                       explain_miss(inputs or {}, prev.manifest.package_inputs if prev else None,
                                    prev.dir.name if prev else ""))
                delta = (self._delta(gen, inputs, why)
                         if self.opts.stage_cache and inputs is not None else None)
                if delta is None:
                    self._bootstrap_and_packages(gen, why)
                else:
                    basis = delta or key
                if key is not None and inputs is not None:
                    self._save(key, inputs, gen.rootfs, basis or "")
            with self._timed("configure"):
                with ChrootSession(gen.rootfs, apt_cache=self.cache) as s:
                    self.conf.later(s, basis, prev)
                clean_root_debs(gen.rootfs, self.cache)
            if self.overlay is not None:
                with self._timed("write_out"):
                    self.stage_cache.finish_overlay(self.overlay)
            self.records += self.conf.records
            with self._timed("manifest"):
                packages = package_list(gen.rootfs)
            with self._timed("export"):
                exports = self._export(gen, prev)
            self.records.append(StageRecord(name="kernel-export", action="ran",
                                            reason="copied from the root (seconds)"))
            gen.write_manifest(self._manifest(gen, packages, exports, inputs,
                                              time.monotonic() - t_start))

    def _delta(self, gen: Generation, inputs: JsonObject, why: str) -> str | None:
        """The package stage as a delta: restore the cache entry whose inputs differ from
        ``inputs`` only by missing packages (:meth:`StageCache.base_for`) and run the package
        stage on it, so apt installs just the added packages and their dependencies. Returns
        None when there is no such entry (or it was damaged: the caller runs the whole stage),
        else the initrd basis of the result: the base's when the install changed no package
        already there and added no file an initramfs reads, "" otherwise."""
        base = self.stage_cache.base_for(inputs)
        if base is None:
            return None
        have = base.info.inputs.get("packages")
        want = inputs.get("packages")
        assert isinstance(have, list) and isinstance(want, list)
        added = [str(p) for p in want if p not in have]
        with self._timed("bootstrap"):
            self.rep.line(f"restoring stage cache entry {base.key} to add {' '.join(added)}")
            res = self.stage_cache.restore(base.key, gen.rootfs, gen.dir / ".overlay")
        self.timings["restore"] = self.timings.pop("bootstrap")
        if res.overlay is not None:
            self.overlay = res
        if res.info is None:
            log.warning("%s; running the whole package stage", res.reason)
            self.rep.line(res.reason)
            return None
        self.delta_base = res
        before = package_list(gen.rootfs)
        with self._timed("packages"):
            with ChrootSession(gen.rootfs, apt_cache=self.cache) as s:
                # the base's lists are those of the same InRelease files (same key but for the
                # packages), already upgraded: no update, no upgrade
                self.conf.packages(s, refresh=False)
            clean_root_debs(gen.rootfs, self.cache)
        after = package_list(gen.rootfs)
        changed = sorted(n for n, p in before.items() if after.get(n) != p)
        new = sorted(set(after) - set(before))
        self.purged = tuple(sorted(set(base.info.purged) | set(self.conf.purged)))
        touching = _initramfs_files(gen.rootfs, new)
        self.records += [
            StageRecord(name="bootstrap", action="reused", key=base.key,
                        reason=f"{res.reason}: the base of a delta install"),
            StageRecord(name="packages", action="ran",
                        reason=f"{why}; as a delta on cache entry {base.key}: installed "
                               f"{' '.join(added)} ({len(new)} new package(s) in all"
                               + (f"; changed: {' '.join(changed)}" if changed else "") + ")")]
        if changed or touching:
            log.info("delta install changed %s: the initramfs is decided by the new key",
                     ", ".join(changed + touching[:5]))
            return ""
        return base.info.initrd_basis or base.key

    def _restore(self, gen: Generation, key: str) -> Restored:
        with self._timed("bootstrap"):
            self.rep.line(f"looking up stage cache entry {key}")
            res = self.stage_cache.restore(key, gen.rootfs, gen.dir / ".overlay")
        if res.overlay is not None:
            self.overlay = res
        # a hit: the copy and its check; a miss: the look-up
        self.timings["restore" if res.info is not None else "cache_lookup"] = \
            self.timings.pop("bootstrap")
        if res.info is not None:
            self.purged = res.info.purged
            self.records += [
                StageRecord(name="bootstrap", action="reused", key=key, reason=res.reason),
                StageRecord(name="packages", action="reused", key=key,
                            reason=f"{res.reason}: same suite, archive InRelease, include, "
                                   "exclude, packages, purge and options")]
        elif res.damaged:
            log.warning("%s; running the package stage again", res.reason)
            self.rep.line(res.reason)
        return res

    def _bootstrap_and_packages(self, gen: Generation, why: str) -> None:
        with self._timed("bootstrap"):
            self.boot.run(gen.rootfs)
        self.records.append(
            StageRecord(name="bootstrap", action="reused", reason="from the bootstrap cache "
                        "(same suite, options and archive InRelease)")
            if self.boot.from_cache else
            StageRecord(name="bootstrap", action="ran", reason=f"{self.opts.backend} ran: {why}"))
        with self._timed("packages"):
            with ChrootSession(gen.rootfs, apt_cache=self.cache) as s:
                self.conf.packages(s)
            # The session bound the shared cache over var/cache/apt/archives (so apt never
            # needs "clean" there); what is left below it now are debootstrap's own copies.
            clean_root_debs(gen.rootfs, self.cache)
        self.purged = tuple(self.conf.purged)
        self.records.append(StageRecord(name="packages", action="ran", reason=why))

    def _save(self, key: str, inputs: JsonObject, root: Path, initrd_basis: str) -> None:
        t0 = time.monotonic()
        self.rep.line(f"saving stage cache entry {key}")
        try:
            e = self.stage_cache.save(key, inputs, root, self.purged, initrd_basis,
                                      base=self.delta_base)
            log.info("stage cache entry %s saved (%d MiB)", key, e.info.bytes // 2**20)
        except (CommandError, OSError) as err:
            log.warning("stage cache entry %s not saved: %s", key, err)
        self.timings["cache_save"] = round(time.monotonic() - t0, 3)

    def _export(self, gen: Generation, prev: Image | None) -> Exports:
        r = self.recipe
        out = export_kernel(gen.rootfs, gen.dir, r.name)
        if self.opts.tar:
            self.rep.line("digesting the tree")
            self.tree_sha256 = tree_digest(gen.rootfs)[0]
            tar, rec = export_tarball(gen.rootfs, gen.dir, r, self.tree_sha256, prev, self.rep,
                                      self.mirror)
            self.records.append(rec)
            out = out.model_copy(update={"tarball": tar})
        return out

    def _manifest(self, gen: Generation, packages: dict[str, Package], exports: Exports,
                  inputs: JsonObject | None, total: float) -> Manifest:
        r = self.recipe
        return Manifest(
            name=r.name,
            kind="build",
            sidusctl=__version__,
            recipe=RecipeInfo.from_data({"path": str(r.path), "sha256": r.digest(),
                                         "values": r.to_json()}, f"{r.path}: recipe values"),
            suite=r.suite,
            arch=r.arch,
            backend=self.opts.backend,
            mirror=self.mirror or "(backend default)",
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            generation=gen.dir.name.removeprefix(".building-"),
            packages=packages,
            package_count=len(packages),
            purged=tuple(self.purged),
            sizes=Sizes(rootfs_bytes=du(gen.rootfs)),
            exports=exports,
            timings_s={**self.timings, "total": round(total, 3)},
            bootstrap_from_cache=self.boot.from_cache,
            build_stages=tuple(self.records),
            package_inputs=inputs or {},
        ).model_copy(update={"tree_sha256": self.tree_sha256} if self.tree_sha256 else {})




# Where an installed package's files make the initrd depend on it beyond what
# :func:`~sidusctl.image.stages.initrd_key` digests (its INITRD_INPUTS): kernels, modules, udev
# rules and helpers, klibc, initramfs-tools' own library.
_INITRAMFS_PREFIXES = ("/boot/", "/lib/modules/", "/usr/lib/modules/", "/lib/udev/",
                       "/usr/lib/udev/", "/usr/lib/klibc", "/usr/share/initramfs-tools/",
                       "/etc/initramfs-tools/", "/usr/lib/initramfs-tools/")


def _initramfs_files(root: Path, packages: list[str]) -> list[str]:
    """The files of ``packages`` (installed in ``root``) under :data:`_INITRAMFS_PREFIXES`."""
    if not packages:
        return []
    res = run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-L", *packages], capture=True,
              check=False, what="dpkg-query -L")
    return [line for line in res.stdout.splitlines() if line.startswith(_INITRAMFS_PREFIXES)]


def build(store: ImageStore, recipe: Recipe, opts: BuildOptions,
          reporter: Reporter | None = None) -> Image:
    """Build ``recipe`` into ``store`` and return the new current :class:`Image`.

    Raises :class:`PrerequisiteError` (not root, missing backend, foreign arch),
    :class:`BuildError` (missing package, full disk, mirror down...), :class:`BusyError` (the
    image is being built by someone else), :class:`Interrupted`/KeyboardInterrupt; in every case
    the previous generation stays current and nothing stays mounted.
    """
    return Builder(store, recipe, opts, reporter).run()


