"""Recipe validation: every problem is found before any download, and the message names the
file, the key and what was expected. Through the library and through the real CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidusctl.core.errors import ConfigErrors
from sidusctl.image import recipe
from tests.conftest import sidusctl

GOOD = 'suite = "bookworm"\narch = "amd64"\n'


def write(tmp_path: Path, text: str, name: str = "img") -> Path:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "image.toml").write_text(text)
    return d / "image.toml"


def test_shipped_recipes_are_valid() -> None:
    for name in ("minimal", "sidus", "pnode"):
        r = recipe.find(name)
        assert r.name == name
        assert r.suite == "bookworm"
        assert r.netboot.enabled
    # the pnode image shares minimal's bootstrap (and so its bootstrap cache)
    mini, pnode = recipe.find("minimal"), recipe.find("pnode")
    assert (pnode.include, pnode.exclude, pnode.variant) == (mini.include, mini.exclude,
                                                              mini.variant)
    assert [p.name for p in pnode.postinst] == ["install-sidusctl"]


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (GOOD + "colour = 'blue'\n", "colour", ["unknown key", "expected one of", "suite"]),
        ('suite = "bookwurm"\n', "suite", ["found 'bookwurm'", "bookworm"]),
        ('arch = "amd64"\n', "suite", ["missing"]),
        ('suite = "bookworm"\narch = "amd46"\n', "arch", ["found 'amd46'", "arm64"]),
        ('suite = 12\n', "suite", ["found int 12", "a string"]),
        (GOOD + "include = 'vim'\n", "include", ["found 'vim'", "a list"]),
        (GOOD + "include = ['Vim!']\n", "include[0]", ["found 'Vim!'", "a Debian package name"]),
        (GOOD + "components = ['main', 'universe']\n", "components[1]", ["found 'universe'", "non-free-firmware"]),
        (GOOD + "variant = 'tiny'\n", "variant", ["found 'tiny'", "minbase"]),
        (GOOD + "install_suggests = 'yes'\n", "install_suggests", ["found 'yes'", "true or false"]),
        (GOOD + "mirror = 'deb.debian.org'\n", "mirror", ["found 'deb.debian.org'", "http://"]),
        (GOOD + "timezone = '../../etc/passwd'\n", "timezone", ["found '../../etc/passwd'", "tz database"]),
        (GOOD + "locales = ['english']\n", "locales[0]", ["found 'english'", "locale name"]),
        (GOOD + "include = ['vim']\nexclude = ['vim']\n", "exclude", ["both included and excluded"]),
        (GOOD + "[tricks]\nremove_hostnames = true\n", "tricks.remove_hostnames", ["unknown key"]),
        (GOOD + "[keyboard]\nlayout = 1\n", "keyboard.layout", ["found int 1", "a string"]),
        (GOOD + "[netboot]\nenabled = 'yes'\n", "netboot.enabled", ["found 'yes'", "true or false"]),
        (GOOD + "[netboot]\nsquashfs_exclude = ['/boot/*']\n", "netboot.squashfs_exclude[0]",
         ["found '/boot/*'", "relative to the root", "no leading '/'"]),
        (GOOD + "[netboot]\nsquashfs_exclude = ['boot/x', 'var/../../etc']\n",
         "netboot.squashfs_exclude[1]", ["found 'var/../../etc'", "no '..'"]),
        (GOOD + "[netboot]\nsquashfs_exclude = 'boot/*'\n", "netboot.squashfs_exclude",
         ["found 'boot/*'", "a list"]),
        (GOOD + "[export]\ncompression = 'lz4'\n", "export.compression", ["found 'lz4'", "zstd"]),
        (GOOD + "[[files]]\nsrc = 'nope.conf'\ndest = '/etc/nope.conf'\n", "files[0].src", ["no such file"]),
        (GOOD + "[[files]]\nsrc = 'image.toml'\ndest = 'etc/x'\n", "files[0].dest", ["invalid destination", "absolute path"]),
        (GOOD + "[[files]]\nsrc = 'image.toml'\ndest = '/etc/../../x'\n", "files[0].dest", ["invalid destination"]),
        (GOOD + "[[files]]\nsrc = 'image.toml'\ndest = '/etc/x'\nmode = 644\n", "files[0].mode", ["invalid mode", "octal"]),
        (GOOD + "[[files]]\nsrc = 'image.toml'\ndest = '/etc/x'\nmode = '0644'\nowner_name = 'x'\n", "files[0].owner_name", ["unknown key"]),
        (GOOD + "postinst = 'setup.sh'\n", "postinst", ["found 'setup.sh'", "a list"]),
        (GOOD + "postinst = ['nope.sh']\n", "postinst[0]", ["no such file", "an executable file"]),
        (GOOD + "postinst = ['image.toml']\n", "postinst[0]", ["is not executable", "chmod +x"]),
        (GOOD + "postinst = ['/bin/true']\n", "postinst[0]", ["relative to the recipe's folder"]),
        (GOOD + "postinst = ['../img/image.toml']\n", "postinst[0]", ["without '..'"]),
    ],
)
def test_validation_names_file_key_and_expectation(tmp_path: Path, text: str, key: str,
                                                   words: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigErrors) as ei:
        recipe.load(path)
    e = next(x for x in ei.value.errors if x.key == key)
    assert e.file == str(path)
    assert e.key == key
    msg = str(e)
    assert str(path) in msg and f"key '{key}'" in msg
    for w in words:
        assert w in msg, (w, msg)


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'suite = "bookworm\n')
    with pytest.raises(ConfigErrors, match="not valid TOML"):
        recipe.load(path)


def test_digest_changes_with_values_and_site_files(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "f").write_text("one")
    path = write(tmp_path, GOOD + "[[files]]\nsrc = 'f'\ndest = '/etc/f'\n")
    d1 = recipe.load(path).digest()
    (tmp_path / "img" / "f").write_text("two")
    d2 = recipe.load(path).digest()
    path.write_text(GOOD + "packages = ['vim']\n[[files]]\nsrc = 'f'\ndest = '/etc/f'\n")
    d3 = recipe.load(path).digest()
    assert len({d1, d2, d3}) == 3


def test_squashfs_exclude_is_read_but_changes_no_build(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    plain = recipe.load(path)
    assert plain.netboot.squashfs_exclude is None  # not set: the exports' default list
    path.write_text(GOOD + "[netboot]\nsquashfs_exclude = ['var/lib/apt/lists/*']\n")
    listed = recipe.load(path)
    assert listed.netboot.squashfs_exclude == ("var/lib/apt/lists/*",)
    path.write_text(GOOD + "[netboot]\nsquashfs_exclude = []\n")
    assert recipe.load(path).netboot.squashfs_exclude == ()  # nothing left out
    # an export parameter: the build (and its stage cache) is the same
    assert listed.digest() == plain.digest() == recipe.load(path).digest()
    # and the manifest records it, for the exports
    assert listed.to_json()["netboot"]["squashfs_exclude"] == ("var/lib/apt/lists/*",)


def test_postinst_scripts_and_digest_over_the_folder(tmp_path: Path) -> None:
    d = tmp_path / "img"
    d.mkdir()
    script = d / "setup.sh"
    script.write_text("#!/bin/sh\ntrue\n")
    script.chmod(0o755)
    plain = write(tmp_path, GOOD)
    d0 = recipe.load(plain).digest()
    (d / "data").write_text("one")
    assert recipe.load(plain).digest() == d0  # no scripts: other files of the folder unread
    path = write(tmp_path, GOOD + "postinst = ['setup.sh']\n")
    r = recipe.load(path)
    assert r.postinst == (d.resolve() / "setup.sh",)
    assert r.to_json()["postinst"] == [str(d.resolve() / "setup.sh")]
    d1 = r.digest()
    (d / "data").write_text("two")  # what a script may read (a wheelhouse, a key)
    d2 = recipe.load(path).digest()
    script.chmod(0o700)
    d3 = recipe.load(path).digest()
    assert len({d0, d1, d2, d3}) == 4


def test_cli_rejects_bad_recipe_before_any_work(tmp_path: Path) -> None:
    path = write(tmp_path, 'suite = "bookwurm"\n')
    state = tmp_path / "state"
    res = sidusctl("build", str(path.parent), state=state)
    assert res.returncode == 2
    assert f"{path}:1: key 'suite': found 'bookwurm'" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (state / "images").exists()  # nothing started, nothing written


def test_cli_unknown_recipe_name_lists_known_ones(tmp_path: Path) -> None:
    res = sidusctl("build", "no-such-recipe", state=tmp_path / "s")
    assert res.returncode == 4
    assert "no image recipe 'no-such-recipe'" in res.stderr and "minimal" in res.stderr


def test_cli_not_root_is_refused_cleanly(tmp_path: Path) -> None:
    state = tmp_path / "state"
    os.chmod(tmp_path, 0o755)
    def as_nobody() -> None:
        os.setgid(65534)
        os.setuid(65534)

    res = sidusctl("build", "minimal", state=state, preexec_fn=as_nobody)
    assert res.returncode == 3, res.stderr
    assert "needs root" in res.stderr and "uid 65534" in res.stderr
    assert not state.exists()


def test_cli_backend_missing_is_refused_cleanly(tmp_path: Path) -> None:
    # A PATH without debootstrap: the real condition of a host that lacks the package.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("chroot", "mount", "umount", "tar", "zstd"):
        src = subprocess_which(tool)
        if src:
            (bindir / tool).symlink_to(src)
    state = tmp_path / "state"
    res = sidusctl("build", "minimal", state=state, env={"PATH": str(bindir)})
    assert res.returncode == 3, res.stderr
    assert "'debootstrap' was not found" in res.stderr and "apt-get install debootstrap" in res.stderr
    assert not (state / "images" / "minimal").exists() or not any(
        p.name.startswith(".building") for p in (state / "images" / "minimal").iterdir())


def subprocess_which(tool: str) -> str | None:
    import shutil

    return shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
