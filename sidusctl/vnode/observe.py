"""What a vnode platform reports about itself: DETER-style status per host and vnode (state,
boot status, start-command exit code) and the wait until vnodes answer SSH. A mixin of
:class:`sidusctl.vnode.platform.Platform`, which provides ``store``, ``_container`` and
``_start_command_exit``."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidusctl.core.errors import CommandError, NotFoundError, SidusError, StateError
from sidusctl.core.run import output, which
from sidusctl.subsys import lxc
from sidusctl.vnode.model import FROZEN, READY, RUNNING, VNode

if TYPE_CHECKING:
    from sidusctl.vnode.store import Store

Progress = Callable[[str], None]
STATUS_WORKERS = 32  # vnodes asked at once by status()
#: in a running container's LXC directory: the PID and start time of the init that was seen
#: booted. Booted stays booted until the container's init changes (a restart), so status asks
#: systemd (an lxc-attach) only until it has seen the boot finish once.
BOOTED_MARK = "sidusctl-booted"


class Observe:
    """Status and SSH wait (see the module docstring)."""

    store: Store

    def _container(self, name: str) -> lxc.Container:
        raise NotImplementedError

    def _start_command_exit(self, vn: VNode) -> int | None:
        raise NotImplementedError

    def status(self, names: Sequence[str] = ()) -> dict[str, Any]:
        """Per host, per vnode (DETER-like): ``state`` (READY/RUNNING/FROZEN), ``boot``
        (``started``: container running, init not yet at its target; ``booted``: init reached
        its target; ``dead``: recorded running but the container is gone; None when READY) and
        ``exit_code`` (start command's, or the container init's once dead)."""
        st = self.store.read()
        for n in names:
            if n not in st.vnodes:
                raise NotFoundError(f"no vnode named {n!r}")
        chosen = [vn for vn in sorted(st.vnodes.values(), key=lambda v: v.name)
                  if not names or vn.name in names]
        listed = self._states(chosen)

        def one(vn: VNode) -> dict[str, Any]:
            c = self._container(vn.name)
            real, pid = listed[vn.name] if vn.name in listed else (c.state(), None)
            boot: str | None = None
            code = vn.exit_code
            state = vn.state
            if real == "RUNNING":
                state = RUNNING
                boot = self._boot_status(c, pid)
                if vn.start_command:
                    code = self._start_command_exit(vn)
            elif real == "FROZEN":
                state, boot = FROZEN, "frozen"
            elif vn.state in (RUNNING, FROZEN):
                state, boot = READY, "dead"
                code = c.exit_status() if code is None else code
            return {"state": state, "boot": boot, "exit_code": code,
                    "addresses": [i.address for i in vn.ifaces]}

        # each answer is an lxc-info and an lxc-attach (tens of ms of waiting each): asked of
        # all vnodes at once, so status over a packed host stays about one round trip
        with ThreadPoolExecutor(max_workers=max(1, min(STATUS_WORKERS, len(chosen)))) as ex:
            answers = list(ex.map(one, chosen))
        hosts: dict[str, dict[str, Any]] = {}
        for vn, a in zip(chosen, answers, strict=True):
            hosts.setdefault(vn.host, {})[vn.name] = a
        return {"hosts": hosts}

    def _states(self, chosen: Sequence[VNode]) -> dict[str, tuple[str, int | None]]:
        """State and init PID of every container of the store, from one ``lxc-ls --fancy``
        (not one lxc-info per vnode); empty if lxc-ls fails (each vnode is then asked)."""
        if not chosen:
            return {}
        lxcpath = self._container(chosen[0].name).lxcpath
        try:
            out = output([which("lxc-ls", "lxc"), "-P", str(lxcpath), "--fancy",
                          "--fancy-format", "NAME,STATE,PID"], timeout=30)
        except SidusError:
            return {}
        got: dict[str, tuple[str, int | None]] = {}
        for line in out.splitlines()[1:]:
            f = line.split()
            if len(f) >= 2:
                got[f[0]] = (f[1], int(f[2]) if len(f) > 2 and f[2].isdigit() else None)
        return got

    @classmethod
    def _boot_status(cls, c: lxc.Container, pid: int | None = None) -> str:
        """``booted`` or ``started`` (see :meth:`status`); with the init's ``pid``, remembered
        once booted (:data:`BOOTED_MARK`)."""
        mark = c.dir / BOOTED_MARK
        init = None
        if pid is not None:
            with contextlib.suppress(OSError, IndexError):
                # /proc/PID/stat: the start time is field 22, the 20th after "(comm)"
                init = f"{pid} {Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[19]}"
                if mark.read_text().strip() == init:
                    return "booted"
        boot = cls._ask_boot_status(c)
        if boot == "booted" and init is not None:
            with contextlib.suppress(OSError):
                mark.write_text(f"{init}\n")
        return boot

    @staticmethod
    def _ask_boot_status(c: lxc.Container) -> str:
        try:
            r = c.attach(["systemctl", "is-system-running"], check=False, timeout=15)
        except CommandError:
            return "started"
        s = r.stdout.strip()
        if s in ("running", "degraded"):
            return "booted"
        if r.returncode == 127 or not s:
            r = c.attach(["runlevel"], check=False, timeout=15)
            if r.returncode == 0 and r.stdout.split()[-1:] not in (["unknown"], []):
                return "booted"
        return "started"

    def wait(self, names: Sequence[str] = (), timeout: float = 120.0,
             progress: Progress | None = None) -> dict[str, float | None]:
        """Wait until each vnode (all RUNNING ones by default) answers SSH: a TCP connection to
        port 22 of its first address returns an ``SSH-`` banner (RFC 4253, 4.2). Returns the
        seconds each took, or None for those that did not answer within ``timeout``."""
        st = self.store.read()
        targets: dict[str, str] = {}
        for vn in st.vnodes.values():
            if names and vn.name not in names:
                continue
            if not vn.ifaces or not vn.ifaces[0].address:
                raise StateError(f"vnode {vn.name!r} has no address to reach SSH on")
            if not names and vn.state == READY:
                continue
            targets[vn.name] = str(vn.ifaces[0].address)
        for n in names:
            if n not in st.vnodes:
                raise NotFoundError(f"no vnode named {n!r}")
        t0 = time.monotonic()
        result: dict[str, float | None] = {n: None for n in targets}
        lock = threading.Lock()

        def probe(name: str, addr: str) -> None:
            while time.monotonic() - t0 < timeout:
                try:
                    with socket.create_connection((addr, 22), timeout=2) as s:
                        s.settimeout(5)
                        if s.recv(64).startswith(b"SSH-"):
                            with lock:
                                result[name] = time.monotonic() - t0
                            if progress:
                                progress(name)
                            return
                except OSError:
                    pass
                time.sleep(0.3)

        threads = [threading.Thread(target=probe, args=(n, a), daemon=True)
                   for n, a in targets.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return result
