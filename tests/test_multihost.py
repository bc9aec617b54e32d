"""A platform across three pnodes, driven through ClusterShell over real OpenSSH.

The pnodes are network namespaces on this machine (tests/pnode_util.py), each with its own
sshd, state directory and btrfs vnode store, joined by a bridge playing the testbed LAN. One
boot of nine cow vnodes proves, in order: ``pnode check`` sees unprepared pnodes; ``pnode
init`` prepares them (btrfs stores, the image sent once, checked by digest); the dry-run plan
follows the placement policy; ``up`` starts the vnodes on their pnodes; a vnode on pn1 pings
one on pn3 across VXLAN; ``exec`` over a node set gathers every output; ``status --json``
reports per pnode; a pnode whose sshd is stopped is reported unreachable within seconds;
``down`` leaves nothing on any pnode. A platform too big for the pnodes is refused before
anything is created.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import sidusctl
from tests.pnode_util import Lab, on_pnode, pnodes, start_sshd, stop_sshd

pytestmark = pytest.mark.slow

WORK = Path("/var/tmp/sdt-multihost")


def platform_text(lab: Lab, image: str, *, count: int = 9, cpu: float | None = None,
                  policy: str = "pack", max_per: int = 3) -> str:
    hosts = "\n".join(f'[pnodes.host.{p.name}]\naddress = "{p.address}"\n'
                      f'state_dir = "{p.state}"\n' for p in lab.pnodes)
    cpu_line = f"cpu = {cpu}\n" if cpu is not None else ""
    return f"""
[pnodes]
hosts = "pn[1-{len(lab.pnodes)}]"
sidusctl = {json.dumps(shlex.join([sys.executable, "-m", "sidusctl"]))}
ssh_options = {json.dumps(lab.ssh_options())}
connect_timeout = 3

{hosts}
[placement]
policy = "{policy}"
max_per_pnode = {max_per}

[[vnetworks]]
name = "sdt-mh"
cidr = "10.236.0.0/24"

