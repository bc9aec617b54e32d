"""The node inventory: parsing, group defaults, pxelinux/GRUB names, and validation messages
(every problem at once, each with file and line)."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import pytest

from sidusctl.core.errors import ConfigErrors
from sidusctl.core.mac import normalize_mac, pxelinux_name
from sidusctl.netboot.inventory import Node, load, parse
from sidusctl.serve.dns import Zone
from tests.conftest import sidusctl

GOOD = """\
[network]
subnet = "10.13.20.0/24"
server = "10.13.20.13"

[defaults]
image = "minimal"
overlay = "tmpfs"
kernel_args = ["console=tty1"]

[groups.compute]
overlay = "iscsi"
iscsi_target = "iqn.2013-04.zone.sidus.target:compute"
format = true

[[nodes]]
name = "node1"
mac = "52:54:00:12:34:56"
ip = "10.13.20.130"

[[nodes]]
name = "node2"
mac = "52-54-00-AB-CD-EF"
ip = "10.13.20.131"
group = "compute"
kernel_args = ["console=ttyS0"]
"""

BAD = """\
[network]
subnet = "10.13.20.0/24"
server = "10.13.20.13"

[defaults]
image = "minimal"

[[nodes]]
name = "node1"
mac = "52:54:00:12:34:56"
ip = "10.13.20.130"

[[nodes]]
name = "node2"
mac = "52:54:00:12:34:56"
ip = "10.13.20.130"

[[nodes]]
name = "node3"
mac = "52:54:00:zz:34:56"
ip = "10.13.21.5"
image = "nosuch"
overlay = "ramdisk"
colour = "blue"

