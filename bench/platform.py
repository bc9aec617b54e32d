#!/usr/bin/env python3
"""Benchmark: one platform of N cow vnodes brought up across three pnodes (network namespaces
on this machine, each with its own sshd, state directory and btrfs store, driven by sidusctl
through ClusterShell over OpenSSH) against the same N vnodes on one host (the reference: the
single-host ``vnode up`` of the same file without ``[pnodes]``), in the same run.

Prints the seconds until every vnode answers SSH for each, their ratio (multi/single; aim at
most 1.3), and the seconds a ``vnode status --platform`` over all of them takes (aim under 2).

    sudo .venv/bin/python bench/multihost.py --image minimal [--state-dir DIR] [--count 100]
                                            [--json]

``--image``: an image name of the state directory's image store (built with ``--tar``) or a
rootfs tarball path. Everything it makes is named sdt-bp* and removed at the end. The three
pnodes share this machine's cores and memory: the ratio shows what the fan-out costs, not
what three real hosts would gain.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.vnode import resolve_tarball
from sidusctl.core.paths import state_dir
from tests.pnode_util import pnodes

WORK = Path("/var/tmp/sdt-bp")
CLI = [sys.executable, "-m", "sidusctl"]


def sidusctl(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*CLI, "--state-dir", str(state), *args], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"sidusctl {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r


def vnodes_part(tarball: Path, count: int) -> str:
    return (f'[[vnetworks]]\nname = "sdt-bpn"\ncidr = "10.238.0.0/22"\n\n'
            f'[[vnodes]]\nname = "sdt-bp[1-{count}]"\nimage = "{tarball}"\nfs = "cow"\n'
            f'vnetwork = "sdt-bpn"\n')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", required=True)
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    tarball = resolve_tarball(a.image, state_dir(a.state_dir))
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    out: dict[str, float] = {}
    try:
        # the reference: the same vnodes on this host
        single = WORK / "single"
        sidusctl(single, "vnode", "init", "--btrfs-image", "8G")
        f1 = WORK / "sdt-bp-single.toml"
        f1.write_text(vnodes_part(tarball, a.count))
        t0 = time.monotonic()
        sidusctl(single, "vnode", "up", str(f1), "--timeout", "600")
        out["single_host_s"] = time.monotonic() - t0
        sidusctl(single, "vnode", "down", str(f1))
        sidusctl(single, "vnode", "deinit")

        with pnodes(WORK / "pn") as lab:
            hosts = "".join(f'[pnodes.host.{p.name}]\naddress = "{p.address}"\n'
                            f'state_dir = "{p.state}"\n' for p in lab.pnodes)
            f3 = WORK / "sdt-bp.toml"
            f3.write_text(f'[pnodes]\nhosts = "pn[1-3]"\n'
                          f'sidusctl = {json.dumps(shlex.join(CLI))}\n'
                          f'ssh_options = {json.dumps(lab.ssh_options())}\n{hosts}\n'
                          f'[placement]\npolicy = "spread"\n\n' + vnodes_part(tarball, a.count))
            front = WORK / "front"
            sidusctl(front, "pnode", "init", str(f3), "--btrfs-image", "4G")
            t0 = time.monotonic()
            sidusctl(front, "vnode", "up", str(f3), "--timeout", "600")
            out["three_pnodes_s"] = time.monotonic() - t0
            t0 = time.monotonic()
            r = sidusctl(front, "vnode", "status", "--platform", str(f3), "--json")
            out["status_s"] = time.monotonic() - t0
            n = sum(len(v) for v in json.loads(r.stdout)["hosts"].values())
            assert n == a.count, f"status shows {n} vnodes"
            sidusctl(front, "vnode", "down", str(f3))
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    out["ratio"] = out["three_pnodes_s"] / out["single_host_s"]
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{a.count} cow vnodes until all answer SSH: one host {out['single_host_s']:.1f} s, "
              f"three pnodes {out['three_pnodes_s']:.1f} s, ratio {out['ratio']:.2f} (aim <= 1.3)")
        print(f"vnode status --platform over {a.count} vnodes: {out['status_s']:.2f} s "
              "(aim < 2 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
