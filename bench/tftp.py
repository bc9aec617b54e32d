#!/usr/bin/env python3
"""TFTP benchmark: sidusctl's TFTP server against dnsmasq's (and tftpy, the library on the
product card), side by side in one run, each on loopback inside its own sdt- network namespace.

Measures (median of --repeat runs, MB = 10^6 bytes):
  1. one 32 MiB file at blksize 1468, lock-step (atftp client; curl too)   aim: >= 0.5x dnsmasq
  2. the same with windowsize 16 (atftp negotiates RFC 7440; dnsmasq
     does not, so it runs lock-step)                                       aim: faster than dnsmasq
  3. 200 concurrent 2 MiB transfers at blksize 1468 (200 atftp processes) aim: 0 failures,
                                                                           aggregate >= 0.5x dnsmasq
  4. peak RSS (VmHWM) of each server process after all of that            aim: ours < 150 MiB
Every received file is checked (size and SHA-256). Namespaces and temp files are removed at the
end, even on failure. Run as root from the repository:
    .venv/bin/python bench/tftp.py [--repeat 3] [--clients 200] [--no-tftpy] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.netns_util import Daemon, netns, nsexec  # noqa: E402

MB = 1e6


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def atftp(ns: str, name: str, out: Path, blksize: int = 1468, window: int | None = None) -> list[str]:
    argv = ["atftp", "--option", f"blksize {blksize}"]
    if window:
        argv += ["--option", f"windowsize {window}"]
    return nsexec(ns, *argv, "-g", "-r", name, "-l", str(out), "127.0.0.1", "69")


def timed_get(argv: list[str], out: Path, want: str) -> float:
    out.unlink(missing_ok=True)
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    dt = time.monotonic() - t0
    if r.returncode != 0 or sha(out) != want:
        raise RuntimeError(f"{argv}: failed or corrupt: {r.stdout[-300:]} {r.stderr[-300:]}")
    return dt


def concurrent(ns: str, n: int, name: str, work: Path, want: str) -> tuple[float, int]:
    outs = [work / f"c{i}" for i in range(n)]
    for o in outs:
        o.unlink(missing_ok=True)
    t0 = time.monotonic()
    procs = [subprocess.Popen(atftp(ns, name, o), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for o in outs]
    rcs = [p.wait(600) for p in procs]
    dt = time.monotonic() - t0
    failures = sum(1 for rc, o in zip(rcs, outs, strict=True)
                   if rc != 0 or not o.exists() or sha(o) != want)
    for o in outs:
        o.unlink(missing_ok=True)
    return dt, failures


def vmhwm(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--no-tftpy", action="store_true", help="skip the tftpy server")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/tftp.py: needs root (network namespaces)")

    work = Path(tempfile.mkdtemp(prefix="sdt-bench-tftp-"))
    root = work / "root"
    root.mkdir()
    big, small = root / "big.bin", root / "small.bin"
    big.write_bytes(os.urandom(32 << 20))
    small.write_bytes(os.urandom(2 << 20))
    want_big, want_small = sha(big), sha(small)
    tag = os.getpid() % 10000
    servers: dict[str, list[str]] = {
        "dnsmasq": ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
                    "--enable-tftp", f"--tftp-root={root}", "--tftp-max=2000",
                    "--listen-address=127.0.0.1", "--bind-interfaces",
                    f"--pid-file={work}/dnsmasq.pid", f"--log-facility={work}/dnsmasq-tftp.log"],
        "sidusctl": [sys.executable, "-m", "sidusctl", "--state-dir", str(work / "state"),
                     "serve", "run", "--interface", "lo", "--no-dhcp", "--tftp-root", str(root)],
    }
    ready = {"dnsmasq": None, "sidusctl": "ready:", "tftpy": None}
    if not args.no_tftpy:
        servers["tftpy"] = [sys.executable, "-c",
                            "import logging,sys,tftpy;logging.disable(logging.INFO);"
                            f"tftpy.TftpServer({str(root)!r}).listen('127.0.0.1', 69)"]
    results: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        if True:
            for name, argv in servers.items():
                ns = stack.enter_context(netns(f"sdt-bt{name[:3]}{tag}"))
                d = Daemon(nsexec(ns, *argv), work / f"{name}.log", ready=ready[name])
                stack.callback(d.stop)
                time.sleep(0.5)  # dnsmasq/tftpy print nothing we can wait for
                r: dict[str, float] = {}
                out = work / "out.bin"
                r["lockstep_s"] = statistics.median(
                    timed_get(atftp(ns, "big.bin", out), out, want_big) for _ in range(args.repeat))
                r["lockstep_curl_s"] = statistics.median(
                    timed_get(nsexec(ns, "curl", "-sS", "--tftp-blksize", "1468", "-o", str(out),
                                     "tftp://127.0.0.1/big.bin"), out, want_big)
                    for _ in range(args.repeat))
                r["window16_s"] = statistics.median(
                    timed_get(atftp(ns, "big.bin", out, window=16), out, want_big)
                    for _ in range(args.repeat))
                runs = [concurrent(ns, args.clients, "small.bin", work, want_small)
                        for _ in range(args.repeat)]
                r["concurrent_s"] = statistics.median(dt for dt, _ in runs)
                r["concurrent_failures"] = sum(f for _, f in runs)
                r["peak_rss_mib"] = vmhwm(d.proc.pid)
                results[name] = r
                print(f"{name}: done", file=sys.stderr)

    size_big, size_all = 32 << 20, args.clients * (2 << 20)
    rows = []
    for name, r in results.items():
        rows.append({
            "server": name,
            "32MiB_blksize1468_MBps": size_big / r["lockstep_s"] / MB,
            "32MiB_blksize1468_curl_MBps": size_big / r["lockstep_curl_s"] / MB,
            "32MiB_window16_MBps": size_big / r["window16_s"] / MB,
            f"{args.clients}x2MiB_aggregate_MBps": size_all / r["concurrent_s"] / MB,
            f"{args.clients}x2MiB_failures_all_runs": int(r["concurrent_failures"]),
            "peak_rss_MiB": r["peak_rss_mib"],
        })
    ref = next(x for x in rows if x["server"] == "dnsmasq")
    ours = next(x for x in rows if x["server"] == "sidusctl")
    ratios = {k: ours[k] / ref[k] for k in ours if k.endswith("MBps") and ref[k]}
    if args.json:
        print(json.dumps({"rows": rows, "ratio_sidusctl_over_dnsmasq": ratios}, indent=2))
        return 0
    keys = [k for k in rows[0] if k != "server"]
    print(f"{'':34}" + "".join(f"{x['server']:>12}" for x in rows) + f"{'ratio':>10}")
    for k in keys:
        line = f"{k:34}" + "".join(f"{x[k]:12.1f}" if isinstance(x[k], float) else f"{x[k]:12d}"
                                   for x in rows)
        if k in ratios:
            line += f"{ratios[k]:9.2f}x"
        print(line)
    print("(ratio = sidusctl / dnsmasq; MB/s with MB = 10^6 bytes; loopback in a netns)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
