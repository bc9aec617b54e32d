"""LXC containers (the lxc-* tools of LXC >= 4): write a container's config, start, stop,
freeze, attach, read its state and change its cgroup settings live. Containers live under an
explicit ``lxcpath`` (``-P``) so that each sidusctl state directory has its own.

Config: ``templates/lxc/vnode.conf.j2`` (veth ifaces on bridges, console log via
``lxc.console.logfile``, cgroup keys ``lxc.cgroup.*`` for v1 and ``lxc.cgroup2.*`` for v2).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidusctl.core.errors import CommandError, SidusError
from sidusctl.core.log import get_logger
from sidusctl.core.run import Result, output, run, which
from sidusctl.core.state import atomic_write_text
from sidusctl.subsys.templates import render

log = get_logger("subsys.lxc")

COMMON_CONF = Path("/usr/share/lxc/config/common.conf")


def _tool(name: str) -> str:
    return which(name, "lxc")


@dataclass(frozen=True)
class Container:
    """Container ``name`` under ``lxcpath``: config at ``lxcpath/name/config``."""

    name: str
    lxcpath: Path

    @property
    def dir(self) -> Path:
        """The container's directory, ``<lxcpath>/<name>``: its config and logs."""
        return self.lxcpath / self.name

    @property
    def config(self) -> Path:
        """The LXC config file, ``<dir>/config``, written by :meth:`write_config`."""
        return self.dir / "config"

    @property
    def console_log(self) -> Path:
        """The console output file, ``<dir>/console.log``; deleted at each :meth:`start`."""
        return self.dir / "console.log"

    @property
    def log_file(self) -> Path:
        """LXC's own log, ``<dir>/lxc.log``, read for start errors and :meth:`exit_status`;
        deleted at each :meth:`start`."""
        return self.dir / "lxc.log"

    def _argv(self, tool: str) -> list[str]:
        return [_tool(tool), "-P", str(self.lxcpath), "-n", self.name]

    # -- config ----------------------------------------------------------------------------
    def write_config(self, rootfs: Path, ifaces: Sequence[dict[str, Any]],
                     cgroups: Sequence[tuple[int, str, str]],
                     devices: Sequence[dict[str, str]] = ()) -> str:
        """Render and write the config; returns its text."""
        text = render("lxc/vnode.conf.j2", vname=self.name, rootfs=str(rootfs),
                      common_conf=str(COMMON_CONF), console_log=str(self.console_log),
                      log_file=str(self.log_file), ifaces=list(ifaces), cgroups=list(cgroups),
                      devices=list(devices))
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config, text)
        return text

    def remove(self) -> None:
        """Forget the container (its config and logs); it must be stopped."""
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- lifecycle -------------------------------------------------------------------------
    def state(self) -> str:
        """``RUNNING``, ``STOPPED``, ``FROZEN``, ``STARTING``, ``STOPPING``... or ``ABSENT``."""
        if not self.config.exists():
            return "ABSENT"
        try:
            return output([*self._argv("lxc-info"), "-s", "-H"], timeout=30).strip() or "STOPPED"
        except CommandError:
            return "STOPPED"

    def pid(self) -> int | None:
        """PID (in the host's namespace) of the container's init, or None if not running."""
        try:
            out = output([*self._argv("lxc-info"), "-p", "-H"], timeout=30).strip()
        except CommandError:
            return None
        return int(out) if out.isdigit() else None

    def start(self) -> None:
        """Start daemonized; :class:`SidusError` with the tail of the LXC log if it fails."""
        self.log_file.unlink(missing_ok=True)
        self.console_log.unlink(missing_ok=True)
        try:
            run([*self._argv("lxc-start"), "-d"], what=f"lxc-start {self.name}", timeout=120)
        except CommandError as e:
            tail = ""
            if self.log_file.exists():
                lines = [ln for ln in self.log_file.read_text(errors="replace").splitlines()
                         if " ERROR " in ln]
                tail = "\n".join("    " + ln for ln in lines[-8:])
            raise SidusError(f"container {self.name} failed to start:\n{tail or e.output_tail}",
                             hint=f"see {self.log_file} and {self.console_log}") from e
        try:
            run([*self._argv("lxc-wait"), "-s", "RUNNING", "-t", "30"], what="lxc-wait")
        except CommandError as e:
            raise SidusError(f"container {self.name} died while starting",
                             hint=f"see {self.log_file} and {self.console_log}") from e

    def stop(self, timeout: int = 10) -> None:
        """Clean shutdown (SIGPWR to init) for ``timeout`` s, then kill. No error if stopped."""
        st = self.state()
        if st in ("STOPPED", "ABSENT"):
            return
        if st == "FROZEN":
            self.unfreeze()
        r = run([*self._argv("lxc-stop"), "-t", str(timeout)], check=False, timeout=timeout + 30)
        if r.returncode != 0 and self.state() not in ("STOPPED", "ABSENT"):
            run([*self._argv("lxc-stop"), "-k"], what=f"lxc-stop -k {self.name}", timeout=60)

    def freeze(self) -> None:
        """Freeze the running container (lxc-freeze, 60 s at most); :class:`CommandError` if it
        fails."""
        run(self._argv("lxc-freeze"), what=f"lxc-freeze {self.name}", timeout=60)

    def unfreeze(self) -> None:
        """Thaw the frozen container (lxc-unfreeze, 60 s at most); :class:`CommandError` if it
        fails."""
        run(self._argv("lxc-unfreeze"), what=f"lxc-unfreeze {self.name}", timeout=60)

    def attach(self, argv: Sequence[str], *, check: bool = True, capture: bool = True,
               timeout: float | None = None, input: bytes | None = None) -> Result:
        """Run ``argv`` inside the container (its namespaces and cgroups) with a clean env."""
        return run([*self._argv("lxc-attach"), "--clear-env", "--", *argv], check=check,
                   capture=capture, timeout=timeout, input=input,
                   what=f"{argv[0]} in {self.name}")

    def cgroup_set(self, key: str, value: str) -> None:
        """Change cgroup file ``key`` of the running container (v1 or v2 as LXC finds it)."""
        run([*self._argv("lxc-cgroup"), "--", key, value], what=f"lxc-cgroup {self.name} {key}={value}",
            timeout=30)

    def cgroup_get(self, key: str) -> str:
        """The value of cgroup file ``key`` of the running container as lxc-cgroup prints it (the
        final newline stripped); :class:`CommandError` if it fails."""
        return output([*self._argv("lxc-cgroup"), "--", key], timeout=30)

    def exit_status(self) -> int | None:
        """Exit code of the container's init from the LXC log (signal N -> 128+N), if known."""
        if not self.log_file.exists():
            return None
        text = self.log_file.read_text(errors="replace")
        code: int | None = None
        for m in re.finditer(r"Child <\d+> ended on (?:error \((\d+)\)|signal [^(]*\((\d+)\))|"
                             r"exited with status (\d+)", text):
            if m.group(1):
                code = int(m.group(1))
            elif m.group(2):
                code = 128 + int(m.group(2))
            elif m.group(3):
                code = int(m.group(3))
        return code


