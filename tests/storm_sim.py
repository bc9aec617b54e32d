"""The simulated nodes of a reboot storm (not qemu), shared by tests/test_storm.py and
bench/bootstorm.py: hundreds of nodes doing concurrently, each from its own MAC and its own
address, what a PXE node does when a whole room reboots:

1. DHCP DISCOVER/REQUEST as the PXE ROM (option 60 ``PXEClient``, 93, 94, 97), then the boot
   loader over TFTP (``pxelinux.0``, ~41 KiB);
2. DHCP again as iPXE (option 77 ``iPXE``), then its per-MAC config, the kernel and the initrd
   over TFTP (blksize 1468, lock-step, as pxelinux does);
3. DHCP again as the kernel (no PXE option), then the squashfs root over HTTP, a third of the
   nodes dropping the connection half-way and resuming with ``Range``, the digest checked;
   reports ``root`` and ``root-mounted`` to ``/sidus/report``, each on its way while the boot
   goes on, as the initramfs sends them (``wget &``);
4. DHCP again as the booted system (option 12 host name), then reports ``booted``.

With ``cfg["boot"] = "ipxe-http"`` steps 1-2 are those of a node whose ROM is iPXE and a
server that hands iPXE an HTTP script (serve-pxe ``--http``): one DHCP exchange as iPXE, then
``boot.ipxe``, the node's script, the kernel and the initrd over HTTP (:func:`boot_files`).

The nodes run inside a client network namespace as ``python -m tests.storm_sim client
CONFIG.json`` (one process per core, :func:`run_clients`), each printing one JSON result. Each
node's protocol work is driven from event loop callbacks, cheap per packet: the simulation
must not be what limits a storm, as each real node has its own CPU.
"""


from __future__ import annotations

import asyncio
import hashlib
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from tests.netns_util import REPO, nsexec
from tests.storm_proto import (
    DhcpReplies,
    DhcpSocket,
    HttpPool,
    Tally,
    dhcp_client,
    dhcp_phase,
    http_req,
    tftp_get,
)

SERVER = "10.78.0.1"
PREFIX = 16

# -- the simulated node (runs inside the client namespace) ---------------------------------------

class _Kept:
    """An HTTP body sink keeping the bytes (a boot script: small) and their SHA-256."""

    def __init__(self) -> None:
        self.data = bytearray()

    def update(self, chunk: bytes) -> None:
        self.data += chunk


