"""Damaged state files and bad values that the real CLI once took with an internal error (exit
70 and a traceback), or quietly: a serve status file of the wrong shape (``serve status``,
``pxe status``, ``pxe status --watch``), lease rows that hold no lease (``serve leases``),
broken image links and unknown images (``image rollback``, ``image list|show``), an nfs-ganesha
bind address that is text, ``pxe squashfs --list`` with a bad or unknown name, and ``pxe
render`` given a TFTP root under a regular file or an empty "signed GRUB". Each is refused with
a message naming the file and key (or path, or option), and nothing is left half-done. Fast:
fake status files, sqlite rows and image directories in tmp_path; no image built, no server.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from sidusctl.core.errors import ConfigError
from sidusctl.subsys import ganesha
from sidusctl.subsys.imagestore import ImageStore
from tests.conftest import sidusctl

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="image rollback needs root")


def _clean(res: subprocess.CompletedProcess[str], code: int, *expect: str) -> None:
    """Exit ``code``, every ``expect`` in stderr, no internal error or traceback."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    for e in expect:
        assert e in res.stderr, (e, res.stderr)


# -- serve/status.json ---------------------------------------------------------------------------

def _node(**kw: Any) -> dict[str, Any]:
    n: dict[str, Any] = {"name": "n1", "mac": "52:54:00:00:00:01", "ip": "10.0.0.5",
                         "stage": "dhcp", "stages": {"dhcp": 1.0}, "files": ["pxelinux.0"],
                         "addresses": [], "dhcp": "10.0.0.5", "booted": False}
    n.update(kw)
    return n


def _status(state: Path, st: dict[str, Any]) -> Path:
    path = state / "serve" / "status.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(st))
    return path


@pytest.mark.parametrize(("st", "key"), [
    ({"updated": "x"}, "'updated'"),
    ({"updated": 1, "dhcp": [1, 2]}, "'dhcp'"),
    ({"updated": 1, "clients": {"a": 1}}, "'clients.a'"),
    ({"updated": 1, "clients": []}, "'clients'"),
    ({"updated": 10**400}, "'updated'"),  # no float: it was an internal error
    ({"updated": 1, "pid": 10**30}, "'pid'"),
    ({"updated": 1, "reload": {"at": "x", "ok": True, "error": None}}, "'reload'"),
    ({"updated": 1, "reload": {"at": 1.0, "ok": "no", "error": None}}, "'reload'"),
])
def test_serve_status_refuses_a_damaged_status_file(tmp_path: Path, st: dict[str, Any],
                                                    key: str) -> None:
    path = _status(tmp_path, st)
    _clean(sidusctl("serve", "status", state=tmp_path, timeout=60), 1, str(path), key)


