"""The package as users get it: the sdist and the wheel carry ``templates/``, ``initramfs/`` and
``images/``, and a wheel installed into a clean venv (dependencies from the package index) finds
them under ``sidusctl/_data`` and never in this checkout.

Slow: builds once per module (``python -m build``, sdist then the wheel from the sdist, with
setuptools from the index) from a copy of the checkout, so nothing is written into the
checkout; installs the wheel into a venv under a temporary directory, removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DATA_DIRS = ("templates", "initramfs", "images")
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis",
                                "_data")


@dataclass(frozen=True)
class Installed:
    src: Path      # the copy of the checkout that was built
    sdist: Path
    wheel: Path
    venv: Path
    site: Path     # the venv's site-packages
    work: Path     # cwd of every command: outside the checkout

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` (argv[0] a program of the venv) in :attr:`work`, with an environment
        that cannot point back to the checkout."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "SIDUSCTL_IMAGES",
                            "SIDUSCTL_STATE", "PYTHONSTARTUP")}
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        res = subprocess.run([self.bin(argv[0]), *argv[1:]], cwd=self.work, env=env,
                             capture_output=True, text=True, timeout=600, check=False)
        if check:
            assert res.returncode == 0, f"{argv}: {res.stdout}\n{res.stderr}"
        return res


def _source_files() -> list[Path]:
    """The checkout's files as a build sees them: tracked and untracked, not ignored."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [Path(p.decode()) for p in out.split(b"\0") if p and (REPO / p.decode()).is_file()]


