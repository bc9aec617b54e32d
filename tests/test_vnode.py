"""sidusctl vnode, for real: LXC containers on a loop-backed btrfs store, bridges, cgroups, tc.

One module-scoped platform (a btrfs store on a loop file under /var/tmp, one vnetwork, three cow
vnodes) serves most tests; everything is named ``sdt-`` and removed at the end even on failure.
The image: the shared ``minimal`` image (tests/conftest.py), or, while developing, the tarball
named by ``SIDUSCTL_VNODE_TEST_IMAGE``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import vnode_util
from tests.conftest import sidusctl

# a module fixture asks for minimal_image (request.getfixturevalue): tests/conftest.py
# starts its build in the background at the session's start when this module is in it
USES_MINIMAL_IMAGE = True
pytestmark = [pytest.mark.slow,  # the built image and LXC
              pytest.mark.skipif(os.geteuid() != 0, reason="vnodes need root")]

BASE = Path(f"/var/tmp/sdt-vnt-{os.getpid()}")
NET = "sdt-vt0"
CIDR = "10.232.0.0/24"
NODES = ["sdt-vta", "sdt-vtb", "sdt-vtc"]
SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR"]


def ok(*args: str, state: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    r = sidusctl(*args, state=state, timeout=timeout)
    assert r.returncode == 0, f"sidusctl {' '.join(args)} failed ({r.returncode}):\n{r.stderr}"
    return r


def state_bytes(state: Path) -> bytes:
    return (state / "vnode" / "state.json").read_bytes()


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> str:
    return vnode_util.vnode_image(request)


@pytest.fixture(scope="module")
def keypair() -> Iterator[Path]:
    d = BASE.with_name(BASE.name + "-keys")
    d.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "id")],
                   check=True)
    yield d / "id"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def plat(image: str, keypair: Path) -> Iterator[Path]:
    """State dir with a btrfs store, vnetwork sdt-vt0 and three RUNNING cow vnodes."""
    state = BASE
    vnode_util.force_cleanup(state, "sdt-vt")
    try:
        ok("vnode", "init", "--btrfs-image", "6G", state=state)
        ok("vnode", "net", "create", NET, CIDR, state=state)
        for n in NODES:
            ok("vnode", "create", n, "--image", image, "--fs", "cow", "--iface", f"if0:{NET}",
               "--ssh-pubkey", f"{keypair}.pub", "--ssh-privkey", str(keypair), state=state,
               timeout=600)
        yield state
    finally:
        vnode_util.tear_down(state, "sdt-vt")


def test_three_cow_vnodes_start_ping_ssh(plat: Path, keypair: Path) -> None:
    used_before = json.loads(ok("vnode", "store", "--json", state=plat).stdout)["used_bytes"]
    ok("vnode", "start", *NODES, state=plat)
    r = ok("vnode", "wait", *NODES, "--timeout", "90", "--json", state=plat)
    assert all(v is not None for v in json.loads(r.stdout).values()), r.stdout
    # they ping each other by address
    addrs = {v["name"]: v["ifaces"][0]["address"]
             for v in json.loads(ok("vnode", "list", "--json", state=plat).stdout)}
    assert all(addrs[n].startswith("10.232.0.") for n in NODES)
    for src, dst in (("sdt-vta", "sdt-vtb"), ("sdt-vtb", "sdt-vtc"), ("sdt-vtc", "sdt-vta")):
        r = sidusctl("vnode", "exec", src, "ping", "-c", "1", "-W", "3", addrs[dst], state=plat)
        assert r.returncode == 0 and "1 received" in r.stdout, r.stdout + r.stderr
    # ssh with the injected key (from the host, through the vnetwork's gateway on the bridge)
    r = subprocess.run(["ssh", *SSH_OPTS, "-i", str(keypair), f"root@{addrs['sdt-vta']}",
                        "hostname; cat /root/.ssh/identity | head -1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "sdt-vta"
    assert "PRIVATE KEY" in r.stdout  # --ssh-privkey went to /root/.ssh/identity
    # btrfs: one snapshot per vnode, and they cost little
    info = json.loads(ok("vnode", "store", "--json", state=plat).stdout)
    for n in NODES:
        assert f"vnodes/{n}/rootfs" in info["subvolumes"]
    subvols = subprocess.run(["btrfs", "subvolume", "list", info["root"]], capture_output=True,
                             text=True, check=True).stdout
    assert all(f"vnodes/{n}/rootfs" in subvols for n in NODES)
    grown = info["used_bytes"] - used_before
    assert grown < 60 * 2**20, f"3 cow vnodes (booted) used {grown / 2**20:.1f} MiB"
    # status: DETER-like per host and vnode
    st = json.loads(ok("vnode", "status", "--json", state=plat).stdout)
    for n in NODES:
        assert st["hosts"]["localhost"][n]["state"] == "RUNNING"
        assert st["hosts"]["localhost"][n]["boot"] in ("booted", "started")


def test_memory_limit_kills_process_over_it(plat: Path) -> None:
    ok("vnode", "update", "sdt-vta", "--mem", "64", state=plat)
    r = ok("vnode", "exec", "sdt-vta", "cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes",
           state=plat)
    assert r.stdout.strip() == str(64 * 2**20)
    # dd allocates its 200 MiB block: over the limit, the OOM killer ends it (SIGKILL: 137)
    r = sidusctl("vnode", "exec", "sdt-vta", "dd", "if=/dev/zero", "of=/dev/null", "bs=200M",
                 "count=1", state=plat)
    assert r.returncode == 137, (r.returncode, r.stderr)
    ok("vnode", "exec", "sdt-vta", "true", state=plat)  # the vnode itself lives on
    ok("vnode", "update", "sdt-vta", "--mem", "max", state=plat)
    r = ok("vnode", "exec", "sdt-vta", "dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1",
           state=plat)


def test_cpu_limit_in_cgroup(plat: Path) -> None:
    ok("vnode", "update", "sdt-vtb", "--cpus", "0.5", "--cpuset", "0", state=plat)
    lxcpath = plat / "vnode" / "lxc"
    q = subprocess.run(["lxc-cgroup", "-P", str(lxcpath), "-n", "sdt-vtb", "cpu.cfs_quota_us"],
                       capture_output=True, text=True, check=True).stdout.strip()
    cs = subprocess.run(["lxc-cgroup", "-P", str(lxcpath), "-n", "sdt-vtb", "cpuset.cpus"],
                        capture_output=True, text=True, check=True).stdout.strip()
    assert (q, cs) == ("50000", "0")
    ok("vnode", "update", "sdt-vtb", "--cpus", "0", state=plat)


def _iperf(plat: Path, server: str, client: str, addr: str, reverse: bool = False) -> float:
    """Mbit/s received, iperf3 run (host binary) inside the two vnodes' network namespaces."""
    lxcpath = plat / "vnode" / "lxc"
    pid = {n: subprocess.run(["lxc-info", "-P", str(lxcpath), "-n", n, "-p", "-H"],
                             capture_output=True, text=True, check=True).stdout.strip()
           for n in (server, client)}
    srv = subprocess.Popen(["nsenter", "-t", pid[server], "-n", "iperf3", "-s", "-1", "-B", addr],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        r = subprocess.run(["nsenter", "-t", pid[client], "-n", "iperf3", "-c", addr, "-t", "4",
                            "-J", *(["-R"] if reverse else [])],
                           capture_output=True, text=True, timeout=30, check=True)
    finally:
        srv.kill()
        srv.wait()
    return float(json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e6


def test_bandwidth_limit_both_directions(plat: Path) -> None:
    addrs = {v["name"]: v["ifaces"][0]["address"]
             for v in json.loads(ok("vnode", "list", "--json", state=plat).stdout)}
    ok("vnode", "update", "sdt-vtc", "--bandwidth", "if0:20mbit", state=plat)
    try:
        out_rate = _iperf(plat, "sdt-vta", "sdt-vtc", addrs["sdt-vta"])          # from sdt-vtc
        in_rate = _iperf(plat, "sdt-vta", "sdt-vtc", addrs["sdt-vta"], reverse=True)  # to it
    finally:
        ok("vnode", "update", "sdt-vtc", "--bandwidth", "if0:max", state=plat)
    assert 16 <= out_rate <= 24, out_rate
    assert 16 <= in_rate <= 24, in_rate


def test_latency_needs_netem_clear_error(plat: Path) -> None:
    before = state_bytes(plat)
    r = sidusctl("vnode", "update", "sdt-vtc", "--latency", "if0:10", state=plat)
    if r.returncode == 0:  # a kernel with netem: it must then be in place
        ok("vnode", "update", "sdt-vtc", "--latency", "if0:0", state=plat)
        return
    assert "netem" in r.stderr and "lacks" in r.stderr, r.stderr
    assert state_bytes(plat) == before


def test_freeze_stops_a_counter(plat: Path) -> None:
    ok("vnode", "exec", "sdt-vtb", "sh", "-c",
       'nohup sh -c "i=0; while :; do i=\\$((i+1)); echo \\$i > /root/counter; sleep 0.1; done"'
       ' >/dev/null 2>&1 &', state=plat)
    counter = plat / "vnode" / "store" / "vnodes" / "sdt-vtb" / "rootfs" / "root" / "counter"
    time.sleep(1)

    def value() -> int:
        return int(counter.read_text().strip() or 0)

    ok("vnode", "freeze", "sdt-vtb", state=plat)
    try:
        st = json.loads(ok("vnode", "status", "sdt-vtb", "--json", state=plat).stdout)
        assert st["hosts"]["localhost"]["sdt-vtb"]["state"] == "FROZEN"
        a = value()
        time.sleep(1.0)
        assert value() == a
    finally:
        ok("vnode", "unfreeze", "sdt-vtb", state=plat)
    b = value()
    time.sleep(1.0)
    assert value() > b


def test_io_limit_on_a_loop_device(plat: Path, image: str) -> None:
    backing = BASE.with_name(BASE.name + "-io.img")
    with open(backing, "wb") as f:
        f.truncate(64 * 2**20)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        ok("vnode", "create", "sdt-vtio", "--image", image, "--iface", f"if0:{NET}",
           "--io", f"{dev}:4M:4M", state=plat)
        ok("vnode", "start", "sdt-vtio", state=plat)

        def dd_rate(count: int) -> float:
            """MiB/s as dd itself timed it (not counting sidusctl's own start-up)."""
            r = ok("vnode", "exec", "sdt-vtio", "dd", f"if={dev}", "of=/dev/null", "bs=1M",
                   f"count={count}", "iflag=direct", state=plat)
            m = re.search(r"copied, ([0-9.]+) s", r.stderr)
            assert m, r.stderr
            return count / float(m.group(1))

        r1 = dd_rate(12)
        assert 3.2 <= r1 <= 4.8, f"{r1:.2f} MiB/s with a 4 MiB/s limit"
        ok("vnode", "update", "sdt-vtio", "--io", f"{dev}:8M:", state=plat)
        r2 = dd_rate(24)
        assert 6.4 <= r2 <= 9.6, f"{r2:.2f} MiB/s with an 8 MiB/s limit"
    finally:
        sidusctl("vnode", "destroy", "sdt-vtio", state=plat)
        subprocess.run(["losetup", "-d", dev], check=False)
        backing.unlink(missing_ok=True)


def test_get_image_starts_as_new_vnode(plat: Path) -> None:
    ok("vnode", "exec", "sdt-vta", "sh", "-c", "echo from-vta > /root/marker", state=plat)
    tar = BASE.with_name(BASE.name + "-dump.tar.zst")
    try:
        ok("vnode", "get-image", "sdt-vta", str(tar), state=plat)
        ok("vnode", "create", "sdt-vtg", "--image", str(tar), "--iface", f"if0:{NET}",
           state=plat, timeout=600)
        ok("vnode", "start", "sdt-vtg", state=plat)
        r = ok("vnode", "wait", "sdt-vtg", "--timeout", "90", state=plat)
        r = ok("vnode", "exec", "sdt-vtg", "cat", "/root/marker", state=plat)
        assert r.stdout.strip() == "from-vta"
    finally:
        sidusctl("vnode", "destroy", "sdt-vtg", state=plat)
        tar.unlink(missing_ok=True)


def test_stop_removes_data_and_crash_recovery(plat: Path) -> None:
    root = plat / "vnode" / "store" / "vnodes" / "sdt-vtc"
    assert (root / "rootfs" / "etc").is_dir()
    ok("vnode", "stop", "sdt-vtc", state=plat)
    assert not root.exists()
    info = json.loads(ok("vnode", "store", "--json", state=plat).stdout)
    assert "vnodes/sdt-vtc/rootfs" not in info["subvolumes"]
    # a container that dies behind sidusctl's back: list tells the truth, start recovers
    ok("vnode", "start", "sdt-vtc", state=plat)
    subprocess.run(["lxc-stop", "-P", str(plat / "vnode" / "lxc"), "-n", "sdt-vtc", "-k"],
                   check=True)
    row = next(v for v in json.loads(ok("vnode", "list", "--json", state=plat).stdout)
               if v["name"] == "sdt-vtc")
    assert row["state"] == "READY" and row["recorded_state"] == "RUNNING" and "dead" in row["note"]
    st = json.loads(ok("vnode", "status", "sdt-vtc", "--json", state=plat).stdout)
    assert st["hosts"]["localhost"]["sdt-vtc"]["boot"] == "dead"
    ok("vnode", "start", "sdt-vtc", state=plat)
    st = json.loads(ok("vnode", "status", "sdt-vtc", "--json", state=plat).stdout)
    assert st["hosts"]["localhost"]["sdt-vtc"]["state"] == "RUNNING"


def test_bad_input_clear_error_state_unchanged(plat: Path, image: str) -> None:
    before = state_bytes(plat)
    cases = [
        (["vnode", "create", "sdt-vtx", "--image", "no-such-image", "--iface", f"if0:{NET}"],
         r"unknown image 'no-such-image'"),
        (["vnode", "create", "sdt-vta", "--image", image, "--iface", f"if0:{NET}"],
         r"vnode named 'sdt-vta' already exists"),
        (["vnode", "create", "sdt-vtx", "--image", image, "--iface", f"if0:{NET}:10.9.9.9"],
         r"10\.9\.9\.9 is outside vnetwork sdt-vt0 \(10\.232\.0\.0/24\)"),
        (["vnode", "create", "sdt-vtx", "--image", image, "--iface", "if0:sdt-nonet"],
         r"no vnetwork named 'sdt-nonet'"),
        (["vnode", "start", "sdt-vta"], r"'sdt-vta' is already RUNNING"),
        (["vnode", "create", "sdt-vtx", "--image", image, "--mem", "12x"], r"invalid size '12x'"),
    ]
    for argv, pattern in cases:
        r = sidusctl(*argv, state=plat)
        assert r.returncode != 0, argv
        assert re.search(pattern, r.stderr), (argv, r.stderr)
        assert "Traceback" not in r.stderr
        assert state_bytes(plat) == before, argv


def test_cow_without_btrfs_is_an_error(image: str) -> None:
    state = BASE.with_name(BASE.name + "-plain")
    try:
        ok("vnode", "init", state=state)
        r = sidusctl("vnode", "create", "sdt-vtp", "--image", image, "--fs", "cow", state=state)
        assert r.returncode == 3, r.stderr
        assert "needs the vnode store on btrfs" in r.stderr and "Traceback" not in r.stderr
        assert json.loads(state_bytes(state))["vnodes"] == {}
    finally:
        sidusctl("vnode", "deinit", state=state)
        vnode_util.force_cleanup(state, "sdt-vt")


def test_platform_file_up_down(plat: Path, image: str, keypair: Path) -> None:
    pf = BASE.with_name(BASE.name + "-platform.toml")
    pf.write_text(f"""
[defaults]
image = "{image}"
vnetwork = "sdt-vtp"
ssh_pubkey = "{keypair}.pub"

[[vnetworks]]
name = "sdt-vtp"
cidr = "10.234.0.0/24"

# Alevin-style entries (Distem's advanced guide): name, bandwidth, cpu
[[vnodes]]
name = "sdt-vtp0"
bandwidth = "100mbit"
cpu = 1

[[vnodes]]
name = "sdt-vtp1"
ifaces = [{{ name = "if0", vnetwork = "sdt-vtp", address = "10.234.0.77" }}]
mem = {{ hierarchy = "v1", mem = 256 }}
""")
    try:
        r = ok("vnode", "up", str(pf), "--timeout", "90", "--json", state=plat)
        res = json.loads(r.stdout)
        assert res["started"] == ["sdt-vtp0", "sdt-vtp1"] and not res["failed"]
        assert all(v is not None for v in res["ssh"].values())
        lst = {v["name"]: v for v in json.loads(ok("vnode", "list", "--json", state=plat).stdout)}
        assert lst["sdt-vtp1"]["ifaces"][0]["address"] == "10.234.0.77"
        assert lst["sdt-vtp0"]["ifaces"][0]["bandwidth"] == 100_000_000
        r = ok("vnode", "down", str(pf), "--json", state=plat)
        assert json.loads(r.stdout) == {"vnodes": ["sdt-vtp0", "sdt-vtp1"],
                                        "vnetworks": ["sdt-vtp"]}, r.stdout
        r = ok("vnode", "down", str(pf), "--json", state=plat)  # again: nothing left to remove
        assert json.loads(r.stdout) == {"vnodes": [], "vnetworks": []}, r.stdout
        left = {v["name"] for v in json.loads(ok("vnode", "list", "--json", state=plat).stdout)}
        assert not left & {"sdt-vtp0", "sdt-vtp1"}
        assert subprocess.run(["ip", "link", "show", "sdt-vtp"], capture_output=True).returncode
    finally:
        sidusctl("vnode", "down", str(pf), state=plat)
        pf.unlink(missing_ok=True)


def test_python_api_roundtrip(plat: Path) -> None:
    from sidusctl import vnode

    p = vnode.open(plat)
    names = {v["name"] for v in p.list()}
    assert set(NODES) <= names
    st = p.status(["sdt-vta"])
    assert st["hosts"]["localhost"]["sdt-vta"]["state"] == vnode.RUNNING
    from sidusctl.core.errors import StateError

    with pytest.raises(StateError):
        p.start("sdt-vta")


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[str, str]]:
    """Two network namespaces linked by a veth pair (underlay 192.168.251.1/.2)."""
    h1, h2 = "sdt-vth1", "sdt-vth2"
    try:
        for h in (h1, h2):
            subprocess.run(["ip", "netns", "add", h], check=True)
            subprocess.run(["ip", "-n", h, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "link", "add", "sdt-vtu1", "netns", h1, "type", "veth", "peer",
                        "name", "sdt-vtu2", "netns", h2], check=True)
        for h, dev, ip in ((h1, "sdt-vtu1", "192.168.251.1/24"), (h2, "sdt-vtu2", "192.168.251.2/24")):
            subprocess.run(["ip", "-n", h, "addr", "add", ip, "dev", dev], check=True)
            subprocess.run(["ip", "-n", h, "link", "set", dev, "up"], check=True)
        yield h1, h2
    finally:
        for h in (h1, h2):
            subprocess.run(["ip", "netns", "del", h], check=False, capture_output=True)


def test_vxlan_between_two_hosts_carries_traffic() -> None:
    s1, s2 = BASE.with_name(BASE.name + "-h1"), BASE.with_name(BASE.name + "-h2")
    try:
        with two_hosts() as (h1, h2):
            for st, h, gw, remote in ((s1, h1, "10.235.0.1", "192.168.251.2"),
                                      (s2, h2, "10.235.0.2", "192.168.251.1")):
                ok("vnode", "net", "create", "sdt-vtx", "10.235.0.0/24", "--mode", "vxlan",
                   "--vxlan-id", "4242", "--vxlan-remote", remote, "--root-interface",
                   f"sdt-vtu{h[-1]}", "--gateway", gw, "--netns", h, state=st)
            server = ("import socket; s=socket.socket(); s.bind(('10.235.0.2', 7777)); s.listen();"
                      "c,_=s.accept(); c.sendall(c.recv(100).upper()); c.close()")
            srv = subprocess.Popen(["ip", "netns", "exec", h2, sys.executable, "-c", server])
            try:
                time.sleep(0.5)
                client = ("import socket,time\nfor i in range(20):\n try:\n"
                          "  c=socket.create_connection(('10.235.0.2',7777),timeout=2);break\n"
                          " except OSError: time.sleep(0.3)\n"
                          "c.sendall(b'over vxlan'); print(c.recv(100).decode())")
                r = subprocess.run(["ip", "netns", "exec", h1, sys.executable, "-c", client],
                                   capture_output=True, text=True, timeout=30)
            finally:
                srv.kill()
                srv.wait()
            assert r.stdout.strip() == "OVER VXLAN", r.stderr
            link = subprocess.run(["ip", "-n", h1, "-s", "-j", "link", "show", "sdt-vtx-vx"],
                                  capture_output=True, text=True, check=True).stdout
            stats = json.loads(link)[0]["stats64"]
            assert stats["tx"]["packets"] > 0 and stats["rx"]["packets"] > 0
            for st in (s1, s2):
                ok("vnode", "net", "delete", "sdt-vtx", state=st)
    finally:
        for st in (s1, s2):
            shutil.rmtree(st, ignore_errors=True)


def test_shared_and_distinct_roots(plat: Path, image: str) -> None:
    store = plat / "vnode" / "store"
    try:
        for n, fs in (("sdt-vts1", "shared"), ("sdt-vts2", "shared"), ("sdt-vtd", "distinct")):
            ok("vnode", "create", n, "--image", image, "--fs", fs, "--iface", f"if0:{NET}",
               state=plat, timeout=600)
            ok("vnode", "start", n, state=plat, timeout=600)
        shared = [p for p in (store / "shared").iterdir() if p.is_dir()]
        assert len(shared) == 1, shared  # one copy for both shared vnodes
        ok("vnode", "exec", "sdt-vts1", "sh", "-c", "echo one > /root/shared-marker", state=plat)
        r = ok("vnode", "exec", "sdt-vts2", "cat", "/root/shared-marker", state=plat)
        assert r.stdout.strip() == "one"
        # distinct: a private full copy, not a snapshot of the cached image
        droot = store / "vnodes" / "sdt-vtd" / "rootfs"
        assert (droot / "etc" / "hostname").read_text().strip() == "sdt-vtd"
        r = ok("vnode", "exec", "sdt-vtd", "test", "!", "-e", "/root/shared-marker", state=plat)
        # the shared root stays while one of its vnodes runs, and goes with the last one
        ok("vnode", "stop", "sdt-vts1", state=plat)
        assert shared[0].is_dir()
        ok("vnode", "stop", "sdt-vts2", state=plat)
        assert not shared[0].exists()
    finally:
        sidusctl("vnode", "destroy", "sdt-vts1", "sdt-vts2", "sdt-vtd", state=plat)


def test_concurrent_commands_keep_the_state_whole(plat: Path, image: str) -> None:
    names = [f"sdt-vtk{i}" for i in range(4)]
    cmd = [sys.executable, "-m", "sidusctl", "--state-dir", str(plat), "vnode", "create"]
    procs = [subprocess.Popen([*cmd, n, "--image", image, "--iface", f"if0:{NET}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in names]
    try:
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        rows = {v["name"]: v for v in json.loads(ok("vnode", "list", "--json", state=plat).stdout)}
        assert set(names) <= set(rows)
        addrs = [rows[n]["ifaces"][0]["address"] for n in names]
        assert len(set(addrs)) == len(addrs)  # no address handed out twice
    finally:
        sidusctl("vnode", "destroy", *names, state=plat)


def test_start_command_exit_code_in_status(plat: Path, image: str) -> None:
    try:
        ok("vnode", "create", "sdt-vtsc", "--image", image, "--iface", f"if0:{NET}",
           "--start-command", "echo hello; exit 3", state=plat)
        ok("vnode", "start", "sdt-vtsc", state=plat)
        deadline = time.monotonic() + 60
        node: dict[str, object] = {}
        while time.monotonic() < deadline:
            st = json.loads(ok("vnode", "status", "sdt-vtsc", "--json", state=plat).stdout)
            node = st["hosts"]["localhost"]["sdt-vtsc"]
            if node["exit_code"] is not None:
                break
            time.sleep(1)
        assert node["exit_code"] == 3, node
        assert node["boot"] == "booted"
        # booted is remembered for this init (pid and start time): later status calls do not
        # ask systemd again; a restart (another init) is asked afresh
        mark = plat / "vnode" / "lxc" / "sdt-vtsc" / "sidusctl-booted"
        pid = mark.read_text().split()[0]
        st = json.loads(ok("vnode", "status", "sdt-vtsc", "--json", state=plat).stdout)
        assert st["hosts"]["localhost"]["sdt-vtsc"]["boot"] == "booted"
        assert Path(f"/proc/{pid}").is_dir()
        r = ok("vnode", "exec", "sdt-vtsc", "cat", "/var/log/sidusctl/start_command.out",
               state=plat)
        assert r.stdout.strip() == "hello"
    finally:
        sidusctl("vnode", "destroy", "sdt-vtsc", state=plat)
