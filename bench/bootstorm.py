#!/usr/bin/env python3
"""Boot storm benchmark: N simulated nodes (not qemu) rebooting at once against serve-pxe and
against the reference stack (dnsmasq for DHCP and TFTP, nginx for HTTP), side by side in one
run.

Each node (the client of tests/test_storm.py, from its own MAC and its own address, all nodes
started within 2 s) does what a PXE node does: DHCP DISCOVER/REQUEST as the PXE ROM, the boot
loader over TFTP, DHCP as iPXE, its pxelinux config, kernel and initrd over TFTP (blksize 1468,
lock-step), DHCP as the kernel, the squashfs root over HTTP (a third resume half-way with
Range), every file checked by SHA-256, DHCP as the booted system. Against serve-pxe it also
POSTs its stages to /sidus/report (nginx cannot take them; the reference does less work).
Both stacks serve the same files: the tree and squashfs export serve-pxe rendered.

Reported per stack: time until the last node has everything, p50/p99 per node, failed nodes,
refusals and retransmits the clients saw, server CPU seconds (all processes of the server
namespace) and peak RSS (VmHWM, summed over them), and the ratios serve-pxe / reference.
Everything runs in sdt- namespaces created here and removed at the end, even on failure.

Run as root from the repository:
    .venv/bin/python bench/bootstorm.py [--nodes 300] [--root-mib 20] [--kernel-kib 4096]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.netns_util import Daemon, bridge, enslave, ip, netns, nsexec, veth  # noqa: E402
from tests.test_storm import (  # noqa: E402
    PREFIX,
    SERVER,
    StormLab,
    _wait_status,
    add_addresses,
    check_storm,
    inventory,
    make_nodes,
    run_clients,
    store_image,
    storm_config,
)

NGINX_CONF = """daemon off;
master_process on;
worker_processes {workers};
user root;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 60;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen {server}:80;
        root {tree};
        location /squashfs/storm/ {{ alias {squash}/; }}
    }}
}}
"""


def ns_usage(ns: str) -> tuple[float, float]:
    """CPU seconds (user + system) and summed peak RSS (MiB) of the processes in ``ns``."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = rss = 0.0
    for pid in ip("netns", "pids", ns, check=False).stdout.split():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(stat[11]) + int(stat[12])) / tick
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    rss += int(line.split()[1]) / 1024
        except (OSError, IndexError, ValueError):
            continue
    return cpu, rss


