"""A throwaway vnode: the last step of README's first command (``sidusctl demo``).

One copy-on-write vnode from an image tarball, in a state directory of its own (the user's
vnode store is never touched), on a vnetwork bridge of its own; SSH answers; a real ``ssh``
with a key injected at create time runs ``hostname`` and ``findmnt /`` inside; then everything
is undone: the vnode, the vnetwork bridge, the loop-backed btrfs store, the directory.

A demo killed with SIGKILL can undo nothing: its vnode's container goes on running, its store
stays mounted on its loop device, its bridge stays. Each demo holds a
:class:`~sidusctl.core.state.FileLock` on ``/run/lock/sidusctl-vnode-demo-<prefix>.lock`` whose
note is its directory; the next demo with that prefix finds the killed one's record there and
undoes what it left (:func:`reclaim`) before it starts, with a warning.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidusctl.core.errors import SidusError, StateError
from sidusctl.core.log import get_logger
from sidusctl.core.run import run, which
from sidusctl.core.state import RUN_LOCK_DIR, FileLock, remove_left_dir
from sidusctl.vnode.platform import Platform

log = get_logger("vnode.demo")

#: the demo's vnetwork: a /24 from 10.0.0.0/8 that testbeds rarely route
DEMO_CIDR = "10.213.77.0/24"
#: size of the sparse loop-backed btrfs file holding the store (bytes; sparse, so cheap)
STORE_BYTES = 4 * 2**30

SSH_OPTS = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR")


def vnode_demo(tarball: Path, *, prefix: str = "sidus-demo", workdir: Path | None = None,
               timeout: float = 180.0,
               on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Start one cow vnode from ``tarball`` (a rootfs .tar.zst/.tar.gz as ``build --tar``
    writes), wait for its SSH server, run ``hostname`` and ``findmnt -n -o FSTYPE,SOURCE /``
    in it over SSH, and undo everything, on errors and Ctrl-C too.

    Returns ``{"vnode", "address", "fs", "ssh_seconds", "hostname", "root", "start_seconds",
    "disk_used_bytes"}`` (seconds from ``start``; bytes of the store after the vnode booted).
    Raises StateError if SSH did not answer within ``timeout`` seconds or printed nonsense,
    CommandError if ssh failed, PrerequisiteError if ssh/ssh-keygen are missing."""
    step = on_step or (lambda s: None)
    ssh, keygen = which("ssh", "openssh-client"), which("ssh-keygen", "openssh-client")
    base = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=workdir or "/var/tmp"))
    lock = FileLock(RUN_LOCK_DIR / f"sidusctl-vnode-demo-{prefix}.lock",
                    f"the vnode demo prefix {prefix!r}", remove=True)
    try:
        lock.acquire(note=str(base))
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    name, net = f"{prefix}-v1"[:32], prefix[:12]
    plat = Platform(base / "state")
    created = inited = False
    try:
        if lock.left_behind is not None:
            pid, note = lock.left_behind
            left = reclaim(Path(note) if note.startswith("/") else None, pid)
            if left:
                step(f"vnode: removed what a killed demo left: {', '.join(left)}")
        key = base / "id_ed25519"
        run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", f"{prefix}@demo", "-f", str(key)])
        step("vnode store: loop-backed btrfs (copy-on-write roots)")
        plat.init(btrfs_image=STORE_BYTES)
        inited = True
        plat.net_create(net, DEMO_CIDR)  # undone by deinit() with the store
        step(f"vnode {name}: create from {tarball.name} (cow, vnetwork {net} {DEMO_CIDR})")
        vn = plat.create(name, str(tarball), fs="cow", ifaces=[f"if0:{net}"],
                         ssh_pubkey=Path(f"{key}.pub").read_text())
        created = True
        address = str(vn.ifaces[0].address)
        step(f"vnode {name}: start")
        t0 = time.monotonic()
        plat.start(name)
        waited = plat.wait([name], timeout=timeout)
        if waited.get(name) is None:
            raise StateError(f"vnode {name} ({address}) did not answer SSH within {timeout:.0f} s",
                             hint=f"its console log: {plat.console_log(name)}")
        ssh_s = time.monotonic() - t0
        step(f"vnode {name}: SSH answers at {address} after {ssh_s:.1f} s")
        out = run([ssh, *SSH_OPTS, "-i", str(key), f"root@{address}",
                   "hostname; findmnt -n -o FSTYPE,SOURCE /"], capture=True, timeout=60).stdout
        lines = out.strip().splitlines()
        if len(lines) < 2:
            raise StateError(f"ssh into vnode {name} printed {out!r}; expected the hostname "
                             "and the root filesystem on two lines")
        info = plat.store_info()
        return {"vnode": name, "address": address, "fs": vn.fs, "ssh_seconds": round(ssh_s, 2),
                "hostname": lines[0].strip(), "root": lines[1].strip(),
                "start_seconds": round(plat.timings.get(name, {}).get("root", 0.0)
                                       + plat.timings.get(name, {}).get("container", 0.0), 3),
                "disk_used_bytes": info.get("used_bytes")}
    finally:
        step("vnode: clean up (vnode, vnetwork, store)")
        _undo(plat, name, created, inited)
        shutil.rmtree(base, ignore_errors=True)
        lock.release()


#: what a demo's directory holds: one must be there before a recorded directory is removed
DEMO_FILES = ("state", "id_ed25519")


def reclaim(recorded: Path | None, pid: int) -> list[str]:
    """Undo what the demo ``pid``, killed, left in its directory ``recorded``: every vnode of
    its store destroyed (its container stopped), the store deinitialized (unmounted, its loop
    device and vnetwork bridges gone), the directory removed (if it holds one of
    :data:`DEMO_FILES`). What was removed, as phrases, also logged as a warning; a step that
    fails is logged and the next one still runs."""
    done: list[str] = []
    if recorded is not None and (recorded / "state").is_dir():
        plat = Platform(recorded / "state")
        try:
            names = list(plat.store.read().vnodes)
        except SidusError as e:
            log.warning("vnode demo left by pid %s: its store cannot be read: %s", pid, e)
            names = []
        for vname in names:
            try:
                plat.destroy(vname)
                done.append(f"vnode {vname}")
            except SidusError as e:
                log.warning("vnode demo left by pid %s: destroy %s: %s", pid, vname, e)
        try:
            if plat.store.read().store:
                plat.deinit()
                done.append(f"its store and vnetworks under {recorded / 'state'}")
        except SidusError as e:
            log.warning("vnode demo left by pid %s: store: %s", pid, e)
    done += remove_left_dir(recorded, DEMO_FILES)
    if done:
        log.warning("the last vnode demo here (pid %s) was killed without cleaning up; removed "
                    "%s", pid, ", ".join(done))
    return done


def _undo(plat: Platform, name: str, created: bool, inited: bool) -> None:
    # each step on its own: one failing must not leave the other undone
    if created:
        try:
            plat.destroy(name)
        except Exception as e:  # reported; cleanup continues
            log.warning("demo cleanup: destroy %s: %s", name, e)
    if inited:
        try:
            plat.deinit()  # the vnetwork's bridge, the store's mount and loop device
        except Exception as e:
            log.warning("demo cleanup: store: %s", e)
