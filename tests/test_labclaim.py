"""A lab's prefix lock (sidusctl.netboot.labclaim): a lab killed with SIGKILL is reclaimed by
the next one, a live one is not, and a namespace no lab recorded is left alone.

Real processes, a real flock, a real network namespace with a process in it; the killed lab is
a child Python process that took the claim and was sent SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidusctl.core.errors import BusyError, SidusError
from sidusctl.core.state import FileLock
from sidusctl.netboot.labclaim import claim
from sidusctl.subsys.net import links
from tests.netns_util import uniq

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

HOLDER = """
import sys, time
from pathlib import Path
from sidusctl.netboot.labclaim import claim
c = claim(sys.argv[1], sys.argv[2], Path(sys.argv[3]), lock_dir=Path(sys.argv[4]))
print("claimed", flush=True)
time.sleep(600)
"""


@pytest.fixture
def names(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """(namespace and prefix, lock directory, work directory); the namespace removed after."""
    ns = uniq("lc")
    lock_dir = tmp_path / "lock"
    try:
        yield ns, lock_dir, tmp_path / "work"
    finally:
        if links.netns_exists(ns):
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                      text=True).stdout.split():
                os.kill(int(pid), signal.SIGKILL)
            links.remove_netns(ns)


def holder(ns: str, lock_dir: Path, workdir: Path) -> subprocess.Popen[str]:
    """A child process that took the claim and holds it (it printed "claimed")."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, ns, ns, str(workdir), str(lock_dir)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "claimed"
    return p


def test_a_clean_lab_records_itself_and_removes_its_record(names: tuple[str, Path, Path]) -> None:
    ns, lock_dir, workdir = names
    c = claim(ns, ns, workdir, lock_dir=lock_dir)
    assert c.left_behind is None
    assert c.path.read_text() == f"{os.getpid()}\n{workdir}\n"
    c.release()
    c.release()  # idempotent
    assert not c.path.exists()  # a clean end leaves no lock file
    # and the next claim finds nothing to reclaim
    again = claim(ns, ns, workdir, lock_dir=lock_dir)
    assert again.left_behind is None
    again.release()


def running_lab(names: tuple[str, Path, Path], marker: str) -> subprocess.Popen[str]:
    """A lab as a child process holds the claim: its work directory (holding ``marker``, one
    of a lab's files) and its namespace are made."""
    ns, lock_dir, workdir = names
    workdir.mkdir()
    (workdir / marker).write_text("")
    p = holder(ns, lock_dir, workdir)
    links.ensure_netns(ns)
    return p


def test_a_killed_lab_is_reclaimed(names: tuple[str, Path, Path]) -> None:
    ns, lock_dir, workdir = names
    p = running_lab(names, "serve-pxe.log")
    # what the killed lab leaves: its namespace with a process in it (as serve-pxe and qemu)
    sleeper = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "300"])
    try:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
        c = claim(ns, ns, workdir, lock_dir=lock_dir)
        try:
            assert c.left_behind == (p.pid, str(workdir))
            assert sleeper.wait(timeout=10) is not None  # ended by the reclaim
            assert not links.netns_exists(ns)
            assert not workdir.exists()
            assert c.path.read_text() == f"{os.getpid()}\n{workdir}\n"
        finally:
            c.release()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_a_live_lab_is_not_touched(names: tuple[str, Path, Path]) -> None:
    ns, lock_dir, workdir = names
    p = running_lab(names, "nodes.toml")
    try:
        with pytest.raises(BusyError, match=rf"the lab prefix '{ns}' is in use by another "
                                            rf"sidusctl process \(pid {p.pid}\)"):
            claim(ns, ns, workdir, lock_dir=lock_dir)
        assert links.netns_exists(ns) and (workdir / "nodes.toml").exists()
    finally:
        p.kill()
        p.wait(timeout=10)


def test_a_namespace_no_lab_recorded_is_left_alone(names: tuple[str, Path, Path]) -> None:
    ns, lock_dir, workdir = names
    links.ensure_netns(ns)
    with pytest.raises(SidusError, match=rf"network namespace {ns} already exists, and no lab "
                                         "recorded it") as e:
        claim(ns, ns, workdir, lock_dir=lock_dir)
    assert e.value.hint is not None and f"ip netns del {ns}" in e.value.hint
    assert links.netns_exists(ns)
    # the lock was not kept: once the namespace is gone, a lab can start
    links.remove_netns(ns)
    claim(ns, ns, workdir, lock_dir=lock_dir).release()


def test_a_record_pointing_at_a_directory_that_is_not_a_lab_keeps_it(
        names: tuple[str, Path, Path], tmp_path: Path) -> None:
    ns, lock_dir, workdir = names
    other = tmp_path / "not-a-lab"
    other.mkdir()
    (other / "precious").write_text("x")
    lock_dir.mkdir()
    # as a killed lab would have written it, but naming a directory with none of a lab's files
    (lock_dir / f"sidusctl-lab-{ns}.lock").write_text(f"{os.getpid() + 1}\n{other}\n")
    c = claim(ns, ns, workdir, lock_dir=lock_dir)
    c.release()
    assert c.left_behind == (os.getpid() + 1, str(other))
    assert (other / "precious").read_text() == "x"


def _wait_blocked(path: Path) -> None:
    """Until a waiter has opened ``path`` and waits in flock(2): /proc/locks lists a blocked
    request ("->") on its inode (proc(5))."""
    ino = f":{path.stat().st_ino} "
    deadline = time.monotonic() + 30
    while not any(ln.split()[1] == "->" and ino in ln
                  for ln in Path("/proc/locks").read_text().splitlines()):
        assert time.monotonic() < deadline, "the waiter never waited"
        time.sleep(0.01)


def test_a_removed_lock_file_is_taken_again_by_its_waiter(tmp_path: Path) -> None:
    """FileLock(remove=True): a holder deletes the file as it releases it; a waiter that had
    opened the deleted file takes the lock on the path's new file, not on the deleted one (two
    holders at once otherwise)."""
    path = tmp_path / "sdt-waiter.lock"
    first = FileLock(path, "the test's prefix", remove=True).acquire(note="/first")
    waiter = FileLock(path, "the test's prefix", remove=True)
    t = threading.Thread(target=waiter.acquire, kwargs={"wait": True, "note": "/second"})
    t.start()
    _wait_blocked(path)
    assert t.is_alive()
    first.release()
    t.join(timeout=10)
    assert waiter.held and path.exists()
    assert path.read_text() == f"{os.getpid()}\n/second\n"
    # the path's file is the one held: a third process-level holder is refused
    with pytest.raises(BusyError):
        FileLock(path, "the test's prefix").acquire()
    waiter.release()
    assert not path.exists()


def test_a_waiter_whose_lock_directory_was_removed_takes_a_lock_in_a_new_one(
        tmp_path: Path) -> None:
    """A holder may remove the lock's whole directory before it releases (``image rm``
    removing an image's squashfs exports, lock file included); the waiter then takes the
    lock in a new directory rather than failing to open the file."""
    import shutil

    d = tmp_path / "sdt-exports"
    path = d / ".lock"
    first = FileLock(path, "the test's exports").acquire()
    waiter = FileLock(path, "the test's exports")
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            waiter.acquire(wait=True)
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    t = threading.Thread(target=wait)
    t.start()
    _wait_blocked(path)
    shutil.rmtree(d)
    first.release()
    t.join(timeout=10)
    assert errors == [] and waiter.held and path.exists()
    waiter.release()
