"""The live processes of this machine, read from /proc (proc(5): ``/proc/PID/stat``), for
tests that check what a run left behind."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, NamedTuple


class Proc(NamedTuple):
    """One process: ``ppid`` (its parent), ``sid`` (its session), ``comm`` (its name)."""

    ppid: int
    sid: int
    comm: str


def live_processes() -> dict[int, Proc]:
    """pid -> :class:`Proc` of every process that is not a zombie (state ``Z`` or ``X``);
    one that ends while it is read is left out."""
    out: dict[int, Proc] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        # after the name: state, ppid, pgrp, session, ...
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] not in ("Z", "X"):
            out[int(d.name)] = Proc(int(fields[1]), int(fields[3]), comm)
    return out


def terminate(proc: subprocess.Popen[Any], timeout: float) -> None:
    """Stops ``proc`` if it still runs: SIGTERM, then SIGKILL if it has not ended after
    ``timeout`` seconds; returns once it has ended (reaped)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
