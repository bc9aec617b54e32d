"""Netboot, proven by booting: the image's kernel and initrd in qemu (TCG), root over NFS from
nfs-ganesha, the sidus initramfs script stacking a writable layer over it.

Everything the guest reaches (rpcbind, nfs-ganesha, tgtd) runs in a private network namespace
with loopback only, and qemu runs there too (slirp shows the namespace as 10.0.2.2).

The image is the shared ``minimal`` image (tests/conftest.py). For development,
``SIDUSCTL_NETBOOT_ROOT=/path/to/rootfs`` boots a root prepared by hand instead (its newest
/boot/vmlinuz-* and initrd.img-*).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidusctl.netboot import inventory
from sidusctl.netboot.tree import ImageFiles, write_tree
from sidusctl.subsys.ganesha import Export, serve
from sidusctl.subsys.qemu import wait_login_prompts
from tests.proc_util import terminate
from tests.qemu_util import BOOT_TIMEOUT, Guest, guest, mkdisk, netns, nfs_append

# a module fixture asks for minimal_image (request.getfixturevalue): tests/conftest.py
# starts its build in the background at the session's start when this module is in it
USES_MINIMAL_IMAGE = True
pytestmark = [pytest.mark.slow,  # the built image, qemu, nfs-ganesha
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, qemu, NFS)")]
#: it boots qemu guests: tests/conftest.py runs it after the slow modules that do not
BOOTS_GUESTS = True

MARK = "sdt-netboot-marker"
OLD_UNIT_LINK = "etc/systemd/system/multi-user.target.wants/sidus-report.service"


@dataclass(frozen=True)
class NetbootImage:
    rootfs: Path
    kernel: Path
    initrd: Path


@dataclass(frozen=True)
class Lab:
    image: NetbootImage
    netns: str
    logdir: Path


@pytest.fixture(scope="module")
def netboot_image(request: pytest.FixtureRequest) -> NetbootImage:
    dev = os.environ.get("SIDUSCTL_NETBOOT_ROOT")
    if dev:
        root = Path(dev)
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        initrds = sorted((root / "boot").glob("initrd.img-*"))
        assert kernels and initrds, f"{root}/boot has no kernel or initrd"
        return NetbootImage(root, kernels[-1], initrds[-1])
    img = request.getfixturevalue("minimal_image")
    return NetbootImage(Path(img.rootfs), Path(img.kernel), Path(img.initrd))


@pytest.fixture(scope="module")
def lab(netboot_image: NetbootImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The image's root exported read-only by nfs-ganesha inside a fresh namespace."""
    logdir = tmp_path_factory.mktemp("sdt-netboot")
    with netns("nb") as ns, serve([Export(netboot_image.rootfs)], netns=ns, bind_addr=None,
                                   workdir=logdir / "ganesha"):
        yield Lab(netboot_image, ns, logdir)


@contextlib.contextmanager
def booted(lab: Lab, name: str, **kw: Any) -> Iterator[Guest]:
    """A guest in the lab's namespace (``kw``: :class:`Guest`'s), its console in
    ``<logdir>/<name>.console.log`` and printed when the block fails: the evidence."""
    log = lab.logdir / f"{name}.console.log"
    with guest(name, netns=lab.netns, log=log, **kw) as g:
        try:
            yield g
        except BaseException:
            print(f"--- console of {name} ({log}) ---\n{g.transcript()[-6000:]}")
            raise


def boot(lab: Lab, name: str, *params: str,
         disks: tuple[Path, ...] = ()) -> contextlib.AbstractContextManager[Guest]:
    """:func:`booted` with the image's kernel and initrd, root over NFS, ``params`` added."""
    return booted(lab, name, kernel=lab.image.kernel, initrd=lab.image.initrd,
                  append=nfs_append(lab.image.rootfs, *params), disks=disks)


