"""CLI: ``sidusctl build``, ``sidusctl update``, ``sidusctl chroot``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from sidusctl.cli.common import console, emit_json, get_ctx, human_size, need_root
from sidusctl.cli.progress import StageProgress
from sidusctl.image import builder, recipe
from sidusctl.image.common import check_variant
from sidusctl.image.update import private_root
from sidusctl.subsys.chroot import ChrootSession
from sidusctl.subsys.imagestore import Image, ImageStore


def _summary(image: Image, out: Path | None) -> dict[str, Any]:
    m = image.manifest
    where = out or image.dir

    def p(path: Path | None) -> str | None:
        if path is None or not path.exists():
            return None
        return str(where / path.name) if out else str(path)

    return {"image": image.name, "generation": image.dir.name, "rootfs": str(image.rootfs),
            "kernel": p(image.kernel), "initrd": p(image.initrd), "tarball": p(image.tarball),
            "manifest": str(image.manifest_path), "packages": m.package_count,
            "rootfs_bytes": m.sizes.rootfs_bytes, "seconds": m.timings_s.get("total"),
            "stages": [{"name": r.name, "action": r.action, "reason": r.reason}
                       for r in m.build_stages]}


def _print_summary(s: dict[str, Any]) -> None:
    console.print(f"[green]image '{s['image']}' built[/green] ({s['packages']} packages, "
                  f"{human_size(s['rootfs_bytes'])}, {s['seconds']} s)", highlight=False)
    stages = s.get("stages", ())
    width = max((len(st["name"]) + 1 for st in stages), default=0)
    for st in stages:
        click.echo(f"{st['name'] + ':':{width}} {st['action']:8} {st['reason']}")
    for k in ("rootfs", "kernel", "initrd", "tarball", "manifest"):
        if s.get(k):
            click.echo(f"{k + ':':10} {s[k]}")


def _print_recipe(rec: recipe.Recipe, as_json: bool) -> None:
    """``build --check``: the validated recipe (JSON: every field, the digest) or a summary."""
    if as_json:
        emit_json({**rec.to_json(), "digest": rec.digest()})
        return
    click.echo(f"recipe '{rec.name}' is valid: {rec.path}")
    click.echo(f"suite {rec.suite}/{rec.arch} ({rec.variant}), {len(rec.packages)} package(s), "
               f"{len(rec.files)} site file(s), digest {rec.digest()[:16]}")


@click.command("build")
@click.argument("image")
@click.option("--backend", type=click.Choice(builder.BACKENDS), default="debootstrap",
              show_default=True, help="Bootstrap tool.")
@click.option("--tar", "tar", is_flag=True, help="Also write a rootfs tarball (LXC/Distem-style).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also copy kernel, initrd and tarball to this directory.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Shared .deb cache (default $SIDUSCTL_CACHE or <state>/cache/apt).")
@click.option("--no-bootstrap-cache", is_flag=True,
              help="Always run the bootstrap tool, even if a cached bootstrap matches.")
@click.option("--no-cache", is_flag=True,
              help="A clean build: restore nothing from the stage cache nor the bootstrap cache "
                   "(the stage cache entry is written afresh).")
@click.option("--check", is_flag=True,
              help="Only find and validate the recipe and print it (with its digest); build "
                   "nothing. Needs no root.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def build_cmd(image: str, backend: str, tar: bool, out: Path | None, cache_dir: Path | None,
              no_bootstrap_cache: bool, no_cache: bool, check: bool, as_json: bool) -> None:
    """Build IMAGE (a recipe name in images/, a folder or an image.toml) into the state
    directory. The previous build stays current unless this one succeeds. The root as it stands
    after the package stage is cached: a rebuild whose suite, archive, packages and options are
    unchanged restores it and runs only the later stages; every stage says whether it ran or
    was reused, and why."""
    rec = recipe.find(image)
    check_variant(rec, backend)
    if check:
        _print_recipe(rec, as_json)
        return
    need_root("sidusctl build")
    store = ImageStore(get_ctx().state)
    opts = builder.BuildOptions(backend=backend, tar=tar, out=out,
                                cache=cache_dir.absolute() if cache_dir else None,
                                bootstrap_cache=not (no_bootstrap_cache or no_cache),
                                stage_cache=not no_cache)
    with StageProgress(f"build {rec.name}") as prog:
        img = builder.build(store, rec, opts, prog)
    s = _summary(img, out)
    if as_json:
        emit_json(s)
    else:
        _print_summary(s)


@click.command("update")
@click.argument("image")
@click.option("--in-place", is_flag=True,
              help="Update the current root directly instead of a copy promoted on success.")
@click.option("--tar", "tar", is_flag=True, help="Also refresh the rootfs tarball.")
@click.option("--json", "as_json", is_flag=True)
def update_cmd(image: str, in_place: bool, tar: bool, as_json: bool) -> None:
    """apt-get update + full-upgrade + autoremove inside IMAGE, services inhibited, then its
    manifest and exports refreshed (the SIDUS "Update Debian" procedure)."""
    need_root("sidusctl update")
    store = ImageStore(get_ctx().state)
    with StageProgress(f"update {image}") as prog:
        img = builder.update(store, image, in_place=in_place, tar=tar, reporter=prog)
    last = img.manifest.last_update
    changed = last.changed if last is not None else {}
    if as_json:
        emit_json({**_summary(img, None), "changed": {p: c.to_json() for p, c in changed.items()}})
    else:
        console.print(f"[green]image '{image}' updated[/green]: {len(changed)} package(s) changed",
                      highlight=False)
        for p, c in sorted(changed.items()):
            click.echo(f"  {p}: {c.from_} -> {c.to}")


@click.command("chroot", context_settings={"ignore_unknown_options": True})
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def chroot_cmd(image: str, command: tuple[str, ...]) -> None:
    """Run COMMAND (default: a login shell) inside IMAGE's root, services inhibited, mounts
    undone and strays killed afterwards (the seed's ``sidus`` alias). Exits with its code."""
    need_root("sidusctl chroot")
    store = ImageStore(get_ctx().state)
    img = store.get(image)
    with store.lock(image):
        private_root(img.rootfs)
        with ChrootSession(img.rootfs) as s:
            rc = _run_in(s, command)
    if rc:
        sys.exit(rc)


def _run_in(s: ChrootSession, command: tuple[str, ...]) -> int:
    if command:
        if sys.stdin.isatty():
            rc = s.interactive(list(command))
        else:
            res = s.run(list(command), check=False, capture=True)
            sys.stdout.write(res.stdout)
            if res.tail:
                sys.stderr.write(res.tail + "\n")
            rc = res.returncode
    else:
        rc = s.interactive(["/bin/bash", "-l"])
    return rc


def register(cli: click.Group) -> None:
    """Add build, update and chroot to the top-level group."""
    cli.add_command(build_cmd)
    cli.add_command(update_cmd)
    cli.add_command(chroot_cmd)
