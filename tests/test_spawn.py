"""The long-running-child spawner and its stop routine (:func:`sidusctl.core.run.spawn`,
:func:`sidusctl.core.run.stop`).

Fast tests: the stop routine escalates to SIGKILL for a child that ignores SIGTERM and ends the
whole process group (a grandchild too); a missing program or one that exits at start-up gives
the typed error; PR_SET_PDEATHSIG ends a child when its parent is SIGKILLed; a SIGINT that
comes while run() or spawn() forks is raised from them with the child ended. Slow test: a real
serve-pxe with NFS through nfs-ganesha in a lab namespace ``sdt-sp<pid>``
(:class:`sidusctl.netboot.lab.PxeLab`, no guest) is SIGKILLed and its ganesha.nfsd and rpcbind
go with it. Processes are checked in /proc.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from sidusctl.core.errors import CommandError, PrerequisiteError
from sidusctl.core.run import PIPE, spawn
from sidusctl.netboot.lab import LabNode, PxeLab
from tests.conftest import SIDUSCTL, BuiltImage
from tests.proc_util import live_processes

REPO = Path(__file__).resolve().parent.parent


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def read_line(child_stdout: object, timeout: float = 10) -> str:
    import select
    assert hasattr(child_stdout, "fileno") and hasattr(child_stdout, "readline")
    ready, _, _ = select.select([child_stdout], [], [], timeout)
    assert ready, "no line from the child"
    return str(child_stdout.readline().decode().strip())


def test_stop_escalates_to_sigkill() -> None:
    child = spawn([sys.executable, "-c", textwrap.dedent("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(600)
    """)], stdout=PIPE)
    assert read_line(child.stdout) == "ready"
    t0 = time.monotonic()
    rc = child.stop(grace=0.5)
    took = time.monotonic() - t0
    assert rc == -signal.SIGKILL
    assert 0.4 < took < 5, took
    assert not running(child.pid)
    assert child.stop() == -signal.SIGKILL  # idempotent


def test_stop_ends_the_whole_group() -> None:
    # the grandchild ignores SIGTERM too (trap is inherited); only the group SIGKILL ends it
    child = spawn(["sh", "-c", 'trap "" TERM; sleep 600 & echo $!; wait'], stdout=PIPE)
    grandchild = int(read_line(child.stdout))
    assert running(grandchild)
    child.stop(grace=0.5)
    assert wait_until(lambda: not running(grandchild), 5), "grandchild still runs"


def test_stop_of_a_polite_child_returns_its_code() -> None:
    child = spawn(["sleep", "600"])
    assert child.alive()
    assert child.stop() == -signal.SIGTERM
    child = spawn(["sh", "-c", "exit 7"])
    assert child.wait(10) == 7
    assert child.stop() == 7


def test_missing_program_and_early_exit_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(PrerequisiteError, match="sdt-no-such-program"):
        spawn(["sdt-no-such-program", "-f"])
    err = tmp_path / "err.log"
    with pytest.raises(CommandError, match="exit code 3") as e:
        spawn(["sh", "-c", "echo cannot bind >&2; exit 3"], stderr=err, settle=2)
    assert e.value.returncode == 3 and "cannot bind" in e.value.output_tail
    # a child that stays up through the settle time is returned
    child = spawn(["sleep", "600"], settle=0.3)
    assert child.alive()
    child.stop()


