"""``sidusctl demo``: what README's first command ends with, run the way README runs it (the
real CLI on the shared ``minimal`` image): a diskless qemu machine PXE-boots through serve-pxe
in a namespace to a login prompt, then a cow vnode answers SSH; afterwards nothing named after
the demo's prefix is left (links, namespaces, mounts, loop devices, directories, processes).

The demo itself (:func:`readme_demo`) runs in tests/test_pnode_guest.py, two at a time with
other tests' guests; this file has its bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, SIDUSCTL, BuiltImage, sidusctl

pytestmark = [pytest.mark.slow,  # the built image, qemu and LXC
              pytest.mark.skipif(os.geteuid() != 0, reason="the demo needs root")]

PREFIX = "sdt-demo"


def _left_behind(prefix: str = PREFIX) -> list[str]:
    left = []
    with open("/proc/self/mountinfo") as f:
        left += [ln.split()[4] for ln in f if prefix in ln.split()[4]]
    for argv in (["ip", "-o", "link"], ["ip", "netns", "list"], ["losetup", "-a"],
                 ["pgrep", "-a", "-f", prefix], ["lxc-ls", "-1"]):
        out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        left += [ln for ln in out.splitlines() if prefix in ln and "pytest" not in ln]
    left += [str(p) for p in Path("/var/tmp").glob(f"{prefix}*")]
    left += [str(p) for p in Path("/run/lock").glob(f"sidusctl-*-{prefix}*.lock")]
    return left


def readme_demo(minimal_image: BuiltImage) -> None:
    """A scenario: README's first command's last step, ``sidusctl demo minimal``, to its end.
    Run by tests/test_pnode_guest.py, two at a time with other tests' guests (one core each
    while the guests boot)."""
    r = sidusctl("demo", "minimal", "--prefix", PREFIX, "--json", state=minimal_image.state,
                 timeout=1500)
    assert r.returncode == 0, r.stderr[-6000:]
    res = json.loads(r.stdout)
    pxe, vn = res["pxe"], res["vnode"]
    # the PXE guest: its name from the demo inventory, root = overlay over the NFS root
    assert pxe["hostname"] == pxe["node"], pxe
    assert pxe["root_fstype"] == "overlay", pxe
    # the lower layer is the image's own root over NFS from the lab's server
    assert pxe["root_lower"] == f"10.77.0.1:{Path(str(minimal_image.rootfs)).resolve()}", pxe
    assert pxe["address"] and pxe["login_prompt_s"] > pxe["dhcp_ack_s"] > 0, pxe
    # the vnode: ssh with the injected key ran hostname inside; its root is a btrfs snapshot
    assert vn["hostname"] == vn["vnode"] == f"{PREFIX}-v1", vn
    assert vn["fs"] == "cow" and vn["root"].startswith("btrfs "), vn
    assert f"/vnodes/{PREFIX}-v1/rootfs" in vn["root"], vn
    assert _left_behind() == []


def test_demo_bad_input(minimal_image: BuiltImage, tmp_path: Path) -> None:
    r = sidusctl("demo", "nosuchimage", state=minimal_image.state)
    assert r.returncode == 4 and "no image 'nosuchimage'" in r.stderr, r.stderr
    r = sidusctl("demo", "minimal", "--prefix", "Bad_Prefix", state=minimal_image.state)
    assert r.returncode == 2 and "--prefix" in r.stderr and "lower-case" in r.stderr, r.stderr
    # another state directory without the image: refused before anything is created
    empty = tmp_path / "state"
    r = sidusctl("demo", "minimal", "--skip-pxe", state=empty)
    assert r.returncode == 4, r.stderr
    assert _left_behind() == []


def test_a_killed_vnode_demo_is_undone_by_the_next(minimal_image: BuiltImage) -> None:
    """``sidusctl demo --skip-pxe`` SIGKILLed once its vnode answers SSH can undo nothing: its
    store stays mounted on its loop device with the vnode's container running. The next demo
    with that prefix undoes it first (sidusctl.vnode.demo.reclaim), runs, and afterwards
    nothing of either is left."""
    prefix = "sdt-dk"
    proc = subprocess.Popen([*SIDUSCTL, "--state-dir", str(minimal_image.state), "demo",
                             "minimal", "--skip-pxe", "--prefix", prefix],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, start_new_session=True)
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "SSH answers" in line:
                break
        else:
            raise AssertionError("the vnode never answered SSH:\n" + "".join(seen))
        proc.kill()  # the demo alone, as the OOM killer would
        proc.communicate(timeout=60)
        left = _left_behind(prefix)
        # the case is real: its store is still mounted, its directory and lock file still there
        assert any(f"/var/tmp/{prefix}-" in ln and ln.endswith("/store") for ln in left), left
        assert any(ln.startswith(f"/run/lock/sidusctl-vnode-demo-{prefix}") for ln in left), left
        r = sidusctl("demo", "minimal", "--skip-pxe", "--prefix", prefix, "--json",
                     state=minimal_image.state, timeout=900)
        assert r.returncode == 0, r.stderr[-4000:]
        assert "was killed without cleaning up" in r.stderr, r.stderr[-4000:]
        assert json.loads(r.stdout)["vnode"]["hostname"] == f"{prefix}-v1"
        assert _left_behind(prefix) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if _left_behind(prefix):  # the test failed: undo what the killed demo left
            from sidusctl.vnode.demo import reclaim

            for d in Path("/var/tmp").glob(f"{prefix}-*"):
                reclaim(d, 0)
            for lk in Path("/run/lock").glob(f"sidusctl-vnode-demo-{prefix}.lock"):
                lk.unlink()
