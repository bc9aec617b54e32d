"""CLI: ``sidusctl import SOURCE NAME``: a Docker/OCI image into the image store (rootfs,
manifest, runtime files, optional LXC/Distem rootfs tarball), without a container engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from sidusctl.cli.common import console, emit_json, get_ctx, human_size, need_root
from sidusctl.cli.progress import StageProgress
from sidusctl.core.errors import ConfigError
from sidusctl.oci.importer import ImportOptions, import_image
from sidusctl.subsys.imagestore import ImageStore, check_name


def _parse_cmd(text: str | None) -> list[str] | None:
    if text is None:
        return None
    s = text.strip()
    if s.startswith("["):
        try:
            v = json.loads(s)
        except ValueError as e:
            raise ConfigError("--cmd", None, f"not valid JSON ({e})",
                              expected='an exec-form JSON list like ["nginx", "-g", '
                                       '"daemon off;"], or a shell-form string') from e
        if not isinstance(v, list) or not all(isinstance(a, str) for a in v) or not v:
            raise ConfigError("--cmd", None, "not a non-empty list of strings",
                              expected="an exec-form JSON list of strings")
        return v
    return ["/bin/sh", "-c", text]


@click.command("import")
@click.argument("source")
@click.argument("name")
@click.option("--ref", default=None, metavar="NAME:TAG",
              help="Image to take from an archive/layout holding several.")
@click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
              help="Platform to pick from a multi-platform index (default: this host's).")
@click.option("--tar", "tar", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write an LXC/Distem rootfs tarball (.tar.zst, .tar.gz or .tar).")
@click.option("--insecure", is_flag=True, help="Plain HTTP to the registry (test registries).")
@click.option("--creds", default=None, metavar="USER:PASSWORD",
              help="Registry credentials (else $SIDUSCTL_REGISTRY_CREDS or an auth file).")
@click.option("--authfile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="containers/docker auth.json with registry credentials.")
@click.option("--cmd", "cmd", default=None,
              help="Command replacing the image's Cmd: a JSON list (exec form) or a string "
                   "(shell form, run by /bin/sh -c).")
@click.option("--unit-name", default="oci-cmd", show_default=True,
              help="Name of the systemd unit / init script made from the image's command.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def import_cmd(source: str, name: str, ref: str | None, platform: str | None, tar: Path | None,
               insecure: bool, creds: str | None, authfile: Path | None, cmd: str | None,
               unit_name: str, as_json: bool) -> None:
    """Import SOURCE as image NAME. SOURCE: a `docker save` archive, an OCI image layout
    (directory or tar), a flat `docker export` tarball, or docker://HOST[:PORT]/REPO:TAG
    (or @sha256:DIGEST) pulled over the OCI distribution API."""
    check_name(name)
    check_name(unit_name, "--unit-name")
    need_root("sidusctl import")  # numeric owners, device nodes
    store = ImageStore(get_ctx().state)
    opts = ImportOptions(ref=ref, platform=platform, tar=tar, insecure=insecure, creds=creds,
                         authfile=authfile, cmd=_parse_cmd(cmd), unit_name=unit_name)
    with StageProgress(f"import {name}", enabled=not as_json) as prog:
        img, m = import_image(store, source, name, opts, prog)
    rt, src, dig = m.runtime, m.source, m.digests
    assert rt is not None and src is not None and dig is not None  # import_image sets them
    summary: dict[str, Any] = {
        "image": name, "generation": img.dir.name, "rootfs": str(img.rootfs),
        "manifest": str(img.manifest_path), "source": src.to_json(), "platform": m.platform,
        "digests": dig.to_json(), "command": list(rt.command), "user": rt.user,
        "uid": rt.uid, "gid": rt.gid, "cwd": rt.cwd, "env": list(rt.env),
        "init": rt.init, "unit": rt.unit, "files": list(rt.files),
        "lxc_snippet": str(img.dir / (rt.lxc_snippet or "lxc.conf")), "note": rt.note,
        "exposed_ports": list(m.exposed_ports), "volumes": list(m.volumes),
        "tarball": str(tar) if tar else None, "rootfs_bytes": m.sizes.rootfs_bytes,
        "seconds": m.timings_s["total"],
    }
    if as_json:
        emit_json(summary)
        return
    console.print(f"[green]image '{name}' imported[/green] from {src.kind} "
                  f"({len(dig.layers)} layers, "
                  f"{human_size(summary['rootfs_bytes'])}, {summary['seconds']} s)",
                  highlight=False)
    for k in ("rootfs", "manifest", "lxc_snippet", "tarball"):
        if summary.get(k):
            click.echo(f"{k + ':':12} {summary[k]}")
    if summary["exposed_ports"]:
        click.echo(f"{'ports:':12} {', '.join(summary['exposed_ports'])}")
    if summary["volumes"]:
        click.echo(f"{'volumes:':12} {', '.join(summary['volumes'])}")
    click.echo(f"{'runs:':12} {rt.note}")


def register(cli: click.Group) -> None:
    """Add ``import`` to the top-level group."""
    cli.add_command(import_cmd)