[[vnodes]]
name = "sdt-mh[1-{count}]"
image = "{image}"
fs = "cow"
vnetwork = "sdt-mh"
{cpu_line}"""


@pytest.fixture(scope="module")
def lab(minimal_image: object) -> Iterator[tuple[Lab, str]]:
    tarball = str(minimal_image.tarball)  # type: ignore[attr-defined]
    import shutil
    shutil.rmtree(WORK, ignore_errors=True)
    with pnodes(WORK / "pn") as lab:
        yield lab, tarball
    shutil.rmtree(WORK, ignore_errors=True)


def cli(front: Path, *args: str, timeout: float = 900) -> tuple[int, str, str]:
    r = sidusctl(*args, state=front, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def test_platform_over_three_pnodes(lab: tuple[Lab, str]) -> None:
    the_lab, tarball = lab
    front = WORK / "front"
    pf = WORK / "sdt-mh.toml"
    pf.write_text(platform_text(the_lab, tarball))

    # check: reachable, same version, but no store yet
    rc, out, err = cli(front, "pnode", "check", str(pf), "--json")
    assert rc == 1, err
    check = json.loads(out)
    assert sorted(check) == ["pn1", "pn2", "pn3"]
    assert all(any("not initialised" in s for s in v) for v in check.values()), check

    # a platform too big: refused before anything is created (2 cores per pnode here)
    big = WORK / "sdt-mh-big.toml"
    big.write_text(platform_text(the_lab, tarball, count=4, cpu=2, max_per=1))
    rc, out, err = cli(front, "vnode", "up", str(big), "--dry-run")
    assert rc == 2 and "sdt-mh4" in err and "does not fit" in err, err

    # init: btrfs stores and the image, sent once
    rc, out, err = cli(front, "pnode", "init", str(pf), "--btrfs-image", "3G", "--json")
    assert rc == 0, err
    assert all("sent" in v for v in json.loads(out).values()), out
    rc, out, err = cli(front, "pnode", "init", str(pf), "--json")
    assert rc == 0 and all("already there" in v for v in json.loads(out).values()), out
    for p in the_lab.pnodes:  # init unpacked the image into each pnode's vnode cache
        r = on_pnode(p, "sh", "-c", f"ls {p.state}/vnode/store/images/*.complete")
        assert r.returncode == 0 and r.stdout.strip(), (p.name, r.stdout, r.stderr)
    rc, out, err = cli(front, "pnode", "check", str(pf), "--json")
    assert rc == 0 and json.loads(out) == {"pn1": [], "pn2": [], "pn3": []}, out + err
    # the Python API drives the same pnodes the same way
    from sidusctl import vnode
    with vnode.Cluster(vnode.load_platform(pf), front) as c:
        assert c.check() == {"pn1": [], "pn2": [], "pn3": []}
        assert c.up(dry_run=True)["plan"]["placement"]["sdt-mh9"] == "pn3"

    # the plan: pack with max_per_pnode = 3
    rc, out, err = cli(front, "vnode", "up", str(pf), "--dry-run", "--json")
    assert rc == 0, err
    plan = json.loads(out)["plan"]
    assert plan["placement"] == {f"sdt-mh{i}": f"pn{(i - 1) // 3 + 1}" for i in range(1, 10)}
    assert plan["gateways"]["sdt-mh"] == {"pn1": "10.236.0.1", "pn2": "10.236.0.2",
                                          "pn3": "10.236.0.3"}
    addrs = {v: a["sdt-mh"] for v, a in plan["addresses"].items()}
    assert len(set(addrs.values())) == 9 and addrs["sdt-mh1"] == "10.236.0.4"
    assert plan["mtu"] == 1450
    assert not (front / "platforms" / "sdt-mh.json").exists()  # a dry run records nothing

    try:
        # a pnode that cannot be reached: up stops before creating anything anywhere
        stop_sshd(the_lab, the_lab.pnodes[2])
        rc, out, err = cli(front, "vnode", "up", str(pf), "--timeout", "240", "--json")
        assert rc == 1 and "pn3: unreachable" in err, err
        # --json: the failure is on stdout too, per pnode, for a script to act on
        assert list(json.loads(out)["problems"]) == ["pn3"], out
        r = on_pnode(the_lab.pnodes[0], sys.executable, "-m", "sidusctl", "--state-dir",
                     str(the_lab.pnodes[0].state), "vnode", "list", "--json")
        assert json.loads(r.stdout) == [], r.stdout
        start_sshd(the_lab, the_lab.pnodes[2])

        rc, out, err = cli(front, "vnode", "up", str(pf), "--json", "--timeout", "240")
        assert rc == 0, out + err
        report = json.loads(out)
        assert all(len(report["pnodes"][p]["started"]) == 3 for p in ("pn1", "pn2", "pn3"))
        assert set(report["timings"]) == {"facts", "plan", "images", "pnodes_up", "pnode_up"}
        assert all("already there" in v for v in report["images"].values())  # init sent it
        assert sorted(report["timings"]["pnode_up"]) == ["pn1", "pn2", "pn3"]
        # up again converges: the same plan, nothing new to start
        rc, out, err = cli(front, "vnode", "up", str(pf), "--json", "--timeout", "240")
        assert rc == 0, out + err
        again = json.loads(out)
        assert again["plan"] == report["plan"]
        assert all(not a["failed"] for a in again["pnodes"].values())

        # each pnode runs its own three, in its own store
        for p in the_lab.pnodes:
            r = on_pnode(p, sys.executable, "-m", "sidusctl", "--state-dir", str(p.state),
                         "vnode", "list", "--json")
            k = int(p.name[2:])
            assert sorted(v["name"] for v in json.loads(r.stdout)) == \
                [f"sdt-mh{i}" for i in range(3 * k - 2, 3 * k + 1)], r.stdout + r.stderr

        # across VXLAN: a vnode on pn1 pings one on pn3 (path MTU left for the header)
        rc, out, err = cli(front, "vnode", "exec", "--platform", str(pf), "--json", "sdt-mh1",
                           "--", "ping", "-c", "2", "-W", "3", "-s", "1400", "-M", "do",
                           addrs["sdt-mh9"])
        assert rc == 0 and "2 received" in json.loads(out)["sdt-mh1"]["stdout"], out + err

        # exec over a node set: every output, folded
        rc, out, err = cli(front, "vnode", "exec", "--platform", str(pf), "sdt-mh[1-9]",
                           "--", "hostname")
        assert rc == 0, err
        for i in range(1, 10):
            assert f"\nsdt-mh{i}\n" in out
        rc, out, err = cli(front, "vnode", "exec", "--platform", str(pf), "sdt-mh[1-9]",
                           "--", "cat", "/etc/debian_version")
        assert rc == 0 and out.count("---------------\nsdt-mh[1-9]\n") == 1, out

        # status per pnode, DETER's shape
        rc, out, err = cli(front, "vnode", "status", "--platform", str(pf), "--json")
        assert rc == 0, err
        st = json.loads(out)
        assert st["unreachable"] == {}
        assert sorted(st["hosts"]["pn2"]) == ["sdt-mh4", "sdt-mh5", "sdt-mh6"]
        assert all(d["state"] == "RUNNING" for h in st["hosts"].values() for d in h.values())
        assert {d["exit_code"] for h in st["hosts"].values() for d in h.values()} == {None}

        # get-image of a vnode on pn3, dumped there and brought here
        dump = WORK / "sdt-mh9.tar.zst"
        rc, out, err = cli(front, "vnode", "get-image", "--platform", str(pf), "sdt-mh9",
                           str(dump))
        assert rc == 0 and dump.stat().st_size > 1 << 20, err
        names = subprocess.run(["tar", "-tf", str(dump)], capture_output=True, text=True,
                               check=True).stdout.split()
        assert "./etc/hostname" in names and not list(WORK.glob("sdt-mh9.tar.zst.*"))

        # the latency matrix fans out; each pnode shapes its own vnodes, or says it lacks netem
        # (this machine's kernel has no netem: the pnodes' answers say so, per pnode)
        matrix = WORK / "matrix"
        matrix.write_text("sdt-mh1 sdt-mh4 sdt-mh7\n0 10 20\n10 0 30\n20 30 0\n")
        rc, out, err = cli(front, "vnode", "latency-matrix", "--platform", str(pf), str(matrix),
                           "--json")
        res = json.loads(out)
        if rc != 0:
            assert "netem" in err and all(f"pn{k}: " in err for k in (1, 2, 3)), err
            assert sorted(res["problems"]) == ["pn1", "pn2", "pn3"] and res["pnodes"] == {}, out
            assert all("netem" in why for why in res["problems"].values()), out
        else:
            assert res == {"pnodes": {f"pn{k}": "applied" for k in (1, 2, 3)},
                           "problems": {}}, out
            rc, out, err = cli(front, "vnode", "exec", "--platform", str(pf), "--json",
                               "sdt-mh1", "--", "tc", "qdisc", "show")
            assert "netem" in json.loads(out)["sdt-mh1"]["stdout"], out + err

        # one pnode's sshd stopped: reported unreachable, within seconds, others still shown
        stop_sshd(the_lab, the_lab.pnodes[1])
        t0 = time.monotonic()
        rc, out, err = cli(front, "vnode", "status", "--platform", str(pf), "--json",
                           timeout=60)
        took = time.monotonic() - t0
        st = json.loads(out)
        assert rc == 1 and list(st["unreachable"]) == ["pn2"], out + err
        assert sorted(st["hosts"]) == ["pn1", "pn3"]
        print(f"status with pn2 unreachable took {took:.1f} s")
        start_sshd(the_lab, the_lab.pnodes[1])
    finally:
        rc, out, err = cli(front, "vnode", "down", str(pf), "--json")
    assert rc == 0, err
    assert json.loads(out) == {"pnodes": {f"pn{k}": "down" for k in (1, 2, 3)},
                               "problems": {}}, out
    for p in the_lab.pnodes:
        r = on_pnode(p, sys.executable, "-m", "sidusctl", "--state-dir", str(p.state),
                     "vnode", "list", "--json")
        assert json.loads(r.stdout) == [], (p.name, r.stdout)
        r = on_pnode(p, "ip", "-o", "link")
        assert "sdt-mh" not in r.stdout, (p.name, r.stdout)
    assert not (front / "platforms" / "sdt-mh.json").exists()
