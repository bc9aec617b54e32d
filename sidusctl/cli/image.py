"""CLI: ``sidusctl image list|show|rm|rollback``."""

from __future__ import annotations

import click
from rich.table import Table

from sidusctl.cli.common import console, emit_json, get_ctx, human_size, need_root
from sidusctl.subsys.imagestore import Image, ImageStore


def _row(img: Image) -> dict[str, object]:
    m = img.manifest
    ex = m.exports
    return {"name": img.name, "kind": m.kind, "suite": m.suite,
            "arch": m.arch, "generation": img.dir.name, "created": m.created,
            "updated": m.updated, "packages": m.package_count,
            "rootfs_bytes": m.sizes.rootfs_bytes, "rootfs": str(img.rootfs),
            "kernel": str(img.kernel) if ex.kernel is not None else None,
            "initrd": str(img.initrd) if ex.initrd is not None else None,
            "tarball": str(img.tarball) if img.tarball else None}


def _cell(v: object) -> str:
    """A table cell: ``-`` for what the image does not have (an import has no suite)."""
    return "-" if v is None else str(v)


@click.group("image")
def image_group() -> None:
    """Built and imported images in the state directory."""


@image_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def list_cmd(as_json: bool) -> None:
    """List images (the current generation of each). With --json, what an image does not have
    (an imported image's suite and package count) is null."""
    store = ImageStore(get_ctx().state, recover=_can_recover())
    rows = [_row(i) for i in store.list()]
    if as_json:
        emit_json(rows)
        return
    if not rows:
        console.print(f"no images in {store.root}")
        return
    t = Table("name", "kind", "suite", "arch", "packages", "size", "created")
    for r in rows:
        t.add_row(*(_cell(r[k]) for k in ("name", "kind", "suite", "arch", "packages")),
                  human_size(r["rootfs_bytes"]),  # type: ignore[arg-type]
                  _cell(r["created"]))
    console.print(t)


@image_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.option("--packages", is_flag=True, help="Include the package list.")
def show_cmd(name: str, as_json: bool, packages: bool) -> None:
    """Show an image's manifest."""
    store = ImageStore(get_ctx().state, recover=_can_recover())
    img = store.get(name)
    man = img.manifest
    m: dict[str, object] = dict(man.to_json())  # the JSON on disk, as it was always shown
    if not packages:
        m.pop("packages", None)
    m["paths"] = _row(img)
    if as_json:
        emit_json(m)
        return
    for k in ("name", "kind", "suite", "arch", "backend", "mirror", "created", "updated",
              "package_count", "purged"):
        if k in m:
            click.echo(f"{k + ':':15} {m[k]}")
    rec = man.recipe
    click.echo(f"{'recipe:':15} {rec.path if rec else None} (sha256 {rec.sha256[:16] if rec else ''})")
    click.echo(f"{'rootfs size:':15} {human_size(man.sizes.rootfs_bytes)}")
    for k, v in man.exports.files().items():
        click.echo(f"{k + ':':15} {img.dir / v.file} ({human_size(v.size)})")
    click.echo(f"{'timings (s):':15} {m.get('timings_s')}")
    if packages:
        for p, pkg in sorted(man.packages.items()):
            click.echo(f"  {p} {pkg.version}")


@image_group.command("rm")
@click.argument("names", nargs=-1, required=True)
def rm_cmd(names: tuple[str, ...]) -> None:
    """Delete images (every generation)."""
    need_root("sidusctl image rm")
    store = ImageStore(get_ctx().state)
    for n in names:
        store.remove(n)
        console.print(f"removed image '{n}'", highlight=False)


@image_group.command("rollback")
@click.argument("name")
def rollback_cmd(name: str) -> None:
    """Make the previous generation of NAME current again."""
    need_root("sidusctl image rollback")
    img = ImageStore(get_ctx().state).rollback(name)
    console.print(f"image '{name}' is now generation {img.dir.name}", highlight=False)


def _can_recover() -> bool:
    import os

    return os.geteuid() == 0


def register(cli: click.Group) -> None:
    """Add the image group to the top-level group."""
    cli.add_command(image_group)
