"""Bad input to the vnode commands is a clear error (exit 2, or 4 for something that does not
exist) naming the file or key, never an internal error, and changes nothing: VXLAN settings,
key and matrix files that are not text, the remote-addresses file, sizes, CPU and latency
values that are not finite, unresolved references of platform files, and a vnode create
that fails on an unknown image (it must not touch the host's sysctls). Fast: no image build,
no container started."""

from __future__ import annotations

import json
import math
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from sidusctl.core.errors import ConfigError, ConfigErrors, SidusError
from sidusctl.core.units import parse_size
from sidusctl.subsys import lxc
from sidusctl.vnode.limits import set_limits
from sidusctl.vnode.model import VIface, VNetwork, VNode
from sidusctl.vnode.platform import Platform
from sidusctl.vnode.platform_file import load
from sidusctl.vnode.store import State
from tests.conftest import sidusctl
from tests.refusals import assert_refused as _bad
from tests.refusals import host_sysctl_values as _sysctls

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the vnode commands need root")


def _binary(tmp_path: Path) -> Path:
    f = tmp_path / "bin"
    f.write_bytes(b"\xff\xfe\x00\x81binary")
    return f


def _tarball(tmp_path: Path) -> Path:
    (tmp_path / "root" / "etc").mkdir(parents=True)
    (tmp_path / "root" / "etc" / "hostname").write_text("x\n")
    t = tmp_path / "img.tar.gz"
    with tarfile.open(t, "w:gz") as tf:
        tf.add(tmp_path / "root", arcname=".")
    return t


def _vnodes_in_state(state: Path) -> dict[str, object]:
    f = state / "vnode" / "state.json"
    return json.loads(f.read_text()).get("vnodes", {}) if f.exists() else {}


def _link_exists(name: str) -> bool:
    r = subprocess.run(["ip", "link", "show", name], capture_output=True, check=False)
    return r.returncode == 0


# -- 1: VXLAN settings ----------------------------------------------------------------------

@pytest.mark.parametrize(("args", "key"), [
    (["--vxlan-remote", "nope"], "key 'vxlan_remote'"),
    (["--vxlan-port", "70000", "--vxlan-remote", "10.0.0.9"], "key 'vxlan_port'"),
])
@root_only
def test_vnet_create_refuses_a_bad_vxlan_peer_or_port(tmp_path: Path, args: list[str],
                                                      key: str) -> None:
    res = sidusctl("vnode", "net", "create", "sdt-bq", "10.8.0.0/24", "--mode", "vxlan",
                   "--vxlan-id", "5", *args, state=tmp_path, timeout=60)
    _bad(res, 2, "vnetwork sdt-bq", key)
    assert not _link_exists("sdt-bq") and not _link_exists("sdt-bq-vx")


@pytest.mark.parametrize(("kw", "key"), [
    ({"vxlan_remote": "nope"}, "vxlan_remote"), ({"vxlan_remotes": ["10.0.0.2", "x"]}, "vxlan_remotes"),
    ({"vxlan_remote": "10.0.0.9", "vxlan_port": 70000}, "vxlan_port"),
    ({"vxlan_remote": "10.0.0.9", "vxlan_port": 0}, "vxlan_port"),
    ({"vxlan_remote": "10.0.0.9", "vxlan_local": "10.0.0"}, "vxlan_local"),
])
def test_vnetwork_validate_checks_vxlan_addresses_and_port(kw: dict[str, object],
                                                          key: str) -> None:
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        VNetwork("sdt-bq", "10.8.0.0/24", mode="vxlan", vxlan_id=5, **kw).validate()  # type: ignore[arg-type]


# -- 2, 3, 4: files that are not what they should be ------------------------------------------

@root_only
def test_a_binary_ssh_key_file_is_a_config_error(tmp_path: Path) -> None:
    f = _binary(tmp_path)
    res = sidusctl("vnode", "create", "sdt-n2", "--image", "minimal", "--ssh-pubkey", str(f),
                   state=tmp_path / "st", timeout=60)
    _bad(res, 2, str(f), "cannot read")
    assert _vnodes_in_state(tmp_path / "st") == {}


def test_a_binary_latency_matrix_is_a_config_error(tmp_path: Path) -> None:
    f = _binary(tmp_path)
    res = sidusctl("vnode", "latency-matrix", str(f), state=tmp_path / "st", timeout=60)
    _bad(res, 2, str(f), "cannot read")