async def boot_files(cfg: dict[str, Any], n: dict[str, str], proto: DhcpReplies, tr: DhcpSocket,
                     tally: Tally, rec: dict[str, Any],
                     lap: Callable[[str], None] = lambda _what: None) -> tuple[dict[str, str], bytes]:
    """A node's boot up to its kernel: DHCP, then the boot loader, its config, the kernel and
    the initrd. ``cfg["boot"]`` says how:

    - ``pxelinux`` (the default): DHCP as a PXE ROM, ``pxelinux.0`` over TFTP, DHCP as iPXE,
      then ``cfg["tftp_files"]`` over TFTP (lock-step, blksize 1468);
    - ``ipxe-http``: the ROM is iPXE (qemu's, or a NIC flashed with it), so its one DHCP
      exchange announces option 77 ``iPXE``; the answer must be
      ``http://SERVER/boot.ipxe`` (serve-pxe ``--http``), then ``cfg["http_files"]`` come
      over HTTP (``boot.ipxe``, the node's script, kernel, initrd), one after the other on
      one connection while the server keeps it open, as iPXE's connection pool.

    Each DHCP answer goes into ``rec["dhcp"]`` under its phase and must be the node's
    reserved address; ``lap(protocol)`` is called after each step. Returns the SHA-256 of
    every file by name (``loader`` for the boot loader), and the node's own boot config
    (its pxelinux config or its iPXE script: the kernel command line is in it). RuntimeError
    on a wrong address or boot file, a failed transfer or an HTTP status other than 200."""
    mac = bytes.fromhex(n["mac"].replace(":", ""))
    srv, me, sid = cfg["server"], n["ip"], cfg.get("server_id")
    dashes = n["mac"].replace(":", "-")
    digests: dict[str, str] = {}
    conf = b""
    if cfg.get("boot", "pxelinux") == "ipxe-http":
        d = rec["dhcp"]["ipxe"] = await dhcp_phase(proto, tr, mac, "ipxe", sid, tally)
        lap("dhcp")
        if d["ack"] != me:
            raise RuntimeError(f"{n['mac']}: got {d['ack']}, its reservation is {me}")
        if d["file"] != f"http://{srv}/boot.ipxe":
            raise RuntimeError(f"{n['mac']}: iPXE was told to boot {d['file']!r}")
        pool = HttpPool()
        try:
            for path in cfg["http_files"]:
                path = path.replace("{mac}", dashes)
                kept = _Kept() if path.endswith(".ipxe") else None
                h = hashlib.sha256()
                sink = h if kept is None else kept
                code, _ = await http_req(me, srv, cfg["http_port"], "GET", path, tally,
                                         sink=sink, pool=pool)
                if code != 200:
                    raise RuntimeError(f"GET {path}: HTTP {code}")
                if kept is not None:
                    h.update(kept.data)
                    conf = bytes(kept.data) if path.startswith("/ipxe/") else conf
                digests[path.lstrip("/")] = h.hexdigest()
        finally:
            await pool.close()  # iPXE ends its connections before it starts the kernel
        lap("boot_http")
        return digests, conf
    d = rec["dhcp"]["pxe"] = await dhcp_phase(proto, tr, mac, "pxe", sid, tally)
    lap("dhcp")
    if d["ack"] != me:
        raise RuntimeError(f"{n['mac']}: got {d['ack']}, its reservation is {me}")
    loader = await tftp_get(me, srv, d["file"] or "pxelinux.0", tally)
    digests["loader"] = hashlib.sha256(loader).hexdigest()
    lap("tftp")
    rec["dhcp"]["ipxe"] = await dhcp_phase(proto, tr, mac, "ipxe", sid, tally)
    lap("dhcp")
    for name in cfg["tftp_files"]:
        name = name.replace("{mac}", dashes)
        data = await tftp_get(me, srv, name, tally)
        conf = data if name.startswith("pxelinux.cfg/") else conf
        digests[name] = hashlib.sha256(data).hexdigest()
    lap("tftp")
    return digests, conf


async def node(cfg: dict[str, Any], n: dict[str, str], proto: DhcpReplies,
               tr: DhcpSocket, tally: Tally, resume: bool,
               barrier: asyncio.Barrier | None) -> dict[str, Any]:
    """One simulated node's boot; its record: the addresses of each DHCP phase, digests,
    ``seconds`` in all and ``by_protocol`` (seconds in DHCP, TFTP, the root's HTTP download,
    the reports, the barrier). With a ``barrier``, all nodes start their root download at
    once (to meet the HTTP limits)."""
    await asyncio.sleep(random.random() * cfg["spread"])
    t0 = mark = time.monotonic()
    rec_t: dict[str, float] = {"dhcp": 0.0, "tftp": 0.0, "http": 0.0, "report": 0.0}

    def lap(what: str) -> None:
        """Add the time since the last lap to ``what``'s (the node's seconds per protocol)."""
        nonlocal mark
        now = time.monotonic()
        rec_t[what] = rec_t.get(what, 0.0) + now - mark
        mark = now

    mac = bytes.fromhex(n["mac"].replace(":", ""))
    srv, me = cfg["server"], n["ip"]
    sid = cfg.get("server_id")
    rec: dict[str, Any] = {"mac": n["mac"], "dhcp": {}}
    digests, _conf = await boot_files(cfg, n, proto, tr, tally, rec, lap)
    rec["dhcp"]["kernel"] = await dhcp_phase(proto, tr, mac, "kernel", sid, tally)
    lap("dhcp")
    h = hashlib.sha256()
    url_path, size = cfg["http_path"], cfg["http_size"]
    report = cfg.get("report_path")

    async def post(stage: str, detail: str) -> None:
        if report:
            form = f"mac={n['mac']}&stage={stage}&detail={detail.replace(' ', '+')}".encode()
            code, _ = await http_req(me, srv, cfg["http_port"], "POST", report, tally, body=form)
            if code != 204:
                raise RuntimeError(f"report {stage}: HTTP {code}")

    # as the initramfs (``wget ... &``), the boot goes on while a report is on its way; the
    # node is done once every report is answered (the last, ``booted``, after the others)
    sent = [asyncio.ensure_future(post("root", "squashfs-http"))]
    try:
        if barrier is not None:
            await barrier.wait()
            lap("barrier")
        if resume:  # the link drops half-way; the initramfs resumes with Range
            half = size // 2
            code, _ = await http_req(me, srv, cfg["http_port"], "GET", url_path, tally,
                                     stop_at=half, sink=h)
            code, hdrs = await http_req(me, srv, cfg["http_port"], "GET", url_path, tally,
                                        headers={"Range": f"bytes={half}-"}, sink=h)
            if code != 206 or hdrs.get("content-range") != f"bytes {half}-{size - 1}/{size}":
                raise RuntimeError(f"resume: {code} {hdrs.get('content-range')}")
        else:
            code, _ = await http_req(me, srv, cfg["http_port"], "GET", url_path, tally, sink=h)
            if code != 200:
                raise RuntimeError(f"GET {url_path}: {code}")
        digests["root"] = h.hexdigest()
        lap("http")
        gen = cfg.get("generation", "")
        sent.append(asyncio.ensure_future(post("root-mounted", f"squashfs-http {gen}")))
        rec["dhcp"]["system"] = await dhcp_phase(proto, tr, mac, "system", sid, tally)
        lap("dhcp")
    except BaseException:
        for f in sent:
            f.cancel()
        await asyncio.gather(*sent, return_exceptions=True)
        raise
    await asyncio.gather(*sent)  # a report's error is the node's
    lap("report")
    await post("booted", gen)
    lap("report")
    rec["digests"] = digests
    rec["seconds"] = time.monotonic() - t0
    rec["by_protocol"] = rec_t
    return rec


