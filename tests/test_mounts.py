"""sidusctl/subsys/mounts.py's umount_tree on real tmpfs mounts: stacked mounts on one point
and mounts below it all go, deepest first; what stays mounted whatever umount says is named in
a warning (that case is forced with a fake: a mount umount cannot remove yet reports gone).
Root only."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from sidusctl.subsys import mounts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount)")


def _tmpfs(target: Path) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "sdt-mnt", str(target)],
                   check=True)


def test_stacked_and_nested_mounts_all_go_deepest_first(tmp_path: Path) -> None:
    top = tmp_path / "sdt-top"
    top.mkdir()
    try:
        for _ in range(3):  # stacked: each hides the one under it
            _tmpfs(top)
        (top / "a" / "b").mkdir(parents=True)
        _tmpfs(top / "a")
        (top / "a" / "b").mkdir()
        _tmpfs(top / "a" / "b")
        done = mounts.umount_tree(top)
        assert done[:2] == [str(top / "a" / "b"), str(top / "a")]
        assert done[2:] == [str(top)] * 3
        assert mounts.mounts_under(top) == []
    finally:
        while mounts.is_mountpoint(top):
            subprocess.run(["umount", "-l", str(top)], check=False)


def test_a_mount_left_after_every_round_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    stuck = str(tmp_path / "sdt-stuck")
    calls: list[str] = []
    monkeypatch.setattr(mounts, "mounts_under", lambda _p: [stuck])

    def umount(target: str) -> bool:
        calls.append(target)
        return True  # "not mounted", as umount(8) says of a path it cannot match

    monkeypatch.setattr(mounts, "umount", umount)
    with caplog.at_level(logging.WARNING):
        done = mounts.umount_tree(tmp_path)
    assert len(calls) == 20 and done == [stuck] * 20
    assert f"still mounted under {tmp_path} after 20 rounds of umount: {stuck}" in caplog.text
