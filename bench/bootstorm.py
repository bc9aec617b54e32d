#!/usr/bin/env python3
"""Boot storm benchmark: N simulated nodes (not qemu) rebooting at once against serve-pxe and
against the reference stack (dnsmasq for DHCP and TFTP, nginx for HTTP, nfs-ganesha for NFS),
side by side in one run, for each node count asked (``--nodes 50,200,500``) and each root
source (``--roots squashfs-http,nfs``).

Each node, from its own MAC and its own address, all nodes started within 2 s, does what a PXE
node does: DHCP DISCOVER/REQUEST as the PXE ROM, the boot loader over TFTP, DHCP as iPXE, its
pxelinux config, kernel and initrd over TFTP (blksize 1468, lock-step), DHCP as the kernel,
then its root, then DHCP as the booted system. Every file is checked by SHA-256. With
``--boot ipxe-http`` the node's ROM is iPXE instead: one DHCP exchange as iPXE, answered with
``http://SERVER/boot.ipxe`` (serve-pxe ``--http``; dnsmasq tags the iPXE user class), then the
script, the node's own script, kernel and initrd over HTTP (from nginx for the reference), on
one keep-alive connection as iPXE's connection pool does (before 2026-12-06 the simulated iPXE
opened a connection per file).

- ``squashfs-http`` (the simulated nodes of tests/storm_sim.py): the squashfs root over HTTP, a third
  of the nodes resuming half-way with Range. Each node POSTs its stages to /sidus/report, as
  the initramfs does (since 2026-12-06 the ``root`` and ``root-mounted`` reports on their
  way while the boot goes on, as its ``wget &``; awaited before ``booted``): serve-pxe records them, nginx answers 204 and drops them (so the clients
  do the same work against both stacks; the reference keeps no per-node status). Each
  stack logs what it serves: serve-pxe a line per DHCP exchange, file and report, dnsmasq
  its DHCP and TFTP lines, nginx its access log (to a file, its default; off before
  2026-12-04, as bench/http_serve.py has had it on).
- ``nfs``: the root is the real ``minimal`` image's directory (a hard-linked copy), and each
  node replays the reads its kernel makes for a real boot: bench/nfs-boot-reads.txt, recorded
  once from a qemu boot by ``bench/boot.py --record-reads`` (how: that file's header). Each
  node is a cold NFSv3 client of its own (this bench's :func:`nfs_boot_reads`: the host kernel
  here has no NFS client, and one would share its caches and connection between nodes):
  portmapper, MNT, then for each recorded entry in order a LOOKUP of every component not seen
  yet, ACCESS and READs of the config's ``rsize`` (8192) to the end of each file, READDIRPLUS
  of each directory listed, READLINK of each symlink; its own TCP connection, one call at a
  time. Whole files are read (an mmap'ed library is only partly read by a real boot: an upper
  bound). The server and export path come from the node's pxelinux config. No reports (an NFS
  root boots through initramfs-tools' own script, which does not report). The nodes run in
  ``--nfs-shards`` processes (default one per core), each with every shards-th node: in one
  process (as before 2026-12-04) their own CPU bounded the storm, not the servers.

Reported per stack: time until the last node has everything, p50/p99 per node, failed nodes,
refusals and retransmits the clients saw, server CPU seconds (all processes of the server
namespace) and peak RSS (VmHWM, summed over them), and the ratios serve-pxe / reference.
Everything runs in sdt- namespaces created here (a bridge and a veth between the server and
the clients, nothing else) and removed at the end, even on failure; each storm is bounded by
``--timeout``. ``--rounds K`` runs K storms per stack, in pairs whose order alternates (A B,
B A, A B, ...: a drifting load weighs on both sides alike), and reports each side's median
run and the ratio of the medians, with every round's times: one storm to the next moves by
more than the stacks differ. Then, from the pairs: the median of the per-round ratios with a
95 % distribution-free interval, the ratio of the summed times, and how many rounds
serve-pxe won (``pairs`` in the JSON; bench/pairs.py pools them across runs).

Run as root from the repository (the nfs root needs ``minimal`` built in the state dir):
    .venv/bin/python bench/bootstorm.py [--nodes 50,200,500] [--roots squashfs-http,nfs]
        [--boot pxelinux,ipxe-http] [--state-dir DIR] [--root-mib 20] [--kernel-kib 4096]
        [--initrd-kib 2048] [--rounds 1] [--again] [--cold-neighbours] [--timeout 600]
        [--out FILE] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# the repository first on the path, bench/ itself not (a bench script named like a standard
# library module would stand in for it)
sys.path[:] = [str(REPO), *(d for d in sys.path if Path(d or ".").resolve() != REPO / "bench")]
import tests.storm_proto as simproto  # noqa: E402
import tests.storm_sim as sim  # noqa: E402
import tests.test_storm as storm  # noqa: E402
from bench import netcounters, nginx_ref  # noqa: E402
from bench.cpucounters import machine_cpu, ns_usage  # noqa: E402
from bench.nfs_client import load_reads, nfs_boot_reads  # noqa: E402
from bench.pairs import describe, pair_stats  # noqa: E402
from tests.netns_util import Daemon, bridge, enslave, ip, netns, nsexec, veth  # noqa: E402

READS = REPO / "bench" / "nfs-boot-reads.txt"
SERVER = sim.SERVER
async def nfs_node(cfg: dict[str, Any], n: dict[str, str], proto: Any, tr: Any,
                   tally: Any) -> dict[str, Any]:
    """One simulated node booting its ``nfs`` root: as the storm's node (tests/storm_sim.py)
    up to the kernel's DHCP, then the root's reads (:func:`nfs_boot_reads`), then DHCP as the
    booted system. The NFS server and export come from the node's pxelinux config."""
    await asyncio.sleep(random.random() * cfg["spread"])
    t0 = time.monotonic()
    mac = bytes.fromhex(n["mac"].replace(":", ""))
    me, sid = n["ip"], cfg.get("server_id")
    rec: dict[str, Any] = {"mac": n["mac"], "dhcp": {}}
    digests, conf = await sim.boot_files(cfg, n, proto, tr, tally, rec)
    m = re.search(rb"nfsroot=([0-9.]+):([^, ]+),\S*rsize=(\d+)", conf)
    if m is None:
        raise RuntimeError(f"{n['mac']}: no nfsroot= in its boot config")
    rec["dhcp"]["kernel"] = await simproto.dhcp_phase(proto, tr, mac, "kernel", sid, tally)
    t_root = time.monotonic()
    digests.update(await nfs_boot_reads(me, m[1].decode(), m[2].decode(), cfg["entries"],
                                        int(m[3]), tally, set(cfg["check"])))
    rec["root_s"] = time.monotonic() - t_root
    # where a node's time went: DHCP and TFTP (or HTTP) up to the kernel's DHCP, then the
    # root's reads
    boot = "dhcp+http" if cfg.get("boot") == "ipxe-http" else "dhcp+tftp"
    rec["by_protocol"] = {boot: t_root - t0, "nfs": rec["root_s"]}
    rec["dhcp"]["system"] = await simproto.dhcp_phase(proto, tr, mac, "system", sid, tally)
    rec["digests"] = digests
    rec["seconds"] = time.monotonic() - t0
    return rec


