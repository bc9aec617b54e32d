"""Atomic state files (:mod:`sidusctl.core.state`): a durable write reaches the disk (file and
directory fsync) before it replaces the old file; a non-durable one (a server's status,
rewritten every few seconds) only renames, and readers still never see a partial file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidusctl.core.state import read_json, write_json


@pytest.mark.parametrize(("durable", "syncs"), [(True, 2), (False, 0)])
def test_json_write_replaces_atomically_and_syncs_only_when_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool, syncs: int) -> None:
    path = tmp_path / "sub" / "status.json"
    calls: list[int] = []
    real = os.fsync

    def counting_fsync(fd: int) -> None:  # the real call, counted
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    write_json(path, {"a": 1}, compact=True, durable=durable)
    assert len(calls) == syncs  # the data, then the directory's entry
    # a reader holding the old file keeps reading it whole; the new one replaces it
    with path.open() as old:
        write_json(path, {"a": 2, "b": [1, 2]}, compact=True, durable=durable)
        assert old.read() == '{"a":1}\n'
    assert read_json(path) == {"a": 2, "b": [1, 2]}
    assert len(calls) == 2 * syncs
    assert sorted(p.name for p in path.parent.iterdir()) == ["status.json"]  # no temp left
    assert (path.stat().st_mode & 0o777) == 0o644
