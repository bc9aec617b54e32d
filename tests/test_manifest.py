"""The typed manifest (sidusctl.subsys.manifest): old files load, new ones keep the same JSON,
unknown keys are tolerated, anything corrupt is a StateError naming the file. Fast, no root."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidusctl.core.errors import StateError
from sidusctl.subsys.imagestore import ImageStore
from sidusctl.subsys.manifest import (
    Change,
    Exports,
    KernelExport,
    LastUpdate,
    Manifest,
    Sizes,
    TarballExport,
)

# What the dict-writing builder wrote for `sidusctl build minimal --tar` (package list trimmed
# to three entries, recipe values to a few keys).
OLD_BUILD: dict[str, Any] = {
    "backend": "debootstrap",
    "bootstrap_from_cache": False,
    "created": "2026-11-30T08:49:35Z",
    "exports": {
        "initrd": {"file": "initrd.img-minimal", "size": 31528384},
        "kernel": {"file": "vmlinuz-minimal", "size": 8193984, "version": "6.1.0-27-amd64"},
        "tarball": {"compression": "zstd", "file": "minimal.tar.zst", "size": 123456789},
    },
    "generation": "20261130T084935-3734",
    "kind": "build",
    "mirror": "http://deb.debian.org/debian",
    "name": "minimal",
    "package_count": 3,
    "packages": {
        "apt": {"arch": "amd64", "installed_kib": "4248", "version": "2.6.1"},
        "base-files": {"arch": "amd64", "installed_kib": "340", "version": "12.4+deb12u8"},
        "zstd": {"arch": "amd64", "installed_kib": "1778", "version": "1.5.4+dfsg2-5"},
    },
    "purged": ["ncurses-term"],
    "recipe": {"path": "/work/main/images/minimal/image.toml", "sha256": "ab" * 32,
               "values": {"name": "minimal", "suite": "bookworm", "arch": "amd64",
                          "packages": ["openssh-server"], "root_password": "***",
                          "netboot": {"enabled": True, "modules": ["nfs"], "nic": ""}}},
    "sidusctl": "0.9.0",
    "sizes": {"rootfs_bytes": 412000256},
    "suite": "bookworm",
    "arch": "amd64",
    "timings_s": {"bootstrap": 61.2, "configure": 80.01, "export": 9.5, "manifest": 0.2,
                  "total": 151.0},
}

OLD_IMPORT: dict[str, Any] = {
    "name": "web", "kind": "import", "sidusctl": "0.9.0", "created": "2026-11-30T09:00:00Z",
    "generation": "20261130T090000-42",
    "source": {"ref": "/tmp/web.tar", "kind": "docker-archive", "selected": None,
               "repo_tags": ["web:1"]},
    "platform": "linux/amd64", "arch": None,
    "digests": {"manifest": None, "config": "sha256:" + "c" * 64,
                "layers": [{"digest": "sha256:" + "d" * 64, "diff_id": "sha256:" + "e" * 64,
                            "compression": "gzip", "size": 100, "uncompressed": 300,
                            "entries": 4, "whiteouts": 0}]},
    "config": {"Cmd": ["/bin/sh", "-c", "echo hi"], "Env": ["PATH=/bin"], "ExposedPorts":
               {"80/tcp": {}}, "Labels": {"a": "b"}},
    "exposed_ports": ["80/tcp"], "volumes": [], "labels": {"a": "b"},
    "runtime": {"command": ["/bin/sh", "-c", "echo hi"], "env": ["PATH=/bin"], "cwd": "/",
                "user": "", "uid": 0, "gid": 0, "username": "root", "init": "none",
                "init_path": None, "unit": None, "files": [], "lxc_snippet": "lxc.conf",
                "note": "the image has no init system"},
    "sizes": {"rootfs_bytes": 4096},
    "exports": {"tarball": {"file": "web.tar.gz", "size": 99, "compression": "gzip",
                            "copy": "/tmp/out.tar.gz"}},
    "timings_s": {"resolve": 0.01, "layers": 0.2, "total": 0.3},
}


@pytest.mark.parametrize("data", [OLD_BUILD, OLD_IMPORT], ids=["build", "import"])
def test_old_manifest_loads_and_writes_back_the_same(data: dict[str, Any],
                                                     tmp_path: Path) -> None:
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    m = Manifest.load(p)
    assert m.to_json() == data
    m.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == data
    assert Manifest.parse(json.dumps(m.to_json())) == m  # model -> JSON -> model


def test_typed_access() -> None:
    b = Manifest.from_data(OLD_BUILD)
    assert b.recipe is not None and b.recipe.sha256 == "ab" * 32
    assert b.packages["apt"].version == "2.6.1" and b.purged == ("ncurses-term",)
    assert b.exports.kernel is not None and b.exports.kernel.version == "6.1.0-27-amd64"
    assert list(b.exports.files()) == ["kernel", "initrd", "tarball"]
    assert b.source is None and "source" not in b.to_json()  # no import keys in a build
    i = Manifest.from_data(OLD_IMPORT)
    assert i.runtime is not None and i.runtime.command[0] == "/bin/sh"
    assert i.exports.tarball is not None and i.exports.tarball.copy_ == "/tmp/out.tar.gz"
    assert i.arch is None and "arch" in i.to_json()  # an explicit null stays
    # dict-style read access for callers written against the dict
    assert b["purged"] == ["ncurses-term"] and "updated" not in b and b.get("suite") == "bookworm"


def test_update_derivation_keeps_keys_and_adds_update_ones() -> None:
    b = Manifest.from_data(OLD_BUILD)
    ex = b.exports.merged(Exports(kernel=KernelExport(file="vmlinuz-minimal", size=1,
                                                      version="6.1.0-28-amd64")))
    ex = ex.model_copy(update={"tarball": TarballExport(file="minimal.tar.zst", size=5,
                                                        compression="zstd")})
    new = b.model_copy(update={
        "exports": ex, "updated": "now",
        "last_update": LastUpdate(changed={"apt": Change(from_="2.6.0", to="2.6.1"),
                                           "new": Change(from_=None, to="1")},
                                  timings_s={"upgrade": 3.0, "total": 4.0}),
        "sizes": b.sizes.model_copy(update={"rootfs_bytes": 7})})
    d = new.to_json()
    assert set(d) == set(OLD_BUILD) | {"updated", "last_update"}
    assert d["exports"] == {**OLD_BUILD["exports"],
                            "kernel": {"file": "vmlinuz-minimal", "size": 1,
                                       "version": "6.1.0-28-amd64"},
                            "tarball": {"file": "minimal.tar.zst", "size": 5,
                                        "compression": "zstd"}}
    assert d["last_update"] == {"changed": {"apt": {"from": "2.6.0", "to": "2.6.1"},
                                            "new": {"from": None, "to": "1"}},
                                "timings_s": {"upgrade": 3.0, "total": 4.0}}
    assert Manifest.from_data(d) == new
    assert Sizes().to_json() == {}


def test_unknown_keys_are_tolerated_and_not_written(tmp_path: Path) -> None:
    data = {**OLD_BUILD, "future_key": {"x": 1},
            "exports": {**OLD_BUILD["exports"], "squashfs": {"file": "x.sqfs", "size": 3}},
            "sizes": {"rootfs_bytes": 1, "tarball_bytes": 2}}
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps(data))
    d = Manifest.load(p).to_json()
    assert "future_key" not in d and "squashfs" not in d["exports"]  # type: ignore[operator]
    assert d["sizes"] == {"rootfs_bytes": 1}


@pytest.mark.parametrize("text", [
    "", "{", "[]", "null", '"x"', '{"name": "m"}', '{"name": 3, "kind": "build"}',
    json.dumps({**OLD_BUILD, "sizes": {"rootfs_bytes": "big"}}),
    json.dumps({**OLD_BUILD, "packages": {"apt": {"version": 2}}}),
    json.dumps({**OLD_IMPORT, "runtime": []}),
    # a size or count below 0 (shown as "-100 B" before)
    json.dumps({**OLD_BUILD, "sizes": {"rootfs_bytes": -100}}),
    json.dumps({**OLD_BUILD, "package_count": -1}),
])
def test_corrupt_manifest_is_a_state_error_naming_the_file(text: str, tmp_path: Path) -> None:
    p = tmp_path / "manifest.json"
    p.write_text(text)
    with pytest.raises(StateError, match=re.escape(str(p))):
        Manifest.load(p)


def test_corrupt_manifest_through_the_store(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, recover=False)
    with store.new_generation("img") as gen:
        gen.rootfs.mkdir()
        gen.write_manifest({"name": "img", "kind": "test"})  # a mapping is validated
    img = store.get("img")
    assert img.manifest.kind == "test" and img.manifest.to_json() == {"name": "img",
                                                                      "kind": "test"}
    img.manifest_path.write_text('{"name": "img", "kind": ')
    with pytest.raises(StateError, match=re.escape(str(img.manifest_path))):
        _ = img.manifest
    img.manifest_path.unlink()
    assert img.manifest.kind == "?"
    with pytest.raises(StateError), store.new_generation("bad") as gen:
        gen.write_manifest({"name": "bad"})  # no kind


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)
_keys = st.sampled_from(sorted(set(OLD_BUILD) | set(OLD_IMPORT))) | st.text(max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _json, max_size=8),
       st.sampled_from([{}, {"name": "n", "kind": "build"}, OLD_BUILD, OLD_IMPORT]))
def test_random_json_objects_load_or_raise_state_error(extra: dict[str, Any],
                                                       base: dict[str, Any]) -> None:
    text = json.dumps({**base, **extra})
    try:
        m = Manifest.parse(text, "/x/manifest.json")
    except StateError as e:
        assert "/x/manifest.json" in str(e)
        return
    assert Manifest.parse(json.dumps(m.to_json())) == m


def test_stage_record_of_a_generation(tmp_path: Path) -> None:
    """Image.stage_record: the named record, None when absent or the manifest is corrupt."""
    from sidusctl.subsys.imagestore import Image

    gen = tmp_path / "gen-1"
    gen.mkdir()
    (gen / "manifest.json").write_text(json.dumps({
        "name": "x", "kind": "build",
        "build_stages": [{"name": "tarball", "action": "ran", "reason": "r", "key": "k1"}]}))
    img = Image("x", gen)
    rec = img.stage_record("tarball")
    assert rec is not None and rec.key == "k1"
    assert img.stage_record("initramfs") is None
    (gen / "manifest.json").write_text("{not json")
    assert img.stage_record("tarball") is None
