"""sidusctl.subsys.rootio: confined I/O in an untrusted root never goes through a symlink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidusctl.subsys import rootio


def _root(tmp_path: Path) -> tuple[Path, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host\n")
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    return root, outside


def test_write_read_and_modes(tmp_path: Path) -> None:
    root, _ = _root(tmp_path)
    rootio.write_file_in_root(root, "a/b/c.txt", b"x" * 10, 0o600, uid=1, gid=2)
    st = os.stat(root / "a/b/c.txt")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o600, 1, 2)
    assert os.stat(root / "a").st_mode & 0o7777 == 0o755
    assert rootio.read_file_in_root(root, "a/b/c.txt") == b"x" * 10
    assert rootio.read_file_in_root(root, "a/b/c.txt", limit=3) == b"xxx"
    assert rootio.read_file_in_root(root, "a/missing") is None
    rootio.mkdir_in_root(root, "home/u/.ssh", 0o700)
    assert os.stat(root / "home/u/.ssh").st_mode & 0o7777 == 0o700


def test_symlinked_parent_is_refused_and_nothing_escapes(tmp_path: Path) -> None:
    root, outside = _root(tmp_path)
    (root / "root").symlink_to(outside)
    with pytest.raises(rootio.UnsafePathError, match="symlink"):
        rootio.write_file_in_root(root, "root/x", b"evil")
    with pytest.raises(rootio.UnsafePathError):
        rootio.mkdir_in_root(root, "root/.ssh", 0o700)
    assert rootio.read_file_in_root(root, "root/secret") is None
    assert not rootio.lexists_in_root(root, "root/secret")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_symlink_as_last_component_is_replaced_not_followed(tmp_path: Path) -> None:
    root, outside = _root(tmp_path)
    (root / "etc" / "hosts").symlink_to(outside / "secret")
    assert rootio.read_file_in_root(root, "etc/hosts") is None
    assert rootio.lexists_in_root(root, "etc/hosts")
    rootio.write_file_in_root(root, "etc/hosts", b"127.0.0.1 localhost\n")
    assert (outside / "secret").read_text() == "host\n"
    assert not (root / "etc" / "hosts").is_symlink()
    rootio.symlink_in_root(root, "etc/link", "/nowhere")
    assert os.readlink(root / "etc" / "link") == "/nowhere"


@pytest.mark.parametrize("rel", ["/etc/x", "../x", "etc/../../x", "", "./"])
def test_bad_relative_paths(tmp_path: Path, rel: str) -> None:
    root, _ = _root(tmp_path)
    with pytest.raises(rootio.UnsafePathError):
        rootio.write_file_in_root(root, rel, b"")


def test_directory_in_the_way_is_refused(tmp_path: Path) -> None:
    root, _ = _root(tmp_path)
    with pytest.raises(rootio.UnsafePathError, match="directory"):
        rootio.write_file_in_root(root, "etc", b"")
