"""vnode pieces that need no container: the LXC config template (golden), rates and sizes,
cgroup settings, the SSH rules of Distem's FAQ, platform-file checking, the netem probe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidusctl.core.errors import ConfigError, ConfigErrors, PrerequisiteError, StateError
from sidusctl.subsys.cgroups import IoLimit, MemLimits, cpu_settings, io_settings
from sidusctl.subsys.net import tc
from sidusctl.subsys.templates import render
from sidusctl.vnode import ssh
from sidusctl.vnode.limits import parse_matrix_file
from sidusctl.vnode.model import VNetwork, parse_mib
from sidusctl.vnode.platform_file import load
from tests.golden import assert_golden


def test_lxc_config_golden() -> None:
    text = render("lxc/vnode.conf.j2", vname="n1", rootfs="/s/vnode/store/vnodes/n1/rootfs",
                  common_conf="/usr/share/lxc/config/common.conf",
                  console_log="/s/vnode/lxc/n1/console.log", log_file="/s/vnode/lxc/n1/lxc.log",
                  ifaces=[{"name": "if0", "bridge": "vnet", "veth": "n1-if0",
                           "hwaddr": "02:aa:bb:cc:dd:ee", "address": "10.144.0.1/22",
                           "gateway": "10.147.255.254"}],
                  cgroups=[(1, "memory.limit_in_bytes", "536870912"),
                           (2, "memory.high", "268435456")],
                  devices=[{"path": "/dev/loop3", "majmin": "7:3"}])
    assert_golden(text, "lxc/vnode.conf")


@pytest.mark.parametrize("text,bits", [("100mbit", 100_000_000), ("1gbit", 10**9),
                                       ("12.5mbps", 100_000_000), ("64kbit", 64_000),
                                       ("3000mbit", 3 * 10**9), ("8000", 8000)])
def test_parse_rate(text: str, bits: int) -> None:
    assert tc.parse_rate(text) == bits


@pytest.mark.parametrize("bad", ["fast", "10 mbits", "-3mbit", "0", "100tbit"])
def test_parse_rate_rejects(bad: str) -> None:
    with pytest.raises(ConfigError):
        tc.parse_rate(bad)


def test_memory_settings_v1_v2() -> None:
    assert MemLimits(1, mem=4096, swap=1024).settings() == [
        (1, "memory.limit_in_bytes", str(4096 * 2**20)),
        (1, "memory.memsw.limit_in_bytes", str(5120 * 2**20))]
    assert MemLimits(1, mem="max").settings() == [(1, "memory.limit_in_bytes", "-1")]
    assert MemLimits(2, soft=4096, hard=4150, swap=1024).settings() == [
        (2, "memory.high", str(4096 * 2**20)), (2, "memory.max", str(4150 * 2**20)),
        (2, "memory.swap.max", str(1024 * 2**20))]
    assert MemLimits(2, soft="max").settings() == [(2, "memory.high", "max")]
    with pytest.raises(ConfigError):
        MemLimits(1, soft=100).settings()
    with pytest.raises(ConfigError):
        MemLimits(2, mem=100).settings()
    # v1 counts swap on top of memory: a swap limit alone would be no limit at all
    for mem in (None, "max"):
        with pytest.raises(ConfigError, match=r"key 'swap'.*without a memory limit"):
            MemLimits(1, mem=mem, swap=256).settings()
    assert MemLimits(1, swap="max").settings() == [(1, "memory.memsw.limit_in_bytes", "-1")]
    # a swap limit of 0 is no swap at all: memsw = mem (v1), memory.swap.max 0 (v2)
    assert MemLimits(1, mem=512, swap=0).settings() == [
        (1, "memory.limit_in_bytes", str(512 * 2**20)),
        (1, "memory.memsw.limit_in_bytes", str(512 * 2**20))]
    assert MemLimits(2, hard=512, swap=0).settings() == [
        (2, "memory.max", str(512 * 2**20)), (2, "memory.swap.max", "0")]


def test_a_swap_limit_may_be_zero_a_memory_limit_may_not() -> None:
    assert parse_mib("0", "--swap", "swap", zero=True) == 0
    assert parse_mib("max", "--swap", "swap", zero=True) == "max"
    for bad, zero in (("0", False), ("-1", True), ("-5", False)):
        with pytest.raises(ConfigError) as ei:
            parse_mib(bad, "--mem", "mem", zero=zero)
        assert f"invalid size '{bad}'" in str(ei.value)


def test_v2_memory_on_this_host_is_an_honest_error() -> None:
    from sidusctl.subsys import cgroups

    if cgroups.v2_has("memory"):
        pytest.skip("this host has the v2 memory controller")
    with pytest.raises(PrerequisiteError, match="cgroup v2 'memory' controller"):
        MemLimits(2, hard=100).check_host()


def test_io_and_cpu_settings() -> None:
    dev = "/dev/null"  # a char device: refused
    with pytest.raises(ConfigError, match="not a block device"):
        IoLimit(dev, 1).majmin()
    loops = sorted(Path("/dev").glob("loop[0-9]*"))
    if loops:
        st = os.stat(loops[0])
        mm = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        assert io_settings([IoLimit(str(loops[0]), 1024, "max")], 1) == [
            (1, "blkio.throttle.read_bps_device", f"{mm} 1024"),
            (1, "blkio.throttle.write_bps_device", f"{mm} 0")]
        assert io_settings([IoLimit(str(loops[0]), 1024, "max")], 2) == [
            (2, "io.max", f"{mm} rbps=1024 wbps=max")]
    assert cpu_settings(1.5, "0-1") == [(1, "cpu.cfs_period_us", "100000"),
                                        (1, "cpu.cfs_quota_us", "150000"),
                                        (1, "cpuset.cpus", "0-1")]


def test_ssh_rules_of_the_faq(tmp_path: Path) -> None:
    host = tmp_path / "host-ssh"
    host.mkdir()
    (host / "authorized_keys").write_text("ssh-ed25519 AAAAhostauth admin@x\n# comment\n")
    (host / "id_ed25519").write_text("HOST PRIVATE\n")
    (host / "id_ed25519.pub").write_text("ssh-ed25519 AAAAhostpub root@host\n")
    root = tmp_path / "rootfs"
    (root / "root" / ".ssh").mkdir(parents=True)
    (root / "root" / ".ssh" / "authorized_keys").write_text("ssh-rsa AAAAimage img@x\n")
    (root / "root" / ".ssh" / "id_ed25519").write_text("VNODE OWN KEY\n")
    ssh.inject(root, pubkey="ssh-ed25519 AAAAparam p@x", privkey="PARAM PRIVATE",
               copy_host_keys=True, host_ssh=host)
    ak = (root / "root/.ssh/authorized_keys").read_text().splitlines()
    assert ak == ["ssh-rsa AAAAimage img@x", "ssh-ed25519 AAAAhostauth admin@x",
                  "ssh-ed25519 AAAAhostpub root@host", "ssh-ed25519 AAAAparam p@x"]
    # id* copied only where absent
    assert (root / "root/.ssh/id_ed25519").read_text() == "VNODE OWN KEY\n"
    assert (root / "root/.ssh/id_ed25519.pub").read_text().startswith("ssh-ed25519 AAAAhostpub")
    assert (root / "root/.ssh/identity").read_text() == "PARAM PRIVATE\n"
    assert oct((root / "root/.ssh/identity").stat().st_mode & 0o777) == "0o600"
    # idempotent: a second start adds nothing
    ssh.inject(root, pubkey="ssh-ed25519 AAAAparam p@x", privkey=None, copy_host_keys=True,
               host_ssh=host)
    assert (root / "root/.ssh/authorized_keys").read_text().splitlines() == ak


def test_ssh_no_host_private_keys_by_default(tmp_path: Path) -> None:
    host = tmp_path / "host-ssh"
    host.mkdir()
    (host / "id_rsa").write_text("HOST PRIVATE\n")
    root = tmp_path / "rootfs"
    root.mkdir()
    ssh.inject(root, pubkey=None, privkey=None, copy_host_keys=False, host_ssh=host)
    assert not (root / "root/.ssh/id_rsa").exists()


def test_ssh_refuses_symlinks_planted_in_the_image(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "rootfs"
    (root / "root").mkdir(parents=True)
    (root / "root" / ".ssh").symlink_to(outside)
    with pytest.raises(StateError, match="symlink"):
        ssh.inject(root, pubkey="k", privkey=None, copy_host_keys=False, host_ssh=tmp_path / "no")
    assert list(outside.iterdir()) == []


def test_platform_file_alevin_and_full(tmp_path: Path) -> None:
    pf = tmp_path / "p.toml"
    pf.write_text("""
