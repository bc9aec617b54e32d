"""Test helpers shared by the vnode test modules: the image they create vnodes from, and the
clean-up of whatever a failed test left (containers, mounts, links)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest


def vnode_image(request: pytest.FixtureRequest) -> str:
    """The image vnodes are created from: ``$SIDUSCTL_VNODE_TEST_IMAGE``, else the tarball
    of the suite's shared ``minimal`` build (the ``minimal_image`` fixture)."""
    env = os.environ.get("SIDUSCTL_VNODE_TEST_IMAGE")
    if env:
        return env
    img = request.getfixturevalue("minimal_image")
    assert img.tarball is not None, "the minimal image has no tarball"
    return str(img.tarball)


def force_cleanup(state: Path, prefix: str) -> None:
    """Whatever the tests of ``state`` left: its containers (stopped; processes left in the
    cgroups of containers named ``prefix*`` killed), mounts below it, links named
    ``prefix*``, the directory."""
    lxcpath = state / "vnode" / "lxc"
    if lxcpath.is_dir():
        for d in lxcpath.iterdir():
            subprocess.run(["lxc-stop", "-P", str(lxcpath), "-n", d.name, "-k"],
                           capture_output=True, check=False)
    # containers whose config is already gone: kill what is left in their cgroups
    cgroups = list(Path("/sys/fs/cgroup/pids").glob(f"lxc.payload.{prefix}*"))
    for cg in cgroups:
        with contextlib.suppress(OSError):
            for pid in (cg / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
    if cgroups:
        time.sleep(1)
    for _ in range(3):
        r = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True)
        targets = [t for t in r.stdout.split() if t.startswith(str(state))]
        for t in sorted(targets, key=len, reverse=True):
            subprocess.run(["umount", "-l", t], check=False)
    r = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True)
    for ln in r.stdout.splitlines():
        name = ln.split(":")[1].strip().split("@")[0]
        if name.startswith(prefix):
            subprocess.run(["ip", "link", "del", name], check=False)
    shutil.rmtree(state, ignore_errors=True)


def tear_down(state: Path, prefix: str) -> None:
    """The end of a module's platform: every vnode destroyed and every vnetwork deleted
    through the CLI (what a user would do), the store deinitialized, then
    :func:`force_cleanup` for whatever that left."""
    import json

    from tests.conftest import sidusctl

    r = sidusctl("vnode", "list", "--json", state=state)
    names = [v["name"] for v in json.loads(r.stdout)] if r.returncode == 0 else []
    if names:
        sidusctl("vnode", "destroy", *names, state=state)
    r = sidusctl("vnode", "net", "list", "--json", state=state)
    for n in json.loads(r.stdout) if r.returncode == 0 else []:
        sidusctl("vnode", "net", "delete", n["name"], state=state)
    sidusctl("vnode", "deinit", state=state)
    force_cleanup(state, prefix)
