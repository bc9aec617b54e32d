"""The stage cache's overlay restore (sidusctl/subsys/overlayroot.py) on a small real tree: a
real overlayfs mount over a cache entry, the changes an install makes, and the merged tree
written out by hard links; then unshare_tree, which a write in place must come after.
Root only (mounts, mknod, chown, trusted.* xattrs)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.test_build_incremental import _meta_walk, special_tree, tree_diff

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (overlayfs, mknod)")


def _lower(src: Path) -> None:
    special_tree(src, confs=10)
    for d in ("var/lib/old", "var/lib/keep"):
        (src / d).mkdir(parents=True)
        for i in range(3):
            (src / d / f"f{i}").write_text(f"{d} {i}\n")


def _install(merged: Path) -> None:
    """What a package install and the later stages do to the root, through the overlay."""
    (merged / "etc/conf0").write_text("CONF 0\n")  # copy-up, then written
    os.chmod(merged / "etc/conf1", 0o600)  # metadata only: a copy-up all the same
    os.setxattr(merged / "etc/conf2", "user.sdt", b"new")
    os.rename(merged / "etc/conf3", merged / "etc/conf3-moved")
    os.link(merged / "etc/conf4", merged / "etc/conf4-link")
    (merged / "etc/conf5").unlink()  # a whiteout
    with open(merged / "usr/bin/tool-hardlink", "ab") as f:  # one of two links written
        f.write(b"appended")
    subprocess.run(["rm", "-rf", str(merged / "var/lib/old")], check=True)
    (merged / "var/lib/old").mkdir()  # an opaque directory: the old files stay hidden
    (merged / "var/lib/old/new").write_text("new\n")
    (merged / "var/lib/keep/f3").write_text("added\n")  # a merged directory
    (merged / "usr/bin/new").write_bytes(os.urandom(70_000))
    os.link(merged / "usr/bin/new", merged / "usr/bin/new-link")
    os.symlink("new", merged / "usr/bin/new-sym")
    os.mknod(merged / "etc/zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    os.chmod(merged / "tmp", 0o1777)


def test_overlay_written_out_equals_the_merged_tree_and_links_the_lower(tmp_path: Path) -> None:
    from sidusctl.subsys.overlayroot import materialize, mount_overlay
    from sidusctl.subsys.treecopy import tree_digest, unshare_tree

    lower = tmp_path / "entry"
    _lower(lower)
    before = tree_digest(lower)[0]
    ov = mount_overlay(lower, tmp_path / "layers", tmp_path / "merged")
    try:
        _install(ov.merged)
        want = _meta_walk(ov.merged)
        assert "var/lib/old/f0" not in want and "etc/conf5" not in want
        # while mounted, the upper files copied (a stage cache entry: the build goes on)
        saved = materialize(lower, ov.upper, tmp_path / "saved", link_upper=False,
                            lower_files={"etc/motd": "x" * 64})
        assert tree_diff(want, _meta_walk(tmp_path / "saved")) == []
        assert saved.known == {"etc/motd": "x" * 64}
    finally:
        ov.umount()
    assert tree_digest(lower)[0] == before  # the entry was never written
    gen = tmp_path / "merged"  # written out on the mount point itself, as a build does
    made = materialize(lower, ov.upper, gen, link_upper=True)
    assert tree_diff(want, _meta_walk(gen)) == []
    assert tree_digest(gen)[0] == tree_digest(tmp_path / "saved")[0]

    def ino(p: Path) -> int:
        return p.lstat().st_ino

    assert ino(gen / "usr/bin/ping") == ino(lower / "usr/bin/ping")  # untouched: linked
    assert ino(gen / "etc/motd") == ino(lower / "etc/motd")
    for rel in ("etc/conf0", "etc/conf1", "etc/conf2", "usr/bin/tool-hardlink"):
        assert ino(gen / rel) != ino(lower / rel), rel  # copied up: the upper's inode
    assert ino(gen / "usr/bin/tool") == ino(lower / "usr/bin/tool")  # its other link stayed
    assert made.linked > 0 and made.from_upper >= 8, made
    for p in gen.rglob("*"):  # overlayfs' own xattrs never reach the tree
        assert not [x for x in os.listxattr(p, follow_symlinks=False)
                    if x.startswith("trusted.overlay.")], p
    assert stat.S_IMODE((gen / "usr/bin/ping").lstat().st_mode) == 0o4755
    assert "security.capability" in os.listxattr(gen / "usr/bin/ping")

    # a write in place comes after unshare_tree, and then leaves the entry alone
    shared = tree_digest(gen)[0]
    n = unshare_tree(gen)
    assert n >= made.linked - 1, (n, made)  # tool and its link were one shared inode
    assert tree_diff(want, _meta_walk(gen)) == []  # same tree, mtimes and in-tree links kept
    assert tree_digest(gen)[0] == shared
    assert ino(gen / "usr/bin/ping") != ino(lower / "usr/bin/ping")
    assert unshare_tree(gen) == 0
    with open(gen / "etc/motd", "a") as f:
        f.write("written in place\n")
    assert tree_digest(lower)[0] == before


def test_stage_cache_overlay_restore_pins_the_entry_until_written_out(tmp_path: Path) -> None:
    """Through the cache: where a restore would be a plain copy, it is an overlay on the
    checked entry, which no eviction or removal can delete while it is mounted; written out,
    the root outlives the entry."""
    from sidusctl.core.errors import StateError
    from sidusctl.image.stagecache import StageCache, stage_key
    from sidusctl.subsys.mounts import mounts_under
    from sidusctl.subsys.treecopy import copy_method, tree_digest

    src = tmp_path / "src"
    special_tree(src, confs=3)
    cache = StageCache(tmp_path / "state")
    key = stage_key({"n": 1})
    cache.save(key, {"n": 1}, src, ())
    gen = tmp_path / "state" / "gen"
    gen.mkdir()
    if copy_method(src, gen) != "copy":
        pytest.skip("this filesystem snapshots or reflinks: no overlay restore here")
    res = cache.restore(key, gen / "rootfs", gen / ".overlay")
    assert res.method == "overlay" and res.overlay is not None, res
    assert "(overlay)" in res.reason and res.files  # checked in place, digests kept
    try:
        with pytest.raises(StateError, match="in use by a running build"):
            cache.remove(key)
        assert cache.prune(0) == [] and len(cache.entries()) == 1  # pinned
        (gen / "rootfs/etc/motd").write_text("changed by the build\n")
    finally:
        made = cache.finish_overlay(res)
    assert mounts_under(gen) == [] and not (gen / ".overlay").exists()
    assert made.from_upper == 1 and made.linked > 0
    assert (gen / "rootfs/etc/motd").read_text() == "changed by the build\n"
    digest = tree_digest(gen / "rootfs")[0]
    assert [e.key for e in cache.prune(0)] == [key]  # unpinned: evictable again
    assert tree_digest(gen / "rootfs")[0] == digest  # the root keeps the linked files

    # an entry damaged by hand is found at the check in place, before any mount
    cache.save(key, {"n": 1}, src, ())
    with open(cache.dir / key / "rootfs/usr/bin/tool", "r+b") as f:
        f.truncate(10)
    res = cache.restore(key, tmp_path / "state/again", tmp_path / "state/.again-layers")
    assert res.info is None and res.damaged and "was damaged" in res.reason
    assert mounts_under(tmp_path / "state") == [] and cache.entries() == []
