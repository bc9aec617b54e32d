"""CLI: ``sidusctl image list|show|rm|rollback|cache``."""

from __future__ import annotations

import time

import click
from rich.table import Table

from sidusctl.cli.common import console, emit_json, get_ctx, human_size, need_root
from sidusctl.core.errors import BusyError, ConfigError, ConfigErrors, NotFoundError
from sidusctl.core.units import parse_size
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
    from sidusctl.netboot import squash

    # the squashfs exports of its generations (sidusctl pxe squashfs; serve-pxe makes them too)
    exports = [e.as_dict() for e in squash.list_exports(get_ctx().state, name)]
    m["squashfs"] = exports
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
    for e in exports:
        click.echo(f"{'squashfs:':15} {e['path']} ({human_size(e['size'])}, {e['generation']}, "
                   f"sha256 {str(e['sha256'])[:16]})")
    click.echo(f"{'timings (s):':15} {m.get('timings_s')}")
    if packages:
        for p, pkg in sorted(man.packages.items()):
            click.echo(f"  {p} {pkg.version}")


@image_group.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("--force", is_flag=True,
              help="Delete even generations that running nodes booted and serve-pxe holds.")
def rm_cmd(names: tuple[str, ...], force: bool) -> None:
    """Delete images (every generation, and their squashfs exports). Refused while running
    nodes hold a generation (serve-pxe's holds: their roots are still served), unless --force."""
    need_root("sidusctl image rm")
    store = ImageStore(get_ctx().state)
    # every name checked before any image goes: all problems at once, nothing half-done
    bad: list[ConfigError] = []
    missing: list[str] = []
    held: list[str] = []
    for n in names:
        try:
            if not store.image_dir(n).is_dir():
                missing.append(f"no image named '{n}' in {store.root}")
            elif not force:
                store.check_removable(n)
        except ConfigError as e:
            bad.append(e)
        except BusyError as e:
            held.append(e.message)  # one hint for all, below
    if bad:
        raise ConfigErrors(bad)
    if missing:
        raise NotFoundError("\n".join(missing))
    if held:
        raise BusyError("\n".join(held), hint="stop those nodes (a hold ends --hold-time after "
                        "its node was last seen), or: sidusctl image rm --force")
    from sidusctl.netboot import squash

    for n in names:
        store.remove(n, force=force)
        # its squashfs exports: nothing else removes them once the image is gone
        exports = squash.remove_all(get_ctx().state, n)
        also = f" and its squashfs exports ({', '.join(exports)})" if exports else ""
        console.print(f"removed image '{n}'{also}", highlight=False)


@image_group.command("rollback")
@click.argument("name")
def rollback_cmd(name: str) -> None:
    """Make the previous generation of NAME current again."""
    need_root("sidusctl image rollback")
    img = ImageStore(get_ctx().state).rollback(name)
    console.print(f"image '{name}' is now generation {img.dir.name}", highlight=False)


def _cache_rows(cache: object) -> dict[str, object]:
    from sidusctl.image.stagecache import StageCache

    assert isinstance(cache, StageCache)
    entries = cache.entries()
    return {"dir": str(cache.dir), "max_bytes": cache.max_bytes,
            "total_bytes": sum(e.info.bytes for e in entries),
            "entries": [{"key": e.key, "bytes": e.info.bytes, "files": e.info.entries,
                         "created": e.info.created, "sidusctl": e.info.sidusctl,
                         "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.last_used)),
                         "suite": e.info.inputs.get("suite"),
                         "packages": e.info.inputs.get("packages"),
                         "tree_sha256": e.info.tree_sha256} for e in entries]}


@image_group.group("cache", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def cache_group(ctx: click.Context, as_json: bool) -> None:
    """Show the stage cache (roots as they stand after the package stage, most recently used
    first), or prune it."""
    if ctx.invoked_subcommand is not None:
        return
    from sidusctl.image.stagecache import StageCache

    rows = _cache_rows(StageCache(get_ctx().state))
    if as_json:
        emit_json(rows)
        return
    entries = rows["entries"]
    assert isinstance(entries, list)
    console.print(f"stage cache {rows['dir']}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
                  f"{human_size(rows['total_bytes'])} of {human_size(rows['max_bytes'])}",  # type: ignore[arg-type]
                  highlight=False)
    if entries:
        t = Table("key", "suite", "packages", "size", "last used", "created")
        for e in entries:
            t.add_row(e["key"], _cell(e["suite"]), " ".join(e["packages"] or []),
                      human_size(e["bytes"]), e["last_used"], e["created"])
        console.print(t)


@cache_group.command("prune")
@click.option("--max-size", "max_size", default=None, metavar="SIZE",
              help="Evict least recently used entries until the cache holds at most SIZE "
                   "(e.g. 4G; 0 empties it). Default: the cache's limit.")
@click.option("--json", "as_json", is_flag=True)
def cache_prune_cmd(max_size: str | None, as_json: bool) -> None:
    """Evict least recently used stage cache entries beyond the size limit."""
    from sidusctl.image.stagecache import StageCache

    need_root("sidusctl image cache prune")
    limit = parse_size(max_size, "--max-size", minimum=0) if max_size is not None else None
    cache = StageCache(get_ctx().state)
    evicted = cache.prune(limit)
    if as_json:
        emit_json({"evicted": [{"key": e.key, "bytes": e.info.bytes} for e in evicted],
                   **_cache_rows(cache)})
        return
    for e in evicted:
        click.echo(f"evicted {e.key} ({human_size(e.info.bytes)})")
    console.print(f"stage cache: {len(evicted)} entr{'y' if len(evicted) == 1 else 'ies'} evicted, "
                  f"{human_size(cache.total_bytes())} left", highlight=False)


def _can_recover() -> bool:
    import os

    return os.geteuid() == 0


def register(cli: click.Group) -> None:
    """Add the image group to the top-level group."""
    cli.add_command(image_group)
