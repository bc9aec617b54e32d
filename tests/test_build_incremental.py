"""Incremental builds. The stage cache alone on a small tree (fast tier); then, for real, on a
copy of images/minimal in its own state directory, whose stage cache starts with a copy of the
entry the session's shared build of ``minimal`` saved (that build was the clean build: the same
recipe, the same archive; the .deb and bootstrap caches are shared too, so nothing is
downloaded twice).

A site file changed rebuilds from the entry (the package stage reused) and, changed back, gives
the same tree as the session's clean build (compared by :func:`tree_diff`), reusing the initrd;
a package added runs the package stage as a delta on the entry (only that package installed)
and gives the same tree as a clean build of the same recipe (:class:`CleanBuild`: the package
stage run whole in a state directory of its own, in the background from the module's first
test on), but for what two clean builds never share (:data:`CLEAN_BUILDS_DIFFER`); a cache entry truncated by hand is
found, reported, deleted and rebuilt (by a delta again). In all: one clean build and five
incremental ones.
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

from sidusctl.subsys.treecopy import copy_method
from tests.conftest import REPO, SIDUSCTL, BuiltImage, _mounts_under, sidusctl
from tests.proc_util import terminate

slow = pytest.mark.slow

# What legitimately differs between two builds of the same recipe, and why. (etc/shadow and
# its backup etc/shadow- are compared by :func:`shadow_unsalted`: chpasswd salts at random; a
# rebuild keeps the hash of its previous generation when the password is the same, a build in
# another state directory cannot.)
DIFFERS = {
    "etc/shadow": "compared by shadow_unsalted",
    "etc/shadow-": "compared by shadow_unsalted",
    "boot/initrd.img-*": "a regenerated initramfs is a cpio archive of build-time mtimes, not "
                         "byte-reproducible (compared by presence and mode only)",
    "var/lib/initramfs-tools/*": "update-initramfs records the sha1 of the initrd it made",
}

# What two clean builds of one recipe never share, so a delta build cannot share it with a
# clean one either: keys and seeds made at random when a package is set up, and the logs of
# the apt and dpkg transactions (with their times; a delta adds a second transaction).
CLEAN_BUILDS_DIFFER = {
    "etc/ssh/ssh_host_*": "openssh-server makes new host keys at each install",
    "etc/iscsi/initiatorname.iscsi": "open-iscsi makes a random initiator name at each install",
    "etc/machine-id": "systemd makes a random machine id at each install",
    "var/lib/dbus/machine-id": "dbus's copy of that id",
    "var/cache/ldconfig/aux-cache": "ldconfig's record of the inodes and times of the libraries",
    "var/log/*": "apt, dpkg and alternatives logs: transactions and their times",
    "var/cache/debconf/*-old": "debconf's backup of its previous database",
    "var/lib/dpkg/*-old": "dpkg's backup of its previous status",
    "var/cache/apt/*.bin": "apt's binary caches, rebuilt at each apt run",
}


def walk(root: Path, differs: dict[str, str] | None = None) -> dict[str, tuple[Any, ...]]:
    """path → (mode, uid, gid, size, link target, sha256, device, xattrs): mtimes left out;
    contents left out for paths matching :data:`DIFFERS` and ``differs``."""
    pats = [*DIFFERS, *(differs or {})]
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
                if any(fnmatch.fnmatch(rel, pat) for pat in pats):
                    digest = size = None
            dev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else None
            xattrs = tuple(sorted((x, os.getxattr(p, x, follow_symlinks=False))
                                  for x in os.listxattr(p, follow_symlinks=False)))
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, size, link, digest, dev, xattrs)
    return out


def shadow_unsalted(root: Path, *, undated: bool = False) -> list[str]:
    """etc/shadow then etc/shadow- (if any), each line prefixed by its file, with each hash
    reduced to its method (``$y$``): what a random salt leaves. ``undated``: each date of
    last change (shadow(5) field 3, days since 1970) made ``DAY``, for builds bootstrapped on
    different days."""
    out = []
    for name in ("etc/shadow", "etc/shadow-"):
        if name == "etc/shadow-" and not (root / name).exists():
            continue
        for line in (root / name).read_text().splitlines():
            f = line.split(":")
            if f[1].startswith("$"):
                f[1] = "$" + f[1].split("$")[1] + "$"
            if undated and len(f) > 2 and f[2]:
                f[2] = "DAY"
            out.append(f"{name}: " + ":".join(f))
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
        return _parse_build(res.stdout, res.stderr)

    def cache(self) -> dict[str, Any]:
        res = sidusctl("image", "cache", "--json", state=self.state)
        assert res.returncode == 0, res.stderr
        out: dict[str, Any] = json.loads(res.stdout)
        return out

    def with_tree(self) -> str:
        """Add the package ``tree`` to the recipe copy; returns the text to put back."""
        toml = self.recipe / "image.toml"
        text = toml.read_text()
        toml.write_text(text.replace('packages = ["openssh-server", "open-iscsi"]',
                                     'packages = ["openssh-server", "open-iscsi", "tree"]'))
        return text


def _parse_build(stdout: str, stderr: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(stdout)
    out["log"] = stderr
    out["by_stage"] = {s["name"]: s for s in out["stages"]}
    return out


class CleanBuild:
    """A clean build of the recipe copy ``recipe`` (with ``tree`` added): in a state directory
    of its own, whose stage cache is empty, so its package stage runs whole, from the
    bootstrap the shared bootstrap cache holds (as the session's clean build of ``minimal``
    did). It runs in the background while the module's first tests build incrementally: the
    builds take turns only at the shared package cache's lock (as any two builds do), and the
    module takes minutes less on two cores."""

    def __init__(self, recipe: Path, state: Path) -> None:
        self.state = state
        self.stdout = (state.parent / "clean-build.json").open("w+")
        self.stderr = (state.parent / "clean-build.log").open("w+")
        self.proc = subprocess.Popen(
            [*SIDUSCTL, "--state-dir", str(state), "--debug", "build",
             str(recipe / "image.toml"), "--json"],
            stdout=self.stdout, stderr=self.stderr, text=True, cwd=REPO)

    def result(self, timeout: float = 1800) -> dict[str, Any]:
        rc = self.proc.wait(timeout=timeout)
        self.stdout.seek(0)
        self.stderr.seek(0)
        out, err = self.stdout.read(), self.stderr.read()
        assert rc == 0, err[-4000:]
        return _parse_build(out, err)

    def close(self) -> None:
        # a build cleans up after SIGTERM (tests/test_build_faults.py)
        terminate(self.proc, timeout=300)
        self.stdout.close()
        self.stderr.close()


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
def clean_with_tree(tmp_path_factory: pytest.TempPathFactory,
                    minimal_image: BuiltImage) -> Any:
    """:class:`CleanBuild` of images/minimal plus ``tree``, started when the module's first
    test asks for it (after the session's build, whose package cache it shares)."""
    base = tmp_path_factory.mktemp("sdt-incremental-clean")
    rec = base / "minimal"  # named as the image: the name is in the tree (hostname, motd)
    shutil.copytree(REPO / "images" / "minimal", rec)
    Work(rec, base / "sdt-state").with_tree()
    build = CleanBuild(rec, base / "sdt-state")
    yield build
    build.close()
    for t in sorted(_mounts_under(base), key=len, reverse=True):
        subprocess.run(["umount", "-l", t], check=False)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def clean(work: Work, minimal_image: BuiltImage) -> dict[str, Any]:
    """The clean build: the session's shared ``minimal`` (its walk and manifest), with a copy of
    the stage cache entry it saved put into the module's state directory."""
    from sidusctl.image.stagecache import stage_key

    manifest = json.loads(Path(str(minimal_image.manifest_path)).read_text())
    key = stage_key(manifest["package_inputs"])
    entry = minimal_image.state / "cache" / "stages" / key
    assert (entry / "entry.json").is_file(), f"the session build saved no stage cache entry {key}"
    dest = work.state / "cache" / "stages"
    dest.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(entry), str(dest / key)], check=True)
    root = Path(str(minimal_image.rootfs))
    return {"walk": walk(root), "shadow": shadow_unsalted(root), "manifest_json": manifest,
            "key": key}


