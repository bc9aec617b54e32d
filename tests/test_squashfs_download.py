"""The squashfs-http download of the boot script (``initramfs/scripts/sidus``), run by busybox's
``sh`` with busybox's applets only (as in the initramfs; coreutils' ``sha256sum``, which the hook
copies in) against sidusctl's HTTP server on loopback: the file arrives whole and its digest
matches; a partial file (a download cut short) is resumed with a range request (RFC 9110
section 14) and then checked whole; a wrong digest and a missing file are retried, the file
removed, the failure reported and named in the panic; a server that stops sending is left by
the watchdog. No run leaves a process behind (the watchdog and its sleep end with the
download). The boots themselves are in tests/test_squashfs_boot.py."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidusctl.core.paths import initramfs_dir
from sidusctl.core.run import STDOUT, spawn
from sidusctl.serve import http
from tests.proc_util import live_processes
from tests.shell_util import shell_function

pytestmark = pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox missing")

APPLETS = ("wget", "ls", "awk", "cut", "sleep", "rm", "mkdir", "cat", "grep")
FUNCTIONS = ("sidus_size", "sidus_wget", "sidus_watchdog", "sidus_download")
DATA = os.urandom(3 * 2**20 + 4321)


def _download(tmp_path: Path, url: str, *, sha256: str, retries: int = 2,
              partial: bytes = b"", stall: int = 20, tick: int = 30,
              check: str = "digest") -> tuple[subprocess.CompletedProcess[str], Path]:
    """Runs ``sidus_download`` into ``tmp_path/img/gen-A.squashfs`` (holding ``partial``
    first) with ``PATH`` = busybox's applets only, in a session of its own; returns the run
    (its output in ``stdout``, both streams) and the file's path. ``check``: how the node
    checks the image (``sidus_pick_check``'s choice: ``digest`` or ``verity``). Fails the test when a process of the session outlives the shell by
    5 s: with the default ``tick`` (the watchdog's sleep, 30 s), one left behind is still
    asleep then."""
    bindir, run = tmp_path / "bin", tmp_path / "run"
    if not bindir.exists():
        bindir.mkdir()
        for a in APPLETS:
            (bindir / a).symlink_to(shutil.which("busybox") or "busybox")
    run.mkdir(exist_ok=True)
    img = tmp_path / "img"
    shutil.rmtree(img, ignore_errors=True)
    img.mkdir()
    out = img / "gen-A.squashfs"
    if partial:
        out.write_bytes(partial)
    sidus = initramfs_dir() / "scripts/sidus"
    script = ('sidus_log() { echo "sidus: $*"; }\n'
              'panic() { echo "PANIC: $*"; exit 3; }\n'
              'sidus_report() { echo "report: $*"; }\n'
              + "".join(shell_function(sidus, f) for f in FUNCTIONS).replace("/run/sidus", str(run))
              + f"sidus_src={url}\nsidus_sha256={sha256}\nsidus_bytes={len(DATA)}\n"
              f"sidus_retries={retries}\nsidus_stall={stall}\nsidus_tick={tick}\n"
              f"sidus_sha256sum={shutil.which('sha256sum')}\nsidus_check={check}\n"
              f'sidus_download "{out}"\necho "rc=$?"\n')
    log = tmp_path / "sh.out"
    log.unlink(missing_ok=True)
    rc = _run_alone(script, log, str(bindir), linger=5)
    return subprocess.CompletedProcess(["busybox", "sh"], rc, log.read_text(), ""), out


def _run_alone(script: str, log: Path, path: str, *, linger: float) -> int:
    """Runs ``script`` with busybox's ``sh`` in a session of its own, ``PATH`` = ``path``,
    both output streams to the file ``log`` (not a pipe: a process left behind must not hold
    the run open); its exit code. Fails the test when it still runs after 120 s, or when a
    process of its session outlives it by ``linger`` seconds."""
    child = spawn([shutil.which("busybox") or "busybox", "sh", "-c", script], stdout=log,
                  stderr=STDOUT, env={"PATH": path}, what="busybox sh")
    try:
        rc = child.wait(timeout=120)
        assert rc is not None, f"the script still runs after 120 s:\n{log.read_text()}"
        deadline = time.monotonic() + linger
        while (left := [f"{pid} {p.comm}" for pid, p in live_processes().items()
                        if p.sid == child.pid]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"{len(left)} processes left behind: {left[:5]}"
        return rc
    finally:
        child.stop(grace=0)


def test_download_checks_the_digest_resumes_and_names_failures(
        tmp_path: Path) -> None:
    sq = tmp_path / "sq"
    sq.mkdir()
    (sq / "gen-A.squashfs").write_bytes(DATA)
    digest = hashlib.sha256(DATA).hexdigest()
    cfg = http.HttpConfig(root=sq, address="127.0.0.1", port=0,
                          mounts=(("/squashfs/img/", sq),))
    with http.serve(cfg) as srv:
        url = f"http://127.0.0.1:{srv.port}/squashfs/img/gen-A.squashfs"

        # the whole file, then its digest
        r, out = _download(tmp_path, url, sha256=digest)
        assert r.stdout.splitlines()[-2:] == [f"sidus: sha256 {digest}: matches", "rc=0"], \
            r.stdout + r.stderr
        assert out.read_bytes() == DATA

        # a partial file (a download cut short): resumed with a range, then checked whole
        ranges = srv.stats.ranges
        half = len(DATA) // 2
        r, out = _download(tmp_path, url, sha256=digest, partial=DATA[:half])
        assert f"sidus: resuming at byte {half} (range request), try 1 of 2" in r.stdout
        assert r.stdout.splitlines()[-2:] == [f"sidus: sha256 {digest}: matches", "rc=0"], \
            r.stdout + r.stderr
        assert out.read_bytes() == DATA and srv.stats.ranges == ranges + 1

        # a wrong digest: both tries fail, the file is removed, the panic names it
        wrong = "0" * 64
        r, out = _download(tmp_path, url, sha256=wrong)
        assert r.returncode == 3, r.stdout + r.stderr
        # (once per try, in the report of the failure and in the panic)
        assert r.stdout.count(f"sha256 {digest}, expected {wrong}") == 4, r.stdout
        assert f"(try 2 of 2)\nreport: failed sha256 {digest}" in r.stdout, r.stdout
        assert r.stdout.splitlines()[-1] == f"PANIC: sidus: cannot download the root image " \
            f"{url} after 2 tries: sha256 {digest}, expected {wrong}"
        assert not out.exists()

        # checked by dm-verity as read: no digest of the whole file (a wrong one is not
        # even looked at); the size still is, and a partial file is still resumed
        r, out = _download(tmp_path, url, sha256=wrong, partial=DATA[:half], check="verity")
        assert r.stdout.splitlines()[-1] == "rc=0", r.stdout + r.stderr
        assert "sha256" not in r.stdout and out.read_bytes() == DATA, r.stdout
        assert f"resuming at byte {half}" in r.stdout

        # a file the server does not have: wget fails, named with the bytes it got
        r, out = _download(tmp_path, url.replace("gen-A", "gen-B"), sha256=digest,
                           retries=1)
        assert r.returncode == 3, r.stdout + r.stderr
        assert "wget failed or stalled at 0 bytes" in r.stdout.splitlines()[-1], r.stdout
    assert srv.stats.internal_errors == 0


@contextlib.contextmanager
def stalling_server(data: bytes, sent: int) -> Iterator[str]:
    """A server on loopback that answers any request with a 200 for ``data`` but sends only
    its first ``sent`` bytes, then nothing more (the connection left open) until the block
    ends. Yields the URL."""
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(0.2)
    done = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        while not done.is_set():
            try:
                c, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            c.settimeout(None)
            conns.append(c)
            c.recv(65536)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data)
                      + data[:sent])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{lsock.getsockname()[1]}/gen-A.squashfs"
    finally:
        done.set()
        lsock.close()
        for c in conns:
            c.close()
        t.join(timeout=5)


def test_a_stalled_download_is_killed_named_and_leaves_nothing(tmp_path: Path) -> None:
    sent = 100_000
    with stalling_server(DATA, sent) as url:
        r, out = _download(tmp_path, url, sha256=hashlib.sha256(DATA).hexdigest(), retries=1,
                           stall=2, tick=1)
    assert f"sidus: download stalled for 2s at {sent} bytes: restarting it" in r.stdout, \
        r.stdout
    assert r.returncode == 3, r.stdout
    assert r.stdout.splitlines()[-1] == f"PANIC: sidus: cannot download the root image {url} " \
        f"after 1 tries: wget failed or stalled at {sent} bytes"
    # what arrived is kept, for the next try's range request
    assert out.stat().st_size == sent


def test_no_sleep_outlives_a_watchdog_ended_at_once(tmp_path: Path) -> None:
    """``sidus_wget`` 1,000 times with a wget that fails at once: the watchdog gets its TERM
    while it starts, often between its fork of ``sleep`` and that child's exec, or before
    the shell has seen the fork's pid. Before the trap killed ``$!`` with KILL, 48 of these
    1,000 runs left a sleep of the watchdog's tick behind (CI once saw one in the test
    above)."""
    sidus = initramfs_dir() / "scripts/sidus"
    script = ("wget() { return 1; }\n"
              + "".join(shell_function(sidus, f) for f in ("sidus_size", "sidus_wget",
                                                           "sidus_watchdog"))
              + "sidus_tick=30\nsidus_stall=60\nsidus_bytes=1\ni=0\n"
              f'while [ "$i" -lt 1000 ]; do sidus_wget http://127.0.0.1:9/x "{tmp_path}/f"; '
              'i=$((i + 1)); done\necho "ran $i"\n')
    log = tmp_path / "sh.out"
    rc = _run_alone(script, log, os.path.dirname(shutil.which("busybox") or ""), linger=2)
    assert rc == 0 and log.read_text().splitlines()[-1] == "ran 1000", log.read_text()


@pytest.mark.parametrize("value", ["", "x:" + "ab" * 32 + ":01", "12a:" + "ab" * 32 + ":01"])
def test_a_malformed_verity_value_is_named_and_refused_before_any_device(value: str) -> None:
    """``sidus_mount_verity`` with a ``sidus.verity=`` whose block count is not a number
    returns 1 (the boot script then checks the whole file and mounts it without dm-verity),
    named on the console, before it runs losetup or dmsetup: busybox's ``sh`` would otherwise
    stop the boot on the arithmetic."""
    sidus = initramfs_dir() / "scripts/sidus"
    script = ('sidus_log() { echo "sidus: $*"; }\n'
              + shell_function(sidus, "sidus_mount_verity")
              + f'sidus_verity="{value}"\nsidus_mount_verity /nonexistent\necho "rc=$?"\n')
    r = subprocess.run([shutil.which("busybox") or "busybox", "sh", "-c", script],
                       capture_output=True, text=True, env={"PATH": "/nonexistent"}, check=False)
    assert r.stdout.splitlines() == [
        f"sidus: sidus.verity={value}: expected DATA_BLOCKS:ROOT_HASH:SALT", "rc=1"], \
        r.stdout + r.stderr
