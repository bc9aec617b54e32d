"""A reboot storm, simulated: a real ``sidusctl serve-pxe`` in an sdt- network namespace with a
bridge, and hundreds of simulated nodes (not qemu) in a client namespace doing concurrently,
each from its own MAC and its own address, what a PXE node does when a whole room reboots:

1. DHCP DISCOVER/REQUEST as the PXE ROM (option 60 ``PXEClient``, 93, 94, 97), then the boot
   loader over TFTP (``pxelinux.0``, ~41 KiB);
2. DHCP again as iPXE (option 77 ``iPXE``), then its per-MAC config, the kernel and the initrd
   over TFTP (blksize 1468, lock-step, as pxelinux does);
3. DHCP again as the kernel (no PXE option), then the squashfs root over HTTP (a real export of
   an image holding a generated file of a few tens of MiB), a third of the nodes dropping the
   connection half-way and resuming with ``Range``, the digest checked; reports ``root`` and
   ``root-mounted`` to ``/sidus/report``;
4. DHCP again as the booted system (option 12 host name), then reports ``booted``.

The simulated nodes are tests/storm_sim.py's, which ``bench/bootstorm.py`` also runs against
the reference stack (dnsmasq, nginx).

Asserted: every node got one address, the same in its four DHCP phases, and no address went to
two MACs; every download is complete with the right SHA-256; with low limits (a second, smaller
round) every refusal is answered (HTTP 503 with Retry-After, TFTP error "server busy") and as
many are counted in the status as the clients saw; no internal error; ``pxe status --json``
shows every node booted with its generation. Wall time and throughput are printed, never
asserted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from tests.netns_util import REPO, Daemon, bridge, enslave, ip, netns, nsexec, uniq, veth
from tests.storm_sim import PREFIX, SERVER, check_storm, report, run_clients

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

# -- the lab: nodes, their inventory, the image, the client link -----------------------------------


def make_nodes(n: int, base: int = 0x10) -> list[dict[str, str]]:
    """``n`` nodes: MAC 52:54:00:5e:XX:YY, address 10.78.1.0 + i (reservations)."""
    first = int(IPv4Address("10.78.1.0"))
    return [{"name": f"st{i:03d}", "mac": f"52:54:00:{base:02x}:{i >> 8:02x}:{i & 0xff:02x}",
             "ip": str(IPv4Address(first + i))} for i in range(n)]


def inventory(nodes: list[dict[str, str]]) -> str:
    out = [f'[network]\nsubnet = "10.78.0.0/{PREFIX}"\nserver = "{SERVER}"\n',
           '[defaults]\nimage = "storm"\nroot = "squashfs-http"\n']
    for n in nodes:
        out.append(f'[[nodes]]\nname = "{n["name"]}"\nmac = "{n["mac"]}"\nip = "{n["ip"]}"\n')
    return "\n".join(out)


def store_image(state: Path, name: str, root_mib: int, kernel: bytes, initrd: bytes) -> None:
    """A built image made with the store's API: a rootfs holding ``root_mib`` MiB of
    pseudo-random bytes (its squashfs export is then about that size), stand-in kernel and
    initrd."""
    from sidusctl.subsys.imagestore import ImageStore
    rnd = random.Random(9)
    with ImageStore(state).new_generation(name) as gen:
        (gen.rootfs / "etc").mkdir(parents=True)
        (gen.rootfs / "etc" / "hostname").write_text("storm\n")
        with (gen.rootfs / "blob").open("wb") as f:
            for _ in range(root_mib):
                f.write(rnd.randbytes(1 << 20))
        (gen.dir / f"vmlinuz-{name}").write_bytes(kernel)
        (gen.dir / f"initrd.img-{name}").write_bytes(initrd)
        gen.write_manifest({"name": name, "kind": "test"})


def add_addresses(ns: str, ifname: str, nodes: list[dict[str, str]]) -> None:
    """Every node's address on the client link (one ``ip -batch``), each a /32 so that the
    subnet route stays on the first."""
    ip("-n", ns, "addr", "add", f"10.78.0.2/{PREFIX}", "dev", ifname)
    batch = "".join(f"addr add {n['ip']}/32 dev {ifname}\n" for n in nodes)
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch, text=True, check=True)


@dataclass
class StormLab:
    srv: str
    cli: str
    br: str
    cif: str
    tmp: Path
    state: Path
    nodes_file: Path
    nodes: list[dict[str, str]]

    def start(self, *extra: str, log: str) -> Daemon:
        return Daemon(nsexec(self.srv, sys.executable, "-m", "sidusctl", "--state-dir",
                             str(self.state), "serve-pxe", "--nodes", str(self.nodes_file),
                             "--interface", self.br, "--nfs", "off", *extra),
                      self.tmp / log, ready="ready:", timeout=120)

    def status(self) -> dict[str, Any]:
        r = subprocess.run([sys.executable, "-m", "sidusctl", "--state-dir", str(self.state),
                            "pxe", "status", "--json"], capture_output=True, text=True,
                           timeout=60, cwd=REPO, check=False)
        assert r.returncode == 0, r.stderr
        out: dict[str, Any] = json.loads(r.stdout)
        return out

    def raw_status(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads((self.state / "serve" / "status.json").read_text())
        return out


N_NODES = int(os.environ.get("SIDUSCTL_STORM_NODES", "300"))
ROOT_MIB = 20
KERNEL = random.Random(1).randbytes(1 << 20)   # a small kernel: TFTP is lock-step
INITRD = random.Random(2).randbytes(512 << 10)


@pytest.fixture
def storm_lab(tmp_path: Path) -> Iterator[StormLab]:
    srv, cli = uniq("st"), uniq("su")
    br, sif, cif = uniq("sb"), uniq("sv"), uniq("sw")
    state = tmp_path / "state"
    store_image(state, "storm", ROOT_MIB, KERNEL, INITRD)
    nodes = make_nodes(N_NODES)
    nodes_file = tmp_path / "nodes.toml"
    nodes_file.write_text(inventory(nodes))
    with netns(srv), netns(cli):
        bridge(srv, br, f"{SERVER}/{PREFIX}")
        veth(srv, sif, cli, cif)
        enslave(srv, sif, br)
        add_addresses(cli, cif, nodes)
        yield StormLab(srv, cli, br, cif, tmp_path, state, nodes_file, nodes)


def _wait_status(lab: StormLab, cond: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = lab.status()
        if cond(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.5)


def boot_files(state: Path) -> tuple[str, str]:
    """The kernel and initrd of image ``storm``'s current generation in serve-pxe's tree,
    where the nodes' configurations name them (``boot/storm/<generation>/...``)."""
    from sidusctl.netboot.tree import ImageFiles
    from sidusctl.subsys.imagestore import ImageStore

    img = ImageStore(state, recover=False).get("storm")
    f = ImageFiles("storm", img.kernel, img.initrd, "", generation=img.dir.name)
    return f.kernel_rel, f.initrd_rel