@slow
def test_site_file_change_reuses_the_package_stage_and_equals_a_clean_build(
        work: Work, clean: dict[str, Any], clean_with_tree: CleanBuild) -> None:
    # (clean_with_tree: the package test's clean build starts now, in the background)
    motd = work.recipe / "files" / "motd.j2"
    original = motd.read_text()
    motd.write_text(original + "sdt-incremental: a site file changed\n")
    changed = work.build()
    st = changed["by_stage"]
    assert st["bootstrap"]["action"] == "reused" and st["packages"]["action"] == "reused", st
    assert f"restored from cache entry {clean['key']}" in st["packages"]["reason"]
    assert "run: debootstrap" not in changed["log"] and "apt-get install" not in changed["log"]
    root = Path(changed["rootfs"])
    assert "sdt-incremental: a site file changed" in (root / "etc/motd").read_text()
    entry_root = Path(work.cache()["dir"]) / clean["key"] / "rootfs"
    if copy_method(entry_root, work.state) == "copy":
        # no snapshots, no reflinks: the root was an overlay on the entry, written out by
        # hard links to every file the later stages left alone
        assert "(overlay)" in st["packages"]["reason"], st["packages"]
        assert (root / "usr/sbin/sshd").stat().st_ino == (entry_root / "usr/sbin/sshd").stat().st_ino
        assert (root / "etc/motd").stat().st_ino != (entry_root / "etc/motd").stat().st_ino
    # a write in place into the published root (sidusctl chroot) leaves the entry alone: the
    # next build finds it undamaged (its digest is checked at every restore)
    res = sidusctl("chroot", work.recipe.name, "sh", "-c",
                   "echo sdt-written-in-place >> /etc/debian_version", state=work.state)
    assert res.returncode == 0, res.stderr
    assert "sdt-written-in-place" in (root / "etc/debian_version").read_text()
    assert "sdt-written-in-place" not in (entry_root / "etc/debian_version").read_text()
    # the same recipe as the clean build again, built incrementally: the same tree
    motd.write_text(original)
    again = work.build()
    assert again["generation"] != changed["generation"]
    st = again["by_stage"]
    assert st["packages"]["action"] == "reused"
    # /etc/motd is no initramfs input: the initrd of the previous generation is reused
    assert st["initramfs"]["action"] == "reused", st["initramfs"]
    diff = tree_diff(clean["walk"], walk(Path(again["rootfs"])))
    assert not diff, "\n".join(diff[:40])
    assert clean["shadow"] == shadow_unsalted(Path(again["rootfs"]))
    assert any(line.startswith("etc/shadow: root:$y$") for line in clean["shadow"])
    # and the same manifest, but for what says when and how it was built (and where from)
    drop = {"created", "generation", "timings_s", "build_stages", "bootstrap_from_cache",
            "exports", "tree_sha256"}
    m_clean = {k: v for k, v in clean["manifest_json"].items() if k not in drop}
    m_again = {k: v for k, v in json.loads(Path(again["manifest"]).read_text()).items()
               if k not in drop}
    m_clean["sizes"] = m_again["sizes"] = None  # du counts blocks: a copy may pack differently
    # the recipe's digest covers its path: compare its values, with the two directories named alike
    for m, d in ((m_clean, REPO / "images" / "minimal"), (m_again, work.recipe)):
        m["recipe"] = json.loads(json.dumps(m["recipe"]["values"]).replace(str(d), "RECIPE"))
    assert m_clean == m_again
    assert _mounts_under(work.state) == []


