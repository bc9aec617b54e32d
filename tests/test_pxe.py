"""Boot-loader trees: golden files for every template (pxelinux, iPXE, GRUB, exports, ganesha),
the incremental atomic TFTP tree, and the ``sidusctl pxe render|nfs-export`` commands.

``SIDUSCTL_UPDATE_GOLDEN=1`` rewrites the golden files (review the diff before committing);
without it a missing golden file fails (tests/golden.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from sidusctl.netboot import nfs as exports
from sidusctl.netboot import secureboot
from sidusctl.netboot.inventory import parse
from sidusctl.netboot.tree import ImageFiles, render_tree, write_tree
from sidusctl.subsys.imagestore import ImageStore
from tests.conftest import sidusctl
from tests.golden import assert_golden

INVENTORY = """\
[network]
subnet = "10.13.20.0/24"
server = "10.13.20.13"
nfs_root = "/srv/nfsroot/{image}"

[defaults]
image = "sidus"
overlay = "tmpfs"
kernel_args = ["console=tty1"]

[groups.compute]
overlay = "iscsi"
iscsi_target = "iqn.2013-04.zone.sidus.target:compute"
format = true

[[nodes]]
name = "node1"
mac = "52:54:00:12:34:56"
ip = "10.13.20.130"
size = "2g"

[[nodes]]
name = "node2"
mac = "52:54:00:ab:cd:ef"
ip = "10.13.20.131"
group = "compute"
iscsi_initiator = "iqn.2004-10.org.sidusctl:node2"

[[nodes]]
name = "ws1"
mac = "52:54:00:00:00:07"
ip = "10.13.20.140"
image = "minimal"
overlay = "disk"
disk = "LABEL=sidus-rw"
kernel_args = ["console=ttyS0,115200", "quiet"]