def _copy_checkout(dest: Path) -> None:
    files = _source_files()
    if not files:  # not a git checkout (an unpacked sdist, say)
        shutil.copytree(REPO, dest, ignore=IGNORE, symlinks=True)
        return
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel, follow_symlinks=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    pytest.importorskip("build", reason="needs the build package (pip install -e '.[test]')")
    top = tmp_path_factory.mktemp("wheel")
    src, dist, venv, work = top / "src", top / "dist", top / "venv", top / "work"
    work.mkdir()
    try:
        _copy_checkout(src)
        subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(src)],
                       check=True, capture_output=True, timeout=900)
        (sdist,) = dist.glob("sidusctl-*.tar.gz")
        (wheel,) = dist.glob("sidusctl-*.whl")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", str(wheel)],
                       check=True, capture_output=True, timeout=900, cwd=work)
        (site,) = venv.glob("lib/python3*/site-packages")
        yield Installed(src, sdist, wheel, venv, site, work)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _checkout_data_files(src: Path) -> set[str]:
    return {str(p.relative_to(src)) for d in DATA_DIRS for p in (src / d).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_sdist_and_wheel_carry_the_data_folders(installed: Installed) -> None:
    expected = _checkout_data_files(installed.src)
    assert {"templates/pxelinux/default.j2", "initramfs/hooks/sidus",
            "images/minimal/image.toml"} <= expected
    with tarfile.open(installed.sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
    assert expected <= set(members), sorted(expected - set(members))
    assert {"setup.py", "MANIFEST.in", "pyproject.toml"} <= set(members)
    assert not any(n.startswith("sidusctl/_data") for n in members)
    with zipfile.ZipFile(installed.wheel) as whl:
        infos = {i.filename: i for i in whl.infolist()}
    shipped = {n.removeprefix("sidusctl/_data/") for n in infos if n.startswith("sidusctl/_data/")}
    assert shipped == expected
    assert "sidusctl/py.typed" in infos
    # the AppArmor kernel features the build compiles the policy cache for (package data)
    features = {str(f.relative_to(installed.src)) for f in
                (installed.src / "sidusctl/image/apparmor-features").glob("*.features")}
    assert "sidusctl/image/apparmor-features/6.1.features" in features
    assert features <= set(infos) and features <= set(members), features
    for rel in expected:
        mode = infos[f"sidusctl/_data/{rel}"].external_attr >> 16
        want_x = bool((installed.src / rel).stat().st_mode & stat.S_IXUSR)
        assert bool(mode & stat.S_IXUSR) == want_x, f"{rel}: mode {mode:o} in the wheel"
    # the build wrote nothing into the package folder of the tree it built
    assert not (installed.src / "sidusctl/_data").exists()


def test_installed_package_reads_its_own_data(installed: Installed) -> None:
    data = installed.site / "sidusctl/_data"
    code = ("import json; from sidusctl.core import paths; "
            "from sidusctl.subsys.initramfs import shipped_files; "
            "print(json.dumps({'pkg': str(paths._PKG), 'templates': str(paths.templates_dir()), "
            "'initramfs': str(paths.initramfs_dir()), 'images': str(paths.images_dir()), "
            "'initramfs_files': [str(p) for p in shipped_files()]}))")
    got = json.loads(installed.run("python", "-c", code).stdout)
    assert got["pkg"] == str(installed.site / "sidusctl")
    for name in DATA_DIRS:
        assert got[name] == str(data / name)
    assert set(got["initramfs_files"]) == {"hooks/sidus", "scripts/sidus", "scripts/init-bottom/sidus",
                                           "scripts/nfs-top/sidus-link",
                                           "scripts/init-top/sidus-nic"}
    for rel in got["initramfs_files"]:  # pip restored the mode recorded in the wheel
        checkout = Path(__file__).resolve().parent.parent / "initramfs" / rel
        assert os.access(data / "initramfs" / rel, os.X_OK) == os.access(checkout, os.X_OK), rel

    # (a) the default recipe, found by name and validated, without building anything
    res = installed.run("sidusctl", "build", "minimal", "--check", "--json")
    rec = json.loads(res.stdout)
    assert rec["name"] == "minimal" and len(rec["digest"]) == 64
    assert rec["path"] == str(data / "images/minimal/image.toml")
    assert all(f["src"].startswith(str(data / "images/minimal/")) for f in rec["files"])
    assert str(REPO) not in res.stdout + res.stderr

    # the documentation commands work from the installed package too
    assert "_SIDUSCTL_COMPLETE" in installed.run("sidusctl", "completion", "bash").stdout
    man = installed.work / "man"
    installed.run("sidusctl", "man", "--out", str(man))
    assert (man / "sidusctl.1").is_file() and (man / "sidusctl-pxe.1").is_file()


def test_installed_package_renders_a_pxe_tree(installed: Installed) -> None:
    # (b) a fake image in a real store, made with the installed package's own API
    state, tftp = installed.work / "state", installed.work / "tftp"
    code = ("import sys; from pathlib import Path\n"
            "from sidusctl.subsys.imagestore import ImageStore\n"
            "store = ImageStore(Path(sys.argv[1]))\n"
            "with store.new_generation('minimal') as gen:\n"
            "    (gen.rootfs / 'etc').mkdir(parents=True)\n"
            "    (gen.dir / 'vmlinuz-minimal').write_bytes(b'k' * 4096)\n"
            "    (gen.dir / 'initrd.img-minimal').write_bytes(b'i' * 8192)\n"
            "    gen.write_manifest({'name': 'minimal', 'kind': 'test'})\n")
    installed.run("python", "-c", code, str(state))
    nodes = installed.work / "nodes.toml"
    nodes.write_text('[network]\nsubnet = "10.0.2.0/24"\nserver = "10.0.2.2"\n\n'
                     '[defaults]\nimage = "minimal"\n\n[[nodes]]\nname = "n1"\n'
                     'mac = "52:54:00:12:34:56"\nip = "10.0.2.15"\n')
    # the CLI's own main(), then (in the same process) where its templates were loaded from
    render = ("import json, sys\n"
              "from sidusctl.cli.main import main\n"
              "from sidusctl.subsys import templates\n"
              "sys.argv = ['sidusctl', *sys.argv[1:]]\n"
              "main()\n"
              "loader = templates.environment().loader\n"
              "print('TEMPLATES', json.dumps(loader.searchpath), file=sys.stderr)\n")
    res = installed.run("python", "-c", render, "--state-dir", str(state), "pxe", "render",
                        "--nodes", "nodes.toml", "--tftp-root", "tftp", "--json")
    used = json.loads(res.stderr.rsplit("TEMPLATES ", 1)[1])
    assert used == [str(installed.site / "sidusctl/_data/templates")]
    out = json.loads(res.stdout)
    assert out["tftp_root"] == str(tftp)
    for rel in ("pxelinux.cfg/01-52-54-00-12-34-56", "pxelinux.cfg/0A00020F",
                "vmlinuz-minimal", "initrd.img-minimal"):
        assert rel in out["created"] and (tftp / rel).is_file(), rel
    assert all((tftp / rel).exists() for rel in out["created"])
    cfg = (tftp / "pxelinux.cfg/0A00020F").read_text()
    assert "nfsroot=10.0.2.2:" in cfg and str(state) in cfg
    assert str(REPO) not in res.stdout + res.stderr
    for p in tftp.rglob("*"):
        if p.is_file() and p.stat().st_size < 1 << 20:
            assert str(REPO).encode() not in p.read_bytes(), p