[[nodes]]
name = "node4"
mac = "01:00:5e:00:00:01"
ip = "10.13.20.255"
group = "gpu"
overlay = "disk"
"""


def test_parse_merges_defaults_groups_and_node_values() -> None:
    inv = parse(GOOD, "nodes.toml", known_images=["minimal"])
    n1, n2 = inv.nodes
    assert (n1.name, n1.mac, n1.ip, n1.image, n1.overlay) == (
        "node1", "52:54:00:12:34:56", ipaddress.IPv4Address("10.13.20.130"), "minimal", "tmpfs")
    assert n1.kernel_args == ("console=tty1",)
    assert n2.mac == "52:54:00:ab:cd:ef"  # normalised
    assert n2.overlay == "iscsi" and n2.format is True
    assert n2.iscsi_target == "iqn.2013-04.zone.sidus.target:compute"
    assert n2.kernel_args == ("console=ttyS0",)  # the node's own value wins
    assert n1.line == 15 and n2.line == 20
    assert inv.images() == ["minimal"]
    assert inv.by_mac("52-54-00-ab-cd-ef") == n2
    assert inv.by_mac("52:54:00:AB:CD:EF") == n2 and inv.by_mac("nonsense") is None
    assert inv.by_mac("52:54:00:00:00:99") is None
    assert inv.by_ip(str(n1.ip)) == n1 and inv.by_ip("10.13.20.1") is None
    res = inv.reservations()
    assert [(r.mac, str(r.ip), r.hostname) for r in res] == [
        ("52:54:00:12:34:56", "10.13.20.130", "node1"),
        ("52:54:00:ab:cd:ef", "10.13.20.131", "node2")]


def test_boot_file_names_match_the_reference_vectors() -> None:
    # netboot-facts.md: pxelinux and GRUB names
    n = Node("a", normalize_mac("88:99:AA:BB:CC:DD"), ipaddress.IPv4Address("192.0.2.91"),
             "minimal")
    assert n.pxelinux_name == "01-88-99-aa-bb-cc-dd"
    assert n.hex_ip == "C000025B"
    g = Node("b", "52:54:00:ec:33:81", ipaddress.IPv4Address("10.0.0.130"), "minimal")
    assert g.mac_dashes == "52-54-00-ec-33-81"
    assert g.hex_ip == "0A000082"
    # the same name from any MAC form (the kernel's BOOTIF value is this too)
    assert pxelinux_name("88-99-AA-BB-CC-DD") == n.pxelinux_name
    with pytest.raises(ValueError):
        pxelinux_name("88:99:aa:bb:cc")


def test_every_problem_reported_at_once_with_lines() -> None:
    with pytest.raises(ConfigErrors) as ei:
        parse(BAD, "nodes.toml", known_images=["minimal"])
    msgs = [e.message for e in ei.value.errors]
    assert msgs == [
        "nodes.toml:15: key 'nodes.node2.mac': duplicate MAC 52:54:00:12:34:56 (also node "
        "'node1' at line 10) (expected one MAC per node)",
        "nodes.toml:16: key 'nodes.node2.ip': duplicate IP 10.13.20.130 (also node 'node1' at "
        "line 11) (expected one address per node)",
        "nodes.toml:20: key 'nodes.node3.mac': found '52:54:00:zz:34:56' (expected a MAC "
        "address such as 52:54:00:12:34:56 (six hex pairs separated by ':' or '-'))",
        "nodes.toml:21: key 'nodes.node3.ip': 10.13.21.5 is outside the subnet 10.13.20.0/24 "
        "(expected an address in 10.13.20.0/24)",
        "nodes.toml:22: key 'nodes.node3.image': unknown image 'nosuch' (expected a built "
        "image: minimal)",
        "nodes.toml:23: key 'nodes.node3.overlay': found 'ramdisk' (expected one of 'tmpfs', "
        "'disk', 'iscsi', 'nfs', 'off')",
        "nodes.toml:24: key 'nodes.node3.colour': unknown key (expected one of image, overlay, root, "
        "size, disk, format, iscsi_target_ip, iscsi_target, iscsi_initiator, nfs_share, "
        "kernel_args, name, mac, ip, group, hostname)",
        "nodes.toml:26: key 'nodes.node4.disk': disk mode needs a disk (expected disk = "
        "\"/dev/sdb1\", \"LABEL=...\" or \"UUID=...\")",
        "nodes.toml:28: key 'nodes.node4.mac': found '01:00:5e:00:00:01' (expected a unicast "
        "MAC (first octet even); this is a multicast address)",
        "nodes.toml:29: key 'nodes.node4.ip': 10.13.20.255 is the broadcast address of "
        "10.13.20.0/24 (expected a host address)",
        "nodes.toml:30: key 'nodes.node4.group': unknown group 'gpu' (expected one of: no "
        "[groups.*] defined)",
    ]


def test_missing_network_and_bad_toml() -> None:
    with pytest.raises(ConfigErrors) as ei:
        parse('[[nodes]]\nname = "n1"\nmac = "52:54:00:00:00:01"\nip = "10.0.0.5"\n'
              'image = "x"\n', "n.toml")
    assert ei.value.errors[0].message == (
        "n.toml: key 'network': missing [network] table (expected [network] with subnet and "
        "server)")
    with pytest.raises(ConfigErrors) as ei:
        parse('[network]\nsubnet = "10.0.0.0/24"\nserver = \n', "n.toml")
    assert ei.value.errors[0].line == 3
    assert "not valid TOML" in ei.value.errors[0].message


def test_cli_check_reports_all_errors_and_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "nodes.toml"
    f.write_text(BAD)
    res = sidusctl("pxe", "check", "--nodes", str(f), state=tmp_path / "state")
    assert res.returncode == 2, res.stderr
    err = res.stderr
    assert f"{f}:15: key 'nodes.node2.mac': duplicate MAC" in err
    assert f"{f}:21: key 'nodes.node3.ip': 10.13.21.5 is outside the subnet" in err
    # no image is built in this empty state: the default image is unknown too
    assert f"{f}:6: key 'defaults.image': unknown image 'minimal'" in err
    assert "Traceback" not in err
    res = sidusctl("pxe", "check", "--nodes", str(tmp_path / "nope.toml"),
                   state=tmp_path / "state")
    assert res.returncode == 2 and "no such inventory file" in res.stderr


def test_load_reads_a_file(tmp_path: Path) -> None:
    f = tmp_path / "nodes.toml"
    f.write_text(GOOD)
    inv = load(f)
    assert inv.file == str(f) and len(inv.nodes) == 2
    assert sys.version_info >= (3, 11)


@pytest.mark.parametrize(("domain", "ok"), [
    ("cluster.lan", True), ("a-1.b.c", True), (".".join(["a" * 63] * 3) + ".b", True),
    ("Cluster.lan", False), ("a..b", False), ("-a.b", False), ("a.b.", False), ("", False),
    (".".join(["a" * 63] * 4), False)])  # 255 characters: above RFC 1035's 253
def test_network_domain_is_a_lower_case_dns_domain(domain: str, ok: bool) -> None:
    text = (f'[network]\nsubnet = "10.0.0.0/24"\nserver = "10.0.0.1"\ndomain = "{domain}"\n'
            '[[nodes]]\nname = "n1"\nmac = "52:54:00:00:00:01"\nip = "10.0.0.5"\n'
            'image = "minimal"\n')
    if ok:
        assert parse(text, "n.toml", known_images=["minimal"]).network.domain == domain
        return
    with pytest.raises(ConfigErrors) as ei:
        parse(text, "n.toml", known_images=["minimal"])
    assert [(e.line, e.key) for e in ei.value.errors] == [(4, "network.domain")], ei.value


DNS_CLASH = """\
[network]
subnet = "10.0.0.0/24"
server = "10.0.0.1"
domain = "cluster.lan"

