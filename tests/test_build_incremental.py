"""Incremental builds. The stage cache alone on a small tree (fast tier); then, for real, on a copy of images/minimal in its own state directory (the
shared .deb and bootstrap caches of the suite are used, so nothing is downloaded twice).

One clean build (``--no-cache``) saves the package stage; a site file changed rebuilds from it
(the package stage reused, the initrd reused) and, changed back, gives the same tree as the
clean build (compared by :func:`tree_diff`); a package added runs the package stage again; a
cache entry truncated by hand is found, reported, deleted and rebuilt. In all: one clean build,
two incremental ones and two that rerun the package stage.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, _mounts_under, sidusctl

slow = pytest.mark.slow

# What legitimately differs between two builds of the same recipe, and why. (etc/shadow does
# not: chpasswd salts at random, but a rebuild keeps the hash when the password is the same.)
DIFFERS = {
    "boot/initrd.img-*": "a regenerated initramfs is a cpio archive of build-time mtimes, not "
                         "byte-reproducible (compared by presence and mode only)",
    "var/lib/initramfs-tools/*": "update-initramfs records the sha1 of the initrd it made",
}


def walk(root: Path) -> dict[str, tuple[Any, ...]]:
    """path → (mode, uid, gid, size, link target, sha256, device, xattrs): mtimes left out."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            st = p.lstat()
            link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            digest = size = None
            if stat.S_ISREG(st.st_mode):
                size = st.st_size
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                if any(fnmatch.fnmatch(rel, pat) for pat in DIFFERS):
                    digest = size = None
            dev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else None
            xattrs = tuple(sorted((x, os.getxattr(p, x, follow_symlinks=False))
                                  for x in os.listxattr(p, follow_symlinks=False)))
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, size, link, digest, dev, xattrs)
    return out


