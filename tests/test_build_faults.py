"""Faults during real builds: a package that does not exist, a mirror that does not answer, a
full disk, SIGINT / SIGTERM / SIGKILL at several stages. After each: a clear message and a
non-zero exit, nothing mounted under the state directory, no process left inside the root, the
previous good image untouched, and (after SIGKILL) the next command cleans the leftovers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sidusctl.subsys import procs
from sidusctl.subsys.imagestore import ImageStore
from tests.conftest import REPO, SIDUSCTL, BuiltImage, _mounts_under, sidusctl

pytestmark = pytest.mark.slow

TINY = 'suite = "bookworm"\nvariant = "minbase"\n'


def recipe_dir(tmp_path: Path, text: str, name: str = "sdt-tiny") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "image.toml").write_text(text)
    return d


def assert_clean(state: Path, name: str) -> None:
    assert _mounts_under(state) == [], _mounts_under(state)
    d = state / "images" / name
    if d.exists():
        assert [p.name for p in d.iterdir() if p.name.startswith(".building")] == []
    assert procs.pids_in_root(state, cmdline=True) == []


def test_unknown_include_package(tmp_path: Path) -> None:
    d = recipe_dir(tmp_path, TINY + 'include = ["sdt-no-such-package"]\n')
    state = tmp_path / "state"
    res = sidusctl("build", str(d), "--no-bootstrap-cache", state=state, timeout=600)
    assert res.returncode == 1, res.stderr
    assert "key 'include': package(s) not found in bookworm (main): sdt-no-such-package" in res.stderr
    assert "Traceback" not in res.stderr
    assert_clean(state, "sdt-tiny")


def test_unknown_packages_entry_found_before_installing(minimal_image: BuiltImage) -> None:
    # The apt-side check runs in the bootstrapped root; exercise it on the real image's root.
    from sidusctl.core.errors import BuildError
    from sidusctl.image.builder import Builder, BuildOptions
    from sidusctl.image.recipe import find
    from sidusctl.subsys.chroot import ChrootSession

    store = ImageStore(minimal_image.state)
    b = Builder(store, find("minimal"), BuildOptions())
    with store.lock("minimal"), ChrootSession(minimal_image.rootfs) as s, \
            pytest.raises(BuildError) as ei:
        b._check_packages(s, ["openssh-server", "sdt-nope-1", "sdt-nope-2"])
    assert "not found in bookworm (main): sdt-nope-1, sdt-nope-2" in str(ei.value)
    assert _mounts_under(minimal_image.state) == []


def test_mirror_that_does_not_answer(tmp_path: Path) -> None:
    # port 9 (discard) on loopback: nothing listens, the connection is refused at once
    d = recipe_dir(tmp_path, TINY + 'mirror = "http://127.0.0.1:9/debian"\n')
    state = tmp_path / "state"
    res = sidusctl("build", str(d), "--no-bootstrap-cache", state=state, timeout=600)
    assert res.returncode == 1
    assert "the mirror http://127.0.0.1:9/debian did not answer for suite bookworm" in res.stderr
    assert_clean(state, "sdt-tiny")


def test_full_disk(tmp_path: Path) -> None:
    from sidusctl.subsys.mounts import mounted

    d = recipe_dir(tmp_path, TINY)
    with mounted("sdt-full", tmp_path / "sdt-full", "tmpfs", ["size=48m"]) as small:
        state = small / "state"
        res = sidusctl("build", str(d), state=state, timeout=900,
                       env={"SIDUSCTL_CACHE": str(small / "cache")})
        assert res.returncode == 1, res.stderr
        assert "is full" in res.stderr and "during bootstrap" in res.stderr, res.stderr[-2000:]
        assert_clean(state, "sdt-tiny")
        assert not (state / "images" / "sdt-tiny" / "current").exists()


def _start(args: list[str], state: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([*SIDUSCTL, "--state-dir", str(state), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen[str], pattern: str, timeout: float) -> str:
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            seen.append(line)
            if pattern in line:
                return "".join(seen)
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"never saw {pattern!r}:\n{''.join(seen)[-3000:]}")


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), True)
    out = proc.stdout.read()
    proc.wait(timeout=timeout)
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_bootstrap(tmp_path: Path, sig: signal.Signals) -> None:
    d = recipe_dir(tmp_path, TINY)
    state = tmp_path / "state"
    p = _start(["--debug", "build", str(d), "--no-bootstrap-cache"], state)
    _wait_for(p, "I: Extracting", 300)   # debootstrap is unpacking into the new root
    p.send_signal(sig)
    out = _finish(p)
    assert p.returncode == 130, out[-2000:]
    assert f"interrupted by {sig.name}" in out
    assert_clean(state, "sdt-tiny")
    assert not (state / "images" / "sdt-tiny" / "current").exists()


def _gen(state: Path) -> tuple[Path, str]:
    img = ImageStore(state, recover=False).get("minimal")
    return img.dir, img.manifest_path.read_text()


def test_sigint_during_chroot_session_keeps_previous_image(minimal_image: BuiltImage) -> None:
    st = minimal_image.state
    before = _gen(st)
    p = None
    try:
        p = _start(["--debug", "update", "minimal"], st)
        _wait_for(p, "run: chroot", 300)     # inside the session: apt-get update in the root
        time.sleep(1)
        p.send_signal(signal.SIGINT)
        out = _finish(p)
        assert p.returncode == 130, out[-2000:]
        assert_clean(st, "minimal")
        assert _gen(st) == before
        assert not (minimal_image.rootfs / "usr/sbin/policy-rc.d").exists()
    finally:
        _stop(p)
        _keep_shared_image(st, before)


def _keep_shared_image(st: Path, before: tuple[Path, str]) -> None:
    """If a failed test left a new generation of the shared image as current, roll back: the
    tests after it were handed the generation they hold (a cascade of unrelated failures
    otherwise)."""
    if _gen(st)[0] != before[0]:
        sidusctl("image", "rollback", "minimal", state=st)


def _stop(p: subprocess.Popen[str] | None) -> None:
    """A build a failed assertion left running is interrupted (and waited for) before the
    shared image is checked: it would otherwise finish later and become current."""
    if p is not None and p.poll() is None:
        p.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(120)
        if p.poll() is None:
            p.kill()
            p.wait()


def test_sigint_during_build_configure_keeps_previous_image(minimal_image: BuiltImage) -> None:
    # A rebuild of the shared image, interrupted once it is working inside the chroot session.
    st = minimal_image.state
    before = _gen(st)
    p = None
    try:
        p = _start(["--debug", "build", "minimal", "--tar"], st)
        _wait_for(p, ": configure", 900)  # "stage 3/5: configure" (after packages, run or restored)
        _wait_for(p, "run: chroot", 120)
        time.sleep(2)
        p.send_signal(signal.SIGINT)
        out = _finish(p)
        assert p.returncode == 130, out[-2000:]
        assert "interrupted by SIGINT" in out
        assert_clean(st, "minimal")
        assert _gen(st) == before
    finally:
        _stop(p)
        _keep_shared_image(st, before)


def test_update_takes_turns_at_the_shared_package_cache(minimal_image: BuiltImage) -> None:
    """An update binds the shared .deb cache into the root as a build does: while another
    build's apt uses it (here the test holds the cache's lock, as a build does around its apt
    runs), the update waits, says so and runs no apt, instead of failing on apt's own lock
    (``var/cache/apt/archives/lock``); once the lock is free it goes on and succeeds."""
    from sidusctl.core.state import FileLock
    from tests.conftest import CACHE

    st = minimal_image.state
    before = _gen(st)
    lock = FileLock(CACHE / ".sidusctl-apt.lock", "the test's hold").acquire(wait=True)
    p = None
    try:
        p = _start(["--debug", "update", "minimal"], st)
        seen = _wait_for(p, "waiting for the shared package cache", 300)
        time.sleep(3)  # it stays there: no apt run while the lock is held
        assert p.stdout is not None
        seen += "".join(iter(p.stdout.readline, ""))  # non-blocking: what came meanwhile
        assert p.poll() is None and "apt-get" not in seen, seen[-3000:]
        lock.release()
        out = _finish(p, timeout=900)
        assert p.returncode == 0, out[-3000:]
        assert re.search(r"run: chroot \S+ apt-get .* update", out), out[-3000:]
        assert _gen(st)[0] != before[0]
        assert_clean(st, "minimal")
    finally:
        lock.release()
        _stop(p)
        _keep_shared_image(st, before)


@pytest.mark.parametrize("stage", ["bootstrap", "chroot"])
def test_sigkill_leftovers_are_found_and_cleaned(minimal_image: BuiltImage, tmp_path: Path,
                                                 stage: str) -> None:
    st = minimal_image.state
    before = _gen(st)
    if stage == "bootstrap":
        d = recipe_dir(tmp_path, TINY)
        p = _start(["--debug", "build", str(d), "--no-bootstrap-cache"], st)
        _wait_for(p, "I: Configuring", 300)  # debootstrap's second stage: its own mounts inside
        name = "sdt-tiny"
    else:
        p = _start(["--debug", "update", "minimal"], st)
        _wait_for(p, "run: chroot", 300)
        time.sleep(1)
        name = "minimal"
    p.kill()                                     # SIGKILL: no cleanup code runs
    p.wait()
    assert p.stdout is not None
    p.stdout.close()
    time.sleep(0.5)
    leftovers = (_mounts_under(st), procs.pids_in_root(st / "images" / name, cmdline=True))
    assert leftovers[0] or leftovers[1] or any(
        x.name.startswith(".building") for x in (st / "images" / name).iterdir()), \
        "SIGKILL left nothing to clean: the test did not hit a live stage"
    res = sidusctl("image", "list", "--json", state=st)  # any command recovers
    assert res.returncode == 0, res.stderr
    assert "recovered:" in res.stderr
    assert_clean(st, name)
    assert _gen(st) == before
    assert "minimal" in [r["name"] for r in json.loads(res.stdout)]
    assert not (minimal_image.rootfs / "usr/sbin/policy-rc.d").exists()
    assert not (minimal_image.rootfs / ".sidusctl-session.json").exists()
    if stage == "bootstrap":
        sidusctl("image", "rm", "sdt-tiny", state=st)




def test_recovery_leaves_alone_processes_that_only_use_a_finished_image(
        minimal_image: BuiltImage) -> None:
    """Recovery runs at the start of most commands. A process that merely uses a finished
    generation (a qemu guest booted from its kernel, a shell cd'ed into its root) belongs to
    someone else and must survive it; only a dead session's or build's leftovers are killed.
    (Before this was fixed, `sidusctl image list` SIGTERMed the qemu guests of a test session
    that was booting the same image.)"""
    kernel = minimal_image.kernel
    assert kernel is not None
    bystander = subprocess.Popen(
        ["python3", "-c", "import time; time.sleep(600)", str(kernel)],
        cwd=minimal_image.rootfs / "etc")
    try:
        time.sleep(0.3)
        assert bystander.pid in procs.pids_in_root(minimal_image.dir, cmdline=True)
        res = sidusctl("image", "list", "--json", state=minimal_image.state)
        assert res.returncode == 0, res.stderr
        time.sleep(0.5)
        assert bystander.poll() is None, f"recovery killed a bystander: {res.stderr}"
        assert "recovered:" not in res.stderr
    finally:
        bystander.kill()
        bystander.wait()