[defaults]
image = "minimal"

[[nodes]]
name = "node1"
mac = "52:54:00:00:00:01"
ip = "10.0.0.11"

[[nodes]]
name = "node2"
mac = "52:54:00:00:00:02"
ip = "10.0.0.12"
hostname = "node1"

[[nodes]]
name = "node3"
mac = "52:54:00:00:00:03"
ip = "10.0.0.13"
hostname = "web"

[[nodes]]
name = "node4"
mac = "52:54:00:00:00:03"
ip = "10.0.0.14"
hostname = "web"

[[nodes]]
name = "node5"
mac = "52:54:00:00:00:05"
ip = "10.0.0.15"
hostname = "node6"

[[nodes]]
name = "node6"
mac = "52:54:00:00:00:06"
ip = "10.0.0.16"
"""


def test_dns_names_clash_reported_at_the_hostname_with_the_other_problems() -> None:
    """A node's DNS name (its hostname, or its name without one: the DNS zone's and DHCP
    option 12's) taken by another node is refused at the hostname that takes it, with the
    node's other problems; serve-pxe's zone once refused it only later, without a line."""
    with pytest.raises(ConfigErrors) as ei:
        parse(DNS_CLASH, "nodes.toml", known_images=["minimal"])
    assert [e.message for e in ei.value.errors] == [
        "nodes.toml:18: key 'nodes.node2.hostname': duplicate DNS name 'node1' (also the "
        "name of node 'node1' at line 10) (expected a hostname that is no other node's DNS "
        "name (its hostname, or its name if it has none))",
        "nodes.toml:28: key 'nodes.node4.mac': duplicate MAC 52:54:00:00:00:03 (also node "
        "'node3' at line 22) (expected one MAC per node)",
        "nodes.toml:30: key 'nodes.node4.hostname': duplicate DNS name 'web' (also the "
        "hostname of node 'node3' at line 24) (expected a hostname that is no other node's "
        "DNS name (its hostname, or its name if it has none))",
        # the later node answers by its name: the hostname taking it is the one blamed
        "nodes.toml:36: key 'nodes.node5.hostname': duplicate DNS name 'node6' (also the "
        "name of node 'node6' at line 39) (expected a hostname that is no other node's DNS "
        "name (its hostname, or its name if it has none))",
    ]
    first = ei.value.errors[0]
    assert (first.file, first.line, first.key) == ("nodes.toml", 18, "nodes.node2.hostname")


def test_a_hostname_may_reuse_a_name_dns_does_not_answer_to() -> None:
    """Only the names a node answers to in DNS must differ: a node's hostname may be its own
    name, or the name of a node that has a hostname of its own; serve-pxe's zone takes both."""
    text = DNS_CLASH.split("[[nodes]]")[0] + (
        '[[nodes]]\nname = "a"\nmac = "52:54:00:00:00:01"\nip = "10.0.0.11"\nhostname = "a"\n'
        '[[nodes]]\nname = "b"\nmac = "52:54:00:00:00:02"\nip = "10.0.0.12"\nhostname = "c"\n'
        '[[nodes]]\nname = "c"\nmac = "52:54:00:00:00:03"\nip = "10.0.0.13"\nhostname = "b"\n')
    inv = parse(text, "nodes.toml", known_images=["minimal"])
    assert inv.network.domain is not None
    zone = Zone(inv.network.domain, tuple((r.hostname or "", r.ip) for r in inv.reservations()))
    zone.validate(inv.file)
    assert [name for name, _ in zone.records] == ["a", "c", "b"]


def test_cli_check_refuses_a_dns_name_clash_with_exit_2(tmp_path: Path) -> None:
    f = tmp_path / "nodes.toml"
    f.write_text(DNS_CLASH)
    res = sidusctl("pxe", "check", "--nodes", str(f), state=tmp_path / "state")
    assert res.returncode == 2, res.stderr
    assert (f"{f}:18: key 'nodes.node2.hostname': duplicate DNS name 'node1' (also the name "
            "of node 'node1' at line 10)") in res.stderr
    assert f"{f}:30: key 'nodes.node4.hostname': duplicate DNS name 'web'" in res.stderr
    assert "Traceback" not in res.stderr and "records" not in res.stderr
