"""The netboot hook installer (no boot here: tests/test_netboot.py boots) and the shell
standard for boot scripts (POSIX sh, shellcheck-clean)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from sidusctl.core.errors import ConfigError, SidusError
from sidusctl.core.paths import initramfs_dir
from sidusctl.subsys.initramfs import install_netboot_hook, shipped_files


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc/initramfs-tools/conf.d").mkdir(parents=True)
    (root / "etc/initramfs-tools/modules").write_text("# site modules\nbtrfs\n")
    return root


def test_install_copies_scripts_modules_and_conf(tmp_path: Path) -> None:
    root = _root(tmp_path)
    written = install_netboot_hook(root, modules=("overlay", "aufs"), nic="eth0")
    it = root / "etc/initramfs-tools"
    assert set(written) == {it / "hooks/sidus", it / "scripts/init-bottom/sidus",
                            it / "scripts/sidus", it / "modules", it / "conf.d/sidus"}
    for rel in ("hooks/sidus", "scripts/init-bottom/sidus", "scripts/sidus"):
        f = it / rel
        assert stat.S_IMODE(f.stat().st_mode) == 0o755
        assert f.read_bytes() == (initramfs_dir() / rel).read_bytes()
    mods = (it / "modules").read_text()
    assert mods.startswith("# site modules\nbtrfs\n")  # the site's own lines are kept
    assert "overlay\naufs\n" in mods
    conf = (it / "conf.d/sidus").read_text()
    assert "DEVICE=eth0\n" in conf and "MODULES=most\n" in conf and "\nBOOT=" not in conf

    # again, with other modules and no NIC: replaced, not appended
    install_netboot_hook(root, modules=("overlay",))
    mods = (it / "modules").read_text()
    assert mods.count("overlay") == 1 and "aufs" not in mods and "btrfs" in mods
    assert "DEVICE=\n" in (it / "conf.d/sidus").read_text()


def test_install_rejects_bad_input_and_leaves_nothing(tmp_path: Path) -> None:
    root = _root(tmp_path)
    with pytest.raises(ConfigError, match="invalid kernel module name 'over lay'"):
        install_netboot_hook(root, modules=("over lay",))
    with pytest.raises(ConfigError, match="invalid interface name"):
        install_netboot_hook(root, nic="eth0; rm -rf /")
    assert not (root / "etc/initramfs-tools/hooks").exists()
    with pytest.raises(SidusError, match="has no etc/initramfs-tools"):
        install_netboot_hook(tmp_path / "empty")


def test_shipped_files_are_posix_sh_and_shellcheck_clean() -> None:
    files = [initramfs_dir() / rel for rel in shipped_files()]
    assert {str(r) for r in shipped_files()} >= {"hooks/sidus", "scripts/init-bottom/sidus"}
    for f in files:
        assert f.read_text().startswith("#!/bin/sh\n"), f
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed (Debian package 'shellcheck')")
    res = subprocess.run(["shellcheck", "-s", "sh", *map(str, files)], capture_output=True,
                         text=True, check=False)
    assert res.returncode == 0, res.stdout
    # and dash, the initramfs' /bin/sh on the build side, parses them
    for f in files:
        subprocess.run(["dash", "-n", str(f)], check=True)
