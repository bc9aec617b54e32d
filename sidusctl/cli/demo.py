"""``sidusctl demo IMAGE``: the whole tool on a built image, with nothing left behind.

README's first command ends with it. Two steps, each self-contained and cleaned up:

1. PXE: a network namespace with a bridge (``sidus-demo-*``), ``serve-pxe`` bound to that
   bridge inside it (our DHCP, TFTP, DNS and NFS through nfs-ganesha), one diskless qemu
   machine (TCG) that PXE-boots from it to a login prompt; logged in over the serial console,
   its hostname and its overlay root are checked (see :func:`sidusctl.netboot.lab.pxe_boot_demo`).
2. vnode: one copy-on-write vnode from the image's tarball, in a store of its own; SSH into
   it with an injected key (see :func:`sidusctl.vnode.demo.vnode_demo`).

Nothing binds outside the namespace and links the demo creates.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from sidusctl.cli.common import console, emit_json, get_ctx, need_root
from sidusctl.core.errors import ConfigError, NotFoundError, StateError
from sidusctl.subsys.imagestore import ImageStore


@click.command("demo")
@click.argument("image", default="minimal")
@click.option("--skip-pxe", is_flag=True, help="Skip the PXE boot step.")
@click.option("--skip-vnode", is_flag=True, help="Skip the vnode step.")
@click.option("--timeout", type=float, default=900, show_default=True,
              help="Seconds each step may take (a TCG boot takes one to three minutes).")
@click.option("--prefix", default="sidus-demo", show_default=True,
              help="Name prefix of everything the demo creates (netns, links, vnode, dirs).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result on stdout.")
def demo_cmd(image: str, skip_pxe: bool, skip_vnode: bool, timeout: float, prefix: str,
             as_json: bool) -> None:
    """PXE-boot a throwaway diskless qemu machine from IMAGE through serve-pxe in a network
    namespace, then start IMAGE as a vnode and SSH into it; everything is removed afterwards.
    IMAGE must be built with a netboot recipe and --tar (as `build minimal --tar` does)."""
    need_root("sidusctl demo")
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,9}", prefix):
        raise ConfigError("--prefix", "prefix", f"{prefix!r} is not usable in link names",
                          expected="1-10 lower-case letters, digits or '-', first a letter")
    ctx = get_ctx()
    store = ImageStore(ctx.state)
    if not store.exists(image):
        raise NotFoundError(f"no image {image!r} in {ctx.state}",
                            hint=f"build it first: sidusctl build {image} --tar")
    img = store.get(image)
    result: dict[str, Any] = {"image": image}

    def step(text: str) -> None:
        if not as_json:
            console.print(f"[bold]demo[/bold] {escape(text)}", highlight=False)

    t0 = time.monotonic()
    if not skip_pxe:
        if img.kernel is None or img.initrd is None:
            raise StateError(f"image {image!r} has no exported kernel and initrd",
                             hint="its recipe needs [netboot] enabled = true")
        from sidusctl.netboot.lab import pxe_boot_demo

        with tempfile.TemporaryDirectory(prefix=f"{prefix}-", dir="/var/tmp") as work:
            # serve-pxe runs in the lab's namespace as a process of its own: this CLI's
            serve = [sys.executable, "-m", "sidusctl", *(["--debug"] if ctx.debug else []),
                     "serve-pxe"]
            result["pxe"] = pxe_boot_demo(ctx.state, image, Path(work), serve_command=serve,
                                          prefix=prefix, on_step=step, timeout=timeout)
        step(_pxe_line(result["pxe"]))
    if not skip_vnode:
        if img.tarball is None:
            raise StateError(f"image {image!r} has no rootfs tarball",
                             hint=f"rebuild it with: sidusctl build {image} --tar")
        from sidusctl.vnode.demo import vnode_demo

        result["vnode"] = vnode_demo(img.tarball, prefix=prefix, timeout=min(timeout, 300),
                                     on_step=step)
        v = result["vnode"]
        step(f"vnode {v['vnode']}: ssh root@{v['address']}: hostname {v['hostname']}, "
             f"root {v['root']}")
    result["seconds"] = round(time.monotonic() - t0, 1)
    if as_json:
        emit_json(result)
    else:
        console.print(f"[green]demo done[/green] in {result['seconds']} s; nothing left behind",
                      highlight=False)


def _pxe_line(pxe: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in sorted(pxe.items()) if not isinstance(v, (dict, list))]
    return "pxe boot: " + ", ".join(parts)


def register(cli: click.Group) -> None:
    """Add ``demo`` to ``cli`` (called by :class:`sidusctl.cli.main.LazyGroup` on first use)."""
    cli.add_command(demo_cmd)