def check_overlay_root(g: Guest, rootfs: Path, upper_fstype: str) -> None:
    """/ is an overlay whose lower layer is the NFS root and whose upper is on ``upper_fstype``."""
    fstype, options = g.sh("findmnt -n -o FSTYPE,OPTIONS /").split(None, 1)
    assert fstype == "overlay", f"/ is {fstype}, not overlay"
    assert "lowerdir=/run/sidus/ro" in options and "upperdir=/run/sidus/rw/upper" in options
    lower = g.sh("findmnt -n -o FSTYPE,SOURCE /run/sidus/ro").split()
    assert lower[0] in ("nfs", "nfs4"), lower
    assert lower[1] == f"10.0.2.2:{rootfs}", lower
    assert g.sh("findmnt -n -o FSTYPE /run/sidus/rw") == upper_fstype
    # the NFS lower layer is read-only: writing there is refused
    assert g.rc("touch /run/sidus/ro/sdt-probe") != 0
    # nothing in the new root's fstab mounts or remounts /
    assert g.sh("awk '$1 !~ /^#/ && $2 == \"/\"' /etc/fstab") == ""
    # that holds for minimal's fstab as built (debootstrap's placeholder has no entry for /),
    # so what can fail here is the edit: init-bottom must leave such an fstab unwritten, not
    # copy it up (tests/test_netboot_hook.py edits one that has an entry)
    assert g.rc("test -e /run/sidus/rw/upper/etc/fstab") == 1


def write_marker(g: Guest, text: str) -> None:
    g.sh(f"echo {text} > /etc/{MARK}")
    assert g.sh(f"cat /etc/{MARK}") == text
    assert g.sh(f"cat /run/sidus/rw/upper/etc/{MARK}") == text
    assert g.rc(f"test -e /run/sidus/ro/etc/{MARK}") == 1


def test_initrd_contains_the_hook(netboot_image: NetbootImage, tmp_path: Path) -> None:
    listing = subprocess.run(["lsinitramfs", str(netboot_image.initrd)], capture_output=True,
                             text=True, check=True).stdout.splitlines()
    names = set(listing)
    assert "scripts/init-bottom/sidus" in names
    assert "scripts/sidus" in names  # boot=sidus: the squashfs roots
    assert "conf/conf.d/sidus" in names
    assert any(n.endswith("/squashfs.ko") or n.endswith("/squashfs.ko.xz") for n in names)
    assert any(n.endswith("/overlay.ko") or n.endswith("/overlay.ko.xz") for n in names)
    for tool in ("findfs", "blkid", "mke2fs", "losetup", "sha256sum"):
        assert f"usr/lib/sidus/bin/{tool}" in names, f"{tool} missing from the initrd"
    # the script must run before udev's, which moves /dev into the root we are about to move
    subprocess.run(["unmkinitramfs", str(netboot_image.initrd), str(tmp_path / "x")], check=True)
    order_files = list((tmp_path / "x").rglob("scripts/init-bottom/ORDER"))
    assert order_files, "no init-bottom ORDER file in the initrd"
    order = [ln.split()[0] for ln in order_files[0].read_text().splitlines() if ln.strip()]
    scripts = [o.rsplit("/", 1)[-1] for o in order]
    assert "sidus" in scripts and scripts.index("sidus") < scripts.index("udev"), scripts
    # and the network drivers load before udev's coldplug starts (init-top/sidus-nic)
    top = list((tmp_path / "x").rglob("scripts/init-top/ORDER"))
    assert top, "no init-top ORDER file in the initrd"
    scripts = [ln.split()[0].rsplit("/", 1)[-1] for ln in top[0].read_text().splitlines()
               if ln.startswith("/scripts/")]
    assert "sidus-nic" in scripts and scripts.index("sidus-nic") < scripts.index("udev"), \
        scripts