def test_serve_status_reads_a_good_status_file(tmp_path: Path) -> None:
    _status(tmp_path, {"pid": 1, "updated": time.time(), "started": 1.0, "internal_errors": 0,
                       "dhcp": {"acks": 3}, "tftp": None, "dns": None,
                       "clients": {"52:54:00:00:00:01": {"ack": "10.0.0.5", "at": 1.0}}})
    res = sidusctl("serve", "status", state=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "DHCP: acks 3" in res.stdout + res.stderr


PXE_BAD = [
    ({"x": 1}, "'pxe.nodes[0].name'"),
    ("abc", "'pxe.nodes'"),
    (1, "'pxe.nodes[0]'"),
    (_node(files=5), "'pxe.nodes[0].files'"),
    (_node(ip=None), "'pxe.nodes[0].ip'"),
    (_node(stage="nowhere"), "'pxe.nodes[0].stage'"),
    (_node(stages={"dhcp": 10**400}), "'pxe.nodes[0].stages.dhcp'"),  # no float
]


@pytest.mark.parametrize(("node", "key"), PXE_BAD)
@pytest.mark.parametrize("watch", [False, True])
def test_pxe_status_refuses_a_damaged_status_file(tmp_path: Path, node: Any, key: str,
                                                  watch: bool) -> None:
    nodes = node if isinstance(node, str) else [node]
    path = _status(tmp_path, {"pid": 1, "updated": 1.0,
                              "pxe": {"interface": "sdt-x", "inventory": "nodes.toml",
                                      "nodes": nodes, "held": {}}})
    args = ("--watch", "--count", "1", "--interval", "0.2") if watch else ()
    _clean(sidusctl("pxe", "status", *args, state=tmp_path, timeout=60), 1, str(path), key)


PXE_BAD_TOP = [
    ({"pid": 10**30}, ["'pid'", "found 1000000000000000000000000000000", "a process id"]),
    ({"pid": 0}, ["'pid'", "found 0", "a process id"]),
    ({"updated": 10**400}, ["'updated'", "found 1000000", "a Unix time"]),
    ({"updated": float("inf")}, ["'updated'", "found inf", "a Unix time"]),
    ("[" * 200000, ["unreadable state file", "nested too deeply"]),
]


@pytest.mark.parametrize(("top", "expect"), PXE_BAD_TOP)
@pytest.mark.parametrize("mode", ["text", "json", "watch"])
def test_pxe_status_refuses_a_damaged_pid_time_or_nesting(tmp_path: Path, top: Any,
                                                          expect: list[str], mode: str) -> None:
    """A pid too large for kill(2), a time too large for a float, 200000 '[' (too deep for the
    JSON decoder) once gave an internal error; a pid of 0 (kill(2): the process group) or an
    infinite time a wrong answer."""
    if isinstance(top, str):
        path = tmp_path / "serve" / "status.json"
        path.parent.mkdir(parents=True)
        path.write_text(top)
    else:
        path = _status(tmp_path, {"pid": 1, "updated": 1.0,
                                  "pxe": {"interface": "sdt-x", "inventory": "nodes.toml",
                                          "nodes": [_node()], "held": {}}, **top})
    args = {"text": (), "json": ("--json",),
            "watch": ("--watch", "--count", "1", "--interval", "0.2")}[mode]
    _clean(sidusctl("pxe", "status", *args, state=tmp_path, timeout=60), 1, str(path), *expect)


def test_pxe_status_reads_a_good_status_file(tmp_path: Path) -> None:
    _status(tmp_path, {"pid": 1, "updated": time.time(),
                       "pxe": {"interface": "sdt-x", "inventory": "nodes.toml",
                               "nodes": [_node()], "held": {}}})
    res = sidusctl("pxe", "status", state=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "n1" in res.stdout and "DHCP ACK 10.0.0.5" in res.stdout


# -- serve/leases.sqlite -------------------------------------------------------------------------

@pytest.mark.parametrize(("ip", "expires"), [("notanip", 1.0), ("10.0.0.5", float("inf"))])
def test_serve_leases_refuses_a_bad_row(tmp_path: Path, ip: str, expires: float) -> None:
    path = tmp_path / "serve" / "leases.sqlite"
    path.parent.mkdir()
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE leases (ip TEXT PRIMARY KEY, mac TEXT UNIQUE, hostname TEXT, "
               "expires REAL NOT NULL, state TEXT NOT NULL, updated REAL NOT NULL)")
    db.execute("INSERT INTO leases VALUES ('10.0.0.9', '52:54:00:00:00:09', NULL, 1.0, "
               "'bound', 1.0)")
    db.execute("INSERT INTO leases VALUES (?, '52:54:00:00:00:01', 'n1', ?, 'bound', 1.0)",
               (ip, expires))
    db.commit()
    db.close()
    for args in ((), ("--json",)):
        _clean(sidusctl("serve", "leases", *args, state=tmp_path, timeout=60), 1, str(path),
               "bad lease row", ip)


# -- images -------------------------------------------------------------------------------------

def _image(state: Path, name: str, gens: tuple[str, ...] = ("gen-1", "gen-2"),
           links: dict[str, str] | None = None) -> Path:
    """A fake image directory: ``gens`` with a rootfs each, and the ``links`` given
    (default: current -> the last, previous -> the one before)."""
    d = state / "images" / name
    for g in gens:
        (d / g / "rootfs").mkdir(parents=True)
    if links is None:
        links = {"current": gens[-1], "previous": gens[-2]}
    for ln, target in links.items():
        os.symlink(target, d / ln)
    return d


def _links(d: Path) -> dict[str, str]:
    return {p.name: os.readlink(p) for p in sorted(d.iterdir()) if p.is_symlink()}


@root_only
@pytest.mark.parametrize(("links", "expect"), [
    ({"previous": "gen-1"}, "current"),  # no current
    ({"current": "gen-1", "previous": "gen-gone"}, "previous -> gen-gone"),  # dangling
    ({"current": "gen-gone", "previous": "gen-1"}, "current -> gen-gone"),
])
def test_rollback_refuses_a_broken_image_and_changes_nothing(
        tmp_path: Path, links: dict[str, str], expect: str) -> None:
    d = _image(tmp_path, "foo", gens=("gen-1",), links=links)
    before = _links(d)
    _clean(sidusctl("image", "rollback", "foo", state=tmp_path, timeout=60), 1,
           str(d), expect)
    assert _links(d) == before


@root_only
def test_rollback_of_an_unknown_image_creates_nothing(tmp_path: Path) -> None:
    _image(tmp_path, "foo")
    _clean(sidusctl("image", "rollback", "bar", state=tmp_path, timeout=60), 4,
           "no image named 'bar'")
    assert not (tmp_path / "images" / "bar").exists()


@root_only
def test_rollback_with_images_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "images").write_text("not a directory\n")
    _clean(sidusctl("image", "rollback", "foo", state=tmp_path, timeout=60), 1,
           str(tmp_path / "images"), "not a directory")


@root_only
def test_rollback_still_swaps_a_sound_image(tmp_path: Path) -> None:
    d = _image(tmp_path, "foo")
    res = sidusctl("image", "rollback", "foo", state=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert _links(d) == {"current": "gen-1", "previous": "gen-2"}


def test_current_symlink_loop_is_a_broken_image(tmp_path: Path) -> None:
    _image(tmp_path, "good")
    loop = tmp_path / "images" / "loop"
    loop.mkdir()
    os.symlink("current", loop / "current")
    res = sidusctl("image", "list", "--json", state=tmp_path, timeout=60)
    _clean(res, 0, "loop")  # skipped, with a warning naming it
    assert [i["name"] for i in json.loads(res.stdout)] == ["good"]
    _clean(sidusctl("image", "show", "loop", state=tmp_path, timeout=60), 1,
           str(loop / "current"))
    assert [i.name for i in ImageStore(tmp_path, recover=False).list()] == ["good"]


# -- pxe nfs-export / squashfs / render ----------------------------------------------------------

def test_nfs_export_refuses_a_bind_address_that_is_no_address(tmp_path: Path) -> None:
    res = sidusctl("pxe", "nfs-export", "minimal", "--network", "10.0.0.0/8", "--bind",
                   "garbage; x", state=tmp_path, timeout=60)
    _clean(res, 2, "--bind", "garbage; x")
    assert "Bind_addr" not in res.stdout
    with pytest.raises(ConfigError, match="not an IPv4 address"):
        ganesha.GaneshaConfig((), bind_addr="127.0.0.1; }")
    assert "Bind_addr = 10.0.0.1;" in ganesha.render_config(
        ganesha.GaneshaConfig((), bind_addr="10.0.0.1"))


@pytest.mark.parametrize(("name", "code", "expect"), [
    ("nope", 4, "no image named 'nope'"),
    ("Bad/../x", 2, "invalid name 'Bad/../x'"),
    ("../../../../../../etc", 2, "invalid name"),
])
def test_squashfs_list_checks_the_image(tmp_path: Path, name: str, code: int,
                                        expect: str) -> None:
    _clean(sidusctl("pxe", "squashfs", name, "--list", state=tmp_path, timeout=60), code,
           expect)


def _render_setup(tmp_path: Path) -> tuple[Path, Path]:
    """A state with image ``minimal`` (stand-in kernel and initrd) and a one-node inventory."""
    state = tmp_path / "state"
    with ImageStore(state).new_generation("minimal") as gen:
        (gen.rootfs / "etc").mkdir(parents=True)
        (gen.dir / "vmlinuz-minimal").write_bytes(b"k" * 64)
        (gen.dir / "initrd.img-minimal").write_bytes(b"i" * 64)
        gen.write_manifest({"name": "minimal", "kind": "test"})
    nodes = tmp_path / "nodes.toml"
    nodes.write_text('[network]\nsubnet = "10.0.2.0/24"\nserver = "10.0.2.2"\n\n'
                     '[defaults]\nimage = "minimal"\n\n[[nodes]]\nname = "n1"\n'
                     'mac = "52:54:00:12:34:56"\nip = "10.0.2.15"\n')
    return state, nodes


def test_render_refuses_a_tftp_root_under_a_regular_file(tmp_path: Path) -> None:
    state, nodes = _render_setup(tmp_path)
    plain = tmp_path / "plain"
    plain.write_text("x")
    _clean(sidusctl("pxe", "render", "--nodes", str(nodes), "--tftp-root", str(plain / "x"),
                    state=state, timeout=60), 2, str(plain / "x"))


def test_render_refuses_a_signed_grub_that_is_no_efi_binary(tmp_path: Path) -> None:
    state, nodes = _render_setup(tmp_path)
    empty = tmp_path / "grubnetx64.efi.signed"
    empty.write_bytes(b"")
    tftp = tmp_path / "tftp"
    _clean(sidusctl("pxe", "render", "--nodes", str(nodes), "--tftp-root", str(tftp),
                    "--signed-grub", str(empty), state=state, timeout=60), 2,
           "--signed-grub", str(empty))
    assert not tftp.exists()