@slow
def test_package_added_runs_a_delta_that_equals_a_clean_build(
        work: Work, clean: dict[str, Any], clean_with_tree: CleanBuild) -> None:
    text = work.with_tree()
    try:
        delta = work.build()
        st = delta["by_stage"]
        assert st["packages"]["action"] == "ran", st
        assert "key 'packages' changed (added: tree)" in st["packages"]["reason"]
        assert f"as a delta on cache entry {clean['key']}: installed tree" in \
            st["packages"]["reason"]
        assert "run: debootstrap" not in delta["log"]
        # tree ships nothing an initramfs reads: the initrd is reused
        assert st["initramfs"]["action"] == "reused", st["initramfs"]
        assert (Path(delta["rootfs"]) / "usr/bin/tree").is_file()
        delta_walk = walk(Path(delta["rootfs"]), CLEAN_BUILDS_DIFFER)
        # dates of last change left out: a bootstrap cache made again between the session's
        # build and the clean one (the archive moved) would have another day's
        delta_shadow = shadow_unsalted(Path(delta["rootfs"]), undated=True)
        # (read now: the build below makes the image's older generations go)
        delta_packages = set(json.loads(Path(delta["manifest"]).read_text())["packages"])
        # the delta's entry: without snapshots or reflinks, what the install left alone is
        # hard-linked from the base entry; it restores (its digest checked) as any entry
        cache = work.cache()
        entry = next(e for e in cache["entries"] if "tree" in e["packages"])
        new_root, base_root = (Path(cache["dir"]) / k / "rootfs" for k in (entry["key"], clean["key"]))
        if copy_method(base_root, Path(cache["dir"])) == "copy":
            assert (new_root / "usr/sbin/sshd").stat().st_ino == \
                (base_root / "usr/sbin/sshd").stat().st_ino
            assert (new_root / "var/lib/dpkg/status").stat().st_ino != \
                (base_root / "var/lib/dpkg/status").stat().st_ino
        hit = work.build()
        assert f"restored from cache entry {entry['key']}" in hit["by_stage"]["packages"]["reason"]
        assert tree_diff(walk(Path(hit["rootfs"]), CLEAN_BUILDS_DIFFER), delta_walk) == []
    finally:
        (work.recipe / "image.toml").write_text(text)
    # the clean build of the same recipe, in its own state directory (started in the
    # background by the module's first test)
    full = clean_with_tree.result()
    assert full["by_stage"]["packages"]["action"] == "ran"
    why = full["by_stage"]["packages"]["reason"]
    assert why.startswith("no cache entry") and "delta" not in why, why  # the whole stage ran
    diff = tree_diff(walk(Path(full["rootfs"]), CLEAN_BUILDS_DIFFER), delta_walk)
    assert not diff, "\n".join(diff[:40])
    assert shadow_unsalted(Path(full["rootfs"]), undated=True) == delta_shadow
    assert set(json.loads(Path(full["manifest"]).read_text())["packages"]) == delta_packages
    assert len(work.cache()["entries"]) == 2


