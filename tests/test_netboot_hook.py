"""The netboot hook installer (no boot here: tests/test_netboot.py boots) and the shell
standard for boot scripts (POSIX sh, shellcheck-clean)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from sidusctl.core.errors import ConfigError, SidusError
from sidusctl.core.paths import initramfs_dir
from sidusctl.subsys.initramfs import install_netboot_hook, shipped_files
from tests.shell_util import shell_function


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
                            it / "scripts/sidus", it / "scripts/nfs-top/sidus-link",
                            it / "scripts/init-top/sidus-nic", it / "modules",
                            it / "conf.d/sidus"}
    for rel in ("hooks/sidus", "scripts/init-bottom/sidus", "scripts/sidus",
                "scripts/nfs-top/sidus-link", "scripts/init-top/sidus-nic"):
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


# modprobe as the kernel answers under lockdown for a module whose signature it rejects
# (EKEYREJECTED); a module this kernel does not have at all fails the dry run too
FAKE_MODPROBE = """#!/bin/sh
echo "$*" >>"${0%/*}/calls"
[ "$1" = "-n" ] && { shift; [ "$1" = "aufs" ] && exit 1; exit 0; }
case "$1" in
overlay) echo "modprobe: ERROR: could not insert 'overlay': Key was rejected by service" >&2; exit 1 ;;
aufs) echo "modprobe: FATAL: Module aufs not found" >&2; exit 1 ;;
esac
exit 0
"""


def test_a_refused_module_is_named_on_the_console_and_recorded(tmp_path: Path) -> None:
    """The hook's module loaders, run by dash with a modprobe that fails as a kernel in
    lockdown does for an unsigned module (a boot cannot make one here: Debian's modules are
    all signed, tests/test_secureboot.py boots them): the module is named on the console with
    the lockdown mode and listed for the report; a module the kernel lacks (aufs) is quiet."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "modprobe").write_text(FAKE_MODPROBE)
    (bindir / "modprobe").chmod(0o755)
    # /sys/module as the node's kernel has it: dm-verity loaded (by scripts/sidus' preload),
    # nothing else (this host's own loaded modules must not count)
    sysmod = tmp_path / "sysmodule"
    (sysmod / "dm_verity").mkdir(parents=True)
    (sysmod / "squashfs").mkdir()
    bottom = initramfs_dir() / "scripts/init-bottom/sidus"
    script = ('warn() { echo "sidus: WARNING: $*"; }\nlockdown=integrity\nmodfail=""\n'
              + shell_function(bottom, "load_module").replace("/sys/module", str(sysmod))
              + 'load_module ext4 && echo "ext4 ok"\nload_module overlay || echo "overlay failed"\n'
              'load_module aufs || echo "aufs failed"\n'
              # loaded already: no modprobe (this one would refuse it)
              'load_module squashfs && echo "squashfs loaded"\necho "modfail=$modfail"\n')
    r = subprocess.run(["dash", "-c", script], capture_output=True, text=True, check=True,
                       env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert r.stdout.splitlines() == [
        "ext4 ok",
        "sidus: WARNING: module overlay could not be loaded (kernel lockdown: integrity; a "
        "module without a valid signature is refused): modprobe: ERROR: could not insert "
        "'overlay': Key was rejected by service",
        "overlay failed", "aufs failed", "squashfs loaded", "modfail=overlay"], r.stdout
    # scripts/sidus (boot=sidus) records its own in /run/sidus/modfail for init-bottom
    run_dir = tmp_path / "run"
    sidus = initramfs_dir() / "scripts/sidus"
    script = ('sidus_log() { echo "sidus: $*"; }\n'
              + shell_function(sidus, "sidus_module")
              .replace("/run/sidus", str(run_dir)).replace("/sys/module", str(sysmod))
              + "sidus_module squashfs\nsidus_module overlay\nsidus_module aufs\n"
              # loaded already (its sysfs name, as scripts/sidus asks for it): no modprobe
              + "sidus_module dm_verity && echo 'dm_verity loaded'\n"
              + f"echo \"modfail=$(cat {run_dir}/modfail)\"\n")
    r = subprocess.run(["dash", "-c", script], capture_output=True, text=True, check=True,
                       env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert "sidus: WARNING: module overlay could not be loaded" in r.stdout, r.stdout
    assert "Key was rejected by service" in r.stdout and "aufs" not in r.stdout, r.stdout
    assert r.stdout.splitlines()[-2:] == ["dm_verity loaded", "modfail=overlay"], r.stdout
    # a module /sys/module lists was never handed to modprobe
    calls = (bindir / "calls").read_text().split()
    assert "overlay" in calls and not {"squashfs", "dm-verity", "dm_verity"} & set(calls), calls


#: the awk program init-bottom/sidus ran before it rewrote the fstab with the shell alone:
#: the reference its shell function must agree with
FSTAB_AWK = ('($1 !~ /^#/) && ($2 == "/") '
             '{ print "# sidus: / is an overlay set up by the initramfs: " $0; next } { print }')
FSTABS = {
    "debootstrap": "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n",
    "root": "UUID=1234 / ext4 errors=remount-ro 0 1\n/dev/sda2 none swap sw 0 0\n",
    "tabs, blanks, no final newline": ("\n#\t/ comment\n\tLABEL=root\t/\text4\tdefaults 0 1\n"
                                      "proc /proc proc defaults 0 0\n  \n/dev/vdb /srv ext4 "
                                      "defaults 0 2"),
    "globs and backslashes": "/dev/* / auto defaults 0 0\n//srv/share /mnt\\040x cifs a\\b 0 0\n",
    "two roots, a comment first": "#x / y\n/dev/a / ext4 ro\ntmpfs / tmpfs rw\n",
}


@pytest.mark.parametrize("name", list(FSTABS))
def test_fstab_rewrite_by_the_shell_matches_the_awk_it_replaced(tmp_path: Path,
                                                                 name: str) -> None:
    """init-bottom's ``fstab_without_root`` (dash here, as strict as busybox's ash) comments
    out the entries for / exactly as the awk program it replaced did (run here as the
    reference), and leaves a file without such an entry untouched (not written at all)."""
    text = FSTABS[name]
    fstab = tmp_path / "fstab"
    fstab.write_text(text)
    ref = subprocess.run(["awk", FSTAB_AWK, str(fstab)], capture_output=True, text=True,
                         check=True).stdout
    func = shell_function(initramfs_dir() / "scripts/init-bottom/sidus", "fstab_without_root")
    os.utime(fstab, ns=(0, 0))
    subprocess.run(["dash", "-ec", func + 'fstab_without_root "$1"', "sh", str(fstab)],
                   check=True, cwd=tmp_path)
    out = fstab.read_text()
    if "# sidus:" in ref:
        assert out == ref, (out, ref)
    else:
        # the same text (awk adds a last newline), and not written: its time unchanged
        assert ref in (text, text + "\n") and out == text
        assert fstab.stat().st_mtime_ns == 0
    # nothing written beside it (the fields of a line are the function's $1..: never a path)
    assert [p.name for p in tmp_path.iterdir()] == ["fstab"]


def test_copy_in_copies_text_as_it_is(tmp_path: Path) -> None:
    """init-bottom's ``copy_in`` (which writes the report script and unit without starting
    cat) copies a quoted here-document byte for byte: tabs, backslashes, ``$``, globs, a
    last line without a newline gains one."""
    text = "\tif exec 3<>\"/dev/tcp/$h/$p\"; then\nprintf 'a\\r\\n%s' * \\\n  x\n\nend"
    func = shell_function(initramfs_dir() / "scripts/init-bottom/sidus", "copy_in")
    out = subprocess.run(["dash", "-ec", func + "copy_in"], input=text, capture_output=True,
                         text=True, check=True, cwd=tmp_path).stdout
    assert out == text + "\n"


OLD_REPORT_FILES = ("etc/systemd/system/sidus-report.service",
                    "etc/systemd/system/multi-user.target.wants/sidus-report.service",
                    "usr/local/lib/sidus/report")


def test_the_report_unit_an_older_initramfs_left_is_removed(tmp_path: Path) -> None:
    """init-bottom's ``forget_old_report_unit`` removes from a persistent upper layer the
    report unit, its enablement link and its script that initramfs scripts before the runtime
    unit wrote there (a unit in /etc would win over this boot's in /run), and nothing else;
    on a layer without them it starts no program (run with an empty PATH)."""
    func = shell_function(initramfs_dir() / "scripts/init-bottom/sidus", "forget_old_report_unit")
    script = 'log() { echo "$*"; }\n' + func + 'forget_old_report_unit "$1"'
    upper = tmp_path / "upper"
    for rel in OLD_REPORT_FILES:
        (upper / rel).parent.mkdir(parents=True, exist_ok=True)
    (upper / OLD_REPORT_FILES[0]).write_text("[Service]\n")
    (upper / OLD_REPORT_FILES[1]).symlink_to("../sidus-report.service")
    (upper / OLD_REPORT_FILES[2]).write_text("#!/bin/sh\n")
    kept = ["etc/systemd/system/other.service", "usr/local/lib/sidus/mine", "etc/hostname"]
    for rel in kept:
        (upper / rel).write_text("x\n")
    out = subprocess.run(["dash", "-ec", script, "sh", str(upper)], capture_output=True,
                         text=True, check=True).stdout
    assert "removed the report unit an older initramfs left" in out
    assert not any(os.path.lexists(upper / rel) for rel in OLD_REPORT_FILES)
    assert sorted(str(p.relative_to(upper)) for p in upper.rglob("*") if p.is_file()) == \
        sorted(kept)
    # the link alone (dangling: its unit removed by hand) is removed too
    (upper / OLD_REPORT_FILES[1]).symlink_to("../sidus-report.service")
    subprocess.run(["dash", "-ec", script, "sh", str(upper)], check=True, capture_output=True)
    assert not os.path.lexists(upper / OLD_REPORT_FILES[1])
    # nothing there: no program started, nothing said
    dash = shutil.which("dash")
    assert dash is not None
    done = subprocess.run([dash, "-ec", script, "sh", str(upper)], capture_output=True,
                          text=True, check=True, env={"PATH": ""})
    assert done.stdout == "" and done.stderr == ""
