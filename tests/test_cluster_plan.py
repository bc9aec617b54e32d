"""The multi-host plan (sidusctl.vnode.cluster_plan): addresses, VNIs, MTU, and the platform
file each pnode gets, which must load on the pnode exactly like a file a person wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from sidusctl.core.errors import ConfigError, ConfigErrors
from sidusctl.vnode.cluster_plan import PnodeInfo, derived_vni, make_plan
from sidusctl.vnode.placement import Capacity, PlacementError
from sidusctl.vnode.platform_file import load

PN = [PnodeInfo("pn1", "192.0.2.1", "eth0", 1500), PnodeInfo("pn2", "192.0.2.2", "eth0", 9000),
      PnodeInfo("pn3", "192.0.2.3", None, 1500)]
CAP = [Capacity(p.name, 4, 8192) for p in PN]

FILE = """
[pnodes]
hosts = "pn[1-3]"

[placement]
policy = "spread"

[[vnetworks]]
name = "vnet"
cidr = "10.144.0.0/24"

[[vnetworks]]
name = "adm"
cidr = "10.145.0.0/29"
vxlan_id = 77

[[vnodes]]
name = "node[1-4]"
image = "minimal"
vnetwork = "vnet"
cpu = 1
bandwidth = "10mbit"

[[vnodes]]
name = "gw"
image = "/srv/other.tar.zst"
host = "pn3"
ifaces = [{ vnetwork = "vnet", address = "10.144.0.200" }, { vnetwork = "adm" }]
mem = { mem = 512 }
"""


def _spec(tmp_path: Path, text: str = FILE):  # type: ignore[no-untyped-def]
    f = tmp_path / "p.toml"
    f.write_text(text)
    return load(f)


def test_plan_addresses_vni_mtu(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    plan = make_plan(spec, PN, CAP, {"minimal": "images/abc.tar.zst"})
    assert plan.placement == {"node1": "pn1", "node2": "pn2", "node3": "pn1", "node4": "pn2",
                              "gw": "pn3"}
    assert plan.gateways["vnet"] == {"pn1": "10.144.0.1", "pn2": "10.144.0.2",
                                     "pn3": "10.144.0.3"}
    assert plan.addresses["node1"] == {"vnet": "10.144.0.4"}
    assert plan.addresses["gw"] == {"vnet": "10.144.0.200", "adm": "10.145.0.4"}
    assert plan.vni == {"vnet": derived_vni("vnet"), "adm": 77}
    assert 0 < derived_vni("vnet") < 2**24
    assert plan.mtu == 1450  # the smallest underlay MTU less 50
    assert plan.vnodes_on("pn2") == ["node2", "node4"]


def test_pnode_files_load_on_the_pnode(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    plan = make_plan(spec, PN, CAP, {"minimal": "/var/lib/x/images/abc.tar.zst"})
    f = tmp_path / "pn3.toml"
    f.write_text(tomli_w.dumps(plan.files["pn3"]))
    mine = load(f)
    assert [v.name for v in mine.vnodes] == ["gw"]
    gw = mine.vnodes[0]
    assert gw.image == "/srv/other.tar.zst"
    assert [(i.name, i.vnetwork, i.address) for i in gw.create["ifaces"]] == \
        [("if0", "vnet", "10.144.0.200"), ("if1", "adm", "10.145.0.4")]
    assert gw.create["mem"]["mem"] == 512
    vnet = {n.name: n for n in mine.vnetworks}["vnet"]
    assert vnet.mode == "vxlan" and vnet.vxlan_remotes == ("192.0.2.1", "192.0.2.2")
    assert vnet.vxlan_local == "192.0.2.3" and vnet.gateway == "10.144.0.3"
    assert vnet.mtu == 1450 and vnet.root_interface is None
    f1 = tmp_path / "pn1.toml"
    f1.write_text(tomli_w.dumps(plan.files["pn1"]))
    n1 = load(f1).vnodes[0]
    assert n1.image == "/var/lib/x/images/abc.tar.zst"
    assert n1.create["bandwidth"] == {"if0": "10mbit"}
    assert n1.create["ifaces"][0].address == "10.144.0.4"


def test_no_address_left_and_repeated_address(tmp_path: Path) -> None:
    small = FILE.replace('cidr = "10.145.0.0/29"', 'cidr = "10.145.0.0/30"')
    with pytest.raises(ConfigError, match="too few addresses for 3 pnodes"):
        make_plan(_spec(tmp_path, small), PN, CAP, {})
    clash = FILE.replace('address = "10.144.0.200"', 'address = "10.144.0.2"')
    with pytest.raises(ConfigError, match="used twice"):
        make_plan(_spec(tmp_path, clash), PN, CAP, {})


def test_too_big_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PlacementError) as ei:
        make_plan(_spec(tmp_path, FILE.replace("cpu = 1", "cpu = 3")), PN, CAP, {})
    assert sorted(ei.value.unplaced) == ["node4"]


def test_platform_file_pnode_errors_all_at_once(tmp_path: Path) -> None:
    bad = FILE.replace('host = "pn3"', 'host = "pn9"').replace(
        'policy = "spread"', 'policy = "random"').replace(
        'name = "node[1-4]"', 'name = "node[1-4"')
    with pytest.raises(ConfigErrors) as ei:
        _spec(tmp_path, bad)
    text = str(ei.value)
    assert "'pn9' is not one of the pnodes" in text
    assert "placement.policy" in text and "random" in text
    assert "invalid node set" in text


def test_key_files_travel_with_the_pnode_file(tmp_path: Path) -> None:
    """A vnode's ssh_pubkey is a path on the frontend: the create arguments hold the key, and
    the pnode's bundle carries the file and points at its copy there."""
    import io
    import tarfile
    import tomllib

    from sidusctl.vnode.cluster import Cluster

    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAtest k@x\n")
    text = FILE.replace('cpu = 1\n', f'cpu = 1\nssh_pubkey = "{key}"\n')
    spec = _spec(tmp_path, text)
    assert spec.vnodes[0].create["ssh_pubkey"] == "ssh-ed25519 AAAAtest k@x\n"
    assert spec.vnodes[0].table["ssh_pubkey"] == str(key)
    plan = make_plan(spec, PN, CAP, {})
    with Cluster(spec, tmp_path / "front") as cl:
        data = cl._bundle("pn1", plan.files["pn1"])
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        names = tf.getnames()
        doc = tomllib.loads(tf.extractfile("p.toml").read().decode())  # type: ignore[union-attr]
        sent = tf.extractfile("keys/node1.ssh_pubkey").read()  # type: ignore[union-attr]
    assert sorted(names) == ["keys/node1.ssh_pubkey", "keys/node3.ssh_pubkey", "p.toml"]
    assert sent == key.read_bytes()
    assert doc["vnodes"][0]["ssh_pubkey"] == "/var/lib/sidusctl/platforms/keys/node1.ssh_pubkey"


def test_facts_and_image_presence_in_one_answer() -> None:
    from sidusctl.vnode.cluster import PRESENT, parse_facts_answer

    doc = '{\n  "cores": 2,\n  "store": {"ready": true}\n}\n'
    facts, have = parse_facts_answer(f"\n{doc}{PRESENT}images/ab.tar.zst\nnoise\n"
                                     f"{PRESENT}images/cd.tar.zst\n")
    assert facts == {"cores": 2, "store": {"ready": True}}
    assert have == {"images/ab.tar.zst", "images/cd.tar.zst"}
    assert parse_facts_answer(doc) == (facts, set())
    for bad in ("", "oops", "[1, 2]"):
        with pytest.raises(ValueError):
            parse_facts_answer(bad)