@slow
def test_truncated_cache_entry_is_detected_reported_and_rebuilt(work: Work,
                                                                 clean: dict[str, Any]) -> None:
    cache = work.cache()
    entry = next(e for e in cache["entries"] if "tree" in e["packages"])
    # (a file of its own: one it shares with its base by a hard link is damaged in both)
    victim = Path(cache["dir"]) / entry["key"] / "rootfs" / "usr/bin/tree"
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    text = work.with_tree()
    try:
        out = work.build()
    finally:
        (work.recipe / "image.toml").write_text(text)
    st = out["by_stage"]
    assert st["packages"]["action"] == "ran", st
    assert f"cache entry {entry['key']} was damaged" in st["packages"]["reason"]
    assert f"as a delta on cache entry {clean['key']}" in st["packages"]["reason"]
    assert "was damaged" in out["log"]  # reported as it happened, too
    assert (Path(out["rootfs"]) / "usr/bin/tree").stat().st_size == size
    after = work.cache()
    fresh = next(e for e in after["entries"] if e["key"] == entry["key"])
    # a new entry, not the damaged one
    assert fresh["created"] >= entry["created"] and fresh["tree_sha256"] != entry["tree_sha256"]
    assert (Path(after["dir"]) / entry["key"] / "rootfs/usr/bin/tree").stat().st_size == size


@slow
def test_cache_prune_evicts_least_recently_used(work: Work, clean: dict[str, Any]) -> None:
    before = work.cache()
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
    assert work.cache()["entries"] == []


# -- the stage cache on a small tree (fast tier: cp and sha256 only) ------------------------------

def _small_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/motd").write_text("hello\n")
    os.chmod(root / "etc/motd", 0o640)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(os.urandom(300_000))
    os.symlink("../usr/bin/tool", root / "etc/link")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-hardlink")