async def nfs_storm(cfg: dict[str, Any]) -> dict[str, Any]:
    """Every node of ``cfg["nodes"]`` booting its nfs root at once (within ``spread`` s), at
    most ``timeout`` s; per node its record or its error (as tests/storm_sim.storm)."""
    tr, proto = await simproto.dhcp_client(cfg["interface"])
    tally = simproto.Tally()
    tally.nfs_calls = tally.nfs_retries = 0  # type: ignore[attr-defined]
    cfg["entries"] = load_reads(Path(cfg["reads"]))
    t0, cpu0 = await sim.shard_start(cfg), time.process_time()  # a shard: its storm's start

    async def one(n: dict[str, str]) -> dict[str, Any]:
        try:
            return await nfs_node(cfg, n, proto, tr, tally)
        except (RuntimeError, OSError, ValueError, IndexError, asyncio.IncompleteReadError,
                struct.error) as e:
            return {"mac": n["mac"], "error": f"{type(e).__name__}: {e}"}

    try:
        results = await sim.each_node([one(n) for n in cfg["nodes"]], cfg["nodes"],
                                        cfg["timeout"])
    finally:
        tr.close()
    return {"wall": time.time() - t0, "nodes": results, "tally": vars(tally),
            "client_cpu": time.process_time() - cpu0}
