#!/usr/bin/env python3
"""DHCP benchmark: sidusctl's DHCP server against dnsmasq, side by side in one run.

Each server runs in its own sdt- network namespace pair (server | veth | client) and is loaded
by Kea's ``perfdhcp`` (package kea-admin) in ``--scenario avalanche`` with ``-R 1000``: 1000
simulated clients (distinct MACs, relayed through giaddr) each doing DISCOVER/OFFER/REQUEST/ACK,
retrying what is lost, until all 1000 hold a lease. Reported: leases per second (1000 / the time
perfdhcp reports to provision them, median of --repeat runs, a fresh server and lease store each
run), and duplicate addresses, counted twice: by perfdhcp ("non unique addresses") and in the
server's own lease store (our SQLite store, dnsmasq's lease file). ``sidusctl-durable`` is
our server with ``--durable`` (an fsync per lease, as dnsmasq's lease file gets). dnsmasq runs with --no-ping
(its ICMP probe would only slow it down), so the reference is its best case.
Aim: at least 0.5x dnsmasq's leases/s, zero duplicates.

Run as root from the repository: ``.venv/bin/python bench/dhcp.py [--repeat 3] [--clients 1000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from sidusctl.serve.leases import read_leases  # noqa: E402
from tests.netns_util import Daemon, netns, nsexec, sidusctl_serve, veth  # noqa: E402

RANGE = ("10.80.1.0", "10.80.10.255")


def one_run(server: str, clients: int, work: Path, tag: int) -> dict[str, float]:
    s_ns, c_ns = f"sdt-bds{tag}", f"sdt-bdc{tag}"
    s_if, c_if = f"sdt-bda{tag}", f"sdt-bdb{tag}"
    run_dir = Path(tempfile.mkdtemp(prefix=f"{server}-", dir=work))
    with netns(s_ns), netns(c_ns):
        veth(s_ns, s_if, c_ns, c_if, a_addr="10.80.0.1/16", b_addr="10.80.0.2/16")
        if server == "dnsmasq":
            lease_file = run_dir / "dnsmasq.leases"
            d = Daemon(nsexec(s_ns, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
                              f"--interface={s_if}", "--bind-interfaces", "--no-ping",
                              f"--dhcp-range={RANGE[0]},{RANGE[1]},255.255.0.0,1h",
                              f"--dhcp-leasefile={lease_file}", "--dhcp-lease-max=100000",
                              f"--pid-file={run_dir}/dnsmasq.pid"), run_dir / "dnsmasq.log",
                       ready="DHCP, sockets bound")
        else:
            extra = ["--durable"] if server == "sidusctl-durable" else []
            d = sidusctl_serve(s_ns, run_dir / "state", "--interface", s_if, *extra,
                               "--pool", f"{RANGE[0]}-{RANGE[1]}", log=run_dir / "serve.log")
        try:
            r = subprocess.run(nsexec(c_ns, "perfdhcp", "-4", "-l", c_if, "--scenario",
                                      "avalanche", "-R", str(clients), "10.80.0.1"),
                               capture_output=True, text=True, timeout=600, check=False)
        finally:
            d.stop()
        out = r.stdout + r.stderr
        m = re.search(r"It took (\d+):(\d+):([\d.]+) to provision (\d+) clients", out)
        if not m:
            raise RuntimeError(f"perfdhcp against {server} gave no result:\n{out[-2000:]}")
        secs = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
        provisioned = int(m[4])
        non_unique = sum(int(x) for x in re.findall(r"non unique addresses: (\d+)", out))
        if server == "dnsmasq":
            rows = [ln.split() for ln in lease_file.read_text().splitlines() if ln.strip()]
            pairs = [(f[2], f[1]) for f in rows]
        else:
            pairs = [(str(x.ip), x.mac or "") for x in
                     read_leases(run_dir / "state" / "serve" / "leases.sqlite")]
        by_ip = Counter(ip for ip, _ in pairs)
        dup = sum(n - 1 for n in by_ip.values() if n > 1)
        return {"seconds": secs, "provisioned": provisioned, "leases_per_s": provisioned / secs,
                "perfdhcp_non_unique": non_unique, "store_leases": len(pairs),
                "store_duplicate_addresses": dup,
                "store_distinct_macs": len({m for _, m in pairs})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/dhcp.py: needs root (network namespaces)")
    if not shutil.which("perfdhcp"):
        sys.exit("bench/dhcp.py: perfdhcp not found (apt-get install kea-admin)")
    work = Path(tempfile.mkdtemp(prefix="sdt-bench-dhcp-"))
    tag = os.getpid() % 10000
    results: dict[str, list[dict[str, float]]] = {"dnsmasq": [], "sidusctl": [],
                                                  "sidusctl-durable": []}
    try:
        for _ in range(args.repeat):  # interleaved, so load changes hit both alike
            for server in results:
                results[server].append(one_run(server, args.clients, work, tag))
                time.sleep(0.5)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, dict[str, Any]] = {}
    for server, runs in results.items():
        summary[server] = {
            "leases_per_s_median": statistics.median(r["leases_per_s"] for r in runs),
            "leases_per_s_runs": [round(r["leases_per_s"], 1) for r in runs],
            "provisioned_min": min(r["provisioned"] for r in runs),
            "perfdhcp_non_unique_total": sum(r["perfdhcp_non_unique"] for r in runs),
            "store_duplicate_addresses_total": sum(r["store_duplicate_addresses"] for r in runs),
            "store_leases_min": min(r["store_leases"] for r in runs),
        }
    ratio = summary["sidusctl"]["leases_per_s_median"] / summary["dnsmasq"]["leases_per_s_median"]
    if args.json:
        print(json.dumps({"servers": summary, "ratio_sidusctl_over_dnsmasq": ratio}, indent=2))
        return 0
    print(f"perfdhcp avalanche, {args.clients} clients, {args.repeat} runs each")
    for server, s in summary.items():
        print(f"  {server:9} {s['leases_per_s_median']:8.1f} leases/s (runs {s['leases_per_s_runs']}), "
              f"provisioned >= {s['provisioned_min']}, leases stored >= {s['store_leases_min']}, "
              f"duplicate addresses: perfdhcp {s['perfdhcp_non_unique_total']}, "
              f"store {s['store_duplicate_addresses_total']}")
    print(f"  ratio sidusctl/dnsmasq: {ratio:.2f}x; --durable: "
          f"{summary['sidusctl-durable']['leases_per_s_median'] / summary['dnsmasq']['leases_per_s_median']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