def special_tree(src: Path, confs: int = 20) -> None:
    """:func:`_small_tree` plus what a copy must keep: a setuid file with a file capability,
    a user xattr, an owner, a sticky directory, a fifo, a device node, ``confs`` small files
    (etc/conf0...) and a directory mtime."""
    import struct

    _small_tree(src)
    (src / "usr/bin/ping").write_bytes(b"\x7fELF" + os.urandom(5000))
    os.chmod(src / "usr/bin/ping", 0o4755)
    # a file capability (VFS_CAP_REVISION_2 | effective, cap_net_raw): chown would clear it
    os.setxattr(src / "usr/bin/ping", "security.capability",
                struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0))
    os.setxattr(src / "etc/motd", "user.sdt", b"kept")
    os.chown(src / "etc/motd", 1234, 4321)
    (src / "tmp").mkdir(mode=0o1777)
    os.chmod(src / "tmp", 0o1777)
    os.mkfifo(src / "etc/fifo")
    os.mknod(src / "etc/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for i in range(confs):
        (src / "etc" / f"conf{i}").write_text(f"conf {i}\n")
    os.utime(src / "etc", ns=(10**18, 10**18))


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
    # an entry.json whose size is below 0 is damaged: not listed (nor counted), deleted at use
    e = cache.save(key, inputs, src, ())
    info = json.loads((e.dir / "entry.json").read_text())
    (e.dir / "entry.json").write_text(json.dumps({**info, "bytes": -100}))
    assert [x.key for x in cache.entries()] == [] and cache.total_bytes() == 0
    res = cache.restore(key, tmp_path / "r3")
    assert res.damaged and "bytes" in res.reason and not e.dir.exists(), res
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
    # the base of a delta install: same inputs but fewer packages; the closest one wins
    cache.prune(max_bytes=0)
    small = cache.save(stage_key(inputs), inputs, src, ())
    bigger = {**inputs, "packages": ["a", "b", "c"]}
    assert cache.base_for(bigger) == cache.entries()[0] and cache.entries()[0].key == small.key
    cache.save(stage_key(bigger), bigger, src, ())
    closest = cache.base_for({**inputs, "packages": ["a", "b", "c", "d"]})
    assert closest is not None and closest.key == stage_key(bigger)
    assert cache.base_for({**inputs, "packages": ["a", "d"]}) is None  # b removed: no delta
    assert cache.base_for(inputs) is None  # the same packages: a hit, not a delta
    assert cache.base_for({**bigger, "suite": "trixie"}) is None  # any other key: no delta


def _meta_walk(root: Path) -> dict[str, tuple[Any, ...]]:
    """:func:`walk` plus mtimes (ns) and, for files, the hard-link groups (by first path)."""
    groups: dict[int, str] = {}
    out = {}
    for rel, rec in sorted(walk(root).items()):
        st = (root / rel).lstat()
        grp = groups.setdefault(st.st_ino, rel) if stat.S_ISREG(st.st_mode) else None
        out[rel] = (*rec, st.st_mtime_ns, grp)
    return out


def test_delta_entry_links_unchanged_files_and_copies_the_rest(tmp_path: Path) -> None:
    """The save of a delta install on a filesystem without snapshots or reflinks: every file
    still as restored is hard-linked from the base entry; whatever changed since the restore
    (content rewritten to the same size and mtime, mode, xattr, rename, hard link, new file,
    removal) is a copy of its own, the new entry's digest is its tree's, the base is untouched,
    and the entry restores as any other."""

    from sidusctl.image.stagecache import StageCache, stage_key
    from sidusctl.subsys.treecopy import copy_tree_linking, tree_digest

    src = tmp_path / "base"
    special_tree(src)

    cache = StageCache(tmp_path / "state")
    base_key = stage_key({"n": 1})
    base = cache.save(base_key, {"n": 1}, src, ())
    res = cache.restore(base_key, tmp_path / "gen")
    assert res.info is not None and res.info.key == base_key and res.copied_before_ns > 0
    gen = tmp_path / "gen"
    # what an install does after the restore
    tool = gen / "etc/conf0"
    st = tool.stat()
    tool.write_text("CONF 0\n")  # same size, mtime put back: only the ctime tells
    os.utime(tool, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(gen / "etc/conf1", 0o600)
    os.setxattr(gen / "etc/conf2", "user.sdt", b"new")
    os.rename(gen / "etc/conf3", gen / "etc/conf3-moved")
    os.link(gen / "etc/conf4", gen / "etc/conf4-link")
    (gen / "etc/conf5").unlink()
    (gen / "usr/bin/new").write_bytes(os.urandom(70_000))
    (gen / "etc/conf6").unlink()
    (gen / "etc/conf6").write_text("conf 6\n")  # same content, a new inode
    before = tree_digest(base.dir / "rootfs")[0]

    # the function itself, then through the cache
    made = tmp_path / "made"
    made.mkdir()
    lc = copy_tree_linking(gen, made, base.dir / "rootfs", res.files, res.copied_before_ns)
    assert tree_diff(_meta_walk(gen), _meta_walk(made)) == []
    assert tree_digest(made)[0] == tree_digest(gen)[0]
    assert lc.copied == 7 and lc.linked > 0, lc  # conf0-3 (moved), conf4, conf6, new
    ino = {rel: (base.dir / "rootfs" / rel).stat().st_ino for rel in ("usr/bin/ping", "etc/conf0")}
    assert (made / "usr/bin/ping").stat().st_ino == ino["usr/bin/ping"]
    assert (made / "etc/conf0").stat().st_ino != ino["etc/conf0"]

    key = stage_key({"n": 2})
    e = cache.save(key, {"n": 2}, gen, (), base=res)
    assert e.info.tree_sha256 == tree_digest(gen)[0]
    if copy_method(gen, cache.dir) == "copy":  # no reflinks here: the save linked from the base
        assert (e.dir / "rootfs/usr/bin/ping").stat().st_ino == ino["usr/bin/ping"]
        assert (e.dir / "rootfs/etc/conf0").stat().st_ino != ino["etc/conf0"]
    assert tree_digest(base.dir / "rootfs")[0] == before == base.info.tree_sha256
    again = cache.restore(key, tmp_path / "again")
    assert again.info is not None, again.reason
    assert tree_diff(_meta_walk(gen), _meta_walk(tmp_path / "again")) == []


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