#: Host limits that many systemd containers exhaust (each systemd, journald, udev... holds
#: inotify instances: 128 per user, the default, is about 30 containers). Keys are paths under
#: :data:`PROC_SYS`; values the minimum wanted.
HOST_SYSCTLS = {"fs/inotify/max_user_instances": 8192, "fs/inotify/max_user_watches": 1048576}
PROC_SYS = Path("/proc/sys")


def _sysctl_name(key: str) -> str:
    return key.replace("/", ".")


def _read_sysctl(key: str) -> int | None:
    try:
        return int((PROC_SYS / key).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def raise_host_sysctls() -> dict[str, dict[str, int]]:
    """Raise (never lower) the host limits of :data:`HOST_SYSCTLS`, as LXC's and LXD's
    production notes advise, logging each change at info level before making it. Returns
    ``{key: {"before": old, "set": new}}`` for the ones actually changed (integers, the
    sysctl's own unit), for :func:`restore_host_sysctls`. A sysctl that cannot be read or
    written (not root, no such key) is skipped with a debug line; never raises."""
    done: dict[str, dict[str, int]] = {}
    for key, want in HOST_SYSCTLS.items():
        have = _read_sysctl(key)
        if have is None or have >= want:
            continue
        log.info("raising host sysctl %s from %d to %d (many containers; restored by "
                 "'sidusctl vnode deinit')", _sysctl_name(key), have, want)
        try:
            (PROC_SYS / key).write_text(f"{want}\n")
        except OSError as e:
            log.debug("cannot raise %s: %s", _sysctl_name(key), e)
            continue
        done[key] = {"before": have, "set": want}
    return done


def restore_host_sysctls(recorded: dict[str, Any]) -> list[str]:
    """Put back the values :func:`raise_host_sysctls` recorded (``{key: {"before", "set"}}``),
    each only if the sysctl still holds the value we set (someone else may have changed it
    since: theirs is kept). Logs each restore at info level; returns one line per sysctl
    restored. Never raises (a malformed record or an unwritable key is skipped)."""
    done = []
    for key, rec in recorded.items():
        if key not in HOST_SYSCTLS or not isinstance(rec, dict):
            continue
        before, mine = rec.get("before"), rec.get("set")
        if not isinstance(before, int) or not isinstance(mine, int):
            continue
        have = _read_sysctl(key)
        if have != mine:
            log.info("host sysctl %s is %s, not the %d we set: left as it is",
                     _sysctl_name(key), have, mine)
            continue
        log.info("restoring host sysctl %s from %d to %d", _sysctl_name(key), mine, before)
        try:
            (PROC_SYS / key).write_text(f"{before}\n")
        except OSError as e:
            log.warning("cannot restore %s to %d: %s", _sysctl_name(key), before, e)
            continue
        done.append(f"sysctl {_sysctl_name(key)}: {mine} -> {before}")
    return done


def list_active(lxcpath: Path) -> list[str]:
    """Names of the containers under ``lxcpath`` in any state but stopped (running, frozen,
    starting, stopping), in one call; see :func:`_ls`."""
    return _ls(lxcpath, "--active")


def list_running(lxcpath: Path) -> list[str]:
    """Names of running containers under ``lxcpath``; see :func:`_ls`."""
    return _ls(lxcpath, "--running")


def _ls(lxcpath: Path, which_ones: str) -> list[str]:
    """``lxc-ls -1 WHICH_ONES`` (lxc-ls(1)) under ``lxcpath``: the names; [] when
    ``lxcpath`` does not exist or lxc-ls fails."""
    if not lxcpath.is_dir():
        return []
    out = output([_tool("lxc-ls"), "-P", str(lxcpath), "-1", which_ones], check=False)
    return out.split()
