"""A state directory that cannot be used, a damaged vnode state file and bad vnode values
are clear errors naming the path or key (ConfigError exit 2, NotFoundError exit 4,
StateError exit 1), never an internal error, and change nothing: a state directory below a
file or on /proc, ``$SIDUSCTL_STATE`` naming a file, an empty ``--state-dir``, a corrupt
``vnode/state.json``, ``vnode cache-image`` of an unknown image (host sysctls untouched),
a gateway that is the network or broadcast address, an unknown ``--netns``, a reversed
cpuset range, a negative or non-finite ``--timeout`` and a ``--btrfs-device`` that is no
block device. Fast: no image build, no container started."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sidusctl.core.errors import ConfigError, StateError
from sidusctl.core.paths import state_dir
from sidusctl.core.state import FileLock
from sidusctl.subsys.cgroups import parse_cpuset
from sidusctl.vnode.model import VNetwork
from sidusctl.vnode.store import State, Store
from tests.conftest import sidusctl
from tests.refusals import assert_refused as _bad
from tests.refusals import host_sysctl_values as _sysctls

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the vnode commands need root")


def _link_exists(name: str) -> bool:
    r = subprocess.run(["ip", "link", "show", name], capture_output=True, check=False)
    return r.returncode == 0


def _a_file(tmp_path: Path) -> Path:
    f = tmp_path / "afile"
    f.write_text("not a directory\n")
    return f


# -- 1: a state directory that cannot be made ------------------------------------------------

@root_only
@pytest.mark.parametrize("args", [["vnode", "list"], ["vnode", "net", "list"],
                                  ["vnode", "status"]])
def test_a_state_dir_below_a_file_is_a_state_error(tmp_path: Path, args: list[str]) -> None:
    state = _a_file(tmp_path) / "sub"
    res = sidusctl(*args, state=state, timeout=60)
    _bad(res, StateError.exit_code, str(state), "cannot create the directory",
         "Not a directory")


@root_only
def test_a_state_dir_on_proc_is_a_state_error() -> None:
    res = sidusctl("vnode", "list", state=Path("/proc/sdt-x"), timeout=60)
    _bad(res, StateError.exit_code, "/proc/sdt-x/vnode", "cannot create the directory")


def test_store_and_lock_name_the_directory_they_cannot_make(tmp_path: Path) -> None:
    below = _a_file(tmp_path) / "sub"
    with pytest.raises(StateError, match=f"{below}/vnode: cannot create"):
        Store(below).read()
    with pytest.raises(StateError, match=f"{below}/vnode: cannot create"), \
            Store(below).transaction():
        pass
    with pytest.raises(StateError, match=f"{below}/l: cannot create"):
        FileLock(below / "l" / ".lock", "a test lock").acquire()


# -- 2: $SIDUSCTL_STATE naming a file, an empty --state-dir ----------------------------------

def test_sidusctl_state_naming_a_file_is_a_config_error(tmp_path: Path) -> None:
    f = _a_file(tmp_path)
    res = sidusctl("image", "list", env={"SIDUSCTL_STATE": str(f)}, timeout=60)
    _bad(res, 2, "$SIDUSCTL_STATE", f"{f} exists and is not a directory")
    assert "no images" not in res.stdout


def test_an_empty_state_dir_option_is_a_config_error() -> None:
    res = sidusctl("--state-dir", "", "image", "list", timeout=60)
    _bad(res, 2, "--state-dir", "empty path")
    assert "no images" not in res.stdout


def test_state_dir_refuses_empty_and_file_paths(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    f = _a_file(tmp_path)
    with pytest.raises(ConfigError, match="--state-dir"):
        state_dir("")
    with pytest.raises(ConfigError, match="not a directory"):
        state_dir(f)
    monkeypatch.setenv("SIDUSCTL_STATE", str(f))
    with pytest.raises(ConfigError, match=r"\$SIDUSCTL_STATE"):
        state_dir()
    monkeypatch.setenv("SIDUSCTL_STATE", str(tmp_path / "new"))
    assert state_dir() == tmp_path / "new"


# -- 3: a corrupt vnode/state.json -----------------------------------------------------------

_CORRUPT = [
    ("[]", "not a vnode state (a JSON object expected, found list)"),
    ('{"vnodes": []}', "vnodes: a JSON object expected"),
    ('{"vnodes": {"a": {"x": 1}}}', "vnodes.a: unexpected key 'x'"),
    ('{"vnodes": {"a": 5}}', "vnodes.a: a JSON object expected, found int"),
    ('{"vnetworks": {"n": 1}}', "vnetworks.n: a JSON object expected, found int"),
    ('{"store": 5}', "store: a JSON object expected"),
    ('{"vnodes": {"a": {"name": "a", "image": "i", "fs": "cow", "ifaces": [{"name": "if0"}]}}}',
     "vnodes.a.ifaces[0]: missing key 'vnetwork'"),
    ('{"vnodes": {"a": {"name": "a", "image": "i", "fs": "cow", "ifaces": 3}}}',
     "vnodes.a.ifaces: a JSON list expected"),
    ('{"vnetworks": {"n": {"name": "n"}}}', "vnetworks.n: missing key 'cidr'"),
    ('{"vnodes": {"a": {"name": "a", "image": "x", "fs": "cow", "cpus": "lots"}}}',
     "vnodes.a.cpus: found 'lots', expected float | None"),
    ('{"vnodes": {"a": {"name": "a", "image": "x", "fs": "cow", "state": 5}}}',
     "vnodes.a.state: found 5, expected str"),
    ('{"vnodes": {"a": {"name": "a", "image": "x", "fs": "cow", "ifaces": '
     '[{"name": "if0", "vnetwork": "v", "latency_ms": NaN}]}}}',
     "vnodes.a.ifaces[0].latency_ms: found nan"),
    ('{"vnetworks": {"n": {"name": "n", "cidr": "10.0.0.0/24", "vxlan_id": "5"}}}',
     "vnetworks.n.vxlan_id: found '5', expected int | None"),
]


@root_only
@pytest.mark.parametrize(("content", "problem"), _CORRUPT)
def test_a_corrupt_vnode_state_is_a_state_error(tmp_path: Path, content: str,
                                                 problem: str) -> None:
    state = tmp_path / "st"
    f = state / "vnode" / "state.json"
    f.parent.mkdir(parents=True)
    f.write_text(content)
    for args in (["list"], ["status"], ["net", "list"]):
        res = sidusctl("vnode", *args, state=state, timeout=60)
        _bad(res, StateError.exit_code, f"{f}: {problem}")
    assert f.read_text() == content


@pytest.mark.parametrize(("content", "problem"), _CORRUPT)
def test_state_from_dict_names_the_key(content: str, problem: str) -> None:
    with pytest.raises(StateError) as e:
        State.from_dict(json.loads(content), "S")
    assert f"S: {problem}" in str(e.value)


# -- 4: cache-image of an unknown image ------------------------------------------------------

@root_only
def test_cache_image_of_an_unknown_image_changes_nothing(
        tmp_path: Path, host_sysctls: dict[str, str]) -> None:
    state = tmp_path / "st"
    res = sidusctl("vnode", "cache-image", "sdt-nope", state=state, timeout=60)
    _bad(res, 4, "unknown image 'sdt-nope'")
    assert "raising host sysctl" not in res.stderr
    assert _sysctls() == host_sysctls
    assert not (state / "vnode" / "store").exists()
    assert not (state / "vnode" / "state.json").exists()


# -- 5: a gateway that is the network or broadcast address -----------------------------------

@pytest.mark.parametrize(("cidr", "gateway", "what"), [
    ("10.0.0.0/24", "10.0.0.0", "network"), ("10.0.0.0/24", "10.0.0.255", "broadcast"),
    ("10.9.0.0/30", "10.9.0.3", "broadcast"), ("10.9.0.0/30", "10.9.0.0", "network")])
def test_vnetwork_gateway_is_a_host_address(cidr: str, gateway: str, what: str) -> None:
    with pytest.raises(ConfigError, match=f"key 'gateway': {gateway} is the {what} address"):
        VNetwork(name="n", cidr=cidr, gateway=gateway).validate()
    assert VNetwork(name="n", cidr="10.9.0.0/30", gateway="10.9.0.1").validate().gateway


@root_only
def test_vnet_create_refuses_the_network_address_as_gateway(tmp_path: Path) -> None:
    state = tmp_path / "st"
    try:
        res = sidusctl("vnode", "net", "create", "sdtgw1", "10.231.7.0/24",
                       "--gateway", "10.231.7.0", state=state, timeout=60)
        _bad(res, 2, "key 'gateway'", "10.231.7.0 is the network address of 10.231.7.0/24")
        assert not _link_exists("sdtgw1")
    finally:
        subprocess.run(["ip", "link", "del", "sdtgw1"], capture_output=True, check=False)


# -- 6: an unknown --netns ---------------------------------------------------------------------

@root_only
def test_vnet_create_in_an_unknown_netns_is_a_config_error(tmp_path: Path) -> None:
    state = tmp_path / "st"
    res = sidusctl("vnode", "net", "create", "sdtns1", "10.231.8.0/24", "--netns",
                   "sdt-no-such-ns", state=state, timeout=60)
    _bad(res, 2, "key 'netns'", "no network namespace 'sdt-no-such-ns'")
    f = state / "vnode" / "state.json"
    assert not f.exists() or json.loads(f.read_text()).get("vnetworks", {}) == {}


# -- 7: a reversed cpuset range -----------------------------------------------------------------

@pytest.mark.parametrize("text", ["3-1", "0,2-1"])
def test_parse_cpuset_refuses_a_reversed_range(text: str) -> None:
    with pytest.raises(ConfigError, match="reversed"):
        parse_cpuset(text)
    assert parse_cpuset("0-1,3") == {0, 1, 3}


@root_only
def test_update_with_a_reversed_cpuset_changes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "st"
    f = state / "vnode" / "state.json"
    f.parent.mkdir(parents=True)
    doc = {"version": 1, "store": {}, "hashes": {}, "vnetworks": {},
           "vnodes": {"sdt-u1": {"name": "sdt-u1", "image": "x", "fs": "distinct"}}}
    f.write_text(json.dumps(doc))
    res = sidusctl("vnode", "update", "sdt-u1", "--cpuset", "3-1", state=state, timeout=60)
    _bad(res, 2, "key 'cpuset'", "'3-1'")
    assert json.loads(f.read_text())["vnodes"]["sdt-u1"].get("cpuset") is None


# -- 8: --timeout ------------------------------------------------------------------------------

@root_only
@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_timeouts_are_finite_and_not_negative(tmp_path: Path, value: str) -> None:
    state = tmp_path / "st"
    res = sidusctl("vnode", "wait", "--timeout", value, "sdt-none", state=state, timeout=60)
    _bad(res, 2, "--timeout")
    pf = tmp_path / "p.toml"
    pf.write_text("")
    res = sidusctl("vnode", "up", "--timeout", value, str(pf), state=state, timeout=60)
    _bad(res, 2, "--timeout")
    assert not state.exists()


# -- 9: --btrfs-device that is no block device ---------------------------------------------------

@root_only
def test_init_with_a_non_block_device_changes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "st"
    f = _a_file(tmp_path)
    res = sidusctl("vnode", "init", "--btrfs-device", str(f), state=state, timeout=60)
    _bad(res, 2, "--btrfs-device", f"{f} is not a block device")
    assert not state.exists()
