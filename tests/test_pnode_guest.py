"""A pnode booted the SIDUS way: a qemu guest (TCG) PXE-booted through our own serve-pxe from
``images/pnode``, driven as a pnode of a platform file by the frontend over its OpenSSH.

This machine's kernel has no netem and no cgroup v2 memory controller; the guest's Debian
kernel and systemd (unified cgroup v2 hierarchy) have both, so what the namespace pnodes of
tests/test_multihost.py cannot show is proven here, in one boot:

- the pnode image is built from a copy of ``images/pnode`` with a wheelhouse of this checkout
  (``pip wheel``) and the frontend's key (its ``postinst`` script installs both), sharing the
  bootstrap and package caches; it is built in the background from the moment the session's
  ``minimal`` is, in a state directory of its own (tests/pnode_image.py), so the session's
  other tests run meanwhile;
- serve-pxe (a :class:`PxeLab` namespace, NFS root, tmpfs overlay) boots the guest (3 GiB, a
  blank virtio disk for the vnode store) to login; the frontend, in the lab's namespace,
  reaches the guest's sshd with its key;
- the guest's ``pnode facts`` show netem, VXLAN and the v2 memory controller; ``pnode check``
  names what the unprepared pnode lacks (no store); the guest's store is made btrfs on its
  disk, then ``pnode init`` sends the vnode image (the shared ``minimal`` build's root without
  kernel, modules, docs and apt lists: 60 MB instead of 280, since a TCG guest receives it
  through ssh at a few MB/s) and ``pnode check`` is clean;
- ``vnode up`` starts three cow vnodes there, one with v2 memory limits (soft, hard, swap):
  memory.high, memory.max and memory.swap.max hold them in the guest's cgroup tree, and a
  process growing past the hard limit is OOM-killed (``memory.events`` counts it);
- ``vnode latency-matrix`` shapes them; every vnode pings every other (20 pings): the median
  round trip is the matrix's i→j plus j→i within 10 %;
- ``vnode down`` leaves no vnode root and no container cgroup on the pnode.

The guest scenario runs in the background from the moment its image is built (tests/conftest.py
gives :func:`in_background` to tests/pnode_image.py), while the session's tests without a guest
(builds, LXC, servers) keep the other core busy; tests/conftest.py sorts this test after the
modules that boot guests, so it finds the scenario done and reports its outcome. The test
itself runs, two at a time, each in its own namespace: the README demo (tests/test_demo.py) and
the scenarios of tests/test_secureboot.py and tests/test_http_boot_uefi.py (run ahead for those
tests, which report their outcome and run what was not started). The guest takes 6-12 minutes
on the shared 2-core machine (2026-12-02: login 103-110 s, ``pnode init`` 71-78 s, ``vnode
up`` 58-70 s; every sidusctl run on a TCG guest costs 10-20 s of Python start-up); ``-s``
prints the seconds of each step.

The image and its reuse key live in the pnode build's state directory, beside the shared one
(``SIDUSCTL_TEST_REUSE`` keeps them); everything else (the lab's namespace ``sdt-pg<pid>``, the guest, the disk, the
frontend's state) is removed at the end, on failure too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from sidusctl.netboot.lab import LabNode, PxeLab, wait_logins
from sidusctl.subsys import qemu
from sidusctl.subsys.tarball import TAR_FLAGS
from tests import pnode_image as pnode_images
from tests import test_http_boot_uefi, test_secureboot
from tests.at_once import in_turn, run_ahead, run_or_replay_each, two_at_a_time
from tests.conftest import REPO, SIDUSCTL, BuiltImage
from tests.netns_util import uniq
from tests.pnode_image import PnodeImage
from tests.test_demo import readme_demo
from tests.test_pxe_boot import evidence

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, qemu, NFS)")]

NODE = LabNode("pg1", "52:54:00:77:06:01", IPv4Address("10.77.0.160"))
SERVE = [*SIDUSCTL, "serve-pxe"]
BOOT_TIMEOUT = 480.0
MEMORY_MIB = 3072
VNODES = ["sdt-pg1", "sdt-pg2", "sdt-pg3"]
# one-way milliseconds, row = from, column = to (Distem's matrix)
MATRIX = [[0, 25, 50], [25, 0, 40], [50, 40, 0]]
PINGS = 20  # per pair; the median is compared (TCG scheduling delays some replies)
MEM = {"soft": 48, "hard": 64, "swap": 16}  # MiB, on sdt-pg3


# -- the pnode image (tests/pnode_image.py) ---------------------------------------------------

@pytest.fixture(scope="module")
def pnode_image(minimal_image: BuiltImage) -> PnodeImage:
    """The pnode image, built in the background since the session's ``minimal`` was
    (tests/pnode_image.py); waits for that build and raises its failure."""
    built = pnode_images.result(minimal_image)
    if built.build_s is not None:
        print(f"pnode image built in {built.build_s:.0f} s (in the background)")
    return built


# what a container does not need: the kernel and its modules, docs, apt's lists and cache
SLIM_EXCLUDES = ("./boot", "./usr/lib/modules", "./usr/share/doc", "./usr/share/man",
                 "./usr/share/locale", "./usr/share/i18n", "./var/cache/apt",
                 "./var/lib/apt/lists")


def vnode_tarball(image: BuiltImage, into: Path) -> Path:
    """The shared ``minimal`` build's rootfs tarball as a vnode tarball in the directory
    ``into`` (the pnode build's state directory, which no other test looks at) without what a
    container never reads (:data:`SLIM_EXCLUDES`): 60 MB instead of 280, which a TCG guest
    receives over ssh (a few MB/s) and unpacks in a minute instead of several. Made once per
    generation, from the tarball the build wrote, not from the
    rootfs directory: the session's chroot tests (tests/test_build.py,
    tests/test_build_faults.py) add and remove session files there while this runs in the
    background, and tar exits 1 on a file that changed as it read it (two CI runs)."""
    tarball = Path(str(image.tarball))
    dest = into / f"sdt-vnode-{Path(str(image.rootfs)).resolve().parent.name}.tar.zst"
    if not dest.exists():
        for old in into.glob("sdt-vnode-*.tar.zst"):
            old.unlink()
        tmp = dest.with_name(f".{dest.name}.tmp")
        tree = into / ".sdt-vnode-tree"
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir()
        try:
            # extracted and archived again (GNU tar 1.34's --delete breaks on this archive's
            # sparse and PAX members): 10-20 s, once per generation
            subprocess.run(["tar", *TAR_FLAGS, "--use-compress-program", "zstd -q", "-xpf",
                            str(tarball), "-C", str(tree),
                            *(f"--exclude={x}" for x in SLIM_EXCLUDES)], check=True, timeout=600)
            subprocess.run(["tar", *TAR_FLAGS, "--use-compress-program", "zstd -T0 -3 -q",
                            "-C", str(tree), "-cf", str(tmp), "."], check=True, timeout=600)
        finally:
            shutil.rmtree(tree, ignore_errors=True)
        tmp.rename(dest)
    return dest


# -- the frontend ------------------------------------------------------------------------------

class Frontend:
    """The frontend's commands, run in the lab's namespace (where the guest is reachable)."""

    def __init__(self, lab: PxeLab, state: Path, key: Path) -> None:
        self.lab, self.state, self.key = lab, state, key
        self.known_hosts = state / "known_hosts"

    def ssh_options(self) -> list[str]:
        return ["-i", str(self.key), "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=no", "-o", "ConnectTimeout=10"]

    def ssh(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.lab.netns, "ssh", "-n",
                               *self.ssh_options(), f"root@{NODE.ip}", command],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def cli(self, *args: str, timeout: float = 900) -> tuple[int, str, str]:
        r = subprocess.run(["ip", "netns", "exec", self.lab.netns, *SIDUSCTL,
                            "--state-dir", str(self.state), *args],
                           capture_output=True, text=True, timeout=timeout, check=False,
                           cwd=REPO)
        return r.returncode, r.stdout, r.stderr

    def exec_json(self, pf: Path, vnode: str, *argv: str) -> dict[str, object]:
        _rc, out, err = self.cli("vnode", "exec", "--platform", str(pf), "--json", vnode,
                                "--", *argv)
        assert out, err
        res: dict[str, object] = json.loads(out)[vnode]
        return res


def platform_text(front: Frontend, image: Path) -> str:
    mem = "".join(f"{k} = {v}\n" for k, v in MEM.items())
    vnodes = "".join(f'[[vnodes]]\nname = "{n}"\nimage = "{image}"\nfs = "cow"\n'
                     f'vnetwork = "sdt-pg"\n' for n in VNODES[:2])
    return f"""