[[nodes]]
name = "lab1"
mac = "52:54:00:00:00:08"
ip = "10.13.20.141"
overlay = "nfs"
nfs_share = "10.13.20.13:/srv/rw/@MAC@"
"""


def _images(tmp: Path | None = None) -> dict[str, ImageFiles]:
    out = {}
    for name in ("sidus", "minimal"):
        k = Path(f"/nonexistent/vmlinuz-{name}")
        i = Path(f"/nonexistent/initrd.img-{name}")
        if tmp is not None:
            k, i = tmp / f"vmlinuz-{name}", tmp / f"initrd.img-{name}"
            k.write_bytes(b"kernel " + name.encode() * 1000)
            i.write_bytes(b"initrd " + name.encode() * 5000)
        out[name] = ImageFiles(name, k, i, f"/srv/nfsroot/{name}")
    return out


def _check_golden(rel: str, text: str) -> None:
    assert_golden(text, f"pxe/{rel}")


def test_tree_matches_golden_files() -> None:
    inv = parse(INVENTORY, "nodes.toml", known_images=["sidus", "minimal"])
    tree = render_tree(inv, _images())
    assert sorted(tree) == sorted([
        "boot.ipxe", "pxelinux.cfg/default",
        "pxelinux.cfg/01-52-54-00-12-34-56", "pxelinux.cfg/0A0D1482",
        "pxelinux.cfg/01-52-54-00-ab-cd-ef", "pxelinux.cfg/0A0D1483",
        "pxelinux.cfg/01-52-54-00-00-00-07", "pxelinux.cfg/0A0D148C",
        "pxelinux.cfg/01-52-54-00-00-00-08", "pxelinux.cfg/0A0D148D",
        "ipxe/52-54-00-12-34-56.ipxe", "ipxe/52-54-00-ab-cd-ef.ipxe",
        "ipxe/52-54-00-00-00-07.ipxe", "ipxe/52-54-00-00-00-08.ipxe",
        "grub/grub.cfg-01-52-54-00-12-34-56", "grub/grub.cfg-01-52-54-00-ab-cd-ef",
        "grub/grub.cfg-01-52-54-00-00-00-07", "grub/grub.cfg-01-52-54-00-00-00-08",
    ])
    for rel, text in tree.items():
        _check_golden(rel, text)
    # the seed's default file: two labels with its exact kernel parameters
    default = tree["pxelinux.cfg/default"]
    assert "LABEL tmpfs" in default and "LABEL iscsi" in default
    assert ("root=/dev/nfs nfsroot=10.13.20.13:/srv/nfsroot/sidus,rsize=8192,wsize=8192,tcp "
            "ip=dhcp aufs=tmpfs") in default
    assert ("aufs=iscsi ISCSI_TARGET_IP=10.13.20.13 "
            "ISCSI_INITIATOR=iqn.2013-04.zone.sidus.target:default root=LABEL=ISCSI") in default
    assert tree["ipxe/52-54-00-12-34-56.ipxe"].startswith("#!ipxe\n")
    # HEXIP and 01-<mac> name the same configuration
    assert tree["pxelinux.cfg/0A0D1482"] == tree["pxelinux.cfg/01-52-54-00-12-34-56"]


def test_export_templates_match_golden_files() -> None:
    _check_golden("exports", exports.exports_line("/srv/nfsroot/sidus", ["10.13.20.0/24"]))
    _check_golden("ganesha.conf", exports.ganesha_config(
        "/srv/nfsroot/sidus", ["10.13.20.0/24"], bind_addr="10.13.20.13"))
    line = exports.exports_line("/srv/nfsroot/sidus", ["10.13.20.0/24"]).splitlines()[-1]
    assert line == "/srv/nfsroot/sidus 10.13.20.0/24(ro,no_subtree_check,async,no_root_squash)"


def test_write_tree_is_incremental_and_removes_stale_files(tmp_path: Path) -> None:
    tftp = tmp_path / "tftp"
    images = _images(tmp_path)
    inv = parse(INVENTORY, "nodes.toml")
    first = write_tree(tftp, inv, images)
    assert "pxelinux.0" in first.created and not first.updated and not first.unchanged
    # the boot loader is the host's own, byte for byte; menu.c32 has libutil.c32 beside it
    assert (tftp / "pxelinux.0").read_bytes() == Path("/usr/lib/PXELINUX/pxelinux.0").read_bytes()
    for mod in ("ldlinux.c32", "menu.c32", "libutil.c32"):
        assert (tftp / mod).read_bytes() == \
            Path("/usr/lib/syslinux/modules/bios", mod).read_bytes()
    assert (tftp / "initrd.img-sidus").read_bytes() == images["sidus"].initrd.read_bytes()
    # GRUB for UEFI machines, built here by grub-mkimage: a PE image (the same bytes each time)
    assert (tftp / "grubnetx64.efi").read_bytes()[:2] == b"MZ"
    # and iPXE's, for serve-pxe --efi-loader ipxe, from the host's ipxe package
    assert (tftp / "ipxe.efi").read_bytes() == Path("/usr/lib/ipxe/ipxe.efi").read_bytes()
    inodes = {p: p.stat().st_ino for p in tftp.rglob("*") if p.is_file()}

    # nothing changed: nothing is rewritten
    second = write_tree(tftp, inv, images)
    assert not second.created and not second.updated and not second.removed
    assert {p: p.stat().st_ino for p in tftp.rglob("*") if p.is_file()} == inodes

    # one node changes mode, one node leaves: only their files move
    changed = INVENTORY.replace('size = "2g"', 'size = "4g"').split("[[nodes]]\nname = \"lab1\"")[0]
    third = write_tree(tftp, parse(changed, "nodes.toml"), images)
    assert sorted(third.updated) == sorted([
        "boot.ipxe", "grub/grub.cfg-01-52-54-00-12-34-56", "ipxe/52-54-00-12-34-56.ipxe",
        "pxelinux.cfg/01-52-54-00-12-34-56", "pxelinux.cfg/0A0D1482",
        # the signed GRUB's grub.cfg lists the nodes (when the host has the signed chain)
        *([] if secureboot.missing_packages() else ["grub/grub.cfg",
                                                   "grub/x86_64-efi/grub.cfg"])])
    assert sorted(third.removed) == sorted([
        "grub/grub.cfg-01-52-54-00-00-00-08", "ipxe/52-54-00-00-00-08.ipxe",
        "pxelinux.cfg/01-52-54-00-00-00-08", "pxelinux.cfg/0A0D148D"])
    assert not (tftp / "pxelinux.cfg/0A0D148D").exists()
    assert "sidus.size=4g" in (tftp / "pxelinux.cfg/0A0D1482").read_text()
    assert not list(tftp.rglob(".*.tmp")) and not list(tftp.rglob("*.sidusctl-tmp"))
    assert json.loads((tftp / ".sidusctl-pxe.json").read_text())["files"]


def _fake_store_image(state: Path, name: str) -> Path:
    """An image in a real store, made with the store's own API (kernel/initrd are stand-ins:
    these tests render trees, they do not boot them)."""
    store = ImageStore(state)
    with store.new_generation(name) as gen:
        (gen.rootfs / "etc").mkdir(parents=True)
        (gen.dir / f"vmlinuz-{name}").write_bytes(b"k" * 4096)
        (gen.dir / f"initrd.img-{name}").write_bytes(b"i" * 8192)
        gen.write_manifest({"name": name, "kind": "test"})
    return store.get(name).rootfs


def test_cli_render_and_nfs_export(tmp_path: Path) -> None:
    state = tmp_path / "state"
    rootfs = _fake_store_image(state, "minimal")
    nodes = tmp_path / "nodes.toml"
    nodes.write_text('[network]\nsubnet = "10.0.2.0/24"\nserver = "10.0.2.2"\n\n'
                     '[defaults]\nimage = "minimal"\n\n[[nodes]]\nname = "n1"\n'
                     'mac = "52:54:00:12:34:56"\nip = "10.0.2.15"\n')
    tftp = tmp_path / "tftp"
    res = sidusctl("pxe", "render", "--nodes", str(nodes), "--tftp-root", str(tftp), "--json",
                   state=state)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert "pxelinux.cfg/01-52-54-00-12-34-56" in out["created"]
    assert "vmlinuz-minimal" in out["created"] and "initrd.img-minimal" in out["created"]
    cfg = (tftp / "pxelinux.cfg/0A00020F").read_text()
    assert f"nfsroot=10.0.2.2:{rootfs},rsize=8192,wsize=8192,tcp" in cfg
    res = sidusctl("pxe", "render", "--nodes", str(nodes), "--tftp-root", str(tftp), "--json",
                   state=state)
    assert json.loads(res.stdout)["created"] == [] and json.loads(res.stdout)["updated"] == []

    res = sidusctl("pxe", "nfs-export", "minimal", "--network", "10.0.2.0/24", state=state)
    assert res.returncode == 0, res.stderr
    assert f"{rootfs} 10.0.2.0/24(ro,no_subtree_check,async,no_root_squash)" in res.stdout
    assert f'Path = "{rootfs}";' in res.stdout and "Name = VFS;" in res.stdout
    res = sidusctl("pxe", "nfs-export", "minimal", "--network", "10.0.2.0/33", state=state)
    assert res.returncode == 2 and "invalid client '10.0.2.0/33'" in res.stderr
    res = sidusctl("pxe", "nfs-export", "nosuch", "--network", "10.0.2.0/24", state=state)
    assert res.returncode == 4 and "no image named 'nosuch'" in res.stderr


@pytest.mark.slow  # nfs-ganesha
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns)")
def test_nfs_export_serve_answers_mount_requests(tmp_path: Path) -> None:
    """``--serve`` runs nfs-ganesha for the root: MOUNT and NFS get registered and showmount
    sees the export (inside a private namespace: nothing on the host's interfaces)."""
    import subprocess
    import time

    from tests.qemu_util import netns

    state = tmp_path / "state"
    rootfs = _fake_store_image(state, "minimal")
    with netns("nfsx") as ns:
        # ganesha resolves Bind_addr with AI_ADDRCONFIG: it wants one non-loopback address up
        subprocess.run(["ip", "-n", ns, "link", "add", "sdt-d0", "type", "veth", "peer", "name",
                        "sdt-d1"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "192.0.2.1/24", "dev", "sdt-d0"],
                       check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "sdt-d0", "up"], check=True)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *_cli(state), "pxe", "nfs-export",
                                 "minimal", "--network", "127.0.0.0/8", "--serve", "--bind",
                                 "127.0.0.1"], stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 40
            out = ""
            while time.monotonic() < deadline:
                r = subprocess.run(["ip", "netns", "exec", ns, "showmount", "-e", "127.0.0.1"],
                                   capture_output=True, text=True, check=False)
                out = r.stdout
                if str(rootfs) in out:
                    break
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.5)
            assert str(rootfs) in out
        finally:
            proc.send_signal(2)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode in (0, 130)


