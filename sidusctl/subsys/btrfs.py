"""btrfs: subvolumes and snapshots (the copy-on-write roots of vnodes), formatting a device or a
loop-backed image file, and reading usage. Everything goes through ``btrfs(8)`` from
btrfs-progs; mounting goes through :mod:`sidusctl.subsys.mounts`.
"""

from __future__ import annotations

import os
from pathlib import Path

from sidusctl.core.errors import PrerequisiteError
from sidusctl.core.run import output, run, which
from sidusctl.subsys import mounts


def _btrfs() -> str:
    return which("btrfs", "btrfs-progs")


def fstype_of(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (``btrfs``, ``ext4``...)."""
    p = os.path.realpath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    best = ("", "")
    for m in mounts.mountinfo():
        t = m.target.rstrip("/") or "/"
        if (p == t or p.startswith(t.rstrip("/") + "/") or t == "/") and len(t) >= len(best[0]):
            best = (t, m.fstype)
    return best[1]


def is_btrfs(path: Path) -> bool:
    """True when ``path`` lives on a btrfs filesystem."""
    return fstype_of(path) == "btrfs"


def is_subvolume(path: Path) -> bool:
    """True when ``path`` is a btrfs subvolume (its inode number is 256, the subvolume root)."""
    try:
        return is_btrfs(path) and os.stat(path).st_ino == 256
    except FileNotFoundError:
        return False


def subvolume_create(path: Path) -> None:
    """Create an empty subvolume at ``path`` (its parent must exist, on btrfs)."""
    run([_btrfs(), "-q", "subvolume", "create", str(path)], what=f"btrfs subvolume create {path}")


def snapshot(source: Path, dest: Path, readonly: bool = False) -> None:
    """Snapshot subvolume ``source`` to ``dest`` (copy-on-write: costs metadata only)."""
    argv = [_btrfs(), "-q", "subvolume", "snapshot"]
    if readonly:
        argv.append("-r")
    run([*argv, str(source), str(dest)], what=f"btrfs snapshot {source} -> {dest}")


def subvolume_delete(path: Path) -> None:
    """Delete subvolume ``path`` (and, first, any subvolume nested in it)."""
    if not path.exists():
        return
    # A read-only snapshot must be made writable before deletion of its nested content.
    run([_btrfs(), "property", "set", "-ts", str(path), "ro", "false"], check=False)
    run([_btrfs(), "-q", "subvolume", "delete", str(path)], what=f"btrfs subvolume delete {path}")


def subvolume_list(mountpoint: Path) -> list[str]:
    """Paths (relative to the filesystem top) of every subvolume of the filesystem at
    ``mountpoint``, as ``btrfs subvolume list`` prints them."""
    out = output([_btrfs(), "subvolume", "list", str(mountpoint)])
    return [ln.split(" path ", 1)[1] for ln in out.splitlines() if " path " in ln]


def mkfs(target: Path, label: str = "sidusctl-vnode") -> None:
    """Format ``target`` (a block device or an image file) as btrfs. Destroys its content."""
    mk = which("mkfs.btrfs", "btrfs-progs")
    run([mk, "-q", "-f", "-L", label, str(target)], what=f"mkfs.btrfs {target}")


def used_bytes(mountpoint: Path) -> int:
    """Bytes allocated on the filesystem at ``mountpoint`` (data + metadata, as ``df`` counts),
    after a sync so that delayed allocation is counted."""
    run([_btrfs(), "filesystem", "sync", str(mountpoint)], check=False)
    st = os.statvfs(mountpoint)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def require() -> None:
    """:class:`PrerequisiteError` unless btrfs-progs is installed and the kernel knows btrfs."""
    _btrfs()
    with open("/proc/filesystems") as f:
        if not any(ln.split()[-1] == "btrfs" for ln in f if ln.strip()):
            raise PrerequisiteError("this kernel has no btrfs filesystem (see /proc/filesystems)")