[pnodes]
hosts = "{NODE.name}"
ssh_options = {json.dumps(front.ssh_options())}
connect_timeout = 10

[pnodes.host.{NODE.name}]
address = "{NODE.ip}"

[[vnetworks]]
name = "sdt-pg"
cidr = "10.237.0.0/24"

{vnodes}
[[vnodes]]
name = "{VNODES[2]}"
image = "{image}"
fs = "cow"
vnetwork = "sdt-pg"
[vnodes.mem]
hierarchy = "v2"
{mem}"""


def ping_all(addrs: dict[str, str]) -> str:
    """A shell command every vnode runs: ``PINGS`` pings to each other vnode's address of
    ``addrs`` (after one that fills the ARP cache), printing ``RTT <name> <ms> ...`` per
    target."""
    return "; ".join(
        f'[ "$(hostname)" = {n} ] || {{ ping -c 1 -W 5 {a} >/dev/null; echo RTT {n} '
        f"$(ping -n -c {PINGS} -i 0.2 -W 5 {a} | sed -n 's/.*time=\\([0-9.]*\\) ms/\\1/p'); }}"
        for n, a in addrs.items())


def rtts(out: str) -> dict[str, list[float]]:
    """``RTT name ms...`` lines -> {name: [ms...]}."""
    got: dict[str, list[float]] = {}
    for line in out.splitlines():
        if line.startswith("RTT "):
            name, *ms = line.split()[1:]
            got[name] = [float(x) for x in ms]
    return got


#: later tests whose scenarios this test runs ahead, two at a time with the README demo
AHEAD_OF = (test_secureboot, test_http_boot_uefi)
#: the pnode guest scenario's key for :func:`tests.at_once.run_ahead`
PNODE_KEY = "test_pnode_guest:pnode"
#: the figures of the pnode guest scenario that ran in the background (printed by the test)
_FIGURES: dict[str, object] = {}
_ABORTED = threading.Event()


def in_background(tmp_path_factory: pytest.TempPathFactory) -> pnode_images.Then:
    """What tests/conftest.py has the pnode build's thread run once the image is built: the
    pnode guest scenario, its outcome kept for the test (:func:`tests.at_once.run_ahead`), so
    that the guest (one core for 6-12 minutes) boots and works while the session's tests
    without a guest run on the other core; and how to abort it (its guest killed) when the
    session stops first."""

    def run(image: PnodeImage) -> None:
        run_ahead(PNODE_KEY, lambda: pnode_guest_scenario(
            image, tmp_path_factory.mktemp("pnode-guest"), _FIGURES))

    def abort() -> None:
        _ABORTED.set()
        subprocess.run(["pkill", "-KILL", "-f", f"qemu-system.*{uniq('pg')}-"], check=False)

    return pnode_images.Then(run, abort)


def test_sidus_booted_pnode_runs_shaped_and_limited_vnodes(
        pnode_image: PnodeImage, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The pnode scenario (:func:`pnode_guest_scenario`, one guest for 6-12 minutes), run in
    the background since its image was built (:func:`in_background`; run here, at once with
    the rest, when it was not), and two at a time, each in its own namespace: tests/test_demo.py's
    README demo (:func:`tests.test_demo.readme_demo`), then the scenarios of the tests of
    :data:`AHEAD_OF` that come later in the session and can run here, run ahead for them
    (:func:`tests.at_once.two_at_a_time`: those tests report their outcome, this one does
    not)."""
    minimal = pnode_image.minimal
    items = request.session.items
    # the tests of the session that come after this one (tests/conftest.py sorts them there)
    later = {i.nodeid.rsplit("/", 1)[-1] for i in items[items.index(request.node) + 1:]}
    ahead: list[tuple[str, Callable[[], None]]] = []
    for mod in AHEAD_OF:
        name = mod.__name__.rsplit(".", 1)[-1]
        if mod.SKIP_REASON is None and f"{name}.py::{mod.TEST_NAME}" in later:
            (tmp_path / name).mkdir()
            ahead += mod.scenarios(minimal, tmp_path / name).items()
    in_background = pnode_images.has_then()

    def pnode() -> None:
        pnode_images.join_then()  # what ran in the background is replayed, else run now
        run_or_replay_each({PNODE_KEY: lambda: pnode_guest_scenario(pnode_image, tmp_path,
                                                                    _FIGURES)})

    def demo() -> None:
        readme_demo(minimal)

    try:
        if in_background:  # the demo and the later tests' scenarios while it may still run
            in_turn(lambda: print(f"run ahead: {two_at_a_time([demo], ahead)}"), pnode)
        else:
            print(f"run ahead: {two_at_a_time([pnode, demo], ahead)}")
    finally:
        print("pnode guest figures:", json.dumps(_FIGURES))


