"""The chroot session: what the SIDUS seed's ``sidus`` alias and its before/after steps do, with
cleanup guaranteed.

On entry: ``usr/sbin/policy-rc.d`` returning 101 (invoke-rc.d(8): no service starts), bind
mounts of /dev, /dev/pts and /dev/shm, fresh proc and sysfs, the host's resolv.conf (so apt can
resolve), and an optional shared apt archive cache bound on ``var/cache/apt/archives``.

On exit, whatever the reason (error, Ctrl-C, SIGTERM turned into an exception by the CLI):
every process still running inside the root is stopped, everything mounted below the root is
unmounted (lazily only as a last resort, with a warning), policy-rc.d and resolv.conf are put
back as they were, and the root's /run and /tmp are emptied. Signals are held off while this
runs so a second Ctrl-C cannot cut it short.

A session that was SIGKILLed leaves a record in ``<root>/.sidusctl-session.json``;
:func:`repair_root` (called by the image store's recovery) reads it and undoes the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sidusctl.core import signals
from sidusctl.core.errors import SidusError
from sidusctl.core.log import get_logger
from sidusctl.core.run import Result, run
from sidusctl.subsys import procs
from sidusctl.subsys.mounts import MountStack, mounts_under, umount_tree

log = get_logger("chroot")

POLICY_RC_D = "#!/bin/sh\n# installed by sidusctl for a chroot session; removed when it ends\nexit 101\n"
SESSION_FILE = ".sidusctl-session.json"
RESOLV_SAVE = "etc/.resolv.conf.sidusctl-saved"

CHROOT_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
    "LC_ALL": "C.UTF-8",
    "LANG": "C.UTF-8",
    "LANGUAGE": "",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "TMPDIR": "/tmp",
}


class ChrootSession:
    """``with ChrootSession(root, apt_cache=...) as s: s.run(["apt-get", "update"])``.

    ``root``: a Debian root directory. ``apt_cache``: a host directory bound on the root's
    ``var/cache/apt/archives`` (shared .deb cache). ``resolv``: copy the host's resolv.conf in
    for the session (restored afterwards). Raises :class:`SidusError` if ``root`` is no root.
    """

    def __init__(self, root: Path, *, apt_cache: Path | None = None, resolv: bool = True) -> None:
        self.root = Path(os.path.realpath(root))
        self.apt_cache = apt_cache
        self.resolv = resolv
        self._mounts = MountStack()
        self._record: dict[str, Any] = {}
        self.active = False

    # -- entry -----------------------------------------------------------------------------
    def __enter__(self) -> ChrootSession:
        if not (self.root / "bin").exists() and not (self.root / "usr/bin").is_dir():
            raise SidusError(f"{self.root} does not look like a Debian root (no /bin, /usr/bin)")
        try:
            with signals.held():
                self._setup()
        except BaseException:
            self._teardown()
            raise
        self.active = True
        return self

    def _save_record(self) -> None:
        (self.root / SESSION_FILE).write_text(json.dumps(self._record))

    def _setup(self) -> None:
        self._record = {"pid": os.getpid(), "policy_rc_d": False, "resolv": None}
        self._save_record()
        policy = self.root / "usr/sbin/policy-rc.d"
        if not policy.exists():
            policy.parent.mkdir(parents=True, exist_ok=True)
            policy.write_text(POLICY_RC_D)
            policy.chmod(0o755)
            self._record["policy_rc_d"] = True
            self._save_record()
        r = self.root
        self._mounts.mount("proc", r / "proc", "proc", ["nosuid", "nodev", "noexec"])
        self._mounts.mount("sysfs", r / "sys", "sysfs", ["ro", "nosuid", "nodev", "noexec"])
        self._mounts.mount("/dev", r / "dev", bind=True)
        self._mounts.mount("/dev/pts", r / "dev/pts", bind=True)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else "/run/shm"
        self._mounts.mount(shm, r / "dev/shm", bind=True)
        if self.apt_cache is not None:
            self.apt_cache.mkdir(parents=True, exist_ok=True)
            (self.apt_cache / "partial").mkdir(exist_ok=True)
            self._mounts.mount(str(self.apt_cache), r / "var/cache/apt/archives", bind=True)
        if self.resolv and os.path.exists("/etc/resolv.conf"):
            rc = r / "etc/resolv.conf"
            save = r / RESOLV_SAVE
            if rc.is_symlink():
                self._record["resolv"] = {"symlink": os.readlink(rc)}
            elif rc.exists():
                shutil.copy2(rc, save)
                self._record["resolv"] = {"file": True}
            else:
                self._record["resolv"] = {"absent": True}
            self._save_record()
            with contextlib.suppress(FileNotFoundError):
                rc.unlink()
            shutil.copyfile("/etc/resolv.conf", rc)

    # -- use -------------------------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        capture: bool = False,
        what: str = "",
        **kw: Any,
    ) -> Result:
        """Run ``argv`` inside the root (chroot(8)), non-interactively; same errors as
        :func:`sidusctl.core.run.run`."""
        full = dict(CHROOT_ENV)
        if env:
            full.update(env)
        return run(["chroot", str(self.root), *argv], env=full, check=check, capture=capture,
                   what=what or argv[0], **kw)

    def interactive(self, argv: Sequence[str]) -> int:
        """Run ``argv`` inside the root attached to our terminal; returns its exit code."""
        env = dict(os.environ)
        env.update(CHROOT_ENV)
        env.pop("DEBIAN_FRONTEND", None)
        env["TERM"] = os.environ.get("TERM", "xterm")
        return subprocess.call(["chroot", str(self.root), *argv], env=env)

    # -- exit ------------------------------------------------------------------------------
    def __exit__(self, *exc: object) -> None:
        with signals.held():
            self._teardown()
        self.active = False

    def _teardown(self) -> None:
        procs.kill_in_root(self.root)
        self._mounts.close()
        leftovers = [t for t in mounts_under(self.root) if t != str(self.root)]
        if leftovers:
            # Mounted by something inside the root (binfmt_misc under proc, say).
            umount_tree_below(self.root)
        _restore(self.root, self._record)
        _empty(self.root / "run")
        _empty(self.root / "tmp")
        with contextlib.suppress(FileNotFoundError):
            (self.root / SESSION_FILE).unlink()


def umount_tree_below(root: Path) -> None:
    """Unmount every mount strictly below ``root`` (``root`` itself is left alone)."""
    for t in mounts_under(root):
        if t != os.path.realpath(root):
            umount_tree(t)


def _restore(root: Path, record: Mapping[str, Any]) -> None:
    policy = root / "usr/sbin/policy-rc.d"
    if record.get("policy_rc_d"):
        with contextlib.suppress(FileNotFoundError):
            policy.unlink()
    res = record.get("resolv")
    if res:
        rc = root / "etc/resolv.conf"
        with contextlib.suppress(FileNotFoundError):
            rc.unlink()
        if "symlink" in res:
            os.symlink(res["symlink"], rc)
        elif res.get("file"):
            os.replace(root / RESOLV_SAVE, rc)


def _empty(d: Path) -> None:
    if not d.is_dir() or d.is_symlink():
        return
    if mounts_under(d):
        return  # never delete through a mount we could not undo
    for p in d.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def repair_root(root: Path) -> list[str]:
    """Undo what a SIGKILLed session left in ``root`` (stray processes, mounts, our
    policy-rc.d, the swapped resolv.conf). Returns one line per repair; [] if nothing to do."""
    rec_path = root / SESSION_FILE
    if not rec_path.exists():
        return []
    actions = []
    try:
        record = json.loads(rec_path.read_text())
    except ValueError:
        record = {}
    killed = procs.kill_in_root(root)
    if killed:
        actions.append(f"killed {len(killed)} process(es) in {root}")
    if [t for t in mounts_under(root) if t != os.path.realpath(root)]:
        umount_tree_below(root)
        actions.append(f"unmounted leftovers below {root}")
    _restore(root, record)
    _empty(root / "run")
    _empty(root / "tmp")
    rec_path.unlink()
    actions.append(f"restored {root} after an interrupted session (pid {record.get('pid')})")
    return actions