def test_latency_matrix_values_are_finite_and_the_matrix_square(tmp_path: Path) -> None:
    f = tmp_path / "m.txt"
    f.write_text("a b a\n0 inf -1\nx 0\n")
    res = sidusctl("vnode", "latency-matrix", str(f), state=tmp_path / "st", timeout=60)
    _bad(res, 2, f"{f}:1: vnode 'a' named twice", f"{f}:2: found 'inf'", f"{f}:2: found '-1'",
         f"{f}:3: found 'x'", f"{f}:3: 2 values for 3 vnodes", "2 rows for 3 vnodes")


@pytest.mark.parametrize(("content", "needle"), [
    ("[1,", ":2: not valid JSON"),
    ('["x"]', "found a JSON list"),
    ('{"a": "nope", "B": "10.0.0.1"}', "key 'a': found 'nope'"),
])
@root_only
def test_remote_addresses_must_be_an_object_of_addresses(tmp_path: Path, content: str,
                                                         needle: str) -> None:
    m = tmp_path / "m.txt"
    m.write_text("a b\n0 1\n1 0\n")
    r = tmp_path / "remote.json"
    r.write_text(content + "\n")
    res = sidusctl("vnode", "latency-matrix", str(m), "--remote-addresses", str(r),
                   state=tmp_path / "st", timeout=60)
    _bad(res, 2, str(r), needle)


# -- 5: sizes ---------------------------------------------------------------------------------

@root_only
def test_an_infinite_btrfs_image_size_is_a_config_error(tmp_path: Path) -> None:
    res = sidusctl("vnode", "init", "--btrfs-image", "1e999G", state=tmp_path, timeout=60)
    _bad(res, 2, "--btrfs-image", "'1e999G'")
    assert not (tmp_path / "vnode" / "btrfs.img").exists()


@pytest.mark.parametrize("bad", ["-5G", "-1", "0", "infT", "1e999G", "1e30T", "9" * 400])
def test_parse_size_refuses_negative_zero_and_non_finite(bad: str) -> None:
    with pytest.raises(ConfigError, match="--btrfs-image"):
        parse_size(bad, "--btrfs-image")


# -- 6: CPUs and latencies --------------------------------------------------------------------

@root_only
def test_create_refuses_infinite_cpus_and_changes_nothing(
        tmp_path: Path, host_sysctls: dict[str, str]) -> None:
    img = _tarball(tmp_path)
    state = tmp_path / "st"
    for v in ("inf", "nan", "-1"):
        res = sidusctl("vnode", "create", "sdt-n1", "--image", str(img), "--cpus", v,
                       state=state, timeout=60)
        _bad(res, 2, "vnode sdt-n1", "key 'cpus'")
    assert _vnodes_in_state(state) == {}
    assert _sysctls() == host_sysctls


@pytest.mark.parametrize("kw", [{"cpus": math.nan}, {"cpus": math.inf},
                                {"latency": {"if0": math.inf}}, {"latency": {"if0": math.nan}}])
def test_set_limits_refuses_non_finite_values(kw: dict[str, object]) -> None:
    vn = VNode("sdt-n1", "x", "distinct", ifaces=[VIface("if0", "v", "10.0.0.1")])
    args: dict[str, object] = {"mem": None, "cpus": None, "cpuset": None, "io": None,
                               "bandwidth": None, "latency": None, **kw}
    with pytest.raises(ConfigError, match=r"key '(cpus|latency)'"):
        set_limits(vn, **args)  # type: ignore[arg-type]
    assert vn.cpus is None and vn.ifaces[0].latency_ms is None


def test_latency_matrix_api_checks_values_and_vifaces(tmp_path: Path) -> None:
    from sidusctl.vnode.limits import check_matrix
    p = Platform(tmp_path)
    with pytest.raises(ConfigErrors) as e:
        p.latency_matrix(["a", "b"], [[0, math.inf], [math.nan, 0]],
                         remote={"b": "nowhere"})
    msg = str(e.value)
    assert "key '[0][1]': found inf" in msg and "key '[1][0]': found nan" in msg
    assert "key 'b': found 'nowhere'" in msg
    with pytest.raises(ConfigErrors, match="3 vnodes"):
        check_matrix(["a", "b", "c"], [[0, 1, 2], [1, 0]])
    # a vnode without a viface has nothing the matrix could shape
    p.store.base.mkdir(parents=True)
    p.store.save(State(store={}, vnetworks={}, hashes={},
                       vnodes={"sdt-a": VNode("sdt-a", "x", "distinct")}))
    with pytest.raises(ConfigError, match="vnode sdt-a: key 'ifaces': no viface"):
        p.latency_matrix(["sdt-a", "sdt-b"], [[0, 5], [5, 0]], remote={"sdt-b": "10.0.0.2"})


# -- 7: platform files ------------------------------------------------------------------------