def pnode_guest_scenario(pnode_image: PnodeImage, tmp_path: Path,
                         figures: dict[str, object]) -> None:
    """What the module's docstring says, in one boot; the seconds of each step and the
    measured round trips go into ``figures``."""
    minimal, state, key = pnode_image.minimal, pnode_image.state, pnode_image.key
    if _ABORTED.is_set():
        pytest.skip("the session stopped before the pnode guest started")
    image = vnode_tarball(minimal, state)
    t_start = time.monotonic()
    lab = PxeLab(uniq("pg"), state, "pnode", [NODE], tmp_path / "lab", serve_command=SERVE)
    front_state = tmp_path / "front"
    front_state.mkdir()
    front = Frontend(lab, front_state, key)
    pf = tmp_path / "sdt-pg.toml"
    disk = tmp_path / "sdt-pg-store.img"
    with open(disk, "wb") as f:
        f.truncate(6 << 30)
    figures.clear()
    with lab, evidence(lab):
        lab.start_serve(ready_timeout=240)
        tap = lab.add_tap()
        g = qemu.Guest(f"{lab.prefix}-{NODE.name}", netns=lab.netns, tap=tap, mac=NODE.mac,
                       memory=MEMORY_MIB, disks=[disk], timeout=BOOT_TIMEOUT,
                       log=lab.workdir / f"{NODE.name}.console.log")
        lab.guests.append(g)
        wait_logins(lab, [(g, NODE)], BOOT_TIMEOUT)
        figures["login_s"] = round(time.monotonic() - g.started, 1)
        g.login(timeout=120)
        lap = time.monotonic()

        def step(name: str) -> None:
            """Seconds since the previous step, into the figures (where a slow run went)."""
            nonlocal lap
            now = time.monotonic()
            figures[f"{name}_s"] = round(now - lap, 1)
            lap = now

        # what the SIDUS root gives: an overlay, systemd on the unified cgroup v2 hierarchy
        assert g.sh("findmnt -n -o FSTYPE /") == "overlay"
        assert g.sh("stat -f -c %T /sys/fs/cgroup") == "cgroup2fs"
        assert "memory" in g.sh("cat /sys/fs/cgroup/cgroup.controllers").split()
        # the boot's own jobs done before the frontend comes (a TCG guest is slow enough)
        g.sh("systemctl is-system-running --wait", timeout=300, check=False)
        step("settle")

        # the frontend reaches its sshd with the key the image carries; sidusctl is there
        # and the kernel has what the namespace pnodes lack
        r = front.ssh("hostname; sidusctl pnode facts --json")
        assert r.returncode == 0, r.stderr
        name, facts_text = r.stdout.split("\n", 1)
        assert name == NODE.name, r.stdout
        facts = json.loads(facts_text)
        assert facts["kernel"]["netem"] and facts["kernel"]["vxlan"], facts
        assert "memory" in facts["cgroup"]["v2"] and facts["tools"]["lxc"], facts
        step("ssh_facts")

        pf.write_text(platform_text(front, image))
        rc, out, err = front.cli("pnode", "check", str(pf), "--json")
        step("check")
        assert rc == 1, out + err
        assert any("not initialised" in s for s in json.loads(out)[NODE.name]), out

        # the store: btrfs on the guest's own disk, then the image sent by pnode init
        r = front.ssh("sidusctl vnode init --btrfs-device /dev/vda")
        assert r.returncode == 0 and "(btrfs)" in r.stdout + r.stderr, r.stdout + r.stderr
        step("store_init")
        rc, out, err = front.cli("pnode", "init", str(pf), "--json")
        assert rc == 0 and "sent" in json.loads(out)[NODE.name], out + err
        step("pnode_init")
        rc, out, err = front.cli("pnode", "check", str(pf), "--json")
        assert rc == 0 and json.loads(out) == {NODE.name: []}, out + err
        step("check_again")

        try:
            rc, out, err = front.cli("vnode", "up", str(pf), "--json", "--timeout", "600")
            assert rc == 0, out + err
            step("up")
            report = json.loads(out)
            assert sorted(report["pnodes"][NODE.name]["started"]) == VNODES, out
            addrs = {v: a["sdt-pg"] for v, a in report["plan"]["addresses"].items()}

            # v2 memory limits, in the guest's own cgroup tree
            cg = f"/sys/fs/cgroup/lxc.payload.{VNODES[2]}"
            want = {"memory.high": str(MEM["soft"] << 20), "memory.max": str(MEM["hard"] << 20),
                    "memory.swap.max": str(MEM["swap"] << 20)}
            got = {f: g.sh(f"cat {cg}/{f}") for f in want}
            assert got == want, (cg, got)
            assert g.sh(f"cat /sys/fs/cgroup/lxc.payload.{VNODES[0]}/memory.max") == "max"
            # a process growing past the hard limit is killed by the OOM killer
            res = front.exec_json(pf, VNODES[2], "dd", "if=/dev/zero", "of=/dev/null",
                                  "bs=160M", "count=1")
            assert res["rc"] == 137, res  # SIGKILL
            events = g.sh(f"cat {cg}/memory.events")
            m = re.search(r"^oom_kill (\d+)$", events, re.M)
            assert m and int(m.group(1)) >= 1, events
            figures["oom_kill"] = int(m.group(1))
            step("limits_and_oom")

            # the latency matrix, measured by ping from every vnode to every other
            matrix = tmp_path / "matrix"
            matrix.write_text(" ".join(VNODES) + "\n"
                              + "".join(" ".join(map(str, row)) + "\n" for row in MATRIX))
            rc, out, err = front.cli("vnode", "latency-matrix", "--platform", str(pf),
                                     str(matrix))
            assert rc == 0, out + err
            step("latency_matrix")
            rc, out, err = front.cli(
                "vnode", "exec", "--platform", str(pf), "--json", "sdt-pg[1-3]", "--", "sh",
                "-c", ping_all(addrs))
            assert rc == 0, out + err
            answers = json.loads(out)
            measured: dict[str, dict[str, float]] = {}
            for i, src in enumerate(VNODES):
                got_ms = rtts(str(answers[src]["stdout"]))
                for j, dst in enumerate(VNODES):
                    if i == j:
                        continue
                    asked = float(MATRIX[i][j] + MATRIX[j][i])
                    samples = sorted(got_ms.get(dst, []))
                    assert len(samples) >= PINGS // 2, (src, dst, answers[src])
                    median = samples[len(samples) // 2]
                    measured[f"{src}->{dst}"] = {"asked": asked, "median": median,
                                                 "min": samples[0], "max": samples[-1]}
                    assert abs(median - asked) <= 0.1 * asked, (src, dst, asked, samples)
            figures["rtt_ms"] = measured
            step("pings")
        finally:
            rc, out, err = front.cli("vnode", "down", str(pf))
        assert rc == 0, out + err
        step("down")
        # nothing left on the pnode: no container, no vnode root, no cgroup
        assert g.sh("ls /var/lib/sidusctl/vnode/store/vnodes") == ""
        assert g.sh("ls -d /sys/fs/cgroup/lxc.payload.* 2>/dev/null | wc -l") == "0"
        figures["total_s"] = round(time.monotonic() - t_start, 1)
    with contextlib.suppress(OSError):
        disk.unlink()
