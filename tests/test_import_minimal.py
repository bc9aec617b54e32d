"""A Debian image: buildah ``FROM scratch`` + the ``minimal`` rootfs tarball (built by
``sidusctl build minimal --tar``), a layer of changes on top, imported and compared with
``umoci unpack``; systemd is found in it, so the CMD becomes an enabled systemd unit."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import sidusctl
from tests.oci_helpers import Buildah, diff_trees, sdt_tempdir, tree, umoci_unpack, without

# a module fixture asks for minimal_image (request.getfixturevalue): tests/conftest.py
# starts its build in the background at the session's start when this module is in it
USES_MINIMAL_IMAGE = True
pytestmark = [pytest.mark.slow,  # the built minimal image and an LXC boot
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


@pytest.fixture
def base_tarball(request: pytest.FixtureRequest) -> Path:
    """The minimal image's tarball (SIDUSCTL_IMPORT_DEV_ROOTFS=DIR: a tarball of DIR instead,
    for developers iterating before the shared image exists)."""
    dev = os.environ.get("SIDUSCTL_IMPORT_DEV_ROOTFS")
    if dev:
        out = Path("/var/tmp/sdt-import-dev-base.tar")
        if not out.exists():
            subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C",
                            dev, "-cf", str(out), "."], check=True)
        return out
    img: Any = request.getfixturevalue("minimal_image")
    assert img.tarball is not None, "the minimal image was built without --tar"
    return Path(img.tarball)


def _attach(name: str, lxcpath: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["lxc-attach", "-n", name, "-P", str(lxcpath), "--", *cmd],
                          capture_output=True, text=True, timeout=60)


def _boot_systemd_and_check_unit(gen: Path, work: Path) -> None:
    """Start the image in LXC with systemd as init (the generated snippet says so): the
    enabled unit must be active, its process /bin/sleep running as uid 1500 in /srv/svc."""
    import time

    name = f"sdt-impsd-{os.getpid()}"
    lxcpath = work / "sdt-lxcpath"
    lxcpath.mkdir()
    conf = lxcpath / "config"
    conf.write_text(f"lxc.uts.name = {name}\nlxc.rootfs.path = dir:{gen / 'rootfs'}\n"
                    "lxc.include = /usr/share/lxc/config/common.conf\n"
                    "lxc.apparmor.profile = unconfined\n"
                    "lxc.mount.auto = proc:mixed sys:mixed cgroup:mixed\n"
                    "lxc.net.0.type = empty\n"
                    f"lxc.include = {gen / 'lxc.conf'}\n")
    try:
        r = subprocess.run(["lxc-start", "-n", name, "-P", str(lxcpath), "-f", str(conf), "-d",
                            "-o", str(lxcpath / "log"), "-l", "INFO"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr + (lxcpath / "log").read_text()
        state = ""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            state = _attach(name, lxcpath, "systemctl", "is-active", "oci-cmd").stdout.strip()
            if state in ("active", "failed"):
                break
            time.sleep(1)
        assert state == "active", _attach(name, lxcpath, "systemctl", "status",
                                          "oci-cmd").stdout
        pid = _attach(name, lxcpath, "systemctl", "show", "-p", "MainPID", "--value",
                      "oci-cmd").stdout.strip()
        ps = _attach(name, lxcpath, "ps", "-o", "uid=,gid=,args=", "-p", pid).stdout.split()
        assert ps == ["1500", "1500", "/bin/sleep", "infinity"]
        cwd = _attach(name, lxcpath, "readlink", f"/proc/{pid}/cwd").stdout.strip()
        assert cwd == "/srv/svc"
    finally:
        subprocess.run(["lxc-stop", "-n", name, "-P", str(lxcpath), "-k"], capture_output=True,
                       timeout=60)


def test_minimal_based_image(base_tarball: Path) -> None:
    b = Buildah()
    with sdt_tempdir() as work, sdt_tempdir("sdt-state-") as state:
        try:
            # the tarball less kernel modules, /boot and apt's cache (2/3 of its size): the
            # test budget is minutes, and none of them matters to layer semantics
            tree_dir = work / "base"
            tree_dir.mkdir()
            flags = ["--numeric-owner", "--xattrs", "--xattrs-include=*"]
            subprocess.run(["tar", *flags, "-C", str(tree_dir), "-x", "-f", str(base_tarball),
                            "--exclude=./usr/lib/modules", "--exclude=./boot",
                            "--exclude=./var/cache"], check=True)
            plain = work / "base.tar"
            subprocess.run(["tar", *flags, "-C", str(tree_dir), "-c", "-f", str(plain), "."],
                           check=True)
            subprocess.run(["rm", "-rf", str(tree_dir)], check=True)
            c1 = b("from", "scratch")
            b("add", c1, str(plain), "/")  # a local tar is extracted into the image
            b("commit", "-q", c1, "sdt-min1")
            c2 = b("from", "sdt-min1")
            b.run(c2, "rm -rf /usr/share/doc && rm /etc/motd && rm -rf /etc/skel && "
                      "echo file > /etc/skel && ln /etc/os-release /etc/os-release.hard && "
                      "useradd -u 1500 -U -m -d /srv/svc svc && "
                      "rm -rf /var/lib/dpkg/info && mkdir /var/lib/dpkg/info && "
                      "touch /var/lib/dpkg/info/new")
            b("config", "--cmd", '["/bin/sleep", "infinity"]', "--user", "svc",
              "--workingdir", "/srv/svc", "--env", "MODE=test run", c2)
            b("commit", "-q", c2, "sdt-min2")
            layout = work / "oci"
            b("push", "--disable-compression", "sdt-min2", f"oci:{layout}:v1")
            r = sidusctl("import", f"oci:{layout}:v1", "sdt-min", "--json", state=state,
                         timeout=600)
            assert r.returncode == 0, r.stderr
            out = json.loads(r.stdout)
            root = Path(out["rootfs"])
            assert out["init"] == "systemd"
            assert out["unit"] == "oci-cmd.service" and (out["uid"], out["gid"]) == (1500, 1500)
            unit = (root / "etc/systemd/system/oci-cmd.service").read_text()
            assert 'ExecStart="/bin/sleep" "infinity"' in unit and "User=1500" in unit
            assert 'Environment="MODE=test run"' in unit
            assert (root / "etc/systemd/system/multi-user.target.wants/oci-cmd.service"
                    ).is_symlink()
            want = tree(umoci_unpack(layout, "v1", work / "umoci"))
            got = without(tree(root), out["files"], want)
            assert diff_trees(got, want) == []
            assert not (root / "usr/share/doc").exists() and (root / "etc/skel").is_file()
            assert os.listdir(root / "var/lib/dpkg/info") == ["new"]
            _boot_systemd_and_check_unit(root.parent, work)
        finally:
            b.cleanup()