_NET = '[[vnetworks]]\nname = "vnet"\ncidr = "10.144.0.0/24"\n\n'


@pytest.mark.parametrize(("body", "needle"), [
    (_NET + '[[vnodes]]\nname = "a"\nimage = "x"\nvnetwork = "nonet"\n',
     "key 'vnodes[0].vnetwork': unknown vnetwork 'nonet'"),
    (_NET + '[[vnodes]]\nname = "a"\nimage = "x"\nifaces = [{ vnetwork = "other" }]\n',
     "key 'vnodes[0].ifaces[0].vnetwork': unknown vnetwork 'other'"),
    (_NET + '[[vnodes]]\nname = "a"\nimage = "x"\n'
     'ifaces = [{ name = "a-very-long-name", vnetwork = "vnet" }]\n',
     "key 'vnodes[0].ifaces[0].name': found 'a-very-long-name'"),
    (_NET + _NET.replace("10.144", "10.145"), "key 'vnetworks[1].name': vnetwork 'vnet' defined twice"),
    (_NET + '[[vnodes]]\nname = "a"\nimage = "x"\nvnetwork = "vnet"\nbandwidth = "lots"\n',
     "key 'vnodes[0].bandwidth': found 'lots' (expected a tc rate"),
    (_NET + '[[vnodes]]\nname = "a"\nimage = "x"\nvnetwork = "vnet"\ncpu = inf\n',
     "key 'vnodes[0].cpu': found float inf (expected a finite number"),
    (_NET + '[[vnodes]]\nname = "a"\nimage = "x"\nvnetwork = "vnet"\nlatency = inf\n',
     "key 'vnodes[0].latency': found float inf"),
    (_NET + '[[vnodes]]\nname = "a"\nimage = "x"\n'
     'ifaces = [{ vnetwork = "vnet", address = "10.9.0.1" }]\n',
     "key 'vnodes[0].ifaces[0].address': 10.9.0.1 is outside vnetwork vnet"),
    ('[[vnetworks]]\nname = "vx"\ncidr = "10.144.0.0/24"\nmode = "vxlan"\n',
     "key 'vnetworks[0].vxlan_id': missing"),
])
def test_platform_file_unresolved_references_are_listed(tmp_path: Path, body: str,
                                                        needle: str) -> None:
    pf = tmp_path / "p.toml"
    pf.write_text(body)
    res = sidusctl("vnode", "up", "--dry-run", str(pf), state=tmp_path / "st", timeout=60)
    _bad(res, 2, str(pf), needle)


def test_platform_file_problems_are_listed_together(tmp_path: Path) -> None:
    pf = tmp_path / "p.toml"
    pf.write_text(_NET + _NET + '[defaults]\nimage = "x"\n\n'
                  '[[vnodes]]\nname = "a"\nvnetwork = "nonet"\ncpu = inf\n\n'
                  '[[vnodes]]\nname = "b"\nifaces = [{ vnetwork = "other", bandwidth = "lots" }]\n')
    with pytest.raises(ConfigErrors) as e:
        load(pf)
    keys = [x.key for x in e.value.errors]
    assert keys == ["vnetworks[1].name", "vnodes[0].vnetwork", "vnodes[0].cpu",
                    "vnodes[1].ifaces[0].bandwidth", "vnodes[1].ifaces[0].vnetwork"], keys


@root_only
def test_platform_up_with_an_unknown_image_creates_nothing(
        tmp_path: Path, host_sysctls: dict[str, str]) -> None:
    pf = tmp_path / "p.toml"
    pf.write_text('[defaults]\nimage = "sdt-nope"\nvnetwork = "sdt-up"\n\n'
                  '[[vnetworks]]\nname = "sdt-up"\ncidr = "10.239.0.0/24"\n\n'
                  '[[vnodes]]\nname = "a"\n\n'
                  f'[[vnodes]]\nname = "b"\nimage = "{tmp_path}/none.tar.gz"\n')
    state = tmp_path / "st"
    try:
        res = sidusctl("vnode", "up", str(pf), "--no-wait", state=state, timeout=120)
        _bad(res, 4, "vnode a: key 'image': unknown image 'sdt-nope'",
             f"vnode b: key 'image': image tarball {tmp_path}/none.tar.gz does not exist")
        assert not _link_exists("sdt-up") and _sysctls() == host_sysctls
    finally:
        if _link_exists("sdt-up"):
            sidusctl("vnode", "down", str(pf), state=state, timeout=120)