def _cli(state: Path) -> list[str]:
    import sys
    return [sys.executable, "-m", "sidusctl", "--state-dir", str(state)]


def test_grub_efi_is_built_again_only_when_its_inputs_or_the_trees_copy_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """grub-mkimage runs on the first render; a render that changes nothing runs no
    grub-mkimage and writes nothing (so it also works on a full disk); a tree whose copy was
    changed, or a recorded build of other inputs (a GRUB upgrade), gets a new build."""
    from sidusctl.core import run as run_mod
    from sidusctl.netboot import tree as tree_mod

    if not (tree_mod.GRUB_EFI_DIR / "moddep.lst").is_file():
        pytest.skip("no GRUB x86-64 EFI modules (grub-efi-amd64-bin)")
    builds: list[list[str]] = []
    real_run = run_mod.run

    def counting_run(argv: list[str], **kw: Any) -> Any:  # the real call, counted
        if "grub-mkimage" in argv[0]:
            builds.append(argv)
        return real_run(argv, **kw)

    monkeypatch.setattr(tree_mod, "run", counting_run)
    tftp = tmp_path / "tftp"
    images = _images(tmp_path)
    inv = parse(INVENTORY, "nodes.toml")
    efi = tftp / "grubnetx64.efi"
    write_tree(tftp, inv, images)
    assert len(builds) == 1
    first = efi.read_bytes()
    record = tftp / ".sidusctl-pxe.json"
    before = record.stat().st_mtime_ns
    second = write_tree(tftp, inv, images)
    assert len(builds) == 1 and "grubnetx64.efi" in second.unchanged
    assert not second.created and not second.updated
    assert record.stat().st_mtime_ns == before
    efi.write_bytes(b"MZ not GRUB")  # the tree's copy changed by someone
    third = write_tree(tftp, inv, images)
    assert len(builds) == 2 and third.updated == ["grubnetx64.efi"]
    assert efi.read_bytes() == first
    rec = json.loads(record.read_text())
    rec["grub_efi"]["key"] = "0" * 64  # built from other modules
    record.write_text(json.dumps(rec))
    fourth = write_tree(tftp, inv, images)
    assert len(builds) == 3 and "grubnetx64.efi" in fourth.unchanged  # same bytes again
    assert json.loads(record.read_text())["grub_efi"]["key"] != "0" * 64


def test_a_generations_kernel_and_initrd_are_named_by_it_in_every_loader() -> None:
    """serve-pxe knows each image's generation: pxelinux, iPXE and GRUB load the kernel and
    initrd from ``boot/<image>/<generation>/``; iPXE's kernel line names the initrd by its
    file name (the image name iPXE gives what it fetched, which the EFI stub looks for)."""
    from dataclasses import replace

    inv = parse(INVENTORY, "nodes.toml", known_images=["sidus", "minimal"])
    images = {n: replace(f, generation="gen-20260101T000000-1") for n, f in _images().items()}
    tree = render_tree(inv, images)
    for rel in ("pxelinux.cfg/default", "pxelinux.cfg/01-52-54-00-12-34-56",
                "ipxe/52-54-00-12-34-56.ipxe", "grub/grub.cfg-01-52-54-00-12-34-56"):
        assert_golden(tree[rel], f"pxe-generation/{rel}")
    assert images["sidus"].kernel_rel == "boot/sidus/gen-20260101T000000-1/vmlinuz-sidus"