async def each_node(runs: list[Coroutine[Any, Any, dict[str, Any]]], nodes: list[dict[str, str]],
                    timeout: float) -> list[dict[str, Any]]:
    """Run every node's coroutine at once, at most ``timeout`` seconds in all; one record per
    node of ``nodes`` (same order), ``{"mac", "error": "timed out"}`` for those cut short."""
    tasks = [asyncio.ensure_future(r) for r in runs]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    return [t.result() if t in done else {"mac": n["mac"], "error": "timed out"}
            for t, n in zip(tasks, nodes, strict=True)]


async def shard_start(cfg: dict[str, Any]) -> float:
    """Wait until ``cfg["start_at"]`` (``time.time()`` seconds, set by :func:`run_clients` for
    every shard of a storm) and return it: the storm's start; without it, now."""
    start_at: float | None = cfg.get("start_at")
    if start_at is None:
        return time.time()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    return start_at


async def storm(cfg: dict[str, Any]) -> dict[str, Any]:
    """Every node of ``cfg["nodes"]`` at once (started within ``cfg["spread"]`` seconds), at
    most ``cfg["timeout"]`` seconds in all; per node its record or its error. A shard of a
    larger storm (:func:`run_clients`) starts at ``cfg["start_at"]`` (``time.time()``) and
    counts its wall time from then; its nodes are ``first``, ``first + step``, ... of the
    storm's (which of them resume the root download depends on that number)."""
    tr, proto = await dhcp_client(cfg["interface"])
    tally = Tally()
    t0, cpu0 = await shard_start(cfg), time.process_time()
    barrier = asyncio.Barrier(len(cfg["nodes"])) if cfg.get("sync_root") else None
    first, step = cfg.get("first", 0), cfg.get("step", 1)

    async def one(i: int, n: dict[str, str]) -> dict[str, Any]:
        try:
            return await node(cfg, n, proto, tr, tally, (first + i * step) % 3 == 0, barrier)
        except (RuntimeError, OSError, ValueError, IndexError,
                asyncio.BrokenBarrierError) as e:
            return {"mac": n["mac"], "error": f"{type(e).__name__}: {e}"}

    try:
        results = await each_node([one(i, n) for i, n in enumerate(cfg["nodes"])],
                                  cfg["nodes"], cfg["timeout"])
    finally:
        tr.close()
    wall = time.time() - t0
    return {"wall": wall, "nodes": results, "tally": vars(tally),
            "client_cpu": time.process_time() - cpu0}


def client_main(path: str) -> None:
    cfg = json.loads(Path(path).read_text())
    print(json.dumps(asyncio.run(storm(cfg))))