def test_tmpfs_layer_is_private_and_gone_and_disk_layer_survives_reboot(lab: Lab) -> None:
    """Two guests booted at once (one TCG boot each costs minutes, and the host has a core for
    each): a tmpfs layer, private and gone after a reboot; a disk layer, kept across one."""
    root = lab.image.rootfs
    disk = mkdisk(lab.logdir / "sdt-rw-disk.img", 256, label="sdt-rw")
    with contextlib.ExitStack() as stack:
        gt = stack.enter_context(boot(lab, "sdt-nb-tmpfs", "aufs=tmpfs", "sidus.size=256m"))
        gd = stack.enter_context(boot(lab, "sdt-nb-disk", "sidus.overlay=disk",
                                      "sidus.disk=LABEL=sdt-rw", "sidus.resolv=keep",
                                      disks=(disk,)))
        wait_login_prompts([gt, gd], BOOT_TIMEOUT)
        gt.login()
        check_overlay_root(gt, root, "tmpfs")
        assert "size=262144k" in gt.sh("findmnt -n -o OPTIONS /run/sidus/rw")
        write_marker(gt, "tmpfs-1")
        assert not (root / "etc" / MARK).exists(), "the write reached the shared NFS root"
        assert "sidus: root: overlay of /run/sidus/ro" in gt.transcript()
        assert gt.sh(". /run/sidus/state; echo $SIDUS_MODE $SIDUS_UNION") == "tmpfs overlay"
        # name service from the lease (slirp's DHCP names 10.0.2.3), written in the rw layer
        assert gt.sh("grep -c '^nameserver 10.0.2.3$' /run/sidus/rw/upper/etc/resolv.conf") \
            == "1"
        assert "sidus: resolv.conf: nameserver 10.0.2.3" in gt.transcript()

        gd.login()
        check_overlay_root(gd, root, "ext4")
        # sidus.resolv=keep: the image's resolv.conf, untouched (not in the rw layer)
        assert gd.rc("test -e /run/sidus/rw/upper/etc/resolv.conf") == 1
        assert gd.sh("findmnt -n -o SOURCE /run/sidus/rw") == "/dev/vda"
        write_marker(gd, "disk-1")
        # what an initramfs older than the runtime report unit left in a persistent layer:
        # its unit, enablement link and script (init-bottom's forget_old_report_unit)
        gd.sh("mkdir -p /etc/systemd/system/multi-user.target.wants /usr/local/lib/sidus && "
              "printf '[Service]\\nExecStart=/bin/true\\n' "
              ">/etc/systemd/system/sidus-report.service && "
              "ln -sf ../sidus-report.service "
              "/etc/systemd/system/multi-user.target.wants/sidus-report.service && "
              "echo true >/usr/local/lib/sidus/report")
        assert gd.rc(f"test -L /run/sidus/rw/upper/{OLD_UNIT_LINK}") == 0
        gd.sh("sync")

        gt.reboot()
        gd.reboot()
        wait_login_prompts([gt, gd], BOOT_TIMEOUT)
        gt.login()
        check_overlay_root(gt, root, "tmpfs")
        assert gt.rc(f"test -e /etc/{MARK}") == 1, "a tmpfs layer survived a reboot"
        gd.login()
        check_overlay_root(gd, root, "ext4")
        assert gd.sh(f"cat /etc/{MARK}") == "disk-1", "the disk layer lost the file on reboot"
        # the old report unit's files are gone from the layer, the marker beside them is not
        assert "removed the report unit an older initramfs left" in gd.transcript()
        for old in ("etc/systemd/system/sidus-report.service", OLD_UNIT_LINK,
                    "usr/local/lib/sidus/report"):
            assert gd.rc(f"test -e /{old} || test -L /{old}") == 1, old
        gd.sh("sync")
    # the file is in the upper directory of the disk's filesystem, seen from the host
    out = subprocess.run(["debugfs", "-R", f"cat /upper/etc/{MARK}", str(disk)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "disk-1"


def pxe_tree(lab: Lab) -> Path:
    """The TFTP tree ``sidusctl pxe render`` writes for one node (``sdt-node1``, the default
    MAC of a test guest) whose disk layer names a disk it does not have."""
    nodes = lab.logdir / "nodes.toml"
    nodes.write_text(f"""[network]
subnet = "10.0.2.0/24"
server = "10.0.2.2"
nfs_root = "{lab.image.rootfs}"

[defaults]
image = "netboot"
kernel_args = ["console=ttyS0", "panic=-1", "quiet", "norandmaps"]

[[nodes]]
name = "sdt-node1"
mac = "52:54:00:12:34:56"
ip = "10.0.2.15"
overlay = "disk"
disk = "LABEL=sdt-missing"
kernel_args = ["console=ttyS0", "sidus.wait=3", "quiet", "systemd.show_status=false",
               "norandmaps"]
""")
    inv = inventory.load(nodes, known_images=["netboot"])
    tftp = lab.logdir / "tftp"
    images = {"netboot": ImageFiles("netboot", lab.image.kernel, lab.image.initrd,
                                    str(lab.image.rootfs))}
    write_tree(tftp, inv, images)
    return tftp


def check_pxe_fallback(g: Guest, lab: Lab) -> None:
    """The node booted from the rendered tree and fell back from its missing disk to tmpfs."""
    cmdline = g.sh("cat /proc/cmdline")
    # IPAPPEND 2 and the node's own file (not the default menu) were used
    assert "BOOTIF=01-52-54-00-12-34-56" in cmdline
    assert "sidus.overlay=disk sidus.disk=LABEL=sdt-missing" in cmdline
    console = g.transcript()
    assert "disk LABEL=sdt-missing not found" in console
    assert "disk mode failed: falling back to tmpfs" in console
    check_overlay_root(g, lab.image.rootfs, "tmpfs")
    assert g.sh(". /run/sidus/state; echo $SIDUS_MODE") == "tmpfs"
    write_marker(g, "fallback")


@contextlib.contextmanager
def tgt_target(ns: str, iqn: str, lun: Path, workdir: Path) -> Iterator[None]:
    """tgtd (userspace iSCSI target) inside ``ns`` with one LUN backed by the file ``lun``."""
    cport = str(100 + os.getpid() % 800)
    adm = ["tgtadm", "-C", cport, "--lld", "iscsi"]
    with open(workdir / "tgtd.log", "wb") as tlog:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "tgtd", "-f", "-C", cport,
                                 "--iscsi", "portal=127.0.0.1:3260"],
                                stdout=tlog, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while subprocess.run([*adm, "--op", "show", "--mode", "target"], capture_output=True,
                             check=False).returncode != 0:
            assert proc.poll() is None, (workdir / "tgtd.log").read_text()
            assert time.monotonic() < deadline, "tgtd did not start"
            time.sleep(0.2)
        subprocess.run([*adm, "--op", "new", "--mode", "target", "--tid", "1", "-T", iqn],
                       check=True)
        subprocess.run([*adm, "--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                        "-b", str(lun)], check=True)
        subprocess.run([*adm, "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"],
                       check=True)
        yield
    finally:
        terminate(proc, timeout=10)


def check_iscsi_layer(g: Guest, lab: Lab, iqn: str) -> None:
    """The writable layer is the iSCSI LUN, formatted by this first boot."""
    check_overlay_root(g, lab.image.rootfs, "ext4")
    assert g.sh("findmnt -n -o SOURCE /run/sidus/rw").startswith("/dev/sd")
    assert g.sh("blkid -o value -s LABEL $(findmnt -n -o SOURCE /run/sidus/rw)") == "ISCSI"
    assert "iSCSI login to " + iqn in g.transcript()
    write_marker(g, "iscsi-1")
    g.sh("sync")


def test_pxe_tree_node_without_its_disk_and_iscsi_layer_boot_at_once(lab: Lab) -> None:
    """Two guests booted at once (the host has a core for each):

    - the rendered tree, end to end: qemu's iPXE ROM gets pxelinux.0 from slirp's TFTP (the
      directory ``sidusctl pxe render`` wrote), pxelinux picks ``pxelinux.cfg/01-<mac>``, the
      node asks for a disk layer whose disk is missing: it falls back to tmpfs and says so;
    - an iSCSI writable layer (tgtd's LUN), formatted on first boot, the write found on the
      LUN afterwards."""
    listing = subprocess.run(["lsinitramfs", str(lab.image.initrd)], capture_output=True,
                             text=True, check=True).stdout
    if "usr/lib/sidus/bin/iscsistart" not in listing:
        pytest.fail("the image's initrd has no iscsistart: open-iscsi must be in the image")
    tftp = pxe_tree(lab)
    iqn = "iqn.2013-04.zone.sidus.target:sdt-node1"
    lun = mkdisk(lab.logdir / "sdt-iscsi-lun.img", 128)
    with contextlib.ExitStack() as stack:
        stack.enter_context(tgt_target(lab.netns, iqn, lun, lab.logdir))
        gp = stack.enter_context(booted(lab, "sdt-nb-pxe", tftp=tftp))
        gi = stack.enter_context(boot(lab, "sdt-nb-iscsi", "aufs=iscsi",
                                      "ISCSI_TARGET_IP=10.0.2.2", f"ISCSI_INITIATOR={iqn}",
                                      "root=LABEL=ISCSI", "sidus.format=1"))
        # the PXE guest goes through iPXE and TFTP first: more time
        wait_login_prompts([gp, gi], BOOT_TIMEOUT + 180)
        gp.login()
        check_pxe_fallback(gp, lab)
        gi.login()
        check_iscsi_layer(gi, lab, iqn)
    out = subprocess.run(["debugfs", "-R", f"cat /upper/etc/{MARK}", str(lun)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "iscsi-1"