# -- the two stacks ---------------------------------------------------------------------------

# nfs-ganesha alone (sidusctl.subsys.ganesha: the same VFS export serve-pxe configures), with
# its own rpcbind; ends (and stops both) on SIGTERM
GANESHA_ALONE = """
import signal, sys, time
from pathlib import Path
from sidusctl.subsys.ganesha import Export, serve
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
with serve([Export(Path(sys.argv[1]))], bind_addr=None, workdir=Path(sys.argv[2])):
    print("ganesha ready", flush=True)
    while True:
        time.sleep(3600)
"""


def private_run(ns: str, *argv: str) -> list[str]:
    """``argv`` in ``ns`` with a private /run: rpcbind (for nfs-ganesha) will not start while
    another rpcbind, in any namespace, holds /run/rpcbind.lock (as sidusctl.netboot.lab)."""
    return nsexec(ns, "unshare", "-m", "sh", "-c", 'mount -t tmpfs sdt-run /run && exec "$@"',
                  "sh", *argv)


def settle(*namespaces: str, flush: bool = False) -> None:
    """Before each storm, either side: write out what the set-up left dirty (serve-pxe's
    first start writes the tree of every node and the squashfs export, with fsyncs), then a
    second's pause, so that no storm runs during the kernel's writeback. (Added because
    serve-pxe's first storm was its slowest; it did not change that: docs/performance.md.)
    With ``flush``, the neighbour (ARP) caches of ``namespaces`` are emptied first: every
    storm then starts as the first one of a run does, as a room powered on in the morning
    (``--cold-neighbours``); without it, from the second storm on, the server's cache holds
    an entry for every node (ip-neighbour(8))."""
    os.sync()
    for ns in namespaces if flush else ():
        ip("-n", ns, "neigh", "flush", "all")
    time.sleep(1.0)