def test_redirections(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.write_text("hello\n")
    out = tmp_path / "out"
    child = spawn(["sh", "-c", "cat; echo oops >&2"], stdin=src, stdout=out,
                  stderr=subprocess.STDOUT)
    assert child.wait(10) == 0
    assert out.read_text() == "hello\noops\n"


def test_pdeathsig_kills_the_child_of_a_killed_parent() -> None:
    # The parent spawns `sleep` (own session: not in the parent's group), prints its pid and
    # waits; SIGKILL to the parent alone must end the sleep too.
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import time
        from sidusctl.core.run import spawn
        c = spawn(["sleep", "600"])
        print(c.pid, flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert parent.stdout is not None
        pid = int(read_line(parent.stdout))
        assert running(pid)
        assert os.getsid(pid) == pid  # its own session
        parent.kill()
        parent.wait(10)
        assert wait_until(lambda: not running(pid), 5), "the orphan still runs"
    finally:
        parent.kill()
        parent.wait()


#: a script: SIGINT arrives while run() or spawn() forks (sent by an at-fork hook, the moment
#: in which a test suite's SIGINT was lost), and each must raise KeyboardInterrupt with its child
#: ended, then leave the caller's signal mask as it was
_INTERRUPTED_FORK = """
import os, signal, sys, threading
from pathlib import Path
from sidusctl.core import run as r

armed = []
os.register_at_fork(before=lambda: armed and os.kill(os.getpid(), armed.pop()))

def sleeps(arg):
    me = f"sleep\\0{arg}\\0".encode()
    return [d.name for d in Path("/proc").iterdir() if d.name.isdigit()
            and (d / "cmdline").exists() and (d / "cmdline").read_bytes() == me
            and (d / "stat").read_text().split(")")[1].split()[0] not in "ZX"]

for name, start in (("run", lambda: r.run(["sleep", "31.5"])),
                    ("spawn", lambda: r.spawn(["sleep", "31.6"]))):
    armed.append(signal.SIGINT)
    try:
        start()
        print(name, "not interrupted")
    except KeyboardInterrupt:
        print(name, "interrupted", sleeps("31.5" if name == "run" else "31.6"), sorted(r.ACTIVE))
print("mask", sorted(int(x) for x in signal.pthread_sigmask(signal.SIG_BLOCK, [])))

def blocked():
    line = r.run(["grep", "^SigBlk", "/proc/self/status"], capture=True).stdout
    return int(line.split()[1], 16)
got = [blocked()]
t = threading.Thread(target=lambda: got.append(blocked()))
t.start(); t.join()
print("child masks", got)
"""


def test_an_interrupt_during_the_fork_is_raised_and_the_child_ended() -> None:
    """CPython runs ``logging``'s at-fork hook in the parent right after a fork with a
    ``preexec_fn``, and an exception raised in that hook is printed and dropped: a SIGINT
    that came during the fork was lost (``sidusctl update`` ran on to exit 0 in a full test run).
    run() and spawn() hold SIGINT and SIGTERM pending across the fork, so the interrupt is
    raised from them, after their child is known and ended; the caller's mask is restored,
    and the children (started from the main thread or another) have both unblocked."""
    r = subprocess.run([sys.executable, "-c", _INTERRUPTED_FORK], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["run interrupted [] []", "spawn interrupted [] []"], r.stdout + r.stderr
    assert "Exception ignored" not in r.stderr, r.stderr
    assert lines[2] == "mask []", r.stdout
    masks = [int(x) for x in lines[3].removeprefix("child masks [").rstrip("]").split(",")]
    sigint_or_sigterm = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    assert len(masks) == 2 and not any(m & sigint_or_sigterm for m in masks), r.stdout


def _descendants(root: int) -> dict[int, str]:
    """pid -> command name of the live descendants of ``root``, from /proc."""
    parent = {pid: (p.ppid, p.comm) for pid, p in live_processes().items()}
    out: dict[int, str] = {}
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (pp, _) in parent.items() if pp in frontier and pid not in out}
        out.update({pid: parent[pid][1] for pid in frontier})
    return out


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, NFS)")
def test_killed_serve_pxe_takes_its_nfs_servers_along(minimal_image: BuiltImage,
                                                      tmp_path: Path) -> None:
    node = LabNode("node1", "52:54:00:77:05:01", IPv4Address("10.77.0.130"))
    pre = f"sdt-sp{os.getpid() % 10000}"
    with PxeLab(pre, minimal_image.state, "minimal", [node], tmp_path,
                serve_command=[*SIDUSCTL, "serve-pxe"]) as lab:
        serve = lab.start_serve("--nfs", "ganesha")
        # everything serve-pxe started: ganesha.nfsd, rpcbind (under `unshare` and the init
        # of its PID namespace, see subsys/ganesha.py)
        kids = _descendants(serve.pid)
        assert {"ganesha.nfsd", "rpcbind"} <= set(kids.values()), kids
        os.kill(serve.pid, signal.SIGKILL)  # serve-pxe alone, as a crash or the OOM killer
        assert serve.wait(10) == -signal.SIGKILL
        assert wait_until(lambda: not any(running(p) for p in kids), 10), \
            {p: n for p, n in kids.items() if running(p)}
        assert lab.stop_serve() == -signal.SIGKILL
    assert pre not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                     check=True).stdout
