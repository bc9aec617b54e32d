"""What the bad-input tests check of a refused command, shared: the exit code, the words that
name the problem, and that it was no internal error; and the host sysctls a vnode store raises
(``host_sysctls`` in conftest.py puts them back after a test)."""

from __future__ import annotations

import subprocess

from sidusctl.subsys import lxc


def assert_refused(res: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """``res`` exited with ``code``, says every needle (stdout or stderr), and is no internal
    error (no traceback, no "internal error")."""
    out = res.stdout + res.stderr
    assert res.returncode == code, out
    assert "internal error" not in out and "Traceback" not in out, out
    for n in needles:
        assert n in out, f"{n!r} not in:\n{out}"


def host_sysctl_values() -> dict[str, str]:
    """The current values of the host sysctls a vnode store raises (lxc.HOST_SYSCTLS)."""
    return {k: (lxc.PROC_SYS / k).read_text() for k in lxc.HOST_SYSCTLS}
