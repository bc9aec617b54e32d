#!/usr/bin/env python3
"""HTTP benchmark: sidusctl's HTTP server (sidusctl/serve/http.py, what serve-pxe serves boot
files, squashfs images and node reports with) against nginx, side by side in one run, each on
loopback inside its own sdt- network namespace.

Measures, for each server (median of --repeat runs):
  1. server CPU per request: --requests sequential GETs of a 4 KiB file, one connection each
     (``Connection: close``, as the simulated nodes of bench/bootstorm.py), in microseconds
     (user + kernel time of the server's processes over the run, read from /proc);
  2. --clients concurrent downloads of a 20 MiB file, one connection each: the time until the
     last one has it, and the server CPU it took.
Every body is checked (size, and SHA-256 for the large file). sidusctl's server logs each
request at info level to a file, through the same log thread as serve-pxe
(sidusctl.core.log.background); nginx's access log is on too (to a file), so both write one
line per request. Namespaces and temporary files are removed at the end, even on failure.
Run as root from the repository:
    .venv/bin/python bench/http_serve.py [--requests 2000] [--clients 100] [--repeat 3] [--json]
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
# the repository first on the path, bench/ itself not (a bench script named like a standard
# library module would stand in for it)
sys.path[:] = [str(REPO), *(d for d in sys.path if Path(d or ".").resolve() != REPO / "bench")]
from bench import nginx_ref  # noqa: E402
from tests.netns_util import Daemon, netns, nsexec  # noqa: E402

PORT = 8080

SIDUSCTL = """
import contextlib, logging, sys, time
from pathlib import Path
from sidusctl.core import log
from sidusctl.serve.http import HttpConfig, serve
log.setup()
logging.getLogger("sidusctl").handlers[0].setStream(open(sys.argv[2], "a"))
# (getattr: this bench also runs against revisions from before the log thread)
with getattr(log, "background", contextlib.nullcontext)(), serve(HttpConfig(root=Path(sys.argv[1]), address="127.0.0.1",
                                        port=int(sys.argv[3]), max_clients=1024, per_client=1024)):
    print("ready", flush=True)
    while True:
        time.sleep(3600)
"""

# the clients, run inside the server's namespace: sequential small GETs, then concurrent
# large ones (threads: each waits in recv most of the time)
CLIENT = r"""
import hashlib, json, socket, sys, threading, time
port, n, clients, want = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def get(path):
    # (body size, SHA-256 of the body) of a GET, streamed
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw = b""
    while b"\r\n\r\n" not in raw:
        d = s.recv(65536)
        assert d, raw[:100]
        raw += d
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:100]
    h, size = hashlib.sha256(body), len(body)
    while (d := s.recv(1 << 20)):
        h.update(d)
        size += len(d)
    s.close()
    return size, h.hexdigest()
mode = sys.argv[5]
t0 = time.monotonic()
if mode == "small":
    for _ in range(n):
        assert get("/small.bin")[0] == 4096
else:
    bad = []
    def one():
        if get("/big.bin")[1] != want:
            bad.append(1)
    ts = [threading.Thread(target=one) for _ in range(clients)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert not bad, f"{len(bad)} corrupt downloads"
print(json.dumps({"seconds": time.monotonic() - t0}))
"""


def ns_cpu(ns: str) -> float:
    """CPU seconds (user + kernel) of the processes in ``ns`` but the client's."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = 0.0
    for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                              check=False).stdout.split():
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
            if "(python" in raw and "bench-http-client" in Path(f"/proc/{pid}/cmdline").read_text():
                continue
            f = raw.rsplit(")", 1)[1].split()
            cpu += (int(f[11]) + int(f[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return cpu


def run_client(ns: str, work: Path, args: argparse.Namespace, want: str, mode: str) -> tuple[float, float]:
    """(seconds, server CPU seconds) of one client run."""
    client = work / "bench-http-client.py"
    client.write_text(CLIENT)
    c0 = ns_cpu(ns)
    r = subprocess.run(nsexec(ns, sys.executable, str(client), str(PORT), str(args.requests),
                              str(args.clients), want, mode),
                       capture_output=True, text=True, timeout=600, check=False)
    c1 = ns_cpu(ns)
    if r.returncode != 0:
        raise RuntimeError(f"client ({mode}) failed: {r.stderr[-2000:]}")
    return float(json.loads(r.stdout)["seconds"]), c1 - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="sequential small GETs")
    ap.add_argument("--clients", type=int, default=100, help="concurrent 20 MiB downloads")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/http_serve.py: needs root (network namespaces)")
    if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
        sys.exit("bench/http_serve.py: nginx not found (apt-get install nginx-light)")
    work = Path(tempfile.mkdtemp(prefix="sdt-bench-http-", dir="/var/tmp"))
    root = work / "root"
    root.mkdir()
    (root / "small.bin").write_bytes(os.urandom(4096))
    big = os.urandom(20 << 20)
    (root / "big.bin").write_bytes(big)
    want = hashlib.sha256(big).hexdigest()
    tag = os.getpid() % 10000
    results: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        for name in ("sidusctl", "nginx"):
            ns = stack.enter_context(netns(f"sdt-bh{name[:3]}{tag}"))
            subprocess.run(nsexec(ns, "ip", "link", "set", "lo", "up"), check=True)
            run = work / name
            run.mkdir()
            if name == "sidusctl":
                d = Daemon(nsexec(ns, sys.executable, "-c", SIDUSCTL, str(root),
                                  str(run / "access.log"), str(PORT)), run / "out.log", ready="ready")
            else:
                d = nginx_ref.start(ns, run, f"        listen 127.0.0.1:{PORT};\n        root {root};",
                                    access_log=str(run / "access.log"))
                time.sleep(0.3)
            stack.callback(d.stop)
            small = [run_client(ns, work, args, want, "small") for _ in range(args.repeat)]
            large = [run_client(ns, work, args, want, "big") for _ in range(args.repeat)]
            results[name] = {
                "us_cpu_per_request": round(statistics.median(c for _, c in small)
                                            / args.requests * 1e6),
                "us_wall_per_request": round(statistics.median(s for s, _ in small)
                                             / args.requests * 1e6),
                "concurrent_s": round(statistics.median(s for s, _ in large), 2),
                "concurrent_cpu_s": round(statistics.median(c for _, c in large), 2),
            }
    a, b = results["sidusctl"], results["nginx"]
    ratios = {k: round(a[k] / b[k], 2) if b[k] else float("nan") for k in a}
    if args.json:
        print(json.dumps({"results": results, "ratios": ratios}, indent=2))
        return 0
    print(f"HTTP: {args.requests} sequential 4 KiB GETs, then {args.clients} concurrent "
          f"20 MiB downloads (medians of {args.repeat}); sidusctl / nginx")
    for k, label in (("us_cpu_per_request", "server CPU per small request (us)"),
                     ("us_wall_per_request", "time per small request (us)"),
                     ("concurrent_s", f"{args.clients} downloads, time (s)"),
                     ("concurrent_cpu_s", f"{args.clients} downloads, server CPU (s)")):
        print(f"  {label:40} {a[k]:>9} / {b[k]:<9} ({ratios[k]}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
