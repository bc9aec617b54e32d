#!/usr/bin/env python3
"""Benchmark: one platform of N cow vnodes brought up across three pnodes (network namespaces
on this machine, each with its own sshd, state directory and btrfs store, driven by sidusctl
through ClusterShell over OpenSSH) against the same N vnodes on one host (the reference: the
single-host ``vnode up`` of the same file without ``[pnodes]``), in the same run.

Prints the seconds until every vnode answers SSH for each (from the ``vnode up`` command's
start to its exit), their ratio (multi/single; aim at most 1.3), the phases of the multi-host
``up`` (facts, plan, images, the pnodes' own ``vnode up``, each pnode's), the seconds a
``vnode status --platform`` over all of them takes (median of ``--status-runs``, ``--settle``
seconds after ``up``; aim under 2), the same for one host's ``vnode status``, and the machine's
load average while each part ran.

    sudo .venv/bin/python bench/vnode_platform.py --image minimal [--state-dir DIR] [--count 100]
                                            [--status-runs 5] [--settle 20] [--skip-single]
                                            [--json]

``--image``: an image name of the state directory's image store (built with ``--tar``) or a
rootfs tarball path. Both sides start with the image already in their vnode cache (a
``pnode init`` unpacks it on every pnode; the single host gets it unpacked by creating and
destroying one vnode first), so what is compared is bringing the platform up, not the
one-time unpack. Everything it makes is named sdt-bp* (vnodes, vnetwork, the pnode namespaces
``sdt-bppn1..3`` on a LAN bridge ``sdt-bppnlan`` with 192.168.251.0/24, the work directory
/var/tmp/sdt-bp) and removed at the end, on failure and on SIGINT/SIGTERM too. The three
pnodes share this machine's cores and memory: the ratio shows what the fan-out costs, not what
three real hosts would gain. With ``PYTHONPATH`` set (to measure another copy of the tree),
the pnodes' sidusctl runs with it too.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# the repository first on the path (this file is run as a script from bench/)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.vnode import resolve_tarball  # noqa: E402
from sidusctl.core.paths import state_dir  # noqa: E402
from tests.pnode_util import pnodes  # noqa: E402

WORK = Path("/var/tmp/sdt-bp")
CLI = [sys.executable, "-m", "sidusctl"]
# the pnodes run the same sidusctl, a PYTHONPATH included (ssh does not pass the environment)
REMOTE_CLI = (["env", f"PYTHONPATH={os.environ['PYTHONPATH']}"]
              if os.environ.get("PYTHONPATH") else []) + CLI
PREFIX, LAN_NET = "sdt-bppn", "192.168.251"


class Failed(Exception):
    pass


def sidusctl(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*CLI, "--state-dir", str(state), *args], capture_output=True,
                       text=True, check=False)
    if check and r.returncode != 0:
        raise Failed(f"sidusctl {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}"
                     f"\n{r.stdout[-2000:]}")
    return r


def vnodes_part(tarball: Path, count: int, name: str = "sdt-bp") -> str:
    return (f'[[vnetworks]]\nname = "sdt-bpn"\ncidr = "10.238.0.0/22"\n\n'
            f'[[vnodes]]\nname = "{name}[1-{count}]"\nimage = "{tarball}"\nfs = "cow"\n'
            f'vnetwork = "sdt-bpn"\n')


@contextmanager
def load_sampler() -> Iterator[list[float]]:
    """The 1-minute load average every 2 s while the block runs (the machine is shared)."""
    samples: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        while True:
            samples.append(os.getloadavg()[0])
            if stop.wait(2):
                return
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield samples
    finally:
        stop.set()
        t.join()


def load_of(samples: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(samples), 2), "max": round(max(samples), 2)}


def timed_status(argv: list[str], state: Path, runs: int, count: int,
                 settle: float) -> dict[str, Any]:
    """After ``settle`` seconds (the vnodes' systemd still starts units once sshd answers),
    ``runs`` runs of ``sidusctl vnode status ARGV --json``: seconds (median, min, max, each)
    and the load average meanwhile; Failed unless every run shows ``count`` RUNNING vnodes."""
    time.sleep(settle)
    took = []
    with load_sampler() as load:
        for _ in range(runs):
            t0 = time.monotonic()
            r = sidusctl(state, "vnode", "status", *argv, "--json")
            took.append(time.monotonic() - t0)
            st = json.loads(r.stdout)
            states = [d["state"] for v in st["hosts"].values() for d in v.values()]
            if len(states) != count or set(states) != {"RUNNING"}:
                raise Failed(f"status shows {len(states)} vnodes, states {set(states)}")
    return {"median": statistics.median(took), "min": min(took), "max": max(took),
            "runs": took, "load": load_of(load)}


def single_host(tarball: Path, count: int, status_runs: int, settle: float
                ) -> dict[str, Any]:
    """The reference: the file without [pnodes], on this host, cache warm."""
    single = WORK / "single"
    f1 = WORK / "sdt-bp-single.toml"
    f1.write_text(vnodes_part(tarball, count))
    warm = WORK / "sdt-bp-warm.toml"
    warm.write_text(vnodes_part(tarball, 1, "sdt-bpw"))
    try:
        sidusctl(single, "vnode", "init", "--btrfs-image", "8G")
        sidusctl(single, "vnode", "create", "sdt-bpw0", "--image", str(tarball), "--fs", "cow")
        sidusctl(single, "vnode", "destroy", "sdt-bpw0")
        with load_sampler() as load:
            t0 = time.monotonic()
            r = sidusctl(single, "vnode", "up", str(f1), "--json", "--timeout", "900")
            took = time.monotonic() - t0
        res = json.loads(r.stdout)
        if len(res["started"]) != count or None in res["ssh"].values():
            raise Failed(f"single host: not every vnode answered SSH: {r.stdout[-2000:]}")
        return {"up_s": took, "load": load_of(load),
                "status_s": timed_status([], single, status_runs, count, settle)}
    finally:
        if single.exists():
            sidusctl(single, "vnode", "down", str(f1), check=False)
            sidusctl(single, "vnode", "destroy", "sdt-bpw0", check=False)
            sidusctl(single, "vnode", "deinit", check=False)


def three_pnodes(tarball: Path, count: int, status_runs: int, settle: float,
                 out: dict[str, Any]) -> dict[str, Any]:
    """The platform over three namespace pnodes; figures go into ``out`` as they come."""
    with pnodes(WORK / "pn", prefix=PREFIX, lan_net=LAN_NET) as lab:
        hosts = "".join(f'[pnodes.host.{p.name}]\naddress = "{p.address}"\n'
                        f'state_dir = "{p.state}"\n' for p in lab.pnodes)
        f3 = WORK / "sdt-bp.toml"
        f3.write_text(f'[pnodes]\nhosts = "pn[1-3]"\n'
                      f'sidusctl = {json.dumps(shlex.join(REMOTE_CLI))}\n'
                      f'ssh_options = {json.dumps(lab.ssh_options())}\n{hosts}\n'
                      f'[placement]\npolicy = "spread"\n\n' + vnodes_part(tarball, count))
        front = WORK / "front"
        try:
            t0 = time.monotonic()
            sidusctl(front, "pnode", "init", str(f3), "--btrfs-image", "6G")
            out["pnode_init_s"] = time.monotonic() - t0
            with load_sampler() as load:
                t0 = time.monotonic()
                r = sidusctl(front, "vnode", "up", str(f3), "--json", "--timeout", "900")
                out["up_s"] = time.monotonic() - t0
            out["load"] = load_of(load)
            rep = json.loads(r.stdout)
            out["phases"] = rep.get("timings", {})
            started = sum(len(a["started"]) for a in rep["pnodes"].values())
            if started != count:
                raise Failed(f"three pnodes: {started} of {count} vnodes started")
            out["status_s"] = timed_status(["--platform", str(f3)], front, status_runs, count,
                                           settle)
        finally:
            sidusctl(front, "vnode", "down", str(f3), check=False)
    return out


def _interrupted(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", required=True)
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--status-runs", type=int, default=5)
    ap.add_argument("--settle", type=float, default=20,
                    help="seconds between up and the status runs (default 20)")
    ap.add_argument("--skip-single", action="store_true",
                    help="only the three pnodes (while profiling)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/vnode_platform.py needs root", file=sys.stderr)
        return 2
    tarball = resolve_tarball(a.image, state_dir(a.state_dir))
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGHUP, _interrupted)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    out: dict[str, Any] = {"count": a.count, "cores": os.cpu_count(), "settle_s": a.settle}
    try:
        if not a.skip_single:
            out["single_host"] = single_host(tarball, a.count, a.status_runs, a.settle)
        three_pnodes(tarball, a.count, a.status_runs, a.settle,
                     out.setdefault("three_pnodes", {}))
    except (Exception, KeyboardInterrupt) as e:
        print(f"bench/vnode_platform.py: {e}\nfigures so far: {json.dumps(out)}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    m = out["three_pnodes"]
    if "single_host" in out:
        out["ratio"] = m["up_s"] / out["single_host"]["up_s"]
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{a.count} cow vnodes until all answer SSH:")
    if "single_host" in out:
        s = out["single_host"]
        print(f"  one host     {s['up_s']:6.1f} s  (load avg mean {s['load']['mean']}, "
              f"max {s['load']['max']})")
    print(f"  three pnodes {m['up_s']:6.1f} s  (load avg mean {m['load']['mean']}, "
          f"max {m['load']['max']})")
    if "ratio" in out:
        print(f"  ratio {out['ratio']:.2f} (aim <= 1.3)")
    print(f"  phases of the multi-host up: {json.dumps(m['phases'])}")
    for what, st in (("vnode status --platform", m["status_s"]),
                     ("one host's vnode status (reference)",
                      out.get("single_host", {}).get("status_s"))):
        if st:
            print(f"{what} over {a.count} vnodes: median {st['median']:.2f} s (min "
                  f"{st['min']:.2f}, max {st['max']:.2f}, {len(st['runs'])} runs; load avg mean "
                  f"{st['load']['mean']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
