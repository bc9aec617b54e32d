"""Loop devices (losetup(8)): attach a file as a block device, find and detach it."""

from __future__ import annotations

import json
from pathlib import Path

from sidusctl.core.run import output, run, which


def attach(backing: Path, direct_io: bool = False) -> str:
    """Attach ``backing`` to a free loop device; returns its path (``/dev/loopN``)."""
    argv = [which("losetup", "mount"), "--find", "--show"]
    if direct_io:
        argv.append("--direct-io=on")
    return output([*argv, str(backing)], what=f"losetup {backing}")


def detach(device: str) -> None:
    """Detach ``device`` (no error if it is already gone)."""
    run([which("losetup", "mount"), "--detach", device], check=False)


def devices_of(backing: Path) -> list[str]:
    """Loop devices whose backing file is ``backing``."""
    out = output([which("losetup", "mount"), "--json", "--list"])
    if not out.strip():
        return []
    rows = json.loads(out).get("loopdevices", [])
    want = str(backing.resolve())
    return [r["name"] for r in rows if (r.get("back-file") or "").split(" (")[0] == want]
