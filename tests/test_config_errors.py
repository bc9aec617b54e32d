"""Every kind of user file (recipe, inventory, platform file, reservations) with several wrong
values: the real CLI lists every problem with file and line, exits 2, prints no traceback and
creates nothing. A fuzz test feeds random TOML documents to each loader: only ConfigErrors come
out, never another exception."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidusctl.cli.serve import parse_reservations
from sidusctl.core.errors import ConfigErrors
from sidusctl.image import recipe
from sidusctl.netboot import inventory
from sidusctl.vnode import platform_file
from tests.conftest import sidusctl


def _run_bad(tmp_path: Path, *args: str, expect: list[str]) -> None:
    state = tmp_path / "sdt-state"
    state.mkdir()
    before = sorted(p.name for p in state.iterdir())
    res = sidusctl(*args, state=state, timeout=60)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    for e in expect:
        assert e in res.stderr, (e, res.stderr)
    assert sorted(p.name for p in state.iterdir()) == before


def test_recipe_errors_all_listed(tmp_path: Path) -> None:
    d = tmp_path / "img"
    d.mkdir()
    f = d / "image.toml"
    (d / "setup.sh").write_text("#!/bin/sh\n")  # not executable
    f.write_text('suite = "bookwurm"\narch = "amd64"\ninclude = ["vim", "Vim!"]\n'
                 'upgrade = "yes"\npostinst = ["setup.sh", "gone.sh"]\n')
    _run_bad(tmp_path, "build", str(d), expect=[
        f"{f}:1: key 'suite': found 'bookwurm'",
        f"{f}:3: key 'include[1]': found 'Vim!'",
        f"{f}:4: key 'upgrade': found 'yes' (expected true or false)",
        f"{f}:5: key 'postinst[0]': found 'setup.sh' (expected an executable file next to "
        "the recipe",
        f"{f}:5: key 'postinst[1]': found 'gone.sh' (expected an executable file next to "
        "the recipe (no such file",
    ])


def test_inventory_errors_all_listed(tmp_path: Path) -> None:
    f = tmp_path / "nodes.toml"
    f.write_text('[network]\nsubnet = "10.0.0.0/24"\nserver = "10.0.0.1"\n\n'
                 '[[nodes]]\nname = "n1"\nmac = "zz"\nip = "10.0.1.5"\nimage = "x"\n'
                 'overlay = "ramdisk"\n')
    _run_bad(tmp_path, "pxe", "check", "--nodes", str(f), expect=[
        f"{f}:7: key 'nodes.n1.mac': found 'zz' (expected a MAC address such as",
        f"{f}:8: key 'nodes.n1.ip': 10.0.1.5 is outside the subnet 10.0.0.0/24",
        f"{f}:10: key 'nodes.n1.overlay': found 'ramdisk'",
    ])


def test_platform_file_errors_all_listed(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text('[[vnetworks]]\nname = "net"\ncidr = "10.0.0.1/24"\n\n'
                 '[[vnodes]]\nname = "w"\nimage = "minimal"\ncount = "x"\n'
                 'mem = { mem = "lots" }\n')
    _run_bad(tmp_path, "vnode", "up", str(f), expect=[
        f"{f}:3: key 'vnetworks[0].cidr': found '10.0.0.1/24'",
        f"{f}:8: key 'vnodes[0].count': found 'x' (expected an integer)",
        f"{f}:9: key 'vnodes[0].mem.mem': found 'lots'",
    ])


def test_reservations_errors_all_listed(tmp_path: Path) -> None:
    f = tmp_path / "res.txt"
    f.write_text("# mac ip host\nzz 10.0.0.2 a\n52:54:00:00:00:01 10.0.0.300\n"
                 "52:54:00:00:00:02 10.0.0.3 a.b c d e\n")
    _run_bad(tmp_path, "serve", "run", "-i", "lo", "--no-dns", "--reservations", str(f), expect=[
        f"{f}:2: found 'zz' (expected a MAC address",
        f"{f}:3: found '10.0.0.300' (expected an IPv4 address",
        f"{f}:4: found 6 fields",
    ])


# -- fuzz -------------------------------------------------------------------------------------

_KEYS = ["suite", "arch", "include", "packages", "name", "mac", "ip", "image", "overlay",
         "subnet", "server", "count", "mem", "cidr", "vnetwork", "ifaces", "io", "cpu",
         "kernel_args", "files", "src", "dest", "mode", "group", "disk", "hierarchy", "x"]
_scalars = st.one_of(st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=False),
                     st.text(max_size=12),
                     st.sampled_from(["bookworm", "amd64", "10.0.0.0/24", "10.0.0.5",
                                      "52:54:00:12:34:56", "minimal", "tmpfs", "disk", "max",
                                      "v2", "10M", "/etc/x", "0644"]))
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4)),
    max_leaves=12)
_tables = st.dictionaries(st.sampled_from(_KEYS), _values, max_size=6)
_docs = st.fixed_dictionaries({}, optional={
    "network": _tables, "defaults": _tables, "vnetworks": st.lists(_tables, max_size=2),
    "vnodes": st.lists(_tables, max_size=3), "nodes": st.lists(_tables, max_size=3),
    "groups": st.dictionaries(st.sampled_from(["a", "b"]), _tables, max_size=2),
    "tricks": _tables, "netboot": _tables, "keyboard": _tables,
    "files": st.lists(_tables, max_size=2), "suite": _values, "include": _values,
})


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if not isinstance(v, float) or v == v else "nan"
    if isinstance(v, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}"
                             for c in v) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"


def _dump(doc: dict[str, Any]) -> str:
    out = [f"{k} = {_toml(v)}" for k, v in doc.items()]
    return "\n".join(out) + "\n"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_docs, junk=st.text(max_size=30))
def test_loaders_raise_only_config_errors(tmp_path: Path, doc: dict[str, Any], junk: str) -> None:
    text = _dump(doc)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        text = junk  # a document this little writer cannot express: fuzz raw text instead
    d = tmp_path / "sdt-fuzz"
    d.mkdir(exist_ok=True)
    f = d / "image.toml"
    for t in (text, junk, text + junk):
        f.write_text(t)
        for load in (lambda: recipe.load(f), lambda: platform_file.load(f),
                     lambda t=t: inventory.parse(t, "n.toml", known_images=["minimal"]),
                     lambda: parse_reservations(f)):
            try:
                load()
            except ConfigErrors as e:
                assert e.errors and all(x.file for x in e.errors)


def test_a_variant_the_backend_has_not_is_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    d = tmp_path / "img"
    d.mkdir()
    f = d / "image.toml"
    f.write_text('suite = "bookworm"\n\nvariant = "standard"\n')
    # debootstrap (the default backend) has no "standard": it would quietly build "important"
    _run_bad(tmp_path, "build", str(d), expect=[
        f"{f}:3: key 'variant': 'standard' is not a variant debootstrap has",
        "(expected minbase, buildd or important, or --backend mmdebstrap)"])
    res = sidusctl("build", "--check", "--backend", "mmdebstrap", str(d),
                   state=tmp_path / "sdt-state", timeout=60)
    assert res.returncode == 0, res.stderr
