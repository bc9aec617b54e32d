"""Commands interrupted or killed part-way, and two commands at once on one state directory:
real processes, real signals, sent at moments found by waiting for a file to appear (never
by sleeping a fixed time). What a killed command leaves, the next one removes; two at once
both succeed, or one refuses with a clear error; none leaves a half export."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidusctl.core.state import FileLock
from sidusctl.netboot import tree
from sidusctl.subsys.imagestore import ImageStore
from tests.conftest import REPO, SIDUSCTL, sidusctl
from tests.refusals import assert_refused

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the image store)")

IMAGE = "sdt-int"


@pytest.fixture
def state() -> Iterator[Path]:
    d = Path(f"/var/tmp/sdt-int-{os.getpid()}")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _image(state: Path, files: int = 1200) -> None:
    """An image whose squashfs export takes mksquashfs a second or so: ``files`` files of
    64 KiB of pseudo-random bytes, stand-in kernel and initrd."""
    rnd = random.Random(3)
    with ImageStore(state).new_generation(IMAGE) as gen:
        (gen.rootfs / "etc").mkdir(parents=True)
        (gen.rootfs / "etc" / "hostname").write_text("sdt\n")
        (gen.rootfs / "d").mkdir()
        for i in range(files):
            (gen.rootfs / "d" / f"f{i}").write_bytes(rnd.randbytes(64 << 10))
        (gen.dir / f"vmlinuz-{IMAGE}").write_bytes(b"k" * 4096)
        (gen.dir / f"initrd.img-{IMAGE}").write_bytes(b"i" * 8192)
        gen.write_manifest({"name": IMAGE, "kind": "test"})


def _start(state: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*SIDUSCTL, "--state-dir", str(state), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return p.returncode, out + err


def _wait_for(found: Callable[[], list[Path]], p: subprocess.Popen[str],
              timeout: float = 30) -> list[Path]:
    """Poll (every ms) until ``found()`` is not empty; [] if ``p`` ended first or in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        hit = found()
        if hit:
            return hit
        time.sleep(0.001)
    return []


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _signal_tree(pid: int, sig: int) -> None:
    for c in _children(pid):
        os.kill(c, sig)
    os.kill(pid, sig)


def _kill(*procs: subprocess.Popen[str]) -> None:
    for p in procs:
        if p.poll() is None:
            _signal_tree(p.pid, signal.SIGCONT)
            p.kill()
            p.communicate()


# -- squashfs exports --------------------------------------------------------------------------

def test_export_of_a_generation_removed_while_packed_exports_nothing(state: Path) -> None:
    """``image rm`` while ``pxe squashfs`` packs the generation: the export fails with a clear
    error (the tree is gone) and records nothing; it was exit 0, "built", a file of part of
    the tree recorded under the whole tree's fingerprint. ``image rm`` waits for it, saying
    so, and then removes the image's exports, directory and all."""
    _image(state)
    d = state / "netboot" / "squashfs" / IMAGE
    exp = _start(state, "pxe", "squashfs", IMAGE)
    rm: subprocess.Popen[str] | None = None
    gone = state / "images" / IMAGE
    try:
        # mksquashfs's output appears: it is packing; stop it while the image goes
        assert _wait_for(lambda: list(d.glob(".*gen-*.tmp-*")), exp), _finish(exp)
        packers = _children(exp.pid)
        assert packers
        for c in packers:
            os.kill(c, signal.SIGSTOP)
        rm = _start(state, "image", "rm", IMAGE)
        # the image is gone; its exports wait for the export holding their lock
        assert _wait_for(lambda: [] if gone.exists() else [gone], rm), _finish(rm)
        for c in packers:
            os.kill(c, signal.SIGCONT)
        rc, out = _finish(exp)
        rm_rc, rm_out = _finish(rm)
    finally:
        _kill(exp)
        if rm is not None:
            _kill(rm)
    assert rc in (4, 5), out
    assert "Traceback" not in out and "nothing exported" in out, out
    assert rm_rc == 0, rm_out
    assert "waiting for it to end before removing the image's exports" in rm_out, rm_out
    assert not d.exists()