def storm_config(lab: StormLab, nodes: list[dict[str, str]], timeout: float) -> dict[str, Any]:
    from sidusctl.netboot import squash
    ex = squash.list_exports(lab.state, "storm")[-1]
    kernel, initrd = boot_files(lab.state)
    return {"interface": lab.cif, "server": SERVER, "server_id": SERVER, "nodes": nodes,
            "spread": 2.0, "timeout": timeout,
            "tftp_files": ["pxelinux.cfg/01-{mac}", kernel, initrd],
            "http_port": 80, "http_path": f"/squashfs/storm/{ex.file}", "http_size": ex.size,
            "report_path": "/sidus/report", "generation": ex.generation,
            "sha256": ex.sha256, "shards": os.cpu_count() or 1}


@pytest.mark.slow  # ~35 s: 300 nodes, then 40 against low limits
def test_storm_hundreds_of_nodes(storm_lab: StormLab) -> None:
    lab = storm_lab
    d = lab.start(log="serve-pxe.log")
    try:
        cfg = storm_config(lab, lab.nodes, timeout=240)
        tree = lab.state / "serve-pxe" / "tftp"
        kernel, initrd = boot_files(lab.state)
        want = {"loader": hashlib.sha256((tree / "pxelinux.0").read_bytes()).hexdigest(),
                kernel: hashlib.sha256(KERNEL).hexdigest(),
                initrd: hashlib.sha256(INITRD).hexdigest(), "root": cfg["sha256"]}
        res = run_clients(lab.cli, cfg, lab.tmp, timeout=240)
        report("storm", res, len(lab.nodes))
        check_storm(res, lab.nodes, want)
        assert res["tally"]["http_refused"] == 0 and res["tally"]["tftp_refused"] == 0
        gen = cfg["generation"]
        st = _wait_status(lab, lambda s: all(n["stage"] == "booted" for n in s["nodes"]))
        bad = [n["name"] for n in st["nodes"] if n["stage"] != "booted" or
               n["generation"] != gen or not n["booted_reported"]]
        assert not bad, bad[:10]
        raw = lab.raw_status()
        assert raw["internal_errors"] == 0
        assert raw["http"]["internal_errors"] == 0 and raw["tftp"]["internal_errors"] == 0
        assert raw["http"]["refused"] == 0 and raw["tftp"]["refused"] == 0
        assert raw["tftp"]["failed"] == 0
        assert raw["http"]["ranges"] == len(lab.nodes[::3])
        assert st["held"] == {"storm": [gen]}
    finally:
        d.stop()
    # a second, smaller round with low limits: refusals answered, counted, not dropped
    few = lab.nodes[:40]
    d = lab.start("--http-max-clients", "4", "--tftp-max-transfers", "4",
                  "--tftp-per-client", "1", log="serve-pxe-limits.log")
    try:
        # all at once, and all at once again for the root: both limits are met
        res = run_clients(lab.cli, {**cfg, "nodes": few, "timeout": 240, "spread": 0.0,
                                    "sync_root": True}, lab.tmp, timeout=240)
        report("storm with low limits", res, len(few))
        check_storm(res, few, want)
        t = res["tally"]
        assert t["http_refused"] > 0 and t["tftp_refused"] > 0
        raw = {}

        def counted(s: dict[str, Any]) -> bool:
            nonlocal raw
            raw = lab.raw_status()
            return bool(raw["http"]["refused"] == t["http_refused"] and
                        raw["tftp"]["refused"] == t["tftp_refused"])

        _wait_status(lab, counted)
        assert raw["http"]["refused"] == t["http_refused"]
        assert raw["tftp"]["refused"] == t["tftp_refused"]
        assert raw["internal_errors"] == 0
    finally:
        d.stop()
    log = (lab.tmp / "serve-pxe-limits.log").read_text()
    assert "refused (503)" in log and "(max_transfers)" in log


