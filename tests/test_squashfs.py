"""Squashfs exports (sidusctl.subsys.squashfs, sidusctl.netboot.squash) on small real trees:
the same tree gives the same bytes (built twice, and from a copy), an unchanged generation is
not packed again, an identical new generation is hard-linked, prune keeps what is held, the
boot command lines of the squashfs roots."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from sidusctl.core.errors import ConfigError, ConfigErrors, SidusError
from sidusctl.netboot import squash
from sidusctl.netboot.inventory import parse
from sidusctl.netboot.tree import ImageFiles, SquashRef, node_cmdline
from sidusctl.subsys import squashfs

pytestmark = pytest.mark.skipif(shutil.which("mksquashfs") is None,
                                reason="squashfs-tools missing (scripts/setup-host)")


def make_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc/hostname").write_text("node\n")
    (root / "usr/bin/tool").write_bytes(os.urandom(1) * 200000)
    (root / "usr/bin/tool").chmod(0o755)
    os.link(root / "usr/bin/tool", root / "usr/bin/tool2")
    (root / "etc/link").symlink_to("hostname")
    for p in sorted(root.rglob("*"), reverse=True):
        os.utime(p, (1700000000, 1700000000), follow_symlinks=False)
    os.utime(root, (1700000000, 1700000000))
    return root


def test_same_tree_same_bytes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    a = squashfs.build(tree, tmp_path / "a.squashfs")
    b = squashfs.build(tree, tmp_path / "b.squashfs")
    assert a.sha256 == b.sha256 and a.size == b.size
    assert (tmp_path / "a.squashfs").read_bytes()[:4] == b"hsqs"
    # a copy elsewhere (other inode numbers, other path) packs to the same bytes too
    subprocess.run(["cp", "-a", str(tree), str(tmp_path / "copy")], check=True)
    c = squashfs.build(tmp_path / "copy", tmp_path / "c.squashfs")
    assert c.sha256 == a.sha256
    # and a change changes them
    (tree / "etc/hostname").write_text("other\n")
    os.utime(tree / "etc/hostname", (1700000000, 1700000000))
    d = squashfs.build(tree, tmp_path / "d.squashfs")
    assert d.sha256 != a.sha256
    assert squashfs.tree_fingerprint(tree) != squashfs.tree_fingerprint(tmp_path / "copy")
    # unsquashfs reads it back: same files
    subprocess.run(["unsquashfs", "-d", str(tmp_path / "out"), str(tmp_path / "a.squashfs")],
                   check=True, capture_output=True)
    assert (tmp_path / "out/usr/bin/tool").read_bytes() == (tmp_path / "copy/usr/bin/tool").read_bytes()
    assert os.readlink(tmp_path / "out/etc/link") == "hostname"


def test_what_mksquashfs_warns_about_is_logged_once_per_kind(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tree = make_tree(tmp_path / "tree")
    # a POSIX ACL (user::rw-, user:65534:r--, group::r--, mask::r--, other::r--; the xattr's
    # layout from acl(5)/posix_acl_xattr.h) on two files: squashfs has no place for it
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in (
        (0x01, 6, 0xFFFFFFFF), (0x02, 4, 65534), (0x04, 4, 0xFFFFFFFF),
        (0x10, 4, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)))
    try:
        for f in ("etc/hostname", "usr/bin/tool"):
            os.setxattr(tree / f, "system.posix_acl_access", acl)
    except OSError as e:  # pragma: no cover - a filesystem mounted noacl
        pytest.skip(f"no POSIX ACLs on {tmp_path}: {e}")
    with caplog.at_level(logging.WARNING, logger="sidusctl"):
        squashfs.build(tree, tmp_path / "a.squashfs")
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == ["mksquashfs: Unrecognised xattr prefix system.posix_acl_access (2 times)"]
    # a tree without one packs without a word
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sidusctl"):
        squashfs.build(make_tree(tmp_path / "plain"), tmp_path / "b.squashfs")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_export_leaves_out_what_a_netbooted_node_never_reads(tmp_path: Path) -> None:
    state = tmp_path / "state"
    d = make_store(state, ["gen-20260101T000000-1"])
    root = d / "gen-20260101T000000-1" / "rootfs"
    for rel in ("boot/vmlinuz-6.1.0-1-amd64", "boot/initrd.img-6.1.0-1-amd64",
                "boot/config-6.1.0-1-amd64", "var/lib/apt/lists/deb_dists_Packages",
                "var/cache/apt/pkgcache.bin", "var/cache/apt/archives/lock"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    ex, how = squash.export(state, "img")
    assert how == "built"
    out = tmp_path / "out"
    subprocess.run(["unsquashfs", "-d", str(out), str(ex.path)], check=True, capture_output=True)
    kept = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.parts[len(out.parts)] in ("boot", "var"))
    # the directories stay (apt makes its lists again in them), what they held goes
    assert kept == ["boot", "boot/config-6.1.0-1-amd64", "var", "var/cache", "var/cache/apt",
                    "var/cache/apt/archives", "var/cache/apt/archives/lock", "var/lib",
                    "var/lib/apt", "var/lib/apt/lists"]
    # the record's fingerprint covers the packing (excludes, level): not the bare tree's
    assert ex.fingerprint != squashfs.tree_fingerprint(root)
    ex6, how6 = squash.export(state, "img", level=6)
    assert how6 == "unchanged" and ex6.sha256 == ex.sha256
    ex9, how9 = squash.export(state, "img", level=9)
    assert how9 == "built" and ex9.fingerprint != ex.fingerprint


def test_a_recipe_replaces_the_excludes_through_the_manifest(tmp_path: Path) -> None:
    state = tmp_path / "state"
    d = make_store(state, ["gen-20260101T000000-1"])
    gen = d / "gen-20260101T000000-1"
    (gen / "rootfs/boot").mkdir()
    (gen / "rootfs/boot/vmlinuz-6.1.0-1-amd64").write_text("kernel")
    default, _ = squash.export(state, "img")
    assert default.exclude == squash.EXCLUDE
    assert "boot/vmlinuz-6.1.0-1-amd64" not in _listing(default.path, tmp_path / "d")

    def manifest(exclude: list[str]) -> None:
        values = {"name": "img", "netboot": {"enabled": True, "squashfs_exclude": exclude}}
        (gen / "manifest.json").write_text(json.dumps({
            "name": "img", "kind": "build",
            "recipe": {"path": "/x/image.toml", "sha256": "0" * 64, "values": values}}))

    manifest(["etc/hostname"])  # the recipe's own list replaces the default one
    own, how = squash.export(state, "img")
    assert how == "built" and own.exclude == ("etc/hostname",)
    listing = _listing(own.path, tmp_path / "o")
    assert "etc/hostname" not in listing and "boot/vmlinuz-6.1.0-1-amd64" in listing
    assert squash.find(state, "img", "gen-20260101T000000-1") == own  # the record keeps it
    manifest([])  # nothing left out
    none, how = squash.export(state, "img")
    assert how == "built" and none.exclude == ()
    assert {"etc/hostname", "boot/vmlinuz-6.1.0-1-amd64"} <= _listing(none.path, tmp_path / "n")
    # a manifest that cannot be read: the default list, the node still gets its root
    (gen / "manifest.json").write_text("{not json")
    fallback, how = squash.export(state, "img")
    assert how == "built" and fallback.exclude == squash.EXCLUDE
    assert fallback.sha256 == default.sha256  # the same bytes as the first export


def _listing(image: Path, dest: Path) -> set[str]:
    subprocess.run(["unsquashfs", "-d", str(dest), str(image)], check=True, capture_output=True)
    return {str(p.relative_to(dest)) for p in dest.rglob("*")}


@pytest.mark.parametrize("pattern", ["/etc/hostname", "", "etc/../../x"])
def test_an_exclude_outside_the_tree_is_refused(tmp_path: Path, pattern: str) -> None:
    tree = make_tree(tmp_path / "tree")
    with pytest.raises(SidusError, match="expected a path relative to the tree"):
        squashfs.build(tree, tmp_path / "a.squashfs", exclude=(pattern,))
    assert not list(tmp_path.glob("*.squashfs")) and not list(tmp_path.glob(".a.squashfs*"))


def make_store(state: Path, gens: list[str]) -> Path:
    d = state / "images" / "img"
    for g in gens:
        make_tree(d / g / "rootfs")
    (d / "current").symlink_to(gens[-1])
    return d


def test_export_skips_unchanged_links_identical_and_prune_keeps_held(tmp_path: Path) -> None:
    state = tmp_path / "state"
    d = make_store(state, ["gen-20260101T000000-1"])
    ex, how = squash.export(state, "img")
    assert how == "built" and ex.file == "gen-20260101T000000-1.squashfs"
    mtime = ex.path.stat().st_mtime_ns
    ex2, how2 = squash.export(state, "img")
    assert how2 == "unchanged" and ex2.sha256 == ex.sha256
    assert ex.path.stat().st_mtime_ns == mtime
    # a new generation with the same tree: a hard link, not a new pack
    make_tree(d / "gen-20260102T000000-1" / "rootfs")
    os.replace(_link(d, "gen-20260102T000000-1"), d / "current")
    ex3, how3 = squash.export(state, "img")
    assert how3 == "linked" and ex3.sha256 == ex.sha256
    assert ex3.path.stat().st_ino == ex.path.stat().st_ino
    # a changed generation: packed, other bytes
    make_tree(d / "gen-20260103T000000-1" / "rootfs")
    (d / "gen-20260103T000000-1/rootfs/etc/new").write_text("x\n")
    os.replace(_link(d, "gen-20260103T000000-1"), d / "current")
    ex4, how4 = squash.export(state, "img")
    assert how4 == "built" and ex4.sha256 != ex.sha256
    assert [e.generation for e in squash.list_exports(state, "img")] == [
        "gen-20260101T000000-1", "gen-20260102T000000-1", "gen-20260103T000000-1"]
    # prune: the held first one and the newest (retain 1) stay, the middle one goes
    removed = squash.prune(state, "img", keep={"gen-20260101T000000-1"}, retain=1)
    assert removed == ["gen-20260102T000000-1"]
    assert [e.generation for e in squash.list_exports(state, "img")] == [
        "gen-20260101T000000-1", "gen-20260103T000000-1"]
    # image show lists them
    from tests.conftest import sidusctl
    r = sidusctl("image", "show", "img", "--json", state=state)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)["squashfs"]
    assert [(e["generation"], e["sha256"]) for e in shown] == [
        ("gen-20260101T000000-1", ex.sha256), ("gen-20260103T000000-1", ex4.sha256)]


def _link(d: Path, target: str) -> Path:
    tmp = d / ".tmp-current"
    tmp.symlink_to(target)
    return tmp


INV = """
[network]
subnet = "10.13.20.0/24"
server = "10.13.20.13"

