"""The import service: SOURCE -> a new generation of image NAME in the image store (rootfs,
manifest, runtime files from the image config, optional rootfs tarball), exactly like builds.

The generation becomes ``current`` only if everything succeeded; an unsafe, corrupt or
truncated image leaves nothing behind (the half-written generation is discarded).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sidusctl import __version__
from sidusctl.core.errors import StateError, WriteError
from sidusctl.core.log import get_logger
from sidusctl.core.report import Reporter
from sidusctl.core.state import atomic_copy
from sidusctl.oci import ImageError, config, sources
from sidusctl.oci.layers import LayerApplier, LayerStats
from sidusctl.subsys.imagestore import Image, ImageStore
from sidusctl.subsys.manifest import (
    Digests,
    Exports,
    LayerRecord,
    Manifest,
    Runtime,
    Sizes,
    Source,
    TarballExport,
)
from sidusctl.subsys.tarball import compression_for, tar_suffix, write_rootfs_tar

log = get_logger("oci")


class _Quiet:
    def stage(self, name: str, index: int, total: int) -> None:
        log.debug("stage %d/%d: %s", index, total, name)

    def line(self, text: str) -> None:
        pass


@dataclass
class ImportOptions:
    """``ref``: image in a multi-image archive/layout (``name:tag`` or OCI ref name);
    ``platform``: ``os/arch[/variant]`` for multi-platform indexes (default: this host);
    ``tar``: also write a rootfs tarball there (suffix picks zstd/gzip/none);
    ``insecure``: plain HTTP for registries; ``creds``: ``user:password``; ``authfile``:
    a containers/docker auth.json; ``cmd``: override the command (exec-form list)."""

    ref: str | None = None
    platform: str | None = None
    tar: Path | None = None
    insecure: bool = False
    creds: str | None = None
    authfile: Path | None = None
    cmd: list[str] | None = None
    unit_name: str = "oci-cmd"


def resolve(source: str, opts: ImportOptions, scratch: Path) -> sources.ResolvedImage:
    """Find manifest, config and layers of SOURCE (any kind)."""
    if source.startswith("docker://"):
        from sidusctl.oci import registry

        return registry.resolve(source, platform=opts.platform, insecure=opts.insecure,
                                creds=opts.creds, authfile=opts.authfile)
    return sources.open_source(source, ref=opts.ref, platform=opts.platform, scratch=scratch)


def apply_image(img: sources.ResolvedImage, rootfs: Path,
                reporter: Reporter | None = None) -> list[LayerStats]:
    """Apply every layer of ``img`` onto ``rootfs`` (which must exist), bottom first."""
    rep = reporter or _Quiet()
    out = []
    n = len(img.layers)
    with LayerApplier(rootfs) as a:
        for layer in img.layers:
            rep.stage(f"layer {layer.index + 1}/{n}", layer.index + 1, n + 1)
            done = [0]

            def on_bytes(k: int, done: list[int] = done) -> None:
                done[0] += k
                if done[0] % (8 << 20) < k:
                    rep.line(f"{done[0] >> 20} MiB")

            with layer.open() as f:
                st = a.apply(f, index=layer.index, label=(layer.digest or "")[:19],
                             digest=layer.digest, size=layer.size, diff_id=layer.diff_id,
                             whiteouts=img.whiteouts, on_bytes=on_bytes)
            log.debug("layer %d: %s entries, %d whiteouts, %s", layer.index + 1, st.entries,
                      st.whiteouts, st.diff_id)
            out.append(st)
    return out


def _du(root: Path) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + dirnames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, n))
                if st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def import_image(store: ImageStore, source: str, name: str, opts: ImportOptions,
                 reporter: Reporter | None = None) -> tuple[Image, Manifest]:
    """Import SOURCE as image ``name``; returns the new current Image and its manifest (with
    ``source``, ``digests``, ``runtime`` set).

    Raises :class:`ImageError` (bad/unsafe/corrupt image, with the layer and entry named),
    :class:`ConfigError` (bad options), :class:`BusyError` (image locked), CommandError
    (tar export failed), :class:`WriteError` when the tarball cannot be written to
    ``opts.tar`` (the image is imported then: its message says so). On any other error
    the previous generation stays current.
    """
    rep = reporter or _Quiet()
    if opts.tar is not None:
        compression_for(opts.tar)  # reject an unknown suffix before any work
    t0 = time.monotonic()
    with store.new_generation(name) as gen:
        scratch = gen.dir / ".scratch"
        rep.stage("resolve", 0, 1)
        img = resolve(source, opts, scratch)
        gen.rootfs.mkdir(mode=0o755)
        t1 = time.monotonic()
        stats = apply_image(img, gen.rootfs, rep)
        t2 = time.monotonic()
        shutil.rmtree(scratch, ignore_errors=True)
        cfg = (img.config.get("config") or {}) if isinstance(img.config, dict) else {}
        runtime = config.install_runtime(gen.rootfs, gen.dir, cfg, image=name, source=source,
                                         cmd_override=opts.cmd, unit_name=opts.unit_name)
        exports = Exports()
        if opts.tar is not None:
            rep.stage("tarball", len(img.layers) + 1, len(img.layers) + 1)
            dest = gen.dir / f"{name}{tar_suffix(opts.tar)}"
            size = write_rootfs_tar(gen.rootfs, dest)
            exports = Exports(tarball=TarballExport(file=dest.name, size=size,
                                                    compression=compression_for(dest),
                                                    copy_=str(opts.tar)))
        where = f"{source}: image config"
        # config, labels and the architecture are the image's own (any JSON): validated as
        # JSON, an ImageError if they are not (a StateError would blame our store)
        try:
            extra = Manifest.from_data({
                "name": name, "kind": "import",
                "arch": img.config.get("architecture") if img.config else None,
                "config": cfg, "labels": cfg.get("Labels") or {},
                "exposed_ports": sorted((cfg.get("ExposedPorts") or {}).keys()),
                "volumes": sorted((cfg.get("Volumes") or {}).keys())}, where)
        except StateError as e:
            raise ImageError(str(e)) from e
        manifest = extra.model_copy(update=dict(
            sidusctl=__version__,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            generation=gen.dir.name.removeprefix(".building-"),
            source=Source(ref=source, kind=img.kind, selected=img.ref,
                          repo_tags=tuple(img.repo_tags)),
            platform=img.platform,
            digests=Digests(manifest=img.manifest_digest, config=img.config_digest,
                            layers=tuple(LayerRecord(
                                digest=s.digest, diff_id=s.diff_id, compression=s.compression,
                                size=s.compressed_bytes, uncompressed=s.uncompressed_bytes,
                                entries=s.entries, whiteouts=s.whiteouts) for s in stats)),
            runtime=Runtime.from_data(runtime, f"{source}: runtime record"),
            sizes=Sizes(rootfs_bytes=_du(gen.rootfs)),
            exports=exports,
            timings_s={"resolve": round(t1 - t0, 3), "layers": round(t2 - t1, 3),
                       "total": round(time.monotonic() - t0, 3)},
        ))
        gen.write_manifest(manifest)
    image = store.get(name)
    if opts.tar is not None and image.tarball is not None:
        try:
            atomic_copy(image.tarball, opts.tar.absolute(), mode=None, link=True)
        except OSError as e:  # WriteError: a full or read-only file system
            raise WriteError(f"image '{name}' is imported ({image.dir.name}), but its tarball "
                             f"could not be copied to {opts.tar}: {e.strerror or e}",
                             e) from e
    return image, manifest


__all__ = ["ImageError", "ImportOptions", "apply_image", "import_image", "resolve"]