[defaults]
image = "minimal"
vnetwork = "vnet"

[[vnetworks]]
name = "vnet"
cidr = "10.144.0.0/22"

[[vnodes]]
name = "node0"
bandwidth = "3000mbit"
cpu = 1

[[vnodes]]
name = "node1"
bandwidth = "1000mbit"
cpu = 2

[[vnodes]]
name = "db"
fs = "distinct"
ifaces = [{ name = "if0", vnetwork = "vnet", address = "10.144.0.9", latency = 5 }]
mem = { hierarchy = "v2", soft_limit = 4096, hard_limit = 4150, swap = 1024 }
io = [{ device = "/dev/sda", read_bps = "10M", write_bps = "max" }]

[[vnodes]]
name = "w"
count = 3
""")
    spec = load(pf)
    names = [v.name for v in spec.vnodes]
    assert names == ["node0", "node1", "db", "w0", "w1", "w2"]
    n1 = spec.vnodes[1].create
    assert n1["cpus"] == 2.0 and n1["bandwidth"] == {"if0": "1000mbit"}
    assert n1["ifaces"][0].vnetwork == "vnet"
    db = spec.vnodes[2].create
    assert db["mem"] == {"hierarchy": 2, "soft": 4096, "hard": 4150, "swap": 1024}
    assert db["io"] == [{"device": "/dev/sda", "read_bps": 10 * 2**20, "write_bps": "max"}]
    assert db["latency"] == {"if0": 5.0} and db["ifaces"][0].address == "10.144.0.9"


def test_platform_file_takes_a_swap_limit_of_zero(tmp_path: Path) -> None:
    pf = tmp_path / "p.toml"
    pf.write_text('[[vnodes]]\nname = "a"\nimage = "x"\n'
                  'mem = { hierarchy = "v2", hard_limit = 256, swap = 0 }\n')
    assert load(pf).vnodes[0].create["mem"] == {"hierarchy": 2, "hard": 256, "swap": 0}


@pytest.mark.parametrize("body,key", [
    ('[[vnodes]]\nname = "a"\nimage = "x"\nbandwith = "1mbit"\n', "vnodes[0].bandwith"),
    ('[[vnodes]]\nname = "a"\n', "vnodes[0].image"),
    ('[[vnetworks]]\nname = "n"\n', "vnetworks[0].cidr"),
    ('[[vnodes]]\nname = "A_B"\nimage = "x"\n', "name"),
    ('[[vnodes]]\nname = "a"\nimage = "x"\nmem = { mem = "lots" }\n', "vnodes[0].mem.mem"),
    ('[[vnodes]]\nname = "a"\nimage = "x"\nmem = { mem = 0 }\n', "vnodes[0].mem.mem"),
    ('[[vnodes]]\nname = "a"\nimage = "x"\nmem = { swap = -1 }\n', "vnodes[0].mem.swap"),
])
def test_platform_file_errors_name_the_key(tmp_path: Path, body: str, key: str) -> None:
    pf = tmp_path / "p.toml"
    pf.write_text(body)
    with pytest.raises(ConfigErrors) as ei:
        load(pf)
    assert str(pf) in str(ei.value) and key in str(ei.value)


def test_latency_matrix_file(tmp_path: Path) -> None:
    f = tmp_path / "m.txt"
    f.write_text("# Distem latency matrix\nn0 n1 n2\n0 10 20\n10 0 15\n20,15,0\n")
    names, m = parse_matrix_file(f)
    assert names == ["n0", "n1", "n2"] and m[2] == [20.0, 15.0, 0.0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netlink)")
def test_missing_netem_is_named() -> None:
    try:
        tc.require_qdisc("netem")
    except PrerequisiteError as e:
        assert "'netem' qdisc" in str(e)
    else:
        pytest.skip("this kernel has netem")
    tc.require_qdisc("tbf")  # and tbf, which bandwidth uses, is there


@pytest.mark.parametrize(("gateway", "problem"), [
    ("foo", "invalid address 'foo'"), ("10.0.0.300", "invalid address '10.0.0.300'"),
    ("10.9.0.1", "10.9.0.1 is outside 10.8.0.0/24")])
def test_a_wrong_gateway_from_the_python_api_is_a_config_error(gateway: str,
                                                                problem: str) -> None:
    # the platform file checks addresses itself; a VNetwork made in Python meets this check
    with pytest.raises(ConfigError, match="key 'gateway'") as e:
        VNetwork("sdt-gw", "10.8.0.0/24", gateway=gateway).validate()
    assert problem in str(e.value)


def test_console_log_of_an_unknown_vnode_is_an_error_a_left_log_is_printed(
        tmp_path: Path) -> None:
    from sidusctl.subsys import lxc
    from tests.conftest import sidusctl
    res = sidusctl("vnode", "console", "--log", "sdt-nope", state=tmp_path, timeout=60)
    assert res.returncode != 0 and "no vnode named 'sdt-nope'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    # a log the vnode left behind (it is gone from the state) is still printed
    log = lxc.Container("sdt-gone", tmp_path / "vnode" / "lxc").console_log
    log.parent.mkdir(parents=True)
    log.write_text("sdt-gone login:\n")
    res = sidusctl("vnode", "console", "--log", "sdt-gone", state=tmp_path, timeout=60)
    assert res.returncode == 0 and res.stdout == "sdt-gone login:\n", res.stderr
