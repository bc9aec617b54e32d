"""sidusctl vnode commands cut short for real: SIGINT, SIGTERM and SIGKILL sent to the CLI at a
chosen step (seen as the child it runs: lxc-start, lxc-attach, lxc-stop, tar...), and commands
interleaved with it (the CLI stopped with SIGSTOP at a chosen child). Afterwards the record and
the host must agree: a vnode recorded RUNNING runs, one recorded READY has no container and no
root, no root another vnode uses is deleted, no link is left unrecorded.

One module-scoped btrfs store (loop file under /var/tmp) and vnetwork; everything is named
``sdt-vi...`` and removed at the end even on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import vnode_util
from tests.conftest import SIDUSCTL, sidusctl

USES_MINIMAL_IMAGE = True
pytestmark = [pytest.mark.slow,  # the built image and LXC
              pytest.mark.skipif(os.geteuid() != 0, reason="vnodes need root")]

BASE = Path(f"/var/tmp/sdt-vni-{os.getpid()}")
NET = "sdt-vi0"
CIDR = "10.236.0.0/24"
HANG = 300  # seconds: a guard against a hung command, not a timed assertion


def ok(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    r = sidusctl(*args, state=state, timeout=HANG)
    assert r.returncode == 0, f"sidusctl {' '.join(args)} failed ({r.returncode}):\n{r.stderr}"
    return r


def spawn(*args: str, state: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([*SIDUSCTL, "--state-dir", str(state), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


@contextlib.contextmanager
def pause_after_listing(d: Path) -> Iterator[tuple[dict[str, str], Callable[[], None]]]:
    """``(env, arm)``: a command run with ``env`` pauses after its first lxc-ls (the real
    one, run by an ``lxc-ls`` first on PATH), having listed the host: ``d/listed`` appears,
    and it goes on once ``d/go`` exists. ``arm()`` does it again for the next command."""
    d.mkdir(parents=True, exist_ok=True)
    real = shutil.which("lxc-ls")
    assert real is not None
    (d / "lxc-ls").write_text(
        f"#!/bin/sh\n{real} \"$@\"; rc=$?\n"
        f"if rm {d}/armed 2>/dev/null; then touch {d}/listed; "
        f"while [ ! -e {d}/go ]; do sleep 0.05; done; fi\nexit $rc\n")
    (d / "lxc-ls").chmod(0o755)

    def arm() -> None:
        for f in ("listed", "go"):
            (d / f).unlink(missing_ok=True)
        (d / "armed").touch()

    arm()
    try:
        yield {"PATH": f"{d}:{os.environ['PATH']}"}, arm
    finally:
        (d / "go").touch()
        shutil.rmtree(d, ignore_errors=True)


def finish(p: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = p.communicate(timeout=HANG)
    return p.returncode, err


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(x) for x in f.read_text().split()]
    return out


def wait_child(p: subprocess.Popen[str], prog: str, *words: str) -> int:
    """The pid of the first child of ``p`` that runs ``prog`` (its argv[0]'s base name) with
    each of ``words`` among its arguments; polls until it appears. Fails if ``p`` ends first."""
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        for c in _children(p.pid):
            argv = _cmdline(c)
            if argv and os.path.basename(argv[0]) == prog and all(w in argv for w in words):
                return c
        if p.poll() is not None:
            out, err = p.communicate()
            pytest.fail(f"the command ended ({p.returncode}) before running {prog} "
                        f"{' '.join(words)}:\n{out}\n{err}")
    pytest.fail(f"no {prog} {' '.join(words)} in {HANG} s")


def stop_after(p: subprocess.Popen[str], prog: str, *words: str) -> None:
    """Stop ``p`` (SIGSTOP) once its child ``prog`` (as :func:`wait_child` finds it) has
    ended, before ``p`` goes on: a signal sent then (with SIGCONT) lands right after that
    step. (lxc-wait may live too short to be seen: the step before it is waited for.)"""
    c = wait_child(p, prog, *words)
    p.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{c}/stat").read_text()
        except OSError:
            return  # reaped just before the stop: p is a step further
        if stat.rpartition(")")[2].split()[0] == "Z":
            return
    pytest.fail(f"{prog} {' '.join(words)} still running after {HANG} s")


def poll_until(found: Callable[[], bool], p: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + HANG
    while not found():
        if p.poll() is not None:
            pytest.fail(f"the command ended ({p.returncode}) before {what}")
        assert time.monotonic() < deadline, f"no {what} in {HANG} s"


def lxc_state(state: Path, name: str) -> str:
    lxcpath = state / "vnode" / "lxc"
    if not (lxcpath / name / "config").exists():
        return "ABSENT"
    r = subprocess.run(["lxc-info", "-P", str(lxcpath), "-n", name, "-s", "-H"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "STOPPED"


def rows(state: Path) -> dict[str, dict[str, object]]:
    return {v["name"]: v for v in json.loads(ok("vnode", "list", "--json", state=state).stdout)}


def vdir(state: Path, name: str) -> Path:
    return state / "vnode" / "store" / "vnodes" / name


def assert_consistent(state: Path, name: str) -> str:
    """The record of ``name`` agrees with LXC and the store; returns its state."""
    row = rows(state)[name]
    real = lxc_state(state, name)
    assert row["note"] is None, row
    assert row["state"] == row["recorded_state"], (row, real)
    if row["state"] == "READY":
        assert real in ("STOPPED", "ABSENT"), (row, real)
        assert not vdir(state, name).exists(), list(vdir(state, name).iterdir())
    else:
        assert real == row["state"], (row, real)
    return str(row["state"])


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> str:
    return vnode_util.vnode_image(request)


@pytest.fixture(scope="module")
def plat(image: str) -> Iterator[Path]:
    """State dir with a btrfs store and vnetwork sdt-vi0; the image cached."""
    state = BASE
    vnode_util.force_cleanup(state, "sdt-vi")
    try:
        ok("vnode", "init", "--btrfs-image", "4G", state=state)
        ok("vnode", "net", "create", NET, CIDR, state=state)
        ok("vnode", "cache-image", image, state=state)
        yield state
    finally:
        vnode_util.tear_down(state, "sdt-vi")


def create(plat: Path, image: str, name: str, *extra: str) -> None:
    ok("vnode", "create", name, "--image", image, "--iface", f"if0:{NET}", *extra, state=plat)


def test_sigterm_stops_a_start_of_several_and_undoes_the_one_under_way(
        plat: Path, image: str) -> None:
    names = ["sdt-via", "sdt-vib", "sdt-vic", "sdt-vid"]
    try:
        for n in names:
            create(plat, image, n)
        p = spawn("vnode", "start", *names, state=plat)
        # the second one's container is started (lxc-start -d done), not yet recorded
        stop_after(p, "lxc-start", "sdt-vib")
        p.send_signal(signal.SIGTERM)
        p.send_signal(signal.SIGCONT)
        rc, err = finish(p)
        assert rc == 130, err
        assert "SIGTERM" in err, err
        assert assert_consistent(plat, "sdt-via") == "RUNNING"
        assert assert_consistent(plat, "sdt-vib") == "READY"  # undone: stopped, root deleted
        for n in ("sdt-vic", "sdt-vid"):  # not started at all: no container was ever made
            assert assert_consistent(plat, n) == "READY"
            assert lxc_state(plat, n) == "ABSENT", n
        # destroy of several, SIGTERM while the second stops: the later ones stay
        p = spawn("vnode", "destroy", "sdt-vib", "sdt-via", "sdt-vic", state=plat)
        wait_child(p, "lxc-stop", "sdt-via")
        p.send_signal(signal.SIGTERM)
        rc, err = finish(p)
        assert rc == 130, err
        left = rows(plat)
        assert "sdt-vib" not in left
        assert assert_consistent(plat, "sdt-via") == "READY"  # stopped, not forgotten
        assert "sdt-vic" in left and lxc_state(plat, "sdt-vic") == "ABSENT"
    finally:
        sidusctl("vnode", "destroy", *names, state=plat)


def test_interrupted_start_command_launch_and_stop_leave_record_and_host_agreeing(
        plat: Path, image: str) -> None:
    name = "sdt-vie"
    try:
        create(plat, image, name, "--start-command", "echo hi")
        p = spawn("vnode", "start", name, state=plat)
        # SIGINT while the start command is being launched (lxc-attach held stopped), and a
        # second one while the start is undone (lxc-stop)
        attach = wait_child(p, "lxc-attach", name)
        os.kill(attach, signal.SIGSTOP)
        p.send_signal(signal.SIGINT)
        os.kill(attach, signal.SIGCONT)
        wait_child(p, "lxc-stop", name)
        p.send_signal(signal.SIGINT)
        rc, err = finish(p)
        assert rc == 130, err
        assert assert_consistent(plat, name) == "READY"
        # it starts again, then a stop interrupted during the clean shutdown still stops it
        ok("vnode", "start", name, state=plat)
        assert assert_consistent(plat, name) == "RUNNING"
        p = spawn("vnode", "stop", name, state=plat)
        wait_child(p, "lxc-stop", name)
        p.send_signal(signal.SIGINT)
        rc, err = finish(p)
        assert rc == 130, err
        assert assert_consistent(plat, name) == "READY"
        assert lxc_state(plat, name) == "STOPPED"
    finally:
        sidusctl("vnode", "destroy", name, state=plat)


def test_stale_ready_record_does_not_let_stop_delete_a_used_shared_root(
        plat: Path, image: str) -> None:
    a, b = "sdt-visa", "sdt-visb"
    shared = plat / "vnode" / "store" / "shared"
    try:
        for n in (a, b):
            create(plat, image, n, "--fs", "shared")
        ok("vnode", "start", a, state=plat)
        p = spawn("vnode", "start", b, state=plat)
        stop_after(p, "lxc-start", b)  # its container runs; the start is not recorded yet
        p.kill()
        p.communicate(timeout=HANG)
        assert rows(plat)[b]["recorded_state"] == "READY"
        assert lxc_state(plat, b) == "RUNNING"
        ok("vnode", "stop", a, state=plat)
        roots = [d for d in shared.iterdir() if d.is_dir()]
        assert len(roots) == 1 and (roots[0] / "etc").is_dir(), roots
        ok("vnode", "exec", b, "test", "-x", "/bin/sh", state=plat)
        # the last user's stop deletes it
        ok("vnode", "stop", b, state=plat)
        assert not [d for d in shared.iterdir() if d.is_dir()]
    finally:
        sidusctl("vnode", "destroy", a, b, state=plat)


def test_get_image_killed_or_outrun_by_stop_leaves_nothing_that_blocks_start(
        plat: Path, image: str) -> None:
    name = "sdt-vig"
    dest = BASE.with_name(BASE.name + "-g.tar.zst")
    try:
        create(plat, image, name, "--fs", "cow")
        ok("vnode", "start", name, state=plat)
        p = spawn("vnode", "get-image", name, str(dest), state=plat)
        wait_child(p, "tar")
        p.kill()
        p.communicate(timeout=HANG)
        exports = list(vdir(plat, name).glob(".export*"))
        assert exports, "the killed get-image left no snapshot: nothing tested"
        ok("vnode", "stop", name, state=plat)
        assert not vdir(plat, name).exists()
        ok("vnode", "start", name, state=plat)
        # a stop while get-image dumps (its tar held stopped): the dump fails, start works
        p = spawn("vnode", "get-image", name, str(dest), state=plat)
        tar = wait_child(p, "tar")
        os.kill(tar, signal.SIGSTOP)
        try:
            ok("vnode", "stop", name, state=plat)
        finally:
            os.kill(tar, signal.SIGCONT)
        rc, err = finish(p)
        assert rc != 0 and not dest.exists(), (rc, err)
        assert rc != 70, err
        assert not vdir(plat, name).exists()
        ok("vnode", "start", name, state=plat)
        assert assert_consistent(plat, name) == "RUNNING"
        ok("vnode", "destroy", name, state=plat)
        assert not vdir(plat, name).exists()
    finally:
        sidusctl("vnode", "destroy", name, state=plat)
        dest.unlink(missing_ok=True)
        dest.with_name(f".{dest.name}.tmp").unlink(missing_ok=True)


def test_net_create_killed_leaves_a_recorded_vnetwork(plat: Path) -> None:
    net, other, cidr = "sdt-vin2", "sdt-vin3", "10.237.0.0/24"
    by_hand = "sdt-vin4"
    try:
        p = spawn("vnode", "net", "create", net, cidr, state=plat)
        poll_until(Path(f"/sys/class/net/{net}").exists, p, f"bridge {net}")
        p.kill()
        p.communicate(timeout=HANG)
        nets = {n["name"] for n in json.loads(ok("vnode", "net", "list", "--json",
                                                 state=plat).stdout)}
        assert net in nets
        r = sidusctl("vnode", "net", "create", other, cidr, state=plat)
        assert r.returncode == 2 and "overlaps" in r.stderr, r.stderr
        ok("vnode", "net", "delete", net, state=plat)
        assert not Path(f"/sys/class/net/{net}").exists()
        # a link nobody recorded: the hint names it and how to remove it
        subprocess.run(["ip", "link", "add", by_hand, "type", "bridge"], check=True)
        r = sidusctl("vnode", "net", "create", by_hand, "10.238.0.0/24", state=plat)
        assert r.returncode == 1 and f"ip link delete {by_hand}" in r.stderr, r.stderr
    finally:
        for n in (net, other):
            sidusctl("vnode", "net", "delete", n, state=plat)
        subprocess.run(["ip", "link", "del", by_hand], capture_output=True, check=False)


def test_up_and_down_take_what_another_command_did_meanwhile_as_done(
        plat: Path, image: str) -> None:
    pf = BASE.with_name(BASE.name + "-platform.toml")
    pf.write_text(f"""
[defaults]
image = "{image}"
vnetwork = "sdt-vip"

[[vnetworks]]
name = "sdt-vip"
cidr = "10.239.0.0/24"

[[vnodes]]
name = "sdt-vip0"

[[vnodes]]
name = "sdt-vip1"
""")
    pause = BASE.with_name(BASE.name + "-bin")
    (plat / "vnode" / "lxc").mkdir(exist_ok=True)  # else the listing runs no lxc-ls
    try:
        with pause_after_listing(pause) as (env, arm):
            # up paused right after it listed the host: meanwhile the vnetwork and one vnode
            # are made by other commands
            p = spawn("vnode", "up", str(pf), "--no-wait", "--json", state=plat, env=env)
            poll_until((pause / "listed").exists, p, "up listed the vnodes")
            ok("vnode", "net", "create", "sdt-vip", "10.239.0.0/24", state=plat)
            ok("vnode", "create", "sdt-vip0", "--image", image, "--iface", "if0:sdt-vip",
               state=plat)
            (pause / "go").touch()
            rc, err = finish(p)
            assert rc == 0, err
            assert {assert_consistent(plat, n) for n in ("sdt-vip0", "sdt-vip1")} == {"RUNNING"}
            # down paused after it listed: one vnode destroyed meanwhile
            arm()
            p = spawn("vnode", "down", str(pf), "--json", state=plat, env=env)
            poll_until((pause / "listed").exists, p, "down listed the vnodes")
            ok("vnode", "destroy", "sdt-vip1", state=plat)
            (pause / "go").touch()
            out, err = p.communicate(timeout=HANG)
            assert p.returncode == 0, err
            assert json.loads(out) == {"vnodes": ["sdt-vip0"], "vnetworks": ["sdt-vip"]}, out
            assert not {"sdt-vip0", "sdt-vip1"} & set(rows(plat))
    finally:
        sidusctl("vnode", "down", str(pf), state=plat)
        pf.unlink(missing_ok=True)
