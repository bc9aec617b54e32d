"""Squashfs roots booted for real: qemu guests (TCG) PXE-boot ``minimal`` through serve-pxe
with ``root = "squashfs-http"`` (downloaded into RAM, read through dm-verity: each block
checked against the hash tree the file ends with) and ``root = "squashfs-nfs"``
(loop-mounted from the NFS-exported directory), tmpfs overlay.

One lab, two guests booted at once, one reboot (three TCG boots for the whole issue):
- both: ``/`` is an overlay whose lower layer is the squashfs; a write lands in the upper
  layer only; the console says which source the root came from; the node reported
  ``booted`` itself (``pxe status``) with the generation it runs;
- a new generation published while they run (a hard-linked copy of the root plus a marker
  file, ``current`` flipped): serve-pxe exports it, ``pxe status`` shows each node still on
  its old generation with the new one next; the old file stays served (held by the nodes);
  the nodes keep reading files they had not opened yet;
- the squashfs-http guest reboots and gets the new generation (the marker is there), while
  the old file stays served for the squashfs-nfs guest: serve-pxe runs with ``--retain 0``,
  so only the node's hold keeps it through the prunes (every 30 s) during that reboot;
- both nodes reported what their kernel says: no lockdown, no Secure Boot (BIOS guests);
- both loaded their AppArmor policy from the cache the build compiled for their kernel, and
  compiled nothing at boot;
- every HTTP client of the first boots (iPXE, the initramfs's download, the reports) closed
  its connections itself: serve-pxe ended none for idleness (``idle_closed``), so no node
  holds a slot of ``--http-per-client`` once it has booted;
- the squashfs-http node holds its image in huge pages; its kernel took the hash tree
  sidusctl wrote (its root is mounted through the verity device, no block failed), and
  refuses a block changed by one bit: a
  copy of the image with one byte changed, mapped with the same table, gives an I/O error
  for that block and reads the next one (tests/test_verity.py checks the same trees against
  cryptsetup's ``veritysetup`` on the host, which has no device-mapper).

The lab's state has a private ``images/minimal`` (its first generation a link to the shared
build), so the shared image store is never touched.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from sidusctl.netboot import squash
from sidusctl.netboot.lab import LabNode, PxeLab, wait_logins
from sidusctl.serve import http
from sidusctl.serve.supervisor import read_status
from sidusctl.subsys.imagestore import ImageStore
from sidusctl.subsys.qemu import Guest
from tests.conftest import SIDUSCTL, BuiltImage
from tests.netns_util import uniq

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, qemu, NFS)"),
              pytest.mark.skipif(shutil.which("mksquashfs") is None,
                                 reason="squashfs-tools missing (scripts/setup-host)")]
#: it boots qemu guests: tests/conftest.py runs it after the slow modules that do not
BOOTS_GUESTS = True

HTTP_NODE = LabNode("sq1", "52:54:00:77:05:01", IPv4Address("10.77.0.150"), "squashfs-http")
NFS_NODE = LabNode("sq2", "52:54:00:77:05:02", IPv4Address("10.77.0.151"), "squashfs-nfs")
SERVE = [*SIDUSCTL, "serve-pxe"]
BOOT_TIMEOUT = 480.0
MARK = "sdt-sq-marker"


@contextlib.contextmanager
def evidence(lab: PxeLab) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for g in lab.guests:
            print(f"--- console of {g.name} ({g.log_path}) ---\n{g.tail(6000)}")
        print(f"--- serve-pxe log ({lab.serve_log}) ---\n{lab.serve_text()[-8000:]}")
        raise


def wait_for(what: str, cond: object, timeout: float = 180) -> None:
    """Poll ``cond()`` until true; fail naming ``what`` after ``timeout`` seconds (a bound,
    not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(1)


def private_image(state: Path, image: BuiltImage) -> Path:
    """``state/images/minimal`` with ``gen-A`` linked to the shared build and current -> it."""
    d = state / "images" / "minimal"
    d.mkdir(parents=True)
    shared = Path(str(image.dir)).resolve()
    (d / shared.name).symlink_to(shared, target_is_directory=True)
    (d / "current").symlink_to(shared.name)
    return d


def publish_generation(state: Path, d: Path, name: str, marker: str) -> Path:
    """A new generation ``name`` of the image in ``d`` (hard-linked copy of current's root,
    plus ``/etc/<MARK>``), then ``current`` flipped to it atomically. Under the image's lock
    in ``state``'s store, as a build holds it: serve-pxe's prune (every 30 s) skips the image
    meanwhile (it holds the lock a moment; waited for), where it would delete a ``gen-*``
    directory that is not yet current (it did, once, mid-copy)."""
    lock = ImageStore(state, recover=False).lock(d.name).acquire(wait=True)
    try:
        cur = (d / "current").resolve()
        new = d / name
        new.mkdir()
        subprocess.run(["cp", "-al", str(cur / "rootfs"), str(new / "rootfs")], check=True)
        (new / "rootfs" / "etc" / MARK).write_text(marker + "\n")
        for f in cur.iterdir():
            if f.is_file():
                os.link(f, new / f.name)
        tmp = d / ".current-tmp"
        tmp.symlink_to(name)
        os.replace(tmp, d / "current")
    finally:
        lock.release()
    return new


def pxe_status(lab: PxeLab) -> dict[str, dict[str, object]]:
    r = subprocess.run([*SIDUSCTL, "pxe", "status", "--json"], capture_output=True, text=True,
                       env={**os.environ, "SIDUSCTL_STATE": str(lab.state)}, check=True)
    return {n["name"]: n for n in json.loads(r.stdout)["nodes"]}


def check_no_connection_left_idle(lab: PxeLab, since: float) -> None:
    """Every HTTP client of the first boots closed its connections itself: the nodes' iPXE
    (kernel, initrd and script; it closes them before it starts the kernel), the
    initramfs's download and the reports. A connection left open would hold a worker and a
    ``per_client`` slot until serve-pxe ended it, counted in ``idle_closed``, the handler's
    timeout after its last request, which came before ``since`` (the login prompts, a
    ``time.monotonic()``): so the check waits until that timeout (plus the status file's
    rewrite) has passed since then."""
    time.sleep(max(0.0, since + http._Handler.timeout + 10 - time.monotonic()))
    _, st = read_status(lab.state, "serve-pxe")
    assert st["http"]["idle_closed"] == 0, st["http"]
    assert st["http"]["requests"] > 0 and st["http"]["internal_errors"] == 0, st["http"]


def check_squashfs_root(g: Guest, root: str, generation: str) -> None:
    fstype = g.sh("findmnt -n -o FSTYPE /")
    assert fstype == "overlay", f"/ is {fstype}"
    assert g.sh("findmnt -n -o FSTYPE /run/sidus/ro") == "squashfs"
    state = g.sh("cat /run/sidus/state")
    assert f"SIDUS_ROOT={root}" in state, state
    assert f"SIDUS_GENERATION={generation}" in state, state
    log = g.sh("cat /run/sidus/sidus.log")
    src = "squashfs over HTTP" if root == "squashfs-http" else "squashfs over NFS"
    assert f"root: {src}" in log, log
    # the NIC's drivers were loaded before udev's coldplug (init-top/sidus-nic)
    assert "network drivers loaded before udev: virtio_pci virtio_net" in log, log
    if root == "squashfs-http":
        assert "root: verity device /dev/dm-" in log and "SIDUS_CHECK=verity" in state, log
        table = g.sh("dmsetup table sidus-root")
        assert " verity 1 " in table and table.endswith("check_at_most_once"), table
        # dm-verity's verdict: V, no block read so far failed its check
        assert g.sh("dmsetup status sidus-root").split()[-1] == "V"
        # the image's tmpfs holds it in huge pages (the kernel's THP for shmem)
        assert "huge=always" in g.sh("findmnt -n -o OPTIONS /run/sidus/img")
        huge_kb = g.sh("awk '/^ShmemHugePages:/ {print $2}' /proc/meminfo")
        assert int(huge_kb) >= 100 * 1024, f"ShmemHugePages: {huge_kb} kB"
    # the report unit is a runtime one (init-bottom wrote it into /run, with the shell
    # alone; the test waits below for the "booted" it sends): the writable layer holds none
    # of it
    assert g.sh("systemctl show -P FragmentPath sidus-report.service") == \
        "/run/systemd/system/sidus-report.service"
    for old in ("etc/systemd/system/sidus-report.service", "usr/local/lib/sidus"):
        assert g.rc(f"test -e /run/sidus/rw/upper/{old}") == 1, old
    # the AppArmor policy came from the cache the build compiled for this kernel
    # (sidusctl/image/apparmor.py): the running kernel's features name a directory of the
    # image, apparmor.service loaded the profiles, and compiled nothing (a compiled profile
    # would have been written into the writable layer)
    cache = g.sh("apparmor_parser --print-cache-dir")
    assert g.rc(f"test -f /run/sidus/ro{cache}/sbin.dhclient") == 0, cache
    assert g.sh("systemctl is-active apparmor.service") == "active"
    assert "dhclient (enforce)" in g.sh("cat /sys/kernel/security/apparmor/profiles")
    assert g.rc("test -e /run/sidus/rw/upper/var/cache/apparmor") == 1
    # minimal's fstab (debootstrap's placeholder) has no entry for /: init-bottom left it
    # unwritten, so it was not copied up (tests/test_netboot_hook.py edits one that has)
    assert g.rc("test -e /run/sidus/rw/upper/etc/fstab") == 1
    # a write lands in the upper layer only
    g.sh("echo written > /etc/sdt-sq-write")
    assert g.sh("cat /run/sidus/rw/upper/etc/sdt-sq-write") == "written"
    assert g.rc("test -e /run/sidus/ro/etc/sdt-sq-write") == 1


#: in the squashfs-http guest: a copy of its image with one byte changed in data block $B,
#: mapped through dm-verity with the node's own parameters (sidus.verity=); then block $B
#: read (must fail), block $B + 1 read (must work), dm-verity's verdict, and the teardown
CORRUPT_COPY = r"""
img=$(ls /run/sidus/img/*.squashfs)
v=$(sed -n 's/.*sidus.verity=\([^ ]*\).*/\1/p' /proc/cmdline)
n=${v%%:*}; rest=${v#*:}; root=${rest%%:*}; salt=${rest#*:}; B=$((n / 2))
cp "$img" /dev/shm/sdt-bad
old=$(dd if=/dev/shm/sdt-bad bs=1 skip=$((B * 4096 + 100)) count=1 2>/dev/null | od -An -tu1)
printf "\\$(printf %o $(( (old + 1) % 256 )))" |
  dd of=/dev/shm/sdt-bad bs=1 seek=$((B * 4096 + 100)) conv=notrunc 2>/dev/null
loop=$(losetup -r -f --show /dev/shm/sdt-bad)
dmsetup create sdt-bad --readonly --noudevsync   --table "0 $((n * 8)) verity 1 $loop $loop 4096 4096 $n $n sha256 $root $salt"
dm=$(dmsetup info -c --noheadings -o blkdevname sdt-bad)
dd if="/dev/$dm" of=/dev/null bs=4096 skip=$B count=1 iflag=direct 2>/dev/null; echo "bad=$?"
dd if="/dev/$dm" of=/dev/null bs=4096 skip=$((B + 1)) count=1 iflag=direct 2>/dev/null; echo "next=$?"
echo "status=$(dmsetup status sdt-bad | awk '{print $NF}')"
dmsetup remove --noudevsync sdt-bad; losetup -d "$loop"; rm -f /dev/shm/sdt-bad
"""


def check_verity_refuses_a_changed_block(g: Guest) -> None:
    # one console line (the console runs one command per line): the script, base64-encoded
    b64 = base64.b64encode(CORRUPT_COPY.encode()).decode()
    out = g.sh(f"echo {b64} | base64 -d >/tmp/sdt-bad.sh && sh /tmp/sdt-bad.sh", timeout=300)
    assert "bad=1" in out and "next=0" in out and "status=C" in out, out


def test_squashfs_roots_boot_keep_their_generation_and_reboot_into_the_new_one(
        minimal_image: BuiltImage, tmp_path: Path) -> None:
    lab = PxeLab(uniq("sq"), minimal_image.state, "minimal", [HTTP_NODE, NFS_NODE], tmp_path,
                 serve_command=SERVE)
    d = private_image(lab.state, minimal_image)
    gen_a = (d / "current").resolve().name
    new: Path | None = None
    try:
        with lab, evidence(lab):
            lab.start_serve("--nfs", "ganesha", "--http", "--retain", "0", ready_timeout=240)
            exp = squash.find(lab.state, "minimal", gen_a)
            assert exp is not None, "serve-pxe did not export the generation nodes need"
            g1 = lab.boot(HTTP_NODE, memory=2048, timeout=BOOT_TIMEOUT)
            g2 = lab.boot(NFS_NODE, memory=1024, timeout=BOOT_TIMEOUT)
            wait_logins(lab, [(g1, HTTP_NODE), (g2, NFS_NODE)], BOOT_TIMEOUT)
            first_logins = time.monotonic()
            assert "sidus: root: squashfs over HTTP" in g1.tail(200000)
            for g, node in ((g1, HTTP_NODE), (g2, NFS_NODE)):
                g.login(timeout=120)
                check_squashfs_root(g, node.root, gen_a)
            check_verity_refuses_a_changed_block(g1)
            wait_for("both nodes report booted", lambda: all(
                pxe_status(lab)[n.name].get("booted_reported") for n in (HTTP_NODE, NFS_NODE)))
            st = pxe_status(lab)
            assert st["sq1"]["generation"] == gen_a and st["sq1"]["stage"] == "booted"
            assert st["sq2"]["generation"] == gen_a
            for n in ("sq1", "sq2"):
                assert (st[n]["lockdown"], st[n]["secure_boot"], st[n]["modules_failed"]) == \
                    ("none", "bios", None), st[n]

            # a new generation while they run
            gen_b = "gen-29991231T000000-1"
            new = publish_generation(lab.state, d, gen_b, "generation B")
            wait_for("serve-pxe exported the new generation",
                     lambda: squash.find(lab.state, "minimal", gen_b) is not None, 300)
            wait_for("pxe status names the next generation",
                     lambda: pxe_status(lab)["sq1"]["next"] == gen_b, 120)
            st = pxe_status(lab)
            assert st["sq1"]["generation"] == gen_a and st["sq2"]["generation"] == gen_a
            assert squash.find(lab.state, "minimal", gen_a) is not None, "old file removed"
            # files never opened before are still readable on both nodes
            for g in (g1, g2):
                out = g.sh("cat /usr/share/common-licenses/GPL-3 | wc -c")
                assert int(out) > 30000, out
                assert g.rc(f"test -e /etc/{MARK}") == 1
            # the node over NFS still reads its (old) file from the server
            assert g2.sh("md5sum /usr/bin/dpkg | cut -c1-8")

            # the squashfs-http node reboots into the new generation
            g1.reboot()
            wait_logins(lab, [(g1, HTTP_NODE)], BOOT_TIMEOUT)
            g1.login(timeout=120)
            assert g1.sh(f"cat /etc/{MARK}") == "generation B"
            assert f"SIDUS_GENERATION={gen_b}" in g1.sh("cat /run/sidus/state")
            assert "SIDUS_CHECK=verity" in g1.sh("cat /run/sidus/state")
            wait_for("the rebooted node reports its new generation",
                     lambda: pxe_status(lab)["sq1"]["generation"] == gen_b, 120)
            assert pxe_status(lab)["sq2"]["generation"] == gen_a
            # the file the squashfs-nfs node reads survived every prune since (no retention)
            assert squash.find(lab.state, "minimal", gen_a) is not None, "held file removed"
            assert gen_a in json.loads(subprocess.run(
                [*SIDUSCTL, "pxe", "status", "--json"], capture_output=True, text=True,
                env={**os.environ, "SIDUSCTL_STATE": str(lab.state)},
                check=True).stdout)["held"]["minimal"]
            assert g2.sh("md5sum /usr/bin/dpkg | cut -c1-8")
            check_no_connection_left_idle(lab, first_logins)
    finally:
        if new is not None:
            shutil.rmtree(new, ignore_errors=True)
