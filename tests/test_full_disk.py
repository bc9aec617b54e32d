"""A state directory (or a file sidusctl writes) on a file system that is full, out of inodes
or read-only: every command says so as a sidusctl error naming the path (never exit 70, never
a traceback), leaves what was there as it was (no half-written file in place of a good one, no
generation published half-written, no temp file or directory left), and the next command
works once there is room again. The file systems are real: small tmpfs mounts named
``sdt-full``, filled with ``fallocate``, unmounted at the end of each test whatever happens."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from sidusctl.core.errors import StateError, WriteError
from sidusctl.core.state import FileLock, atomic_copy, read_json, write_json
from sidusctl.serve import dhcp_codec as dc
from sidusctl.serve.dhcp import DhcpServer
from sidusctl.serve.dhcp_config import BootPolicy, DhcpConfig, Reservation
from sidusctl.serve.leases import LeaseStore
from sidusctl.subsys.imagestore import ImageStore
from sidusctl.subsys.mounts import mounted
from tests.conftest import sidusctl
from tests.oci_helpers import tar_of, ti, write_oci_layout
from tests.refusals import assert_refused


@dataclass
class SmallFs:
    """A mounted tmpfs: ``path``; :meth:`fill` takes all but ``leave`` bytes of it with one
    file, :meth:`free` gives them back."""

    path: Path

    @property
    def filler(self) -> Path:
        return self.path / "sdt-filler"

    def fill(self, leave: int = 0) -> None:
        self.free()
        st = os.statvfs(self.path)
        size = st.f_bavail * st.f_frsize - leave
        if size > 0:
            subprocess.run(["fallocate", "-l", str(size), str(self.filler)], check=True)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)


@pytest.fixture
def small_fs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SmallFs]:
    """A tmpfs of 8 MiB (or ``@pytest.mark.parametrize("small_fs", ["size=...,..."],
    indirect=True)``), unmounted after the test."""
    opts = getattr(request, "param", "size=8m")
    try:
        with mounted("sdt-full", tmp_path / "sdt-full", "tmpfs", [opts]) as mnt:
            yield SmallFs(mnt)
    finally:
        with contextlib.suppress(OSError):
            (tmp_path / "sdt-full").rmdir()


def store_image(state: Path, name: str, blob: int = 64 << 10) -> Path:
    """A generation of ``name`` made with the store's API (as tests/test_storm.py does);
    its directory."""
    with ImageStore(state).new_generation(name) as gen:
        (gen.rootfs / "etc").mkdir(parents=True)
        (gen.rootfs / "etc" / "hostname").write_text(f"{name}\n")
        (gen.rootfs / "blob").write_bytes(os.urandom(blob))
        (gen.dir / f"vmlinuz-{name}").write_bytes(b"k" * 1000)
        (gen.dir / f"initrd.img-{name}").write_bytes(b"i" * 1000)
        gen.write_manifest({"name": name, "kind": "test"})
    return (state / "images" / name / "current").resolve()


def leftovers(d: Path) -> list[str]:
    """Temp files and unfinished generations below ``d``."""
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")
                  if p.name.endswith(".tmp") or p.name.startswith(".building-"))


# -- locks -------------------------------------------------------------------------------------

def test_image_commands_work_on_a_full_state_dir(small_fs: SmallFs) -> None:
    """Every command opens the image store, which takes each image's lock to recover what a
    killed command left; the lock's holder record could not be written on a full disk, and
    every command (even ``image list``, even ``image rm``, the one that frees space) died
    with an internal error (exit 70)."""
    state = small_fs.path / "state"
    store_image(state, "sdt-a")
    store_image(state, "sdt-b")
    (state / "images" / "sdt-a" / ".lock").write_bytes(b"")  # as a clean holder leaves it
    (state / "images" / "sdt-b" / ".lock").write_bytes(b"")
    small_fs.fill()
    res = sidusctl("image", "list", "--json", state=state)
    assert res.returncode == 0, res.stderr
    assert "sdt-a" in res.stdout and "sdt-b" in res.stdout
    res = sidusctl("image", "show", "sdt-a", state=state)
    assert res.returncode == 0, res.stderr
    res = sidusctl("image", "rm", "sdt-b", state=state)
    assert res.returncode == 0, res.stderr
    assert not (state / "images" / "sdt-b").exists()
    assert os.statvfs(small_fs.path).f_bavail > 0  # space freed by sidusctl itself


def test_a_lock_with_a_note_on_a_full_disk_is_refused_and_left_free(small_fs: SmallFs) -> None:
    """A holder that records a note (a lab's or demo's work directory, for the next holder to
    clean after a SIGKILL) must not hold the lock unrecorded; without a note the lock is
    taken (the record only names the pid in others' messages)."""
    lock = small_fs.path / "sdt.lock"
    lock.write_bytes(b"")
    small_fs.fill()
    with pytest.raises(StateError, match=f"{lock}: cannot record the holder"):
        FileLock(lock, "sdt").acquire(note="/some/work/dir")
    held = FileLock(lock, "sdt").acquire()  # free again, and taken without a record
    try:
        assert held.held
    finally:
        held.release()


# -- atomic writers ----------------------------------------------------------------------------

def test_write_json_on_a_full_disk_keeps_the_old_file(small_fs: SmallFs) -> None:
    f = small_fs.path / "state.json"
    write_json(f, {"good": True})
    small_fs.fill()
    with pytest.raises(WriteError, match=f"cannot write {f} \\(No space left on device\\)") as ei:
        write_json(f, {"good": False, "pad": "x" * 100_000})
    assert isinstance(ei.value, OSError) and ei.value.errno == errno.ENOSPC  # servers' catch
    assert read_json(f) == {"good": True}
    assert leftovers(small_fs.path) == []
    small_fs.free()
    write_json(f, {"good": False})
    assert read_json(f) == {"good": False}


def test_atomic_copy_on_a_full_disk_keeps_the_old_file(small_fs: SmallFs, tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.write_bytes(os.urandom(1 << 20))
    dest = small_fs.path / "tftp" / "vmlinuz"
    dest.parent.mkdir()
    dest.write_bytes(b"old kernel")
    small_fs.fill(leave=256 << 10)
    with pytest.raises(WriteError, match=f"cannot write {dest} \\(No space left on device\\)"):
        atomic_copy(src, dest)
    assert dest.read_bytes() == b"old kernel"
    assert leftovers(small_fs.path) == []
    with pytest.raises(FileNotFoundError):  # a source that cannot be read stays an OSError
        atomic_copy(tmp_path / "missing", dest)


def test_writers_on_a_read_only_fs(small_fs: SmallFs, tmp_path: Path) -> None:
    f = small_fs.path / "state.json"
    write_json(f, {"good": True})
    small_fs.read_only()
    with pytest.raises(WriteError, match="Read-only file system"):
        write_json(f, {"good": False})
    with pytest.raises(WriteError, match="Read-only file system"):
        write_json(small_fs.path / "new" / "state.json", {})
    src = tmp_path / "src"
    src.write_bytes(b"x")
    with pytest.raises(WriteError, match=f"cannot write {small_fs.path / 'copy'}"):
        atomic_copy(src, small_fs.path / "copy")
    assert read_json(f) == {"good": True}


# -- generations -------------------------------------------------------------------------------

def test_a_generation_that_does_not_fit_is_not_published(small_fs: SmallFs) -> None:
    """A write in the block that fails for want of space (here an unwrapped pathlib write,
    as install_runtime's lxc.conf was, which made 'import' exit 70) is a WriteError naming
    the image; the generation is gone, the old one current."""
    state = small_fs.path / "state"
    old = store_image(state, "sdt-img")
    small_fs.fill(leave=16 << 10)
    store = ImageStore(state)
    with (pytest.raises(WriteError, match="no new generation of image 'sdt-img'"),
          store.new_generation("sdt-img") as gen):
        (gen.dir / "lxc.conf").write_text("x" * (1 << 20))
    assert store.get("sdt-img").dir == old
    assert store.generations("sdt-img") == [old.name]
    assert leftovers(state) == []
    small_fs.free()
    new = store_image(state, "sdt-img")
    assert new != old and store.get("sdt-img", "previous").dir == old


@pytest.mark.parametrize("small_fs", ["size=8m,nr_inodes=64"], indirect=True)
def test_a_generation_whose_links_do_not_fit_is_not_published(small_fs: SmallFs) -> None:
    """The block completes, but the file system has no inode left for the new ``previous``
    and ``current`` links: the promotion died with an OSError (exit 70) and left the renamed
    generation behind, a ``gen-`` directory nothing leads to; now the links are as they were,
    the generation is removed and the error names the image. A rollback likewise."""
    state = small_fs.path / "state"
    first = store_image(state, "sdt-img", blob=1024)
    second = store_image(state, "sdt-img", blob=1024)
    store = ImageStore(state)
    hog = small_fs.path / "sdt-inodes"
    hog.mkdir()

    def use_all_inodes() -> None:
        n = 0
        while True:
            try:
                (hog / str(n)).touch()
            except OSError as e:
                assert e.errno == errno.ENOSPC
                return
            n += 1

    with (pytest.raises(WriteError, match="no new generation of image 'sdt-img'"),
          store.new_generation("sdt-img") as gen):
        (gen.rootfs / "etc").mkdir(parents=True)
        use_all_inodes()
    assert store.get("sdt-img").dir == second
    assert store.get("sdt-img", "previous").dir == first
    assert store.generations("sdt-img") == sorted([first.name, second.name])
    assert leftovers(state) == []
    use_all_inodes()  # those of the generation removed are free again
    with pytest.raises(WriteError, match="not rolled back"):
        store.rollback("sdt-img")
    assert store.get("sdt-img").dir == second
    assert store.get("sdt-img", "previous").dir == first
    for p in hog.iterdir():
        p.unlink()
    assert store.rollback("sdt-img").dir == first


def test_two_generations_within_a_second(tmp_path: Path) -> None:
    """Generations are named by the second and the pid: a second one made by the same
    process within the second was renamed onto the first (ENOTEMPTY, an OSError) and its
    ``.building-`` directory left behind."""
    gens = [store_image(tmp_path, "sdt-img", blob=16) for _ in range(3)]  # 2 in one second
    assert len(set(gens)) == 3
    store = ImageStore(tmp_path)
    assert store.get("sdt-img").dir == gens[2]
    assert store.get("sdt-img", "previous").dir == gens[1]
    assert store.generations("sdt-img") == [gens[1].name, gens[2].name]  # in order
    assert leftovers(tmp_path) == []


def test_import_into_a_full_state_dir(small_fs: SmallFs, tmp_path: Path) -> None:
    """A layer that does not fit is the state disk's fault, not the image's: exit 1 (a
    StateError) naming the rootfs, where it was exit 2 (a corrupt image); nothing is left
    and the import works once there is room."""
    state = small_fs.path / "state"
    layer = tar_of([ti("etc", tarfile.DIRTYPE), ti("etc/hostname", data=b"x\n"),
                    ti("blob", data=os.urandom(512 << 10))])
    layout = write_oci_layout(tmp_path / "sdt-layout", [layer])
    (state / "images").mkdir(parents=True)
    small_fs.fill(leave=64 << 10)
    res = sidusctl("import", f"oci:{layout}:latest", "sdt-imp", state=state)
    assert_refused(res, 1, "cannot write 'blob' in", "No space left on device",
                   "no new generation of image 'sdt-imp'")
    assert list((state / "images").iterdir()) == []
    small_fs.free()
    res = sidusctl("import", f"oci:{layout}:latest", "sdt-imp", state=state)
    assert res.returncode == 0, res.stderr



def test_import_whose_tarball_does_not_fit_says_the_image_is_imported(
        small_fs: SmallFs, tmp_path: Path) -> None:
    """``import --tar OUT`` with OUT on a full disk: the image is in the store (it was
    published before the copy), and the error says so, where it said only "cannot write
    OUT"; no partial OUT is left."""
    state = tmp_path / "sdt-state"
    layer = tar_of([ti("etc", tarfile.DIRTYPE), ti("etc/hostname", data=b"x\n"),
                    ti("blob", data=os.urandom(256 << 10))])
    layout = write_oci_layout(tmp_path / "sdt-layout", [layer])
    small_fs.fill(leave=16 << 10)
    out = small_fs.path / "sdt-imp.tar.zst"
    res = sidusctl("import", f"oci:{layout}:latest", "sdt-imp", "--tar", str(out), state=state)
    assert_refused(res, 1, "image 'sdt-imp' is imported (gen-", "its tarball could not be "
                   f"copied to {out}", "No space left on device")
    assert not out.exists() and leftovers(small_fs.path) == []
    assert sidusctl("image", "show", "sdt-imp", state=state).returncode == 0


def test_build_copy_out_that_does_not_fit_says_the_image_is_built(
        small_fs: SmallFs, tmp_path: Path) -> None:
    """``build --out DIR`` copies the kernel, initrd and tarball out after the build; with
    DIR on a full disk that was a raw OSError (exit 70 after a whole build). Now a
    WriteError that says the image is built and what was copied, and no partial file."""
    from sidusctl.image.exports import copy_out

    gen = store_image(tmp_path / "sdt-state", "sdt-b")
    (gen / "sdt-b.tar.zst").write_bytes(os.urandom(64 << 10))  # does not fit below
    small_fs.fill(leave=12 << 10)
    out = small_fs.path / "out"
    image = ImageStore(tmp_path / "sdt-state", recover=False).get("sdt-b")
    with pytest.raises(WriteError) as e:
        copy_out(image, out)
    msg = str(e.value)
    assert f"image 'sdt-b' is built ({gen.name})" in msg and str(out) in msg, msg
    assert "copied: vmlinuz-sdt-b, initrd.img-sdt-b" in msg, msg
    assert sorted(p.name for p in out.iterdir()) == ["initrd.img-sdt-b", "vmlinuz-sdt-b"]
    small_fs.free()
    copy_out(image, out)
    assert (out / "sdt-b.tar.zst").read_bytes() == (gen / "sdt-b.tar.zst").read_bytes()

# -- the DHCP lease store ----------------------------------------------------------------------

SERVER = IPv4Address("10.0.0.1")
MAC = bytes.fromhex("525400ec3381")


def _request(ip: str) -> bytes:
    """A DHCPREQUEST (selecting) from MAC for ``ip`` (RFC 2131 layout; options 53, 50, 54)."""
    b = bytearray(240)
    b[0], b[1], b[2] = 1, 1, 6
    b[4:8] = b"\x39\x03\xf3\x26"
    b[10:12] = b"\x80\x00"
    b[28:34] = MAC
    b[236:240] = b"\x63\x82\x53\x63"
    return (bytes(b) + b"\x35\x01\x03\x32\x04" + IPv4Address(ip).packed + b"\x36\x04"
            + SERVER.packed + b"\xff")


@pytest.mark.parametrize("small_fs", ["size=1m"], indirect=True)
def test_dhcp_does_not_ack_a_lease_it_cannot_commit(small_fs: SmallFs) -> None:
    """A lease that cannot be committed (the store's disk is full) gets no ACK and no NAK:
    the client asks again. It was counted as an internal error (a bug) with a traceback."""
    cfg = DhcpConfig(interface="sdt-unbound", lease_file=small_fs.path / "leases.sqlite",
                     reservations=(Reservation("52:54:00:ec:33:81", IPv4Address("10.0.0.130"),
                                               "node1"),),
                     boot=BootPolicy(bios="pxelinux.0", efi_x64="grubnetx64.efi",
                                     ipxe_script="boot.ipxe"),
                     lease_time=600)
    srv = DhcpServer(cfg, server_ip=SERVER, subnet=IPv4Network("10.0.0.0/24"))
    try:
        assert srv.store is not None
        small_fs.fill()
        assert srv.handle(_request("10.0.0.130"), ("0.0.0.0", 68), 67) == []
        assert srv.stats.internal_errors == 0 and srv.stats.ignored == 1
        assert srv.store.by_mac == {}
        small_fs.free()
        out = srv.handle(_request("10.0.0.130"), ("0.0.0.0", 68), 67)
        assert len(out) == 1 and dc.decode(out[0][0]).msg_type == dc.ACK
        assert srv.stats.internal_errors == 0
    finally:
        srv.close()
    reopened = LeaseStore(small_fs.path / "leases.sqlite")
    try:
        assert reopened.by_mac["52:54:00:ec:33:81"].ip == IPv4Address("10.0.0.130")
    finally:
        reopened.close()


@pytest.mark.parametrize("small_fs", ["size=64k"], indirect=True)
def test_a_lease_store_that_cannot_be_made_says_so(small_fs: SmallFs) -> None:
    small_fs.fill()
    db = small_fs.path / "serve" / "leases.sqlite"
    with pytest.raises(StateError, match=f"{db}: cannot write the lease database \\(full"):
        LeaseStore(db)
    small_fs.free()
    LeaseStore(db).close()


# -- the vnode store ---------------------------------------------------------------------------

def test_vnode_init_image_on_a_full_disk_leaves_no_file(small_fs: SmallFs) -> None:
    """mkfs.btrfs cannot format a loop file on a full disk: the command fails (exit 1) and
    the sparse file, which is no store, is not left behind."""
    state = small_fs.path / "state"
    (state / "vnode").mkdir(parents=True)
    small_fs.fill()
    t0 = time.monotonic()
    res = sidusctl("vnode", "init", "--btrfs-image", "200M", state=state)
    assert_refused(res, 1, "btrfs.img")
    assert not (state / "vnode" / "btrfs.img").exists()
    assert time.monotonic() - t0 < 60


# -- squashfs exports --------------------------------------------------------------------------

def test_a_squashfs_export_whose_hash_tree_does_not_fit(small_fs: SmallFs) -> None:
    """mksquashfs fits, the dm-verity hash tree appended to its file does not: that was an
    OSError out of verity.append_tree (exit 70); now exit 1 naming the export, no temp file
    left, and the export works once there is room."""
    from sidusctl.netboot.squash import export, squash_dir

    state = small_fs.path / "state"
    store_image(state, "sdt-rnd", blob=1 << 20)
    ex, _ = export(state, "sdt-rnd")
    assert ex.verity is not None and ex.verity.tree_blocks >= 2
    d = squash_dir(state, "sdt-rnd")
    for p in d.iterdir():
        if p.name != ".lock":
            p.unlink()
    # room for the squashfs, the lock's record and half the tree
    small_fs.fill(leave=(ex.verity.data_blocks + 1 + ex.verity.tree_blocks // 2) * 4096)
    res = sidusctl("pxe", "squashfs", "sdt-rnd", state=state)
    assert_refused(res, 1, f"cannot write {d / ex.path.name} (No space left on device)")
    assert [p.name for p in d.iterdir()] == [".lock"]
    small_fs.free()
    res = sidusctl("pxe", "squashfs", "sdt-rnd", state=state)
    assert res.returncode == 0, res.stderr
