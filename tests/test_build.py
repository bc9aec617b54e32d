"""The real build of images/minimal (shared fixture) checked against its recipe, and the
chroot, update, image and tarball commands run for real on it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from sidusctl.image import apparmor, recipe
from sidusctl.subsys.chroot import ChrootSession
from tests.conftest import BuiltImage, _mounts_under, sidusctl

pytestmark = pytest.mark.slow


def dpkg_status(root: Path) -> dict[str, str]:
    out = subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f",
                          "${Package}\t${db:Status-Abbrev}\n"], capture_output=True, text=True,
                         check=True).stdout
    return {ln.split("\t")[0]: ln.split("\t")[1].strip() for ln in out.splitlines()}


def test_build_outputs_exist_and_manifest_matches(minimal_image: BuiltImage) -> None:
    img = minimal_image
    m = img.manifest
    rec = recipe.find("minimal")
    assert m["recipe"]["sha256"] == rec.digest()
    assert m["suite"] == "bookworm" and m["arch"] == "amd64" and m["backend"] == "debootstrap"
    assert img.kernel.stat().st_size > 4_000_000          # a real bzImage
    assert img.initrd.stat().st_size > 4_000_000
    assert img.tarball is not None and img.tarball.name == "minimal.tar.zst"
    # the package list in the manifest is what dpkg says, versions included
    status = dpkg_status(img.rootfs)
    installed = {p for p, s in status.items() if s.startswith("ii")}
    assert set(m["packages"]) == installed
    assert all(v["version"] and v["arch"] for v in m["packages"].values())
    assert m["sizes"]["rootfs_bytes"] > 200 * 2**20
    assert {"configure", "manifest", "export", "total"} <= set(m["timings_s"])
    # bootstrap and packages ran, or their result came from the stage cache (restore)
    assert {"bootstrap", "packages"} <= set(m["timings_s"]) or "restore" in m["timings_s"]
    # one record per stage, each saying what happened and why
    # (an image kept from a run before stage records existed has none: SIDUSCTL_TEST_REUSE=1)
    stages = {s["name"]: s for s in m.get("build_stages", [])}
    if stages or "restore" in m["timings_s"] or "packages" in m["timings_s"]:
        assert {"bootstrap", "packages", "locales", "files", "initramfs"} <= set(stages)
        assert all(s["action"] in ("ran", "reused", "skipped") and s["reason"]
                   for s in stages.values())
    # nothing of the build session is left behind
    assert _mounts_under(img.state) == []
    assert not (img.rootfs / ".sidusctl-session.json").exists()
    assert list((img.rootfs / "run").iterdir()) == [] and list((img.rootfs / "tmp").iterdir()) == []
    # debootstrap's copies of the .debs went to the shared cache, not into the image
    assert list((img.rootfs / "var/cache/apt/archives").glob("*.deb")) == []


def test_include_exclude_and_purge_are_honoured(minimal_image: BuiltImage) -> None:
    rec = recipe.find("minimal")
    status = dpkg_status(minimal_image.rootfs)
    for p in (*rec.include, *rec.packages):
        assert status.get(p, "").startswith("ii"), f"{p} not installed"
    # openssh-client Recommends xauth and recommends are on: only the exclude keeps it out
    assert status["openssh-client"].startswith("ii")
    assert rec.install_recommends
    for p in rec.exclude:
        assert not status.get(p, "un").startswith("ii"), f"excluded {p} installed"
    pins = (minimal_image.rootfs / "etc/apt/preferences.d/90sidusctl-exclude").read_text()
    assert "Package: xauth\nPin: release *\nPin-Priority: -1" in pins
    # ncurses-term came with openssh-server's Recommends, then the purge removed it
    assert minimal_image.manifest["purged"] == ["ncurses-term"]
    assert not status.get("ncurses-term", "un").startswith("ii")


def test_services_were_inhibited_during_the_build(minimal_image: BuiltImage) -> None:
    if "restored from cache entry" in minimal_image.log:
        pytest.skip("the package stage of this build came from the stage cache (a kept state "
                    "directory, SIDUSCTL_TEST_REUSE=1): no package was configured in it")
    # invoke-rc.d asked our policy-rc.d while openssh-server was configured, and was told no
    assert "policy-rc.d denied execution of start" in minimal_image.log
    assert not (minimal_image.rootfs / "usr/sbin/policy-rc.d").exists()
    # the base came from debootstrap, run now or earlier and kept in the bootstrap cache (a CI
    # machine that built before keeps /var/cache/sidusctl-test): the log says which
    ran = "run: debootstrap" in minimal_image.log or "debootstrap --arch=amd64" in minimal_image.log
    cached = "bootstrap from cache " in minimal_image.log
    assert ran != cached, "the log names neither (or both) of debootstrap and the bootstrap cache"
    assert minimal_image.manifest["bootstrap_from_cache"] is cached


def test_locale_timezone_keyboard_site_files_and_tricks(minimal_image: BuiltImage) -> None:
    rec = recipe.find("minimal")
    root = minimal_image.rootfs
    assert (root / "etc/timezone").read_text().strip() == rec.timezone
    assert os.readlink(root / "etc/localtime") == f"/usr/share/zoneinfo/{rec.timezone}"
    assert (root / "etc/default/locale").read_text().strip() == f"LANG={rec.locales[0]}"
    out = subprocess.run(["chroot", str(root), "locale", "-a"], capture_output=True, text=True,
                         check=True).stdout.split()
    for loc in rec.locales:
        assert loc.replace("UTF-8", "utf8") in out, (loc, out)
    assert rec.keyboard is not None
    kb = (root / "etc/default/keyboard").read_text()
    assert f'XKBLAYOUT="{rec.keyboard.layout}"' in kb
    # a rendered template site file
    motd = (root / "etc/motd").read_text()
    assert "sidusctl lab" in motd and "minimal (bookworm/amd64)" in motd
    assert stat.S_IMODE((root / "etc/motd").stat().st_mode) == 0o644
    # owner and group resolved in the IMAGE's /etc/group, not the host's
    st = (root / "etc/sidus/node.conf").stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 0
    image_gid = next(int(ln.split(":")[2]) for ln in (root / "etc/group").read_text().splitlines()
                     if ln.startswith("_ssh:"))
    assert st.st_gid == image_gid
    # tricks
    assert not (root / "etc/hostname").exists()
    ifaces = (root / "etc/network/interfaces").read_text()
    assert "iface lo inet loopback" in ifaces and "eth0" not in ifaces
    limits = (root / "etc/security/limits.d/90-sidusctl.conf").read_text()
    assert all(line in limits for line in rec.tricks.limits)
    # root's password was set (hashed) from the recipe
    shadow = (root / "etc/shadow").read_text()
    assert shadow.startswith("root:$")


def test_apparmor_policy_cache_is_compiled_for_the_images_kernel(
        minimal_image: BuiltImage) -> None:
    """The build compiled every profile into the cache directory named by the features of
    the image's kernel (sidusctl/image/apparmor.py); the booted node's use of it is
    checked in tests/test_squashfs_boot.py."""
    root = minimal_image.rootfs
    stages = {s["name"]: s for s in minimal_image.manifest.get("build_stages", [])}
    if stages:  # an image kept from before stage records (SIDUSCTL_TEST_REUSE=1) has none
        assert stages["apparmor-cache"]["action"] == "ran", stages["apparmor-cache"]
    profiles = sorted(p.name for p in (root / "etc/apparmor.d").iterdir() if p.is_file())
    assert "sbin.dhclient" in profiles
    caches = sorted((root / "var/cache/apparmor").iterdir())
    assert len(caches) == 1 and caches[0].name.endswith(".0"), caches
    assert sorted(p.name for p in caches[0].iterdir()) == sorted([".features", *profiles])
    assert (caches[0] / ".features").read_bytes() == \
        (apparmor.FEATURES_DIR / "6.1.features").read_bytes()
    # each no older than its profile (the parser gives it the newest mtime of the profile
    # and its includes): the node's parser uses a cache only then
    for n in profiles:
        assert (caches[0] / n).stat().st_mtime >= (root / "etc/apparmor.d" / n).stat().st_mtime
    # nothing of the compilation left in the root
    assert not (root / apparmor.FEATURES_IN_ROOT.lstrip("/")).exists()


def test_a_profile_the_parser_refuses_is_a_warning_and_the_others_are_cached(
        minimal_image: BuiltImage, tmp_path: Path) -> None:
    """A profile the image's parser cannot compile (written into an overlay on the shared
    root, so the image is not touched): compile_cache names it and caches the others."""
    lower = minimal_image.rootfs
    upper, work, merged = (tmp_path / n for n in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "sdt-aa-broken",
                    "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)],
                   check=True)
    try:
        cache = merged / "var/cache/apparmor"
        for d in cache.iterdir():
            shutil.rmtree(d)
        (merged / "etc/apparmor.d/sdt-broken").write_text(
            "profile sdt-broken /usr/bin/true {\n  this is no rule,\n}\n")
        with ChrootSession(merged, resolv=False) as s:
            made, failed = apparmor.compile_cache(s, apparmor.plan(merged))
        assert len(failed) == 1 and "sdt-broken" in failed[0], failed
        assert len(made) == 1
        cached = {p.name for p in (merged / made[0]).iterdir()}
        assert {"sbin.dhclient", "lsb_release"} <= cached and "sdt-broken" not in cached
        assert not (merged / apparmor.FEATURES_IN_ROOT.lstrip("/")).exists()
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_tarball_extracts_to_the_same_tree(minimal_image: BuiltImage, tmp_path: Path) -> None:
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-I", "zstd",
                    "-xpf", str(minimal_image.tarball), "-C", str(dest)], check=True)
    src = minimal_image.rootfs

    def walk(base: Path) -> dict[str, tuple[object, ...]]:
        out: dict[str, tuple[object, ...]] = {}
        for dirpath, dirs, files in os.walk(base):
            for n in dirs + files:
                p = Path(dirpath) / n
                st = p.lstat()
                rel = str(p.relative_to(base))
                link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
                digest = None
                if stat.S_ISREG(st.st_mode):
                    digest = hashlib.sha256(p.read_bytes()).hexdigest()
                dev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else None
                mtime = None if stat.S_ISDIR(st.st_mode) else int(st.st_mtime)
                out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size if digest else None,
                            link, digest, dev, mtime)
        return out

    a, b = walk(src), walk(dest)
    assert len(a) > 5000
    missing = sorted(set(a) - set(b))[:10]
    extra = sorted(set(b) - set(a))[:10]
    assert not missing and not extra, (missing, extra)
    diff = [k for k in a if a[k] != b[k]][:10]
    assert not diff, [(k, a[k], b[k]) for k in diff]
    # file capabilities (an xattr) survive: ping is installed with cap_net_raw
    caps = subprocess.run(["getfattr", "-n", "security.capability", "--only-values",
                           str(dest / "usr/bin/ping")], capture_output=True, check=False)
    assert caps.returncode == 0 and caps.stdout


def test_chroot_runs_a_command_with_the_session_and_cleans_up(minimal_image: BuiltImage) -> None:
    st = minimal_image.state
    res = sidusctl("chroot", "minimal", "sh", "-c",
                   "cat /etc/debian_version; test -x /usr/sbin/policy-rc.d && /usr/sbin/policy-rc.d;"
                   " echo rc=$?; findmnt -n -o FSTYPE /proc; sleep 300 & echo started", state=st)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split()
    assert lines[0] == (minimal_image.rootfs / "etc/debian_version").read_text().strip()
    assert "rc=101" in lines and "proc" in lines and "started" in lines
    # the stray `sleep 300` was killed, the mounts undone, policy-rc.d removed
    assert _mounts_under(minimal_image.rootfs) == []
    assert not (minimal_image.rootfs / "usr/sbin/policy-rc.d").exists()
    ps = subprocess.run(["pgrep", "-f", "sleep 300"], capture_output=True, text=True, check=False)
    for pid in ps.stdout.split():
        assert not os.readlink(f"/proc/{pid}/root").startswith(str(minimal_image.state))
    # a failing command's exit code comes through
    assert sidusctl("chroot", "minimal", "sh", "-c", "exit 7", state=st).returncode == 7


def test_image_list_and_show(minimal_image: BuiltImage) -> None:
    st = minimal_image.state
    res = sidusctl("image", "list", "--json", state=st)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    row = next(r for r in rows if r["name"] == "minimal")
    assert row["rootfs"] == str(minimal_image.rootfs)
    assert row["kernel"] == str(minimal_image.kernel)
    res = sidusctl("image", "show", "minimal", "--json", "--packages", state=st)
    m = json.loads(res.stdout)
    assert m["packages"]["openssh-server"]["version"]
    assert sidusctl("image", "show", "nope", state=st).returncode == 4


def test_update_runs_in_a_new_generation_and_can_roll_back(minimal_image: BuiltImage) -> None:
    st = minimal_image.state
    before = minimal_image.dir
    res = sidusctl("update", "minimal", "--json", state=st, timeout=900)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    from sidusctl.subsys.imagestore import ImageStore

    store = ImageStore(st)
    cur = store.get("minimal")
    assert cur.dir != before and store.get("minimal", "previous").dir == before
    assert "updated" in cur.manifest and isinstance(out["changed"], dict)
    assert cur.tarball is not None and cur.kernel.exists()
    assert _mounts_under(st) == []
    assert not (cur.rootfs / "usr/sbin/policy-rc.d").exists()
    # roll back so the other tests keep the image they were given
    assert sidusctl("image", "rollback", "minimal", state=st).returncode == 0
    assert store.get("minimal").dir == before


def test_mmdebstrap_backend_and_the_bootstrap_cache(tmp_path: Path) -> None:
    """The second backend, on the benchmark's like-for-like minbase recipe: the first build saves
    the bootstrap as a plain tar and compresses it beside the build (only the .tar.zst is left),
    the second build restores it instead of running mmdebstrap and ends with the same packages."""
    state, apt = tmp_path / "sdt-state", tmp_path / "apt"
    boot = tmp_path / "bootstrap"  # the bootstrap cache lives next to the apt cache
    argv = ["--debug", "build", "bench/recipes/minbase", "--backend", "mmdebstrap",
            "--cache-dir", str(apt), "--json"]
    first = sidusctl(*argv, state=state, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "run: /usr/bin/mmdebstrap --variant=minbase" in first.stderr
    assert "saving bootstrap cache" in first.stderr
    left = sorted(p.name for p in boot.iterdir())
    assert len(left) == 1 and left[0].endswith(".tar.zst"), left
    m1 = json.loads(first.stdout)
    assert m1["image"] == "minbase" and m1["packages"] > 80
    man1 = json.loads((state / "images/minbase/current/manifest.json").read_text())
    assert man1["backend"] == "mmdebstrap" and man1["bootstrap_from_cache"] is False

    # the stage cache would restore the whole root: empty it, so the bootstrap cache is used
    assert sidusctl("image", "cache", "prune", "--max-size", "0", state=state).returncode == 0
    second = sidusctl(*argv, state=state, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"bootstrap from cache {boot / left[0]}" in second.stderr
    assert "run: /usr/bin/mmdebstrap" not in second.stderr
    man2 = json.loads((state / "images/minbase/current/manifest.json").read_text())
    assert man2["bootstrap_from_cache"] is True
    assert man2["packages"] == man1["packages"]
    assert sorted(p.name for p in boot.iterdir()) == left
    assert _mounts_under(state) == []


def test_background_compress_finishes_or_is_abandoned_cleanly(tmp_path: Path) -> None:
    from sidusctl.image.bootstrap import prune as _prune
    from sidusctl.subsys.tarball import BackgroundCompress
    data = os.urandom(1 << 20) * 48  # 48 MiB, compressible, long enough to kill mid-way
    for ending in ("finish", "abandon"):
        d = tmp_path / ending
        d.mkdir()
        tar = d / "bookworm-amd64-k.tar"
        tar.write_bytes(data)
        z = BackgroundCompress(tar, d / "bookworm-amd64-k.tar.zst", level=1)
        getattr(z, ending)()
        names = sorted(p.name for p in d.iterdir())
        if ending == "finish":
            assert names == ["bookworm-amd64-k.tar.zst"]
            out = subprocess.run(["zstd", "-dc", str(d / names[0])], capture_output=True,
                                 check=True).stdout
            assert hashlib.sha256(out).digest() == hashlib.sha256(data).digest()
        else:  # killed: no temp file, the plain tar stays a valid entry
            assert names == ["bookworm-amd64-k.tar"]
            assert tar.read_bytes() == data
    # _prune keeps the newest entries, whichever form they are in, and old temp files go
    d = tmp_path / "prune"
    d.mkdir()
    for i, name in enumerate(["a.tar.zst", "b.tar", "c.tar.zst", ".d.tar.zst.tmp"]):
        (d / name).write_bytes(b"x")
        os.utime(d / name, (1e9 + i, 1e9 + i))
    _prune(d, keep=2)
    assert sorted(p.name for p in d.iterdir()) == ["b.tar", "c.tar.zst"]
