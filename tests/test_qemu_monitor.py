"""qemu's human monitor through :func:`sidusctl.subsys.qemu.monitor_command`, on a real qemu
(a machine that starts its firmware and finds nothing to boot: no image needed, about a
second): the answer comes without the prompt and the echo; a socket nobody serves is a
:class:`GuestError`, not an internal error."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

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
