"""qemu's human monitor through :func:`sidusctl.subsys.qemu.monitor_command`, on a real qemu
(a machine that starts its firmware and finds nothing to boot: no image needed, about a
second): the answer comes without the prompt and the echo; a socket nobody serves is a
:class:`GuestError`, not an internal error."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from sidusctl.core.errors import SidusError
from sidusctl.subsys import qemu

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 missing")


def test_monitor_answers_one_command_at_a_time(tmp_path: Path) -> None:
    sock = tmp_path / "sdt-mon.sock"
    g = qemu.Guest("sdt-mon", monitor=sock, memory=64, nic_rom=False)
    try:
        # the socket exists once qemu listens
        deadline = time.monotonic() + 30
        while not sock.exists() and g.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert qemu.monitor_command(sock, "info status") == "VM status: running"
        jit = qemu.monitor_command(sock, "info jit")
        assert jit.startswith("Translation buffer state:"), jit
        assert "TB count" in jit and "TB invalidate count" in jit and "(qemu)" not in jit
    finally:
        g.close()
    with pytest.raises(qemu.GuestError, match=r"sdt-mon\.sock"):
        qemu.monitor_command(sock, "info status", timeout=2)


def test_prealloc_holds_the_vcpus_until_cont(tmp_path: Path) -> None:
    """``prealloc``: qemu faults in the guest's RAM and keeps the vCPUs stopped; :meth:`cont`
    starts them once the monitor answers and restarts the guest's clock there."""
    with pytest.raises(SidusError, match="prealloc needs monitor"):
        qemu.Guest("sdt-pre", prealloc=True, memory=64, nic_rom=False)
    sock = tmp_path / "sdt-pre.sock"
    g = qemu.Guest("sdt-pre", monitor=sock, prealloc=True, memory=64, nic_rom=False)
    try:
        created = g.started
        assert "-mem-prealloc" in g.argv and "-S" in g.argv
        deadline = time.monotonic() + 30
        while not sock.exists() and g.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert qemu.monitor_command(sock, "info status") == "VM status: paused (prelaunch)"
        setup = g.cont()
        assert setup >= 0 and g.started > created
        assert qemu.monitor_command(sock, "info status") == "VM status: running"
    finally:
        g.close()