def summarize(res: dict[str, Any], cpu: float, rss: float) -> dict[str, Any]:
    ok = sorted(r["seconds"] for r in res["nodes"] if "seconds" in r)
    fails = [r for r in res["nodes"] if "error" in r]

    def pct(p: float) -> float:
        return ok[min(len(ok) - 1, int(p * len(ok)))] if ok else float("nan")

    return {"wall_s": round(res["wall"], 2), "p50_s": round(pct(0.5), 2),
            "p99_s": round(pct(0.99), 2), "failures": len(fails),
            "failure_examples": [f["error"] for f in fails[:3]],
            "mb_per_s": round(res["tally"]["bytes"] / res["wall"] / 1e6, 1),
            "server_cpu_s": round(cpu, 1), "server_peak_rss_mib": round(rss, 1),
            **{k: v for k, v in res["tally"].items() if k != "bytes"}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=300)
    ap.add_argument("--root-mib", type=int, default=20, help="size of the squashfs (MiB)")
    ap.add_argument("--kernel-kib", type=int, default=4096)
    ap.add_argument("--initrd-kib", type=int, default=2048)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per storm, at most")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/bootstorm.py: needs root (network namespaces)")
    for tool, pkg in (("dnsmasq", "dnsmasq-base"), ("nginx", "nginx-light"),
                      ("mksquashfs", "squashfs-tools")):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"bench/bootstorm.py: {tool} not found (apt-get install {pkg})")
    tag = os.getpid() % 10000
    work = Path(tempfile.mkdtemp(prefix="sdt-bench-storm-"))
    kernel = random.Random(1).randbytes(args.kernel_kib << 10)
    initrd = random.Random(2).randbytes(args.initrd_kib << 10)
    state = work / "state"
    store_image(state, "storm", args.root_mib, kernel, initrd)
    nodes = make_nodes(args.nodes)
    (work / "nodes.toml").write_text(inventory(nodes))
    srv, cli = f"sdt-bss{tag}", f"sdt-bsc{tag}"
    br, sif, cif = f"sdt-bsb{tag}", f"sdt-bsv{tag}", f"sdt-bsw{tag}"
    out: dict[str, Any] = {"nodes": args.nodes, "root_mib": args.root_mib,
                           "kernel_kib": args.kernel_kib, "initrd_kib": args.initrd_kib}
    try:
        with netns(srv), netns(cli):
            bridge(srv, br, f"{SERVER}/{PREFIX}")
            veth(srv, sif, cli, cif)
            enslave(srv, sif, br)
            add_addresses(cli, cif, nodes)
            lab = StormLab(srv, cli, br, cif, work, state, work / "nodes.toml", nodes)
            # serve-pxe first: it renders the tree and exports the squashfs both stacks serve
            d = lab.start(log="serve-pxe.log")
            try:
                cfg = storm_config(lab, nodes, args.timeout)
                tree = state / "serve-pxe" / "tftp"
                want = {"loader": hashlib.sha256((tree / "pxelinux.0").read_bytes()).hexdigest(),
                        "vmlinuz-storm": hashlib.sha256(kernel).hexdigest(),
                        "initrd.img-storm": hashlib.sha256(initrd).hexdigest(),
                        "root": cfg["sha256"]}
                c0, _ = ns_usage(srv)
                res = run_clients(cli, cfg, work, args.timeout)
                c1, rss = ns_usage(srv)
                # the status file is written every 2 s: wait for the last reports to land
                st = _wait_status(lab, lambda s: all(n["stage"] == "booted"
                                                     for n in s["nodes"]), timeout=20)
            finally:
                d.stop()
            out["serve-pxe"] = summarize(res, c1 - c0, rss)
            out["serve-pxe"]["booted_in_status"] = sum(n["stage"] == "booted"
                                                       for n in st["nodes"])
            with_errors = out["serve-pxe"]["failures"]
            if not with_errors:
                check_storm(res, nodes, want)
            # the reference: dnsmasq (DHCP + TFTP) and nginx (HTTP) on the same bridge
            run = work / "ref"
            run.mkdir()
            (run / "hosts").write_text("".join(f"{n['mac']},{n['ip']}\n" for n in nodes))
            from sidusctl.netboot import squash
            (run / "nginx.conf").write_text(NGINX_CONF.format(
                workers=os.cpu_count() or 1, run=run, server=SERVER, tree=tree,
                squash=squash.squash_dir(state, "storm")))
            dnsmasq = Daemon(nsexec(srv, "dnsmasq", "--no-daemon", "--conf-file=/dev/null",
                                    "--port=0", f"--interface={br}", "--bind-interfaces",
                                    "--no-ping", "--dhcp-range=10.78.0.0,static,255.255.0.0,1h",
                                    f"--dhcp-hostsfile={run / 'hosts'}",
                                    f"--dhcp-leasefile={run / 'leases'}",
                                    "--dhcp-lease-max=100000", "--dhcp-boot=pxelinux.0",
                                    "--enable-tftp", f"--tftp-root={tree}", "--tftp-max=2000",
                                    f"--pid-file={run / 'dnsmasq.pid'}"),
                             run / "dnsmasq.log", ready="TFTP root")
            try:
                nginx = Daemon(nsexec(srv, "nginx", "-p", str(run), "-c",
                                      str(run / "nginx.conf")), run / "nginx.log")
                try:
                    for _ in range(100):  # nginx says nothing when ready: wait for its pid
                        if (run / "nginx.pid").exists():
                            break
                        time.sleep(0.05)
                    rcfg = {**cfg, "report_path": None}
                    c0, _ = ns_usage(srv)
                    rres = run_clients(cli, rcfg, work, args.timeout)
                    c1, rss = ns_usage(srv)
                finally:
                    nginx.stop()
            finally:
                dnsmasq.stop()
            out["reference"] = summarize(rres, c1 - c0, rss)
            if not out["reference"]["failures"]:
                check_storm(rres, nodes, want)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a, b = out["serve-pxe"], out["reference"]
    out["ratio_wall"] = round(a["wall_s"] / b["wall_s"], 2)
    out["ratio_p99"] = round(a["p99_s"] / b["p99_s"], 2)
    out["failures"] = {"serve-pxe": a["failures"], "reference": b["failures"]}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"boot storm: {args.nodes} nodes, squashfs {args.root_mib} MiB over HTTP, kernel "
          f"{args.kernel_kib} KiB + initrd {args.initrd_kib} KiB over TFTP")
    for name, s in (("serve-pxe", a), ("dnsmasq+nginx", b)):
        print(f"  {name:14} all booted in {s['wall_s']:6.1f} s  p50 {s['p50_s']:5.1f} s  p99 "
              f"{s['p99_s']:5.1f} s  failures {s['failures']}  refused HTTP "
              f"{s['http_refused']} TFTP {s['tftp_refused']}  retransmits DHCP "
              f"{s['dhcp_retries']} TFTP {s['tftp_retries']}  server CPU {s['server_cpu_s']} s, "
              f"peak RSS {s['server_peak_rss_mib']} MiB")
        for e in s["failure_examples"]:
            print(f"      e.g. {e}")
    print(f"  ratio serve-pxe / reference: time {out['ratio_wall']}x, p99 {out['ratio_p99']}x; "
          f"failures {a['failures']} vs {b['failures']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
