"""The netboot initramfs hook: installs sidusctl's initramfs-tools files into a Debian root.

Owns ``<root>/etc/initramfs-tools/hooks/sidus``, ``.../scripts/init-bottom/sidus``, the modules
it adds to ``.../modules`` and ``.../conf.d/sidus``. The files come from the shipped
``initramfs/`` folder (:func:`sidusctl.core.paths.initramfs_dir`); ``update-initramfs`` is the
caller's job (it must run inside a chroot session). Sources: initramfs-tools(7),
initramfs.conf(5).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from sidusctl.core.errors import ConfigError, SidusError
from sidusctl.core.paths import initramfs_dir
from sidusctl.core.state import atomic_write_bytes, atomic_write_text

CONF_NAME = "sidus"
_MODULE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_NIC_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
MODULES_BEGIN = "# >>> sidusctl netboot modules"
MODULES_END = "# <<< sidusctl netboot modules"


def shipped_files() -> list[Path]:
    """The shipped initramfs files, relative to :func:`initramfs_dir` (``hooks/sidus``,
    ``scripts/init-bottom/sidus``, ...). Raises :class:`SidusError` if the folder is missing."""
    base = initramfs_dir()
    files = sorted(p.relative_to(base) for p in base.rglob("*") if p.is_file())
    if not files:
        raise SidusError(f"no initramfs files in {base} (is sidusctl installed completely?)")
    return files


def _conf_text(nic: str | None) -> str:
    lines = [
        "# Written by sidusctl (netboot): see initramfs.conf(5).",
        "# MODULES=most keeps local-disk drivers so the same initrd can also boot a disk;",
        "# root=/dev/nfs on the kernel command line selects BOOT=nfs.",
        "MODULES=most",
        "BUSYBOX=y",
        "NFSROOT=auto",
    ]
    # DEVICE empty: initramfs-tools takes the interface from BOOTIF= (pxelinux IPAPPEND 2)
    # or tries every interface.
    lines.append(f"DEVICE={nic or ''}")
    return "\n".join(lines) + "\n"


def _merge_modules(existing: str, modules: Sequence[str]) -> str:
    """``existing`` /etc/initramfs-tools/modules with our block (re)placed at its end."""
    out: list[str] = []
    skipping = False
    for line in existing.splitlines():
        if line.strip() == MODULES_BEGIN:
            skipping = True
            continue
        if line.strip() == MODULES_END:
            skipping = False
            continue
        if not skipping:
            out.append(line)
    while out and not out[-1].strip():
        out.pop()
    block = [MODULES_BEGIN, *modules, MODULES_END]
    return "\n".join([*out, "", *block] if out else block) + "\n"


def install_netboot_hook(
    root: Path, *, modules: Sequence[str] = ("overlay",), nic: str | None = None
) -> list[Path]:
    """Install the netboot hook into the Debian root ``root``.

    Copies the shipped ``initramfs/`` files to ``root/etc/initramfs-tools/`` (mode 0755),
    lists ``modules`` in ``root/etc/initramfs-tools/modules`` (a marked block, replaced on a
    re-install) and writes ``conf.d/sidus`` (``MODULES=most``, ``BUSYBOX=y``, ``DEVICE=nic``).
    Idempotent. Returns the files written, absolute. Raises :class:`ConfigError` for a bad
    module or interface name, :class:`SidusError` if ``root`` has no initramfs-tools.
    """
    root = Path(root)
    for m in modules:
        if not _MODULE_RE.match(m):
            raise ConfigError("netboot", "modules", f"invalid kernel module name {m!r}",
                              expected="letters, digits, '_' or '-'")
    if nic is not None and not _NIC_RE.match(nic):
        raise ConfigError("netboot", "nic", f"invalid interface name {nic!r}",
                          expected="a Linux interface name such as eth0 or ens3 (1-15 characters)")
    itools = root / "etc/initramfs-tools"
    if not itools.is_dir():
        raise SidusError(f"{root} has no etc/initramfs-tools",
                         hint="install initramfs-tools in the image before the netboot hook")
    written: list[Path] = []
    base = initramfs_dir()
    for rel in shipped_files():
        dest = itools / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, (base / rel).read_bytes(), mode=0o755)
        os.chmod(dest, 0o755)
        written.append(dest)
    mod_file = itools / "modules"
    existing = mod_file.read_text() if mod_file.exists() else ""
    atomic_write_text(mod_file, _merge_modules(existing, list(modules)))
    written.append(mod_file)
    conf = itools / "conf.d" / CONF_NAME
    conf.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(conf, _conf_text(nic))
    written.append(conf)
    return written
