"""Test helpers for netboot: a private network namespace, and a qemu guest (TCG) driven over its
serial console with pexpect (the driver itself is :mod:`sidusctl.subsys.qemu`).

Everything the guest talks to (nfs-ganesha, rpcbind, tgtd) runs inside a network namespace
``sdt-nb-<pid>`` that only has loopback, and qemu runs there too: its user-mode network (slirp)
shows the namespace's 127.0.0.1 to the guest as 10.0.2.2. Nothing listens on the host's own
interfaces. qemu's ``-name`` carries the ``sdt-`` prefix so the leak check can see it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sidusctl.subsys import qemu as _qemu
from sidusctl.subsys.qemu import BOOT_TIMEOUT, NORANDMAPS, QUIET, ROOT_PASSWORD

__all__ = ["BOOT_TIMEOUT", "HOST", "QUIET", "ROOT_PASSWORD", "Guest", "guest", "mkdisk",
           "netns", "nfs_append"]

HOST = "10.0.2.2"  # the host (here: the namespace) as slirp shows it to the guest


def have_kvm_free_qemu() -> bool:
    return shutil.which("qemu-system-x86_64") is not None


@contextlib.contextmanager
def netns(tag: str = "nb") -> Iterator[str]:
    """A network namespace ``sdt-<tag>-<pid>`` with loopback up; deleted on exit."""
    name = f"sdt-{tag}-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        # anything still running in it (a test that failed half-way) is ended first
        r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                           check=False)
        for pid in r.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", name], check=False)


class Guest(_qemu.Guest):
    """:class:`sidusctl.subsys.qemu.Guest` whose name always carries the ``sdt-`` prefix (the
    leak check looks for it)."""

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__(name if name.startswith("sdt-") else f"sdt-{name}", **kw)


@contextlib.contextmanager
def guest(name: str, **kw: Any) -> Iterator[Guest]:
    g = Guest(name, **kw)
    try:
        yield g
    finally:
        g.close()  # `ip netns exec` execs qemu: the child's pid is qemu's


def nfs_append(export: Path, *extra: str, console: str = "ttyS0") -> str:
    """Kernel command line for an NFS root served at ``HOST:export``."""
    parts = [f"console={console}", "root=/dev/nfs",
             f"nfsroot={HOST}:{export},rsize=8192,wsize=8192,tcp", "ip=dhcp",
             "panic=-1", *QUIET, *NORANDMAPS, *extra]
    return " ".join(parts)


def mkdisk(path: Path, size_mb: int, label: str | None = None) -> Path:
    """A raw disk image; with ``label``, one ext4 filesystem over the whole disk."""
    with open(path, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    if label:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, str(path)], check=True)
    return path