def measured(srv: str, cli: str, cold: bool,
             storm_run: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One storm, either side: :func:`settle` (``cold``: the neighbour caches emptied), then
    ``storm_run()`` (the clients' merged JSON) with the server namespace ``srv``'s CPU, the
    machine's idle and stolen seconds and both namespaces' network counters
    (bench/netcounters.py) read around it. ``(the clients' JSON, its summary)``: the
    summary is :func:`summarize`'s with ``machine_idle_s``, ``machine_steal_s`` and ``net``
    added."""
    settle(srv, cli, flush=cold)
    u0, k0, _ = ns_usage(srv)
    m0, net = machine_cpu(), netcounters.start(srv, cli)
    res = storm_run()
    m1, counted = machine_cpu(), net()
    u1, k1, rss = ns_usage(srv)
    o = summarize(res, u1 - u0, k1 - k0, rss)
    o["net"] = counted
    o["machine_idle_s"] = round(m1[0] - m0[0], 1)
    o["machine_steal_s"] = round(m1[1] - m0[1], 1)
    return res, o


def summarize(res: dict[str, Any], user: float, kernel: float, rss: float) -> dict[str, Any]:
    ok = sorted(r["seconds"] for r in res["nodes"] if "seconds" in r)
    fails = [r for r in res["nodes"] if "error" in r]

    def pct(p: float) -> float:
        return ok[min(len(ok) - 1, int(p * len(ok)))] if ok else float("nan")

    by = [r["by_protocol"] for r in res["nodes"] if "by_protocol" in r]
    p50_by = {k: round(sorted(b.get(k, 0.0) for b in by)[len(by) // 2], 2)
              for k in (by[0] if by else {})}
    return {"wall_s": round(res["wall"], 2), "p50_s": round(pct(0.5), 2),
            "p50_by_protocol_s": p50_by,
            "p99_s": round(pct(0.99), 2), "failures": len(fails),
            "failure_examples": [f["error"] for f in fails[:3]],
            "mb_per_s": round(res["tally"]["bytes"] / res["wall"] / 1e6, 1),
            "server_cpu_s": round(user + kernel, 1), "server_user_s": round(user, 2),
            "server_kernel_s": round(kernel, 2), "server_peak_rss_mib": round(rss, 1),
            "client_cpu_s": round(res["client_cpu"], 1),
            "http_kib_per_read": round(res["tally"].get("http_bytes", 0) / 1024
                                       / max(1, res["tally"].get("http_reads", 0)), 1),
            **{k: v for k, v in res["tally"].items() if k not in ("bytes", "http_bytes")}}


def run_nfs_clients(ns: str, cfg: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """The nfs storm from inside ``ns``: ``cfg["shards"]`` processes of ``bench/bootstorm.py
    --nfs-client CFG``, each with every shards-th node, all starting at one moment, their JSON
    merged (tests/storm_sim.run_clients)."""
    return sim.run_clients(ns, cfg, work, timeout,
                           client=(sys.executable, str(Path(__file__).resolve()), "--nfs-client"))


def inventory(nodes: list[dict[str, str]], root: str) -> str:
    out = [f'[network]\nsubnet = "10.78.0.0/{sim.PREFIX}"\nserver = "{SERVER}"\n',
           f'[defaults]\nimage = "storm"\nroot = "{root}"\n']
    for n in nodes:
        out.append(f'[[nodes]]\nname = "{n["name"]}"\nmac = "{n["mac"]}"\nip = "{n["ip"]}"\n')
    return "\n".join(out)


def nfs_image(state: Path, rootfs: Path, kernel: bytes, initrd: bytes) -> None:
    """Image ``storm`` whose root is a hard-linked copy of ``rootfs`` (a built image's)."""
    from sidusctl.subsys.imagestore import ImageStore
    with ImageStore(state).new_generation("storm") as gen:
        gen.rootfs.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-al", f"{rootfs}/.", str(gen.rootfs)], check=True)
        (gen.dir / "vmlinuz-storm").write_bytes(kernel)
        (gen.dir / "initrd.img-storm").write_bytes(initrd)
        gen.write_manifest({"name": "storm", "kind": "test"})


def storm_once(args: argparse.Namespace, count: int, root: str, boot: str,
               src_root: Path | None) -> dict[str, Any]:
    """One storm of ``count`` nodes with ``root``, booting the ``boot`` way (``pxelinux``:
    kernel and initrd over TFTP; ``ipxe-http``: over HTTP), against serve-pxe, then the
    reference."""
    tag = os.getpid() % 10000
    work = Path(tempfile.mkdtemp(prefix="sdt-bench-storm-", dir="/var/tmp"))
    kernel = random.Random(1).randbytes(args.kernel_kib << 10)
    initrd = random.Random(2).randbytes(args.initrd_kib << 10)
    state = work / "state"
    if root == "nfs":
        assert src_root is not None
        nfs_image(state, src_root, kernel, initrd)
    else:
        storm.store_image(state, "storm", args.root_mib, kernel, initrd)
    nodes = storm.make_nodes(count)
    (work / "nodes.toml").write_text(inventory(nodes, root))
    srv, cli = f"sdt-bss{tag}", f"sdt-bsc{tag}"
    br, sif, cif = f"sdt-bsb{tag}", f"sdt-bsv{tag}", f"sdt-bsw{tag}"
    http_boot = boot == "ipxe-http"
    phases = 3 if http_boot else 4  # DHCP exchanges per node (an iPXE ROM asks once, not twice)
    out: dict[str, Any] = {"nodes": count, "root": root, "boot": boot,
                           "kernel_kib": args.kernel_kib,
                           "initrd_kib": args.initrd_kib,
                           "cold_neighbours": args.cold_neighbours,
                           "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    if root == "squashfs-http":
        out["root_mib"] = args.root_mib
    try:
        with netns(srv), netns(cli):
            bridge(srv, br, f"{SERVER}/{sim.PREFIX}")
            veth(srv, sif, cli, cif)
            enslave(srv, sif, br)
            storm.add_addresses(cli, cif, nodes)
            tree = state / "serve-pxe" / "tftp"
            # serve-pxe first: it renders the tree (and the squashfs export) both stacks serve
            def start_serve_pxe(log: str) -> Daemon:
                return Daemon(private_run(srv, sys.executable, "-m", "sidusctl", "--state-dir",
                                          str(state), "serve-pxe", "--nodes",
                                          str(work / "nodes.toml"), "--interface", br, "--nfs",
                                          "ganesha" if root == "nfs" else "off",
                                          *(["--http"] if http_boot else [])),
                              work / log, ready="ready:", timeout=300)

            def serve_pxe_storm(clients: Any, cfg: dict[str, Any], want: dict[str, str],
                                status: bool) -> dict[str, Any]:
                """One storm against the serve-pxe running."""
                res, o = measured(srv, cli, args.cold_neighbours,
                                  lambda: clients(cli, cfg, work, args.timeout))
                st = None
                if status and root != "nfs":  # the status file is written every 2 s: wait
                    st = storm._wait_status(
                        storm.StormLab(srv, cli, br, cif, work, state, work / "nodes.toml",
                                       nodes),
                        lambda s: all(n["stage"] == "booted" for n in s["nodes"]), timeout=20)
                if st is not None:
                    o["booted_in_status"] = sum(n["stage"] == "booted" for n in st["nodes"])
                else:
                    time.sleep(2.5)  # the next status write
                # how long DHCP datagrams waited in serve-pxe's socket (kernel time stamps)
                sst = json.loads((state / "serve" / "status.json").read_text())
                o["dhcp_late"], o["dhcp_wait_max_ms"] = sst["dhcp"]["late"], sst["dhcp"]["wait_max_ms"]
                o["tftp_server_retransmits"] = sst["tftp"]["retransmits"]
                if not o["failures"]:
                    sim.check_storm(res, nodes, want, phases)
                return o

            def reference_storm(i: int, clients: Any, cfg: dict[str, Any],
                                want: dict[str, str]) -> dict[str, Any]:
                """The reference: dnsmasq (DHCP + TFTP) and nginx (HTTP) or nfs-ganesha."""
                run = work / f"ref-{i}"
                run.mkdir()
                (run / "hosts").write_text("".join(f"{n['mac']},{n['ip']}\n" for n in nodes))
                dnsmasq = Daemon(nsexec(srv, "dnsmasq", "--no-daemon", "--conf-file=/dev/null",
                                        "--port=0", f"--interface={br}", "--bind-interfaces",
                                        "--no-ping", "--dhcp-range=10.78.0.0,static,255.255.0.0,1h",
                                        f"--dhcp-hostsfile={run / 'hosts'}",
                                        # one lease file for all its rounds, as serve-pxe
                                        # keeps its lease store in its state dir: from
                                        # round 2 on both find the leases of the round before
                                        f"--dhcp-leasefile={work / 'reference-leases'}",
                                        "--dhcp-lease-max=100000",
                                        # iPXE (option 77) gets the script over HTTP, as
                                        # from serve-pxe --http; a PXE ROM pxelinux.0
                                        *(["--dhcp-userclass=set:ipxe,iPXE",
                                           f"--dhcp-boot=tag:ipxe,http://{SERVER}/boot.ipxe",
                                           "--dhcp-boot=tag:!ipxe,pxelinux.0"] if http_boot
                                          else ["--dhcp-boot=pxelinux.0"]),
                                        "--enable-tftp", f"--tftp-root={tree}", "--tftp-max=2000",
                                        f"--pid-file={run / 'dnsmasq.pid'}"),
                                 run / "dnsmasq.log", ready="TFTP root")
                others: list[Daemon] = []
                try:
                    if root == "nfs":
                        others.append(Daemon(private_run(srv, sys.executable, "-c",
                                                         GANESHA_ALONE, str(export),
                                                         str(run / "ganesha")),
                                             run / "ganesha-alone.log", ready="ganesha ready",
                                             timeout=120))
                    if root != "nfs" or http_boot:
                        from sidusctl.netboot import squash
                        others.append(nginx_ref.start(srv, run, (
                            f"        listen {SERVER}:80;\n        root {tree};\n"
                            f"        location /squashfs/storm/ {{ alias "
                            f"{squash.squash_dir(state, 'storm')}/; }}\n"
                            "        location = /sidus/report { return 204; }"),
                            access_log=str(run / "access.log")))
                    rres, o = measured(srv, cli, args.cold_neighbours,
                                       lambda: clients(cli, cfg, work, args.timeout))
                finally:
                    for other in reversed(others):
                        other.stop()
                    dnsmasq.stop()
                if not o["failures"]:
                    sim.check_storm(rres, nodes, want, phases)
                return o

            d = start_serve_pxe("serve-pxe.log")
            try:
                cfg: dict[str, Any]
                kernel_rel, initrd_rel = storm.boot_files(state)
                if root == "nfs":
                    cfg = {"interface": cif, "server": SERVER, "server_id": SERVER,
                           "nodes": nodes, "spread": 2.0, "timeout": args.timeout,
                           "shards": args.nfs_shards,
                           "tftp_files": ["pxelinux.cfg/01-{mac}", kernel_rel, initrd_rel],
                           "reads": str(args.reads)}
                    files = [p for k, _, p in load_reads(args.reads) if k == "f"]
                    cfg["check"] = files[::max(1, len(files) // 25)]
                    conf = (tree / "pxelinux.cfg" / ("01-" + nodes[0]["mac"].replace(":", "-")))
                    m = re.search(r"nfsroot=[0-9.]+:([^, ]+)", conf.read_text())
                    assert m is not None, conf.read_text()
                    export = Path(m[1])
                else:
                    cfg = storm.storm_config(
                        storm.StormLab(srv, cli, br, cif, work, state, work / "nodes.toml",
                                       nodes), nodes, args.timeout)
                cfg["boot"] = boot
                cfg["http_port"] = 80
                cfg["http_files"] = ["/boot.ipxe", "/ipxe/{mac}.ipxe", f"/{kernel_rel}",
                                     f"/{initrd_rel}"]
                want = {kernel_rel: hashlib.sha256(kernel).hexdigest(),
                        initrd_rel: hashlib.sha256(initrd).hexdigest()}
                if http_boot:
                    want["boot.ipxe"] = hashlib.sha256((tree / "boot.ipxe").read_bytes()).hexdigest()
                else:
                    want["loader"] = hashlib.sha256((tree / "pxelinux.0").read_bytes()).hexdigest()
                if root == "nfs":
                    for p in cfg["check"]:
                        want[p] = hashlib.sha256((export / p.lstrip("/")).read_bytes()).hexdigest()
                else:
                    want["root"] = cfg["sha256"]
                clients = run_nfs_clients if root == "nfs" else sim.run_clients
                a_runs = [serve_pxe_storm(clients, cfg, want, status=True)]
            finally:
                d.stop()
            b_runs: list[dict[str, Any]] = []
            # A B, B A, A B, ...: a load that drifts through the run (a machine settling after
            # a build) weighs on both sides alike, not always on the one that goes first
            for i in range(args.rounds):
                if i % 2:
                    b_runs.append(reference_storm(i, clients, cfg, want))
                if i:
                    d = start_serve_pxe(f"serve-pxe-{i}.log")
                    try:
                        a_runs.append(serve_pxe_storm(clients, cfg, want, status=False))
                    finally:
                        d.stop()
                if not i % 2:
                    b_runs.append(reference_storm(i, clients, cfg, want))
            if args.again:  # serve-pxe once more after the reference: A B A
                d = start_serve_pxe("serve-pxe-again.log")
                try:
                    out["serve-pxe-again"] = serve_pxe_storm(clients, cfg, want, status=False)
                finally:
                    d.stop()
            out["serve-pxe"], out["reference"] = median_run(a_runs), median_run(b_runs)
            if args.rounds > 1:
                # every round's failures and retransmissions, not the median run's only
                out["rounds"] = [{"serve-pxe": x["wall_s"], "reference": y["wall_s"],
                                  "first": "reference" if i % 2 else "serve-pxe",
                                  "failures": [x["failures"], y["failures"]],
                                  "dhcp_retries": [x["dhcp_retries"], y["dhcp_retries"]],
                                  "tftp_retries": [x["tftp_retries"], y["tftp_retries"]],
                                  "steal_s": [x["machine_steal_s"], y["machine_steal_s"]],
                                  "net": [x["net"], y["net"]]}
                                 for i, (x, y) in enumerate(zip(a_runs, b_runs, strict=True))]
                out["pairs"] = pair_stats(out["rounds"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a, b = out["serve-pxe"], out["reference"]
    out["ratio_wall"] = round(a["wall_s"] / b["wall_s"], 2)
    out["ratio_p99"] = round(a["p99_s"] / b["p99_s"], 2)
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of one stack's storms, the one of median time (the lower middle of an even count)."""
    return sorted(runs, key=lambda r: float(r["wall_s"]))[(len(runs) - 1) // 2]


def print_one(o: dict[str, Any]) -> None:
    what = (f"squashfs {o['root_mib']} MiB over HTTP" if o["root"] == "squashfs-http"
            else "nfs root (recorded boot reads over NFSv3)")
    how = ("over HTTP (iPXE ROM, serve-pxe --http)" if o.get("boot") == "ipxe-http"
           else "over TFTP (pxelinux)")
    print(f"boot storm: {o['nodes']} nodes, {what}, kernel {o['kernel_kib']} KiB + initrd "
          f"{o['initrd_kib']} KiB {how}; load average before {o['load_average_before']}")
    ref = "dnsmasq+ganesha" if o["root"] == "nfs" else "dnsmasq+nginx"
    for name, s in (("serve-pxe", o["serve-pxe"]), (ref, o["reference"])):
        extra = (f"NFS calls {s.get('nfs_calls')}" if o["root"] == "nfs" else
                 f"refused HTTP {s['http_refused']} TFTP {s['tftp_refused']}")
        print(f"  {name:15} all booted in {s['wall_s']:6.1f} s  p50 {s['p50_s']:5.1f} s  p99 "
              f"{s['p99_s']:5.1f} s  failures {s['failures']}  {extra}  retransmits DHCP "
              f"{s['dhcp_retries']} TFTP {s['tftp_retries']}  server CPU {s['server_cpu_s']} s "
              f"(user {s['server_user_s']}, kernel {s['server_kernel_s']}), "
              f"peak RSS {s['server_peak_rss_mib']} MiB, {s['mb_per_s']} MB/s; the simulated "
              f"nodes' CPU {s['client_cpu_s']} s")
        if "machine_steal_s" in s:
            print(f"      the machine meanwhile: {s['machine_idle_s']} s idle, "
                  f"{s['machine_steal_s']} s stolen by the hypervisor (all CPUs)")
        if s.get("http_reads"):
            print(f"      the nodes read HTTP bodies {s['http_kib_per_read']} KiB at a time "
                  f"({s['http_reads']} reads) over {s.get('http_connections', '?')} "
                  "connections")
        if s["p50_by_protocol_s"]:
            print("      per node, medians: " + ", ".join(
                f"{k} {v} s" for k, v in s["p50_by_protocol_s"].items()))
        if "dhcp_late" in s:
            print(f"      DHCP datagrams answered more than 1 s after arrival: {s['dhcp_late']}"
                  f" (longest wait {s['dhcp_wait_max_ms']} ms); TFTP blocks the server "
                  f"retransmitted: {s['tftp_server_retransmits']}")
        for e in s["failure_examples"]:
            print(f"      e.g. {e}")
    if "serve-pxe-again" in o:
        s = o["serve-pxe-again"]
        print(f"  serve-pxe again all booted in {s['wall_s']:6.1f} s  p50 {s['p50_s']:5.1f} s  "
              f"p99 {s['p99_s']:5.1f} s  failures {s['failures']}  server CPU "
              f"{s['server_cpu_s']} s, peak RSS {s['server_peak_rss_mib']} MiB")
    for i, r in enumerate(o.get("rounds", [])):
        first = "reference first" if r.get("first") == "reference" else "serve-pxe first"
        print(f"  round {i + 1} ({first}): serve-pxe {r['serve-pxe']:6.1f} s, reference "
              f"{r['reference']:6.1f} s, failures {r['failures'][0]} / {r['failures'][1]}, "
              f"retransmits DHCP {r['dhcp_retries'][0]} / {r['dhcp_retries'][1]}, "
              f"TFTP {r['tftp_retries'][0]} / {r['tftp_retries'][1]}, steal "
              f"{r['steal_s'][0]} / {r['steal_s'][1]} s")
    if "pairs" in o:
        print(f"  per round, serve-pxe / reference: {describe(o['pairs'])}")
    median = " (medians)" if "rounds" in o else ""
    print(f"  ratio serve-pxe / reference{median}: time {o['ratio_wall']}x, p99 "
          f"{o['ratio_p99']}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="300", help="node counts, comma-separated (50,200,500)")
    ap.add_argument("--roots", default="squashfs-http",
                    help="root sources, comma-separated: squashfs-http, nfs")
    ap.add_argument("--state-dir", default=None, help="where minimal is built (nfs root)")
    ap.add_argument("--image", default="minimal", help="the built image the nfs root copies")
    ap.add_argument("--reads", type=Path, default=READS, help="the recorded boot (nfs root)")
    ap.add_argument("--boot", default="pxelinux",
                    help="how nodes load kernel and initrd, comma-separated: pxelinux (a PXE "
                    "ROM, pxelinux.0, TFTP), ipxe-http (an iPXE ROM given an HTTP script: "
                    "serve-pxe --http, dnsmasq with a user-class tag; then HTTP)")
    ap.add_argument("--root-mib", type=int, default=20, help="size of the squashfs (MiB)")
    ap.add_argument("--kernel-kib", type=int, default=4096)
    ap.add_argument("--initrd-kib", type=int, default=2048)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per storm, at most")
    ap.add_argument("--rounds", type=int, default=1,
                    help="storms per stack, in pairs of alternating order (A B, B A, ...): "
                         "each side's median run is reported, every round's time listed")
    ap.add_argument("--cold-neighbours", action="store_true",
                    help="empty both namespaces' neighbour (ARP) caches before every storm, "
                    "so that each starts as the first storm of a run does")
    ap.add_argument("--again", action="store_true",
                    help="run serve-pxe's storm once more after the reference's (A B A: a load "
                    "that changes during the run shows as a difference between the two As)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, default=None,
                    help="also append each storm's result to this file (one JSON line each)")
    ap.add_argument("--nfs-shards", type=int, default=os.cpu_count() or 1,
                    help="processes the simulated nodes of an nfs storm run in (default: one "
                    "per core; 1 as before 2026-12-04)")
    ap.add_argument("--nfs-client", metavar="CFG", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.nfs_client:
        print(json.dumps(asyncio.run(nfs_storm(json.loads(Path(args.nfs_client).read_text())))))
        return 0
    if os.geteuid() != 0:
        sys.exit("bench/bootstorm.py: needs root (network namespaces)")
    # SIGTERM (kill, timeout) ends the run as Ctrl-C does: the namespaces, daemons and temp
    # directories go in the finally blocks instead of staying behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    roots = args.roots.split(",")
    boots = args.boot.split(",")
    if not set(boots) <= {"pxelinux", "ipxe-http"}:
        sys.exit(f"bench/bootstorm.py: --boot {args.boot}: expected pxelinux and/or ipxe-http")
    for tool, pkg in (("dnsmasq", "dnsmasq-base"), ("nginx", "nginx-light"),
                      ("mksquashfs", "squashfs-tools"), ("ganesha.nfsd", "nfs-ganesha")):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"bench/bootstorm.py: {tool} not found (apt-get install {pkg})")
    src_root = None
    if "nfs" in roots:
        from sidusctl.core.paths import state_dir
        from sidusctl.subsys.imagestore import ImageStore
        src_root = ImageStore(state_dir(args.state_dir)).get(args.image).rootfs
        if not args.reads.is_file():
            sys.exit(f"bench/bootstorm.py: {args.reads} missing (bench/boot.py --record-reads)")
    results = []
    for count in (int(c) for c in args.nodes.split(",")):
        for root in roots:
            for boot in boots:
                o = storm_once(args, count, root, boot, src_root)
                results.append(o)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(o) + "\n")
                if not args.json:
                    print_one(o)
                    sys.stdout.flush()
    if args.json:
        print(json.dumps(results, indent=2))
    return 0 if all(o["serve-pxe"]["failures"] == o["reference"]["failures"] == 0
                    and o.get("serve-pxe-again", {}).get("failures", 0) == 0
                    and all(sum(r["failures"]) == 0 for r in o.get("rounds", []))
                    for o in results) else 1


if __name__ == "__main__":
    sys.exit(main())