def tree_diff(a: dict[str, tuple[Any, ...]], b: dict[str, tuple[Any, ...]]) -> list[str]:
    """Every difference between two walks, one line each."""
    out = [f"only in the first: {k}" for k in sorted(set(a) - set(b))]
    out += [f"only in the second: {k}" for k in sorted(set(b) - set(a))]
    out += [f"differs: {k}: {a[k]} != {b[k]}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    return out


@dataclass
class Work:
    recipe: Path   # the copy of images/minimal
    state: Path

    def build(self, *extra: str) -> dict[str, Any]:
        res = sidusctl("--debug", "build", str(self.recipe / "image.toml"), "--json", *extra,
                       state=self.state, timeout=1800)
        assert res.returncode == 0, res.stderr[-4000:]
        out: dict[str, Any] = json.loads(res.stdout)
        out["log"] = res.stderr
        out["by_stage"] = {s["name"]: s for s in out["stages"]}
        return out


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("sdt-incremental")
    rec = base / "minimal"
    shutil.copytree(REPO / "images" / "minimal", rec)
    w = Work(rec, base / "sdt-state")
    yield w
    for t in sorted(_mounts_under(w.state), key=len, reverse=True):
        subprocess.run(["umount", "-l", t], check=False)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def clean(work: Work) -> dict[str, Any]:
    """The one clean build of the module (writes the stage cache entry), and its tree's walk."""
    out = work.build("--no-cache")
    out["walk"] = walk(Path(out["rootfs"]))
    out["manifest_json"] = json.loads(Path(out["manifest"]).read_text())
    return out


@slow
def test_clean_build_runs_every_stage_and_saves_the_package_stage(work: Work,
                                                                   clean: dict[str, Any]) -> None:
    st = clean["by_stage"]
    assert st["packages"]["action"] == "ran" and "--no-cache" in st["packages"]["reason"]
    assert st["initramfs"]["action"] == "ran"
    assert "stage cache entry " in clean["log"] and " saved (" in clean["log"]
    res = sidusctl("image", "cache", "--json", state=work.state)
    cache = json.loads(res.stdout)
    assert len(cache["entries"]) == 1 and cache["entries"][0]["bytes"] > 200 * 2**20
    assert "openssh-server" in cache["entries"][0]["packages"]
    assert _mounts_under(work.state) == []


@slow
def test_site_file_change_reuses_the_package_stage_and_equals_a_clean_build(
        work: Work, clean: dict[str, Any]) -> None:
    motd = work.recipe / "files" / "motd.j2"
    original = motd.read_text()
    motd.write_text(original + "sdt-incremental: a site file changed\n")
    changed = work.build()
    st = changed["by_stage"]
    assert st["bootstrap"]["action"] == "reused" and st["packages"]["action"] == "reused", st
    assert "restored from cache entry" in st["packages"]["reason"]
    # /etc/motd is no initramfs input: the initrd of the clean build is reused
    assert st["initramfs"]["action"] == "reused", st["initramfs"]
    assert "run: debootstrap" not in changed["log"] and "apt-get install" not in changed["log"]
    root = Path(changed["rootfs"])
    assert "sdt-incremental: a site file changed" in (root / "etc/motd").read_text()
    assert changed["generation"] != clean["generation"]
    # the same recipe as the clean build again, built incrementally: the same tree
    motd.write_text(original)
    again = work.build()
    assert again["by_stage"]["packages"]["action"] == "reused"
    diff = tree_diff(clean["walk"], walk(Path(again["rootfs"])))
    assert not diff, "\n".join(diff[:40])
    # and the same manifest, but for what says when and how it was built
    drop = {"created", "generation", "timings_s", "build_stages", "bootstrap_from_cache"}
    m_clean = {k: v for k, v in clean["manifest_json"].items() if k not in drop}
    m_again = {k: v for k, v in json.loads(Path(again["manifest"]).read_text()).items()
               if k not in drop}
    m_clean["sizes"] = m_again["sizes"] = None  # du counts blocks: a copy may pack differently
    assert m_clean == m_again
    assert _mounts_under(work.state) == []


@slow
def test_package_list_change_runs_the_package_stage(work: Work, clean: dict[str, Any]) -> None:
    toml = work.recipe / "image.toml"
    text = toml.read_text()
    toml.write_text(text.replace('packages = ["openssh-server", "open-iscsi"]',
                                 'packages = ["openssh-server", "open-iscsi", "tree"]'))
    try:
        out = work.build()
    finally:
        toml.write_text(text)
    st = out["by_stage"]
    assert st["packages"]["action"] == "ran", st
    assert "key 'packages' changed (added: tree)" in st["packages"]["reason"]
    assert (Path(out["rootfs"]) / "usr/bin/tree").is_file()
    res = sidusctl("image", "cache", "--json", state=work.state)
    assert len(json.loads(res.stdout)["entries"]) == 2


@slow
def test_truncated_cache_entry_is_detected_reported_and_rebuilt(work: Work,
                                                                 clean: dict[str, Any]) -> None:
    cache = json.loads(sidusctl("image", "cache", "--json", state=work.state).stdout)
    entry = next(e for e in cache["entries"] if "tree" not in e["packages"])
    victim = Path(cache["dir"]) / entry["key"] / "rootfs" / "usr/sbin/sshd"
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    out = work.build()
    st = out["by_stage"]
    assert st["packages"]["action"] == "ran", st
    assert f"cache entry {entry['key']} was damaged" in st["packages"]["reason"]
    assert "was damaged" in out["log"]  # reported as it happened, too
    assert (Path(out["rootfs"]) / "usr/sbin/sshd").stat().st_size == size
    after = json.loads(sidusctl("image", "cache", "--json", state=work.state).stdout)
    fresh = next(e for e in after["entries"] if e["key"] == entry["key"])
    # a new entry (the package stage ran again: new ssh host keys, logs...), not the damaged one
    assert fresh["created"] >= entry["created"] and fresh["tree_sha256"] != entry["tree_sha256"]
    assert (Path(after["dir"]) / entry["key"] / "rootfs/usr/sbin/sshd").stat().st_size == size


@slow
def test_cache_prune_evicts_least_recently_used(work: Work, clean: dict[str, Any]) -> None:
    before = json.loads(sidusctl("image", "cache", "--json", state=work.state).stdout)
    assert len(before["entries"]) == 2
    newest, oldest = before["entries"]
    res = sidusctl("image", "cache", "prune", "--max-size", str(newest["bytes"] + 1), "--json",
                   state=work.state)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [e["key"] for e in out["evicted"]] == [oldest["key"]]
    assert [e["key"] for e in out["entries"]] == [newest["key"]]
    res = sidusctl("image", "cache", "prune", "--max-size", "0", state=work.state)
    assert res.returncode == 0 and "1 entry evicted" in res.stdout + res.stderr
    assert json.loads(sidusctl("image", "cache", "--json", state=work.state).stdout)["entries"] == []


# -- the stage cache on a small tree (fast tier: cp and sha256 only) ------------------------------

def _small_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/motd").write_text("hello\n")
    os.chmod(root / "etc/motd", 0o640)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(os.urandom(300_000))
    os.symlink("../usr/bin/tool", root / "etc/link")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-hardlink")


def test_stage_cache_saves_restores_detects_damage_and_evicts(tmp_path: Path) -> None:
    from sidusctl.image.stagecache import StageCache, explain_miss, stage_key
    from sidusctl.subsys.treecopy import tree_digest

    src = tmp_path / "src"
    _small_tree(src)
    cache = StageCache(tmp_path / "state", max_bytes=10 * 2**20)
    inputs: dict[str, Any] = {"suite": "bookworm", "packages": ["a", "b"]}
    key = stage_key(inputs)
    e = cache.save(key, inputs, src, ("p",))
    assert e.info.tree_sha256 == tree_digest(src)[0] and e.info.purged == ("p",)
    assert [x.name for x in cache.dir.iterdir() if x.name.startswith(".tmp-")] == []
    # restored: the same tree (modes, links, contents), by the cheapest method here
    res = cache.restore(key, tmp_path / "r1")
    assert res.info is not None and res.method in ("snapshot", "reflink", "copy"), res
    assert tree_diff(walk(src), walk(tmp_path / "r1")) == []
    assert (tmp_path / "r1/usr/bin/tool").stat().st_nlink == 2
    # a file truncated in the entry: found at use, reported, entry deleted, nothing left at dest
    with open(e.dir / "rootfs/usr/bin/tool", "r+b") as f:
        f.truncate(1000)
    res = cache.restore(key, tmp_path / "r2")
    assert res.info is None and res.damaged and f"cache entry {key} was damaged" in res.reason
    assert not (tmp_path / "r2").exists() and not e.dir.exists()
    assert cache.restore(key, tmp_path / "r3").reason == "no cache entry for these inputs"
    # a half-written entry (no entry.json) is not an entry
    (cache.dir / "deadbeef" / "rootfs").mkdir(parents=True)
    assert [x.key for x in cache.entries()] == []
    # LRU: the least recently used goes first once the total passes the limit
    keys = []
    for i in range(3):
        k = stage_key({**inputs, "n": i})
        cache.save(k, {**inputs, "n": i}, src, ())
        os.utime(cache.dir / k / "used", (1e9 + i, 1e9 + i))
        keys.append(k)
    cache.restore(keys[0], tmp_path / "r4")  # now the most recently used
    one = cache.entries()[0].info.bytes
    evicted = cache.prune(max_bytes=2 * one)
    assert [x.key for x in evicted] == [keys[1]]
    assert {x.key for x in cache.entries()} == {keys[0], keys[2]}
    # why a package stage ran, from the inputs
    assert explain_miss({**inputs, "packages": ["a", "b", "c"]}, inputs, "gen-1") == \
        "key 'packages' changed (added: c) since gen-1"
    assert "new InRelease for bookworm-updates" in explain_miss(
        {"releases": {"bookworm": "1", "bookworm-updates": "3"}},
        {"releases": {"bookworm": "1", "bookworm-updates": "2"}}, "gen-1")
    assert "pruned or evicted" in explain_miss(inputs, inputs, "gen-1")


@slow
def test_stage_cache_on_btrfs_snapshots_and_reflinks(tmp_path: Path) -> None:
    """On a loop-backed btrfs: entries are subvolumes, restored by snapshot; a plain directory
    is copied by reflink."""
    from sidusctl.image.stagecache import StageCache, stage_key
    from sidusctl.subsys import btrfs
    from sidusctl.subsys.mounts import mounted
    from sidusctl.subsys.treecopy import copy_method, copy_tree, remove_tree

    img = tmp_path / "sdt-inc-btrfs.img"
    with open(img, "wb") as f:
        f.truncate(512 * 2**20)
    btrfs.mkfs(img, label="sdt-inc")
    with mounted(str(img), tmp_path / "sdt-inc-mnt", "btrfs", ["loop"]) as mnt:
        src = mnt / "src"
        _small_tree(src)
        assert copy_method(src, mnt) == "reflink"
        assert copy_tree(src, mnt / "plain-copy") == "reflink"
        cache = StageCache(mnt / "state")
        key = stage_key({"n": 1})
        e = cache.save(key, {"n": 1}, src, ())
        assert btrfs.is_subvolume(e.dir / "rootfs")
        (mnt / "gen").mkdir()
        res = cache.restore(key, mnt / "gen" / "rootfs")
        assert res.info is not None and res.method == "snapshot", res
        assert tree_diff(walk(src), walk(mnt / "gen" / "rootfs")) == []
        remove_tree(mnt / "gen" / "rootfs")
        cache.prune(max_bytes=0)
        assert cache.entries() == [] and not (mnt / "gen" / "rootfs").exists()