def test_platform_dry_run_names_the_images_up_would_not_find(tmp_path: Path) -> None:
    pf = tmp_path / "p.toml"
    pf.write_text('[defaults]\nimage = "sdt-nope"\n\n[[vnodes]]\nname = "a"\n\n'
                  f'[[vnodes]]\nname = "b"\nimage = "{tmp_path}/none.tar.gz"\n')
    state = tmp_path / "st"
    res = sidusctl("vnode", "up", "--dry-run", str(pf), state=state, timeout=60)
    _bad(res, 4, "vnode a: key 'image': unknown image 'sdt-nope'",
         f"vnode b: key 'image': image tarball {tmp_path}/none.tar.gz does not exist")
    assert not state.exists()


# -- 8: a failed create leaves the host as it was ---------------------------------------------

@root_only
def test_create_with_an_unknown_image_leaves_the_host_sysctls(
        tmp_path: Path, host_sysctls: dict[str, str]) -> None:
    state = tmp_path / "st"
    res = sidusctl("vnode", "create", "sdt-n1", "--image", "sdt-nope", state=state, timeout=60)
    _bad(res, 4, "unknown image 'sdt-nope'")
    assert "raising host sysctl" not in res.stderr
    assert _sysctls() == host_sysctls
    f = state / "vnode" / "state.json"
    assert not f.exists() or json.loads(f.read_text())["store"] == {}
    assert not (state / "vnode" / "store").exists()


def test_sysctls_raised_by_a_failing_transaction_are_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a store step that fails after the sysctls went up (here: cow on a plain directory)
    # must still record them, or 'vnode deinit' would never put them back
    from sidusctl.subsys import btrfs
    if btrfs.is_btrfs(tmp_path):
        pytest.skip("tmp_path is on btrfs: cow would work")
    fake = {"fs/inotify/max_user_instances": {"before": 128, "set": 8192}}
    monkeypatch.setattr(lxc, "raise_host_sysctls", lambda: dict(fake))
    p = Platform(tmp_path)
    with pytest.raises(SidusError, match="needs the vnode store on btrfs"):
        p.create("sdt-n1", str(_tarball(tmp_path)), fs="cow")
    st = p.store.read()
    assert st.store == {"host_sysctls": fake} and st.vnodes == {}


@pytest.mark.parametrize("cmd", [["exec", "n[1-", "--", "true"], ["status", "x[", "y"]])
def test_a_bad_node_set_on_the_command_line_is_named_as_such(tmp_path: Path,
                                                             cmd: list[str]) -> None:
    res = sidusctl("vnode", *cmd, state=tmp_path / "st", timeout=60)
    _bad(res, 2, "command line: key 'NODES': invalid node set '", "missing bracket")


@root_only
def test_an_image_path_that_is_a_directory_is_named_as_such(
        tmp_path: Path, host_sysctls: dict[str, str]) -> None:
    res = sidusctl("vnode", "create", "sdt-d1", "--image", str(tmp_path),
                   state=tmp_path / "st", timeout=60)
    _bad(res, 2, f"{tmp_path}: is not a regular file (expected a rootfs tarball")
    assert _sysctls() == host_sysctls


def test_set_limits_lists_every_bad_value_and_changes_nothing() -> None:
    vn = VNode("sdt-l", "x", "distinct")
    with pytest.raises(ConfigErrors) as e:
        set_limits(vn, mem={"swap": 100}, cpus=-1.0, cpuset="3-1", io=None, bandwidth=None,
                   latency={"if9": 5.0})
    msgs = [x.message for x in e.value.errors]
    assert len(msgs) == 4, msgs
    for needle in ("key 'swap'", "key 'cpus': found -1.0", "invalid cpuset '3-1'",
                   "key 'latency': no viface 'if9'"):
        assert any(needle in m for m in msgs), (needle, msgs)
    assert vn.mem == {} and vn.cpus is None and vn.cpuset is None


@root_only
@pytest.mark.parametrize(("name", "data", "kind"), [
    ("garbage.tar.gz", b"\x00garbage" * 300, "gzip-compressed"),
    ("rootfs.tar.zst", b"\x1f\x8b" + b"\x00" * 600, "zstd-compressed"),
    ("rootfs.tar", b"x" * 1024, "a plain tar"),
])
def test_an_image_tarball_that_is_not_what_its_suffix_says_is_refused_first(
        tmp_path: Path, host_sysctls: dict[str, str], name: str, data: bytes, kind: str) -> None:
    t = tmp_path / name
    t.write_bytes(data)
    state = tmp_path / "st"
    res = sidusctl("vnode", "create", "sdt-g1", "--image", str(t), state=state, timeout=60)
    _bad(res, 2, f"{t}: is not {kind}")
    assert _sysctls() == host_sysctls and not (state / "vnode" / "store").exists()