# -- running a storm, checking it -----------------------------------------------------------------

def run_clients(ns: str, cfg: dict[str, Any], work: Path, timeout: float,
                client: Sequence[str] = ()) -> dict[str, Any]:
    """The storm from inside ``ns``: ``cfg["shards"]`` processes (default 1) of ``python -m
    tests.storm_sim client`` (or of ``client``, given the shard's JSON file as its last
    argument), each with every shards-th node, all starting at one moment;
    their JSON merged (nodes in ``cfg["nodes"]`` order, tallies and client CPU summed, the
    longest wall time). Hundreds of simulated nodes are many machines: one process for them
    all would make the simulation, not the server, the bottleneck of a storm. A storm with
    ``sync_root`` (one asyncio barrier) runs in one process."""
    nodes = cfg["nodes"]
    shards = 1 if cfg.get("sync_root") else max(1, min(cfg.get("shards", 1), len(nodes)))
    start_at = time.time() + 2.0 if shards > 1 else None  # after every interpreter started
    procs: list[tuple[subprocess.Popen[bytes], Path, Any]] = []
    try:
        for k in range(shards):
            stem = work / f"storm-{len(nodes)}-{k}-{time.monotonic_ns()}"
            shard = dict(cfg, nodes=nodes[k::shards], first=k, step=shards, start_at=start_at)
            stem.with_suffix(".json").write_text(json.dumps(shard))
            out_f = stem.with_suffix(".out").open("wb")
            procs.append((subprocess.Popen(
                nsexec(ns, *(client or (sys.executable, "-m", "tests.storm_sim", "client")),
                       str(stem.with_suffix(".json"))),
                stdout=out_f, stderr=subprocess.PIPE, cwd=REPO), stem.with_suffix(".out"), out_f))
        outs: list[dict[str, Any]] = []
        for proc, out_p, _f in procs:
            _, err = proc.communicate(timeout=timeout + 60)
            assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
            outs.append(json.loads(out_p.read_text()))
    finally:
        for proc, _p, f in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            f.close()
    merged: list[dict[str, Any]] = [{}] * len(nodes)
    for k, o in enumerate(outs):
        merged[k::shards] = o["nodes"]
    return {"wall": max(o["wall"] for o in outs), "nodes": merged, "shards": shards,
            "tally": {key: sum(o["tally"][key] for o in outs) for key in outs[0]["tally"]},
            "client_cpu": sum(o["client_cpu"] for o in outs)}


def check_storm(res: dict[str, Any], nodes: list[dict[str, str]], want: dict[str, str],
                phases: int = 4) -> None:
    """One address per MAC across its ``phases`` DHCP phases (4; 3 for ``ipxe-http``, whose
    ROM is iPXE), no address twice, every digest right."""
    errors = [r for r in res["nodes"] if "error" in r]
    assert not errors, errors[:5]
    by_ip: dict[str, str] = {}
    for n, r in zip(nodes, res["nodes"], strict=True):
        assert r["mac"] == n["mac"]
        got = {(p["offer"], p["ack"]) for p in r["dhcp"].values()}
        assert got == {(n["ip"], n["ip"])}, (n, r["dhcp"])
        assert len(r["dhcp"]) == phases, (n, r["dhcp"])
        assert by_ip.setdefault(n["ip"], n["mac"]) == n["mac"]
        for k, v in want.items():
            key = k.replace("{mac}", n["mac"].replace(":", "-"))
            assert r["digests"][key] == v, (n["name"], key)
    assert len(by_ip) == len(nodes)


def report(label: str, res: dict[str, Any], n: int) -> None:
    secs = sorted(r["seconds"] for r in res["nodes"] if "seconds" in r)
    t = res["tally"]
    print(f"\n{label}: {n} nodes in {res['wall']:.1f} s wall, "
          f"{t['bytes'] / res['wall'] / 1e6:.0f} MB/s received, per node p50 "
          f"{secs[len(secs) // 2]:.1f} s, max {secs[-1]:.1f} s; refused HTTP {t['http_refused']}, "
          f"TFTP {t['tftp_refused']}; retransmits DHCP {t['dhcp_retries']}, "
          f"TFTP {t['tftp_retries']}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "client":
        client_main(sys.argv[2])
    else:
        sys.exit("usage: python -m tests.storm_sim client CONFIG.json")
