"""The exports of a generation: ``vmlinuz-<name>`` and ``initrd.img-<name>`` (copied from the
root), the rootfs tarball (written, or reused from the image's current generation when the
tree it would hold is the same: same :func:`~sidusctl.subsys.treecopy.tree_digest`, same
compression), and copies to an ``--out`` directory.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from sidusctl.core.errors import CommandError, WriteError
from sidusctl.core.state import atomic_copy
from sidusctl.image.common import Reporter, explain
from sidusctl.image.recipe import Recipe
from sidusctl.subsys.imagestore import Image
from sidusctl.subsys.manifest import ExportFile, Exports, KernelExport, StageRecord, TarballExport
from sidusctl.subsys.tarball import suffix_for, write_rootfs_tar
from sidusctl.subsys.treecopy import file_sha256

TARBALL_VERSION = "1"  # bump when write_rootfs_tar's output changes for the same tree


def export_kernel(root: Path, dest: Path, name: str) -> Exports:
    """Copy the root's newest ``boot/vmlinuz-*`` and its initrd to ``dest`` as
    ``vmlinuz-<name>`` and ``initrd.img-<name>`` (the SIDUS seed's naming); returns the
    manifest's ``kernel``/``initrd`` entries (file, version, size in bytes), none set if the
    root has no kernel."""
    kernels = sorted(root.glob("boot/vmlinuz-*"), key=version_key)
    if not kernels:
        return Exports()
    k = kernels[-1]
    ver = k.name.removeprefix("vmlinuz-")
    shutil.copy2(k, dest / f"vmlinuz-{name}")
    kernel = KernelExport(file=f"vmlinuz-{name}", version=ver, size=k.stat().st_size)
    initrd = root / "boot" / f"initrd.img-{ver}"
    if not initrd.exists():
        return Exports(kernel=kernel)
    shutil.copy2(initrd, dest / f"initrd.img-{name}")
    return Exports(kernel=kernel,
                   initrd=ExportFile(file=f"initrd.img-{name}", size=initrd.stat().st_size))


def version_key(p: Path) -> list[Any]:
    """A sort key for kernel file names (``vmlinuz-6.1.0-9-amd64``) that orders their
    numbers as numbers: ``6.1.0-10`` after ``6.1.0-9``."""
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.name)]



def copy_out(image: Image, out: Path) -> None:
    """Copy ``image``'s kernel, initrd and rootfs tarball, those it has, into ``out``
    (created), keeping their names, modes and times (``--out``), each by
    :func:`~sidusctl.core.state.atomic_copy`. :class:`WriteError` when ``out`` cannot take them (a full or read-only
    file system): it says that the image itself is built, which files were copied before,
    and leaves no partial file."""
    done: list[str] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for p in (image.kernel, image.initrd, image.tarball):
            if p is None or not p.exists():
                continue
            atomic_copy(p, out / p.name, mode=None)
            st = p.stat()
            os.utime(out / p.name, ns=(st.st_atime_ns, st.st_mtime_ns))
            done.append(p.name)
    except OSError as e:
        copied = f" (copied: {', '.join(done)})" if done else ""
        raise WriteError(f"image '{image.name}' is built ({image.dir.name}), but its files "
                         f"could not be copied to {out}: {e.strerror or e}{copied}", e) from e



def export_tarball(root: Path, gen_dir: Path, r: Recipe, tree_sha256: str, prev: Image | None,
                   rep: Reporter, mirror: str) -> tuple[TarballExport, StageRecord]:
    """Write ``<name>.tar.<comp>`` of ``root`` into ``gen_dir``, or hard-link the current
    generation's (``prev``) when its recorded key (tree digest + compression) is the same and
    its file still has the recorded sha256. Returns the manifest entry and the stage record.
    BuildError if tar fails (full disk)."""
    dest = gen_dir / f"{r.name}{suffix_for(r.compression)}"
    key = f"{TARBALL_VERSION}:{r.compression}:{tree_sha256}"
    why = _tarball_reuse(prev, dest.name, key)
    if why is None:
        assert prev is not None
        os.link(prev.dir / dest.name, dest)
        rep.line(f"{dest.name} reused from {prev.dir.name}")
        rec = StageRecord(name="tarball", action="reused", key=key, sha256=file_sha256(dest),
                          reason=f"same tree as {prev.dir.name}")
    else:
        rep.line(f"writing {dest.name}")
        try:
            write_rootfs_tar(root, dest)
        except CommandError as e:
            raise explain(e, r, mirror, dest, "tarball export") from e
        rec = StageRecord(name="tarball", action="ran", key=key, sha256=file_sha256(dest),
                          reason=why)
    return TarballExport(file=dest.name, size=dest.stat().st_size, compression=r.compression), rec


def _tarball_reuse(prev: Image | None, name: str, key: str) -> str | None:
    if prev is None:
        return "no earlier generation of this image to reuse it from"
    rec = prev.stage_record("tarball")
    if rec is None or rec.key is None:
        return f"{prev.dir.name} records no tarball key"
    if rec.key != key:
        return f"the tree differs from {prev.dir.name}'s"
    f = prev.dir / name
    if not f.is_file() or file_sha256(f) != rec.sha256:
        return f"the tarball of {prev.dir.name} is missing or damaged"
    return None