[defaults]
image = "img"
root = "squashfs-http"

[[nodes]]
name = "n1"
mac = "52:54:00:00:00:01"
ip = "10.13.20.101"

[[nodes]]
name = "n2"
mac = "52:54:00:00:00:02"
ip = "10.13.20.102"
root = "squashfs-nfs"

[[nodes]]
name = "n3"
mac = "52:54:00:00:00:03"
ip = "10.13.20.103"
root = "nfs"
"""


def test_inventory_root_and_command_lines() -> None:
    inv = parse(INV, "nodes.toml")
    assert [n.root for n in inv.nodes] == ["squashfs-http", "squashfs-nfs", "nfs"]
    ref = SquashRef("gen-X.squashfs", "ab" * 32, 1234, "http://10.13.20.13/squashfs/img/gen-X.squashfs",
                    "10.13.20.13:/var/lib/sq/img/gen-X.squashfs", f"1:{'cd' * 32}:{'ef' * 32}")
    img = ImageFiles("img", Path("/k"), Path("/i"), "/srv/img", ref)
    c1 = node_cmdline(inv, inv.nodes[0], img, report_url="http://10.13.20.13/sidus/report")
    assert ("boot=sidus ip=dhcp sidus.root=squashfs-http "
            "sidus.src=http://10.13.20.13/squashfs/img/gen-X.squashfs "
            f"sidus.sha256={'ab' * 32} sidus.bytes=1234 "
            f"sidus.verity=1:{'cd' * 32}:{'ef' * 32} "
            "sidus.report=http://10.13.20.13/sidus/report") in c1
    assert "root=/dev/nfs" not in c1
    c2 = node_cmdline(inv, inv.nodes[1], img)
    assert "sidus.src=10.13.20.13:/var/lib/sq/img/gen-X.squashfs" in c2
    assert "sidus.verity=" not in c2  # the NFS-read file is loop-mounted as it is
    c3 = node_cmdline(inv, inv.nodes[2], img)
    assert "root=/dev/nfs nfsroot=10.13.20.13:/srv/img," in c3 and "boot=sidus" not in c3
    assert inv.nodes[0].ip == IPv4Address("10.13.20.101")


def test_inventory_rejects_an_unknown_root() -> None:
    with pytest.raises(ConfigErrors) as e:
        parse(INV.replace('root = "squashfs-nfs"', 'root = "floppy"'), "nodes.toml")
    msg = str(e.value)
    assert "nodes.toml:19: key 'nodes.n2.root'" in msg and "floppy" in msg


def test_store_keeps_held_generations_until_the_hold_expires(tmp_path: Path) -> None:
    """The image store's side of "a node keeps the image it booted" (every root source: the
    directory an ``nfs`` root reads): a promotion deletes generations other than current and
    previous unless held; an expired hold no longer keeps one; a symlinked generation or
    image directory (a lab's) is never deleted."""
    import time

    from sidusctl.subsys.imagestore import ImageStore

    store = ImageStore(tmp_path)

    def publish() -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        if store.exists("img"):
            while time.strftime("%Y%m%dT%H%M%S") == stamp:
                time.sleep(0.05)
        with store.new_generation("img") as g:
            (g.rootfs / "etc").mkdir(parents=True)
        return store.get("img").dir.name

    g1 = publish()
    store.set_holds("img", "serve-pxe@sdt-br", {g1: time.time() + 600, "bogus": 1e12})
    assert store.held("img") == {g1: pytest.approx(time.time() + 600, abs=5)}
    g2, g3 = publish(), publish()
    assert store.generations("img") == [g1, g2, g3]  # g1 held: kept by the third publish
    # another holder, expired, changes nothing; our hold expired: prune deletes g1
    store.set_holds("img", "other", {g1: time.time() - 1})
    assert store.prune("img") == []
    store.set_holds("img", "serve-pxe@sdt-br", {g1: time.time() - 1})
    assert store.held("img") == {}
    assert store.prune("img") == [g1]
    assert store.generations("img") == [g2, g3]
    store.set_holds("img", "serve-pxe@sdt-br", {})
    assert not (store.image_dir("img") / "holds" / "serve-pxe@sdt-br.json").exists()
    with pytest.raises(ConfigError, match="invalid holder name"):
        store.set_holds("img", "../x", {})
    # a generation that is a symlink is not the store's to delete; a linked image dir neither
    outside = tmp_path / "elsewhere" / "gen-19990101T000000-1"
    (outside / "rootfs").mkdir(parents=True)
    (store.image_dir("img") / outside.name).symlink_to(outside)
    g4 = publish()
    assert outside.is_dir() and store.generations("img")[-2:] == [g3, g4]
    other = ImageStore(tmp_path / "lab")
    (other.root).mkdir(parents=True)
    (other.root / "img").symlink_to(store.image_dir("img"))
    store.set_holds("img", "serve-pxe@sdt-br", {})
    assert other.prune("img") == []


def test_a_prune_during_a_reload_keeps_the_current_generations_export(tmp_path: Path) -> None:
    """serve-pxe's reload exports the new current generation, then renders the boot tree, and
    only then serves it (its loader's files). A prune in that window (every 30 s) kept only
    what the old files named and the nodes held: with ``--retain 0`` it deleted the fresh
    export, and the next boots had no root (seen once in CI's squashfs boot test). The
    store's current generation is kept whatever the loader says yet."""
    from types import SimpleNamespace

    from sidusctl.netboot.pxesupervisor import PxeSupervisor
    from sidusctl.serve import supervisor

    state = tmp_path / "state"
    d = make_store(state, ["gen-20260101T000000-1"])
    squash.export(state, "img")
    (d / "gen-20260102T000000-1").mkdir()
    shutil.copytree(d / "gen-20260101T000000-1" / "rootfs", d / "gen-20260102T000000-1" / "rootfs",
                    symlinks=True)
    (d / "gen-20260102T000000-1" / "rootfs" / "etc" / "new").write_text("B\n")
    os.replace(_link(d, "gen-20260102T000000-1"), d / "current")
    squash.export(state, "img")  # the reload's export of the new current generation

    class Loader:  # what the supervisor reads of serve-pxe's loader, before the swap
        def __init__(self) -> None:
            self.opts = SimpleNamespace(serve_dir=tmp_path / "serve", state=state,
                                        hold_time=900, interface="sdt-x", retain=0,
                                        tftp_root=tmp_path / "tftp")
            self.inventory = parse(INV, known_images=["img"])
            self.files: dict[str, object] = {}  # the new files are not applied yet
            self.nfs = None

        def __call__(self) -> supervisor.ServeConfig:
            return supervisor.ServeConfig()

    # the boot tree: the reload rendered the new generation's kernel and initrd too
    boot = tmp_path / "tftp" / "boot" / "img"
    for g in ("gen-20260101T000000-1", "gen-20260102T000000-1"):
        (boot / g).mkdir(parents=True)
        (boot / g / "vmlinuz-img").write_bytes(b"k")
    sup = PxeSupervisor(Loader())  # type: ignore[arg-type]
    removed = sup.prune()
    assert squash.find(state, "img", "gen-20260102T000000-1") is not None, removed
    assert "img/gen-20260101T000000-1" in removed  # what nothing holds still goes
    assert (boot / "gen-20260102T000000-1" / "vmlinuz-img").is_file(), removed
    assert not (boot / "gen-20260101T000000-1").exists(), removed
    assert "img/gen-20260101T000000-1 (kernel, initrd)" in removed