# -- pxe status --watch ----------------------------------------------------------------------

def test_status_is_rewritten_only_when_something_changed(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A status write is skipped while no event, reload or counter changed, until the
    heartbeat; an event, a reload or the end (forced) write it."""
    from sidusctl.serve import supervisor
    f = tmp_path / "status.json"
    sup = supervisor.Supervisor(lambda: supervisor.ServeConfig(status_file=f))

    def written() -> tuple[int, float]:
        st = f.stat()
        return st.st_ino, json.loads(f.read_text())["updated"]  # a write replaces the file

    sup._write_status()
    first = written()
    sup._write_status()
    assert written() == first
    sup._event("ack", "52:54:00:00:00:0a", "10.78.1.10")
    sup._write_status()
    second = written()
    assert second != first and "52:54:00:00:00:0a" in json.loads(f.read_text())["clients"]
    sup.apply(supervisor.ServeConfig(status_file=f))
    sup._write_status()
    third = written()
    assert third != second
    sup._write_status(force=True)
    assert written() != third
    monkeypatch.setattr(supervisor, "STATUS_HEARTBEAT", 0.0)
    last = written()
    sup._write_status()
    assert written() != last


def test_inbox_runs_posted_calls_on_the_loop_in_order_with_one_wakeup_per_batch() -> None:
    """Four threads post 250 calls each while the event loop is busy: every call runs, on the
    loop's thread, each thread's in its order, after one wake-up for them all. With the loop
    idle, calls posted within the delay are one batch too, run at once by ``flush``; a
    call posted once the loop has closed is dropped without an error."""
    import asyncio
    import threading

    from sidusctl.serve.supervisor import Inbox

    got: list[tuple[str, str, str, int | None]] = []
    stamps: list[float] = []

    def handler(k: str, w: str, x: str, at: float) -> None:
        got.append((k, w, x, threading.get_ident()))
        stamps.append(at)

    inbox = Inbox(handler)
    inbox.post("early", "-", "-")  # no loop yet: dropped

    async def main() -> None:
        loop = asyncio.get_running_loop()
        inbox.loop = loop
        posted = threading.Event()

        def poster(t: int) -> None:
            for i in range(250):
                inbox.post("http", f"t{t}", str(i))

        def busy() -> None:  # the loop is answering something else meanwhile
            threads = [threading.Thread(target=poster, args=(t,)) for t in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            posted.set()

        loop.call_soon(busy)
        while not posted.is_set() or len(got) < 1000:
            await asyncio.sleep(0.01)
        inbox.post("http", "t0", "after")  # the loop idle: woken again
        while len(got) < 1001:
            await asyncio.sleep(0.01)
        # the loop idle, a long delay: three calls from a thread, spread over 0.3 s, are one
        # batch, run by flush() before the delay ends
        slow = Inbox(handler, delay=60.0)
        slow.loop = loop

        def spread() -> None:
            for i in range(3):
                slow.post("report", "t9", str(i))
                threading.Event().wait(0.1)

        th = threading.Thread(target=spread)
        th.start()
        while th.is_alive():
            await asyncio.sleep(0.01)
        assert len(got) == 1001  # waiting for the delay
        slow.flush()
        assert slow.wakeups == 1
        assert [g[2] for g in got[1001:]] == ["0", "1", "2"]
        # each call carries the time it was posted, not the batch's: 0.1 s apart
        assert stamps[-1] - stamps[-3] >= 0.15, stamps[-3:]

    loop_thread = threading.get_ident()
    asyncio.run(main())
    assert len(got) == 1004 and {g[3] for g in got} == {loop_thread}
    for t in range(4):
        assert [int(x) for k, w, x, _ in got[:1000] if w == f"t{t}"] == list(range(250))
    assert got[1000][:3] == ("http", "t0", "after")
    assert inbox.wakeups == 2, inbox.wakeups
    inbox.post("late", "-", "-")  # the loop is closed: dropped
    assert len(got) == 1004


def test_node_status_joins_addresses_that_asked_for_a_nodes_per_mac_files() -> None:
    """In proxy mode the site's DHCP server gives the addresses: a node's files come from an
    address the inventory does not know, learnt from its per-MAC file; that address's files
    are the node's, and no other node's."""
    from sidusctl.netboot import inventory, pxestatus
    inv = inventory.parse('[network]\nsubnet = "10.78.0.0/20"\nserver = "10.78.0.1"\n'
                          '[defaults]\nimage = "storm"\n'
                          '[[nodes]]\nname = "a"\nmac = "52:54:00:00:00:0a"\nip = "10.78.1.10"\n'
                          '[[nodes]]\nname = "b"\nmac = "52:54:00:00:00:0b"\nip = "10.78.1.11"\n',
                          known_images=["storm"])
    fetched = {"192.0.2.7": {"pxelinux.cfg/01-52-54-00-00-00-0a": 1.0, "vmlinuz-storm": 2.0,
                             "initrd.img-storm": 3.0},
               "192.0.2.8": {"pxelinux.0": 0.5},
               "10.78.1.11": {"pxelinux.0": 0.7}}
    ip_mac = {"192.0.2.7": "52:54:00:00:00:0a", "192.0.2.9": "52:54:00:00:00:0a"}
    a, b = pxestatus.nodes(inv, {}, acks={}, proxied={"52:54:00:00:00:0a": 0.4},
                           fetched=fetched, ip_mac=ip_mac, reports={}, holds={})
    assert a["addresses"] == ["192.0.2.7", "192.0.2.9"] and a["proxy_dhcp"] == 0.4
    assert a["files"] == ["pxelinux.cfg/01-52-54-00-00-00-0a", "vmlinuz-storm",
                          "initrd.img-storm"]
    assert a["stage"] == "kernel" and a["stages"]["kernel"] == 3.0
    assert b["addresses"] == [] and b["files"] == ["pxelinux.0"] and b["stage"] == "boot-files"


def _watch_status(now: float) -> dict[str, Any]:
    """A serve-pxe status with 7 nodes in every stage (one failed), some refusals."""
    def n(name: str, stage: str | None, dhcp: float | None, booted: float | None = None,
          failed: str | None = None) -> dict[str, Any]:
        return {"name": name, "mac": "52:54:00:00:00:01", "ip": "10.78.1.1", "stage": stage,
                "stages": {"dhcp": dhcp, "boot-files": None, "kernel": None, "root": None,
                           "booted": booted}, "failed": failed, "generation": None}
    nodes = [n("w-unseen", None, None), n("w-dhcp", "dhcp", now - 50),
             n("w-files", "boot-files", now - 90), n("w-kernel", "kernel", now - 20),
             n("w-root", "root", now - 30, failed="sha256 mismatch"),
             n("w-fast", "booted", now - 100, now - 95), n("w-slow", "booted", now - 100, now - 60)]
    return {"pid": os.getpid(), "updated": now, "internal_errors": 0,
            "http": {"refused": 7}, "tftp": {"refused": 3},
            "dhcp": {"late": 2, "wait_max_ms": 1400},
            "pxe": {"interface": "sdt-x", "inventory": "nodes.toml", "nodes": nodes, "held": {}}}


def test_watch_table_counts_stages_and_slowest_nodes() -> None:
    from rich.console import Console

    from sidusctl.cli.servepxe import _watch_table
    now = 1000.0
    st = _watch_status(now)
    con = Console(record=True, width=100, force_terminal=True)
    con.print(_watch_table(st, st["pxe"], slowest=5, now=now))
    text = con.export_text()
    cells = [[c.strip() for c in line.split("│")] for line in text.splitlines() if "│" in line]
    table = {c[0]: c[1] for c in cells if len(c) == 2}
    assert "7 node(s)" in text
    assert table["not seen"] == "1" and table["DHCP"] == "1" and table["boot files"] == "1"
    assert table["kernel+initrd"] == "1" and table["root"] == "1" and table["booted"] == "2"
    assert table["failed"] == "1"
    assert table["refused"] == "HTTP 7, TFTP 3"
    assert table["DHCP late"] == "2 (longest wait 1400 ms)"
    # not booted, longest waiting first; then the booted node that took longest
    slow = [k for k in table if k.startswith(("slow:", "slowest:"))]
    assert slow == ["slow: w-files", "slow: w-dhcp", "slow: w-root", "slow: w-kernel",
                    "slowest: w-slow"]
    assert table["slow: w-files"] == "boot files, 90 s"
    assert table["slowest: w-slow"] == "booted in 40.0 s"


def _pty_run(argv: list[str], sigint_after: str | None = None,
             timeout: float = 30) -> tuple[int, str]:
    """``argv`` with a pseudo-terminal as stdin/stdout/stderr (rich then draws a live view);
    SIGINT once ``sigint_after`` has been printed. (exit code, output)."""
    import pty
    import select
    master, slave = pty.openpty()
    p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=REPO,
                         env={**os.environ, "COLUMNS": "100", "LINES": "40", "TERM": "xterm"})
    os.close(slave)
    out = b""
    sent = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.1)
            if r:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            if sigint_after and not sent and sigint_after.encode() in out:
                p.send_signal(2)
                sent = True
            if p.poll() is not None and not r:
                break
        rc = p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    return rc, out.decode(errors="replace")


def test_watch_cli_refreshes_count_times_and_stops_on_sigint(tmp_path: Path) -> None:
    from sidusctl.core.state import write_json
    state = tmp_path / "state"
    (state / "serve").mkdir(parents=True)
    write_json(state / "serve" / "status.json", _watch_status(time.time()))
    base = [sys.executable, "-m", "sidusctl", "--state-dir", str(state), "pxe", "status",
            "--watch", "--interval", "0.2"]
    rc, out = _pty_run([*base, "--count", "3"])
    assert rc == 0, out
    assert "kernel+initrd" in out and "HTTP 7, TFTP 3" in out and "slowest: w-slow" in out
    assert "Traceback" not in out
    rc, out = _pty_run(base, sigint_after="slowest: w-slow")
    assert rc == 0, out
    assert "Traceback" not in out and "slowest: w-slow" in out



_STATUS_INVENTORY = ('[network]\nsubnet = "10.78.0.0/20"\nserver = "10.78.0.1"\n'
                     '[defaults]\nimage = "storm"\n' + "".join(
                         f'[[nodes]]\nname = "n{i}"\nmac = "52:54:00:00:00:{i:02x}"\n'
                         f'ip = "10.78.1.{i}"\n' for i in range(1, 9)))


def _pxe_supervisor(tmp_path: Path) -> Any:
    """A PxeSupervisor over :data:`_STATUS_INVENTORY` (8 nodes, image ``storm``), given
    what it reads of serve-pxe's loader and no servers (nothing is started)."""
    from types import SimpleNamespace

    from sidusctl.netboot import inventory
    from sidusctl.netboot.pxesupervisor import PxeSupervisor
    from sidusctl.serve import supervisor

    class Loader:
        def __init__(self) -> None:
            self.opts = SimpleNamespace(serve_dir=tmp_path, state=tmp_path / "state",
                                        hold_time=3600, interface="sdt-x", retain=2)
            self.inventory = inventory.parse(_STATUS_INVENTORY, known_images=["storm"])
            self.files: dict[str, Any] = {}
            self.nfs = None

        def __call__(self) -> supervisor.ServeConfig:
            return supervisor.ServeConfig()

    return PxeSupervisor(Loader())  # type: ignore[arg-type]


def test_an_event_handed_over_late_keeps_its_own_time(tmp_path: Path) -> None:
    """The HTTP workers' events reach the loop up to INBOX_DELAY later (supervisor.Inbox),
    with the time they happened: a kernel and initrd fetched before a DHCP ACK, handled
    after it, still count as a boot ("booted" without reports: kernel and initrd, then an
    ACK)."""
    sup = _pxe_supervisor(tmp_path)
    mac, ip = "52:54:00:00:00:01", "10.78.1.1"
    t = time.time()
    sup._event("ack", mac, ip)  # the ACK, handled first
    for f in ("/vmlinuz-storm", "/initrd.img-storm"):  # fetched half a second before it
        sup._event("http", ip, f, t - 0.5)
    node = sup.node_status()[0]
    assert node["mac"] == mac and node["stages"]["kernel"] == t - 0.5
    assert node["booted"] and node["stage"] == "booted"


def test_node_status_rebuilds_only_the_nodes_that_had_events(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PxeSupervisor.node_status keeps each node's entry and builds again only those of
    nodes with an event since (DHCP, a file from one of their addresses, a report and the
    address it came from), and all of them after a reload: after each of 400 random
    events, what it returns equals a full build, and it asked for no more than the nodes
    those events touched."""
    from sidusctl.netboot import inventory, pxestatus

    text = _STATUS_INVENTORY
    asked: list[set[str] | None] = []
    full_nodes = pxestatus.nodes

    def nodes(*a: Any, only: Any = None, **kw: Any) -> list[dict[str, Any]]:
        asked.append(None if only is None else set(only))
        return full_nodes(*a, only=only, **kw)

    monkeypatch.setattr(pxestatus, "nodes", nodes)
    sup = _pxe_supervisor(tmp_path)
    inv = sup.loader.inventory
    assert inv is not None
    macs = [n.mac for n in inv.nodes]
    addresses = [str(n.ip) for n in inv.nodes] + ["192.0.2.7", "192.0.2.8"]
    rng = random.Random(7)

    def full() -> list[dict[str, Any]]:
        return full_nodes(inv, sup.loader.files, acks=sup.acks, proxied=sup.proxied,
                          fetched=sup.fetched, ip_mac=sup.ip_mac, reports=sup.reports,
                          holds=sup.holds)

    assert sup.node_status() == full() and asked[-1] is None  # the first: every node
    since: set[str] = set()  # the nodes the events since the last status touched
    reloaded = False
    for step in range(400):
        kind = rng.choice(["ack", "proxy", "file", "mac-file", "report", "reload"])
        touched: set[str] = set()
        if kind in ("ack", "proxy"):
            mac = rng.choice(macs)
            sup._event(kind, mac, "-")
            touched = {mac}
        elif kind in ("file", "mac-file"):
            ip, mac = rng.choice(addresses), rng.choice(macs)
            name = (f"ipxe/{mac.replace(':', '-')}.ipxe" if kind == "mac-file"
                    else rng.choice(["pxelinux.0", "vmlinuz-storm", "initrd.img-storm",
                                     "squashfs/storm/gen-1.squashfs"]))
            before = sup.ip_mac.get(ip)
            sup._event(rng.choice(["sent", "http"]), ip, "/" + name)
            node = inv.by_ip(ip)
            touched = {m for m in (before, sup.ip_mac.get(ip), node and node.mac) if m}
        elif kind == "report":
            ip, mac = rng.choice(addresses), rng.choice(macs)
            stage = rng.choice(["root", "overlay", "booted", "failed"])
            before = sup.ip_mac.get(ip)
            sup._event("address", ip, mac)
            sup._event("report", mac, f"{stage} secureboot=off")
            touched = {mac} | ({before} if before else set())
        else:  # a reload: another inventory object, the same nodes
            sup.loader.inventory = inv = inventory.parse(text, known_images=["storm"])
            reloaded = True
        since |= touched
        if rng.random() < 0.5:  # several events between two status writes, or one
            continue
        got = sup.node_status()
        assert got == full(), step
        if reloaded:
            assert asked[-1] is None, step
        else:
            assert asked[-1] is not None and asked[-1] <= since, (step, asked[-1], since)
        since, reloaded = set(), False
    assert sum(a is not None and len(a) <= 2 for a in asked) > 50  # a node or two rebuilt