def test_export_killed_while_appending_its_hash_tree_leaves_nothing_for_good(
        state: Path) -> None:
    """An export SIGKILLed after mksquashfs, while it appends the hash tree: its temp file
    (the size of the export) is removed by the next export, which succeeds."""
    _image(state)
    d = state / "netboot" / "squashfs" / IMAGE
    left: list[Path] = []
    for _ in range(5):  # the export may end between the poll and the kill: again, --force
        exp = _start(state, "pxe", "squashfs", IMAGE, "--force")
        try:
            hit = _wait_for(lambda: [p for p in d.glob(".gen-*.verity-*")
                                     if ".tmp-" not in p.name], exp)
            if hit:
                exp.kill()
        finally:
            _kill(exp)
        left = [p for p in d.glob(".*gen-*") if p.exists()]
        if left:
            break
    assert left, "the export was never caught while appending its hash tree"
    res = sidusctl("pxe", "squashfs", IMAGE, state=state, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "removing" in res.stderr and "left by an export that was killed" in res.stderr
    assert not list(d.glob(".*gen-*"))
    assert len(list(d.glob("gen-*.squashfs"))) == 1


# -- pxe render --------------------------------------------------------------------------------

def _inventory(state: Path, nodes: int) -> Path:
    f = state / "nodes.toml"
    body = ('[network]\nsubnet = "10.0.0.0/16"\nserver = "10.0.0.2"\n\n'
            f'[defaults]\nimage = "{IMAGE}"\n')
    for i in range(nodes):
        body += (f'\n[[nodes]]\nname = "n{i}"\nmac = "52:54:00:12:{i // 256:02x}:{i % 256:02x}"'
                 f'\nip = "10.0.{i // 200 + 1}.{i % 200 + 10}"\n')
    f.write_text(body)
    return f


needs_grub = pytest.mark.skipif(not (tree.GRUB_EFI_DIR / "moddep.lst").is_file(),
                                reason="grub-efi-amd64-bin not installed")


@needs_grub
def test_two_renders_of_one_tree_at_once_both_succeed(state: Path) -> None:
    """A second ``pxe render`` of a tree while the first runs grub-mkimage: the second waits
    for the first and both succeed, the tree whole; the two shared grub-mkimage's temp file
    and the second removed it under the first (exit 70, FileNotFoundError)."""
    _image(state, files=1)
    nodes = _inventory(state, 4)
    tftp = state / "tftp"
    render = ("pxe", "render", "--nodes", str(nodes), "--tftp-root", str(tftp))
    first = _start(state, *render)
    second = None
    try:
        assert _wait_for(lambda: list(tftp.glob(".grubnetx64.efi.build-tmp")), first), \
            _finish(first)
        _signal_tree(first.pid, signal.SIGSTOP)  # grub-mkimage too
        second = _start(state, *render)
        # without a lock it runs to its end; with one it waits
        with contextlib.suppress(subprocess.TimeoutExpired):
            second.wait(timeout=5)
        _signal_tree(first.pid, signal.SIGCONT)
        results = [_finish(first), _finish(second)]
    finally:
        _kill(first, *([second] if second else []))
    for rc, out in results:
        assert rc == 0, out
        assert "Traceback" not in out
    assert (tftp / "grubnetx64.efi").stat().st_size > 0
    assert not list(tftp.rglob(".*tmp")) and not (tftp / tree.LOCK).exists()


def test_render_killed_while_writing_leaves_no_temp_file_for_good(state: Path) -> None:
    """A ``pxe render`` SIGKILLed while a file of the tree is a temp file: the next render
    removes it (it stayed in the TFTP root, served, for good)."""
    _image(state, files=1)
    nodes = _inventory(state, 400)
    tftp = state / "tftp"
    render = ("pxe", "render", "--nodes", str(nodes), "--tftp-root", str(tftp))
    caught: list[Path] = []
    for _ in range(5):
        shutil.rmtree(tftp, ignore_errors=True)
        p = _start(state, *render)
        try:
            while p.poll() is None and not caught:
                _signal_tree(p.pid, signal.SIGSTOP)
                caught = [f for d in ("pxelinux.cfg", "ipxe", "grub")
                          for f in (tftp / d).glob(".*.tmp")] if tftp.is_dir() else []
                if caught:
                    p.kill()
                else:
                    _signal_tree(p.pid, signal.SIGCONT)
                    time.sleep(0.002)
        finally:
            _kill(p)
        if caught:
            break
    assert caught, "the render was never caught with a temp file"
    res = sidusctl(*render, state=state, timeout=120)
    assert res.returncode == 0, res.stderr
    assert not list(tftp.rglob(".*tmp")), list(tftp.rglob(".*tmp"))
    assert_refused(sidusctl("image", "show", "sdt-nosuch", state=state), 4, "sdt-nosuch")


def test_image_rm_deletes_the_directory_before_it_lets_the_lock_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that takes an image's lock the moment ``image rm`` lets it go (an import of
    the same name) keeps what it makes: the directory went while the lock was held. (It was
    deleted after the release, the new generation with it.) The moment is made certain by
    running the second command from inside the release."""
    state = tmp_path / "sdt-state"

    def make(store: ImageStore) -> None:
        with store.new_generation("img") as gen:
            (gen.rootfs / "etc").mkdir(parents=True)
            gen.write_manifest({"name": "img", "kind": "test"})

    store = ImageStore(state, recover=False)
    make(store)
    lock_path = store.image_dir("img") / ".lock"
    real_release = FileLock.release
    started: list[bool] = []

    def release(self: FileLock) -> None:
        real_release(self)
        if self.path == lock_path and not started:
            started.append(True)
            make(ImageStore(state, recover=False))  # another command, its own lock

    monkeypatch.setattr(FileLock, "release", release)
    store.remove("img")
    monkeypatch.undo()
    assert started
    assert (ImageStore(state, recover=False).get("img").rootfs / "etc").is_dir()
