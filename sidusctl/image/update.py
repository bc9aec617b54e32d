"""``sidusctl update``: apt-get update + full-upgrade inside an image, in a copy of its current
generation promoted on success (or in place), then its manifest and exports refreshed.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from sidusctl.core.errors import BuildError, CommandError, PrerequisiteError
from sidusctl.core.log import get_logger
from sidusctl.core.run import run
from sidusctl.image.common import (
    APT,
    Quiet,
    Reporter,
    default_cache,
    du,
    make_cache,
    package_list,
    shared_cache_turn,
)
from sidusctl.image.exports import export_kernel
from sidusctl.subsys.chroot import ChrootSession
from sidusctl.subsys.imagestore import Image, ImageStore
from sidusctl.subsys.manifest import Change, LastUpdate, TarballExport
from sidusctl.subsys.tarball import suffix_for, write_rootfs_tar
from sidusctl.subsys.treecopy import unshare_tree

log = get_logger("update")


def private_root(root: Path) -> int:
    """Make a published root safe to write in place: the files it shares with the stage cache
    (a root written out from an overlay restore hard-links every file its build left as the
    entry had it) get inodes of their own (:func:`~sidusctl.subsys.treecopy.unshare_tree`).
    Returns how many were copied; a root with none shared costs one walk (a stat per
    entry). Raises OSError if a copy fails (a full disk): each file is then whole, shared or
    copied."""
    t = time.monotonic()
    n = unshare_tree(root)
    if n:
        log.info("%s: %d file(s) shared with the stage cache copied before writing in place "
                 "(%.1f s)", root, n, time.monotonic() - t)
    return n


def update(store: ImageStore, name: str, *, in_place: bool = False, tar: bool = False,
           cache: Path | None = None, reporter: Reporter | None = None) -> Image:
    """The seed's "Update Debian": apt-get update, full-upgrade, autoremove and clean inside a
    chroot session (services inhibited, strays killed, mounts undone), then the manifest, kernel,
    initrd (and tarball with ``tar``) refreshed.

    By default the current generation is copied (``cp -a --reflink=auto``) into a new one that is
    updated and promoted only on success (the old one stays as ``previous``); ``in_place``
    updates the current root directly (what an NFS-served root needs). Same errors as
    :func:`build`."""
    rep: Reporter = reporter or Quiet()
    cur = store.get(name)
    manifest = cur.manifest
    if os.geteuid() != 0:
        raise PrerequisiteError(f"updating an image needs root (mounts, chroot); running as uid {os.geteuid()}")
    cache = make_cache(cache or default_cache(store))
    apt = APT
    t0 = time.monotonic()

    def _do(root: Path, gen_dir: Path) -> None:
        timings: dict[str, float] = {}
        rep.stage("upgrade", 1, 3)
        t = time.monotonic()
        # the shared cache is bound into the root: apt takes turns with the builds using it
        with ChrootSession(root, apt_cache=cache) as s, shared_cache_turn(cache, rep):
            try:
                s.run([*apt, "update"], what="apt-get update")
                s.run([*apt, "full-upgrade"], what="apt-get full-upgrade", tail_lines=60)
                s.run([*apt, "autoremove", "--purge"], what="apt-get autoremove")
            except CommandError as e:
                raise BuildError(f"update of image '{name}' failed: {e}") from e
        timings["upgrade"] = round(time.monotonic() - t, 3)
        rep.stage("manifest", 2, 3)
        packages = package_list(root)
        rep.stage("export", 3, 3)
        exports = manifest.exports.merged(export_kernel(root, gen_dir, name))
        if tar or exports.tarball is not None:
            comp = exports.tarball.compression if exports.tarball is not None else "zstd"
            dest = gen_dir / f"{name}{suffix_for(comp)}"
            exports = exports.model_copy(update={"tarball": TarballExport(
                file=dest.name, size=write_rootfs_tar(root, dest), compression=comp)})
        before = {p: v.version for p, v in manifest.packages.items()}
        changed = {p: Change(from_=before.get(p), to=v.version)
                   for p, v in packages.items() if before.get(p) != v.version}
        new = manifest.model_copy(update={
            "packages": packages, "package_count": len(packages), "exports": exports,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "last_update": LastUpdate(changed=changed, timings_s={
                **timings, "total": round(time.monotonic() - t0, 3)}),
            "sizes": manifest.sizes.model_copy(update={"rootfs_bytes": du(root)})})
        new.save(gen_dir / "manifest.json")

    if in_place:
        with store.lock(name):
            private_root(cur.rootfs)
            _do(cur.rootfs, cur.dir)
        return store.get(name)
    with store.new_generation(name) as gen:
        rep.line(f"copying {cur.dir.name} to a new generation")
        run(["cp", "-a", "--reflink=auto", str(cur.rootfs), str(gen.rootfs)], what="cp -a")
        for p in (cur.kernel, cur.initrd):
            if p.exists():
                shutil.copy2(p, gen.dir / p.name)
        _do(gen.rootfs, gen.dir)
    return store.get(name)
