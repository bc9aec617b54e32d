"""Test helpers: network namespaces, veth pairs and bridges named ``sdt-*``, always removed
(processes inside killed, /etc/netns/<name> removed) even when the test fails; the real CLI run
inside a namespace; and a PXE probe client (``python -m tests.netns_util probe IF``) that
collects every DHCP offer on a link, as a PXE ROM would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def nsexec(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def uniq(prefix: str) -> str:
    """``sdt-<prefix><pid % 10000>``: unique per test process, short enough for an ifname."""
    name = f"sdt-{prefix}{os.getpid() % 10000}"
    assert len(name) <= 15, name
    return name


def _kill_ns_pids(name: str) -> None:
    r = ip("netns", "pids", name, check=False)
    pids = [int(p) for p in r.stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.time() + 3
        while pids and time.time() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()]
            time.sleep(0.05)


@contextlib.contextmanager
def netns(name: str, resolv: str | None = None) -> Iterator[str]:
    """A fresh namespace ``name`` (must start with ``sdt-``) with lo up; with ``resolv``, an
    /etc/netns/<name>/resolv.conf that ``ip netns exec`` shows as /etc/resolv.conf."""
    assert name.startswith("sdt-")
    if name in ip("netns", "list").stdout.split():
        _kill_ns_pids(name)
        ip("netns", "del", name, check=False)
    etc = Path("/etc/netns") / name
    try:
        ip("netns", "add", name)
        ip("-n", name, "link", "set", "lo", "up")
        if resolv is not None:
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(resolv)
        yield name
    finally:
        _kill_ns_pids(name)
        ip("netns", "del", name, check=False)
        shutil.rmtree(etc, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only if empty


def veth(a_ns: str, a_if: str, b_ns: str, b_if: str, a_addr: str | None = None,
         b_addr: str | None = None, b_mac: str | None = None) -> None:
    """A veth pair ``a_if``/``b_if`` moved into namespaces ``a_ns``/``b_ns`` (removed with
    them), up, with optional CIDR addresses and a fixed MAC on the b side."""
    assert a_if.startswith("sdt-") and b_if.startswith("sdt-")
    ip("link", "add", a_if, "type", "veth", "peer", "name", b_if)
    try:
        ip("link", "set", a_if, "netns", a_ns)
        ip("link", "set", b_if, "netns", b_ns)
    except subprocess.CalledProcessError:
        ip("link", "del", a_if, check=False)
        raise
    if b_mac:
        ip("-n", b_ns, "link", "set", b_if, "address", b_mac)
    for ns, ifn, addr in ((a_ns, a_if, a_addr), (b_ns, b_if, b_addr)):
        if addr:
            ip("-n", ns, "addr", "add", addr, "dev", ifn)
        ip("-n", ns, "link", "set", ifn, "up")


def bridge(ns: str, name: str, addr: str | None = None) -> None:
    """A bridge ``name`` inside ``ns`` (removed with it), up."""
    ip("-n", ns, "link", "add", name, "type", "bridge")
    ip("-n", ns, "link", "set", name, "type", "bridge", "stp_state", "0", "forward_delay", "0")
    if addr:
        ip("-n", ns, "addr", "add", addr, "dev", name)
    ip("-n", ns, "link", "set", name, "up")


def enslave(ns: str, ifn: str, br: str) -> None:
    ip("-n", ns, "link", "set", ifn, "master", br)


class Daemon:
    """A long-lived process started in a namespace, its stderr in ``log``; stopped by
    :meth:`stop` (SIGTERM, then SIGKILL) or :meth:`kill9`."""

    def __init__(self, argv: list[str], log: Path, ready: str | None = None,
                 timeout: float = 15) -> None:
        self.log = log
        self._f = log.open("ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._f,
                                     stderr=self._f, cwd=REPO, start_new_session=True)
        if ready:
            deadline = time.time() + timeout
            while ready not in self.text():
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"{argv[:8]} did not become ready:\n{self.text()[-3000:]}")
                time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._f.close()
        return self.proc.returncode

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        self._f.close()


def sidusctl_serve(ns: str, state: Path, *args: str, log: Path) -> Daemon:
    """``sidusctl serve run ARGS`` (the real CLI) inside ``ns``, waited for until ready."""
    return Daemon(nsexec(ns, sys.executable, "-m", "sidusctl", "--state-dir", str(state),
                         "serve", "run", *args), log, ready="ready:")


# -- PXE probe: runs inside a client namespace ---------------------------------------------------

def _probe(ifname: str) -> dict[str, object]:
    from sidusctl.serve import dhcp_codec as dc
    mac = bytes.fromhex(Path(f"/sys/class/net/{ifname}/address").read_text().strip()
                        .replace(":", ""))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, 25, ifname.encode())
    s.bind(("0.0.0.0", 68))
    s.settimeout(0.3)
    pxe = {dc.OPT_VENDOR_CLASS: b"PXEClient:Arch:00000:UNDI:002001",
           dc.OPT_CLIENT_ARCH: b"\0\0", dc.OPT_CLIENT_NDI: b"\x01\x02\x01",
           dc.OPT_CLIENT_UUID: b"\0" + bytes(range(16))}

    def packet(mt: int, xid: int, extra: dict[int, bytes], ciaddr: str = "0.0.0.0") -> bytes:
        return dc.DhcpPacket(op=1, xid=xid, flags=dc.FLAG_BROADCAST, chaddr=mac,
                             ciaddr=IPv4Address(ciaddr),
                             options={dc.OPT_MSG_TYPE: bytes([mt]), **pxe, **extra}).encode()

    # receive like a real client: an AF_PACKET socket, as the kernel's UDP stack drops
    # packets on an interface without an address (reverse-path check)
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
    raw.bind((ifname, 0x0800))
    raw.settimeout(0.3)

    def collect(xid: int, secs: float) -> list[dc.DhcpPacket]:
        out, end = [], time.time() + secs
        while time.time() < end:
            try:
                pkt = raw.recv(65536)
            except TimeoutError:
                continue
            ihl = (pkt[0] & 0x0F) * 4
            if len(pkt) < ihl + 8 or pkt[9] != 17 or pkt[ihl + 2:ihl + 4] != b"\x00\x44":
                continue
            try:
                p = dc.decode(pkt[ihl + 8:])
            except dc.MalformedPacket:
                continue
            if p.xid == xid and p.op == 2:
                out.append(p)
        return out

    def show(p: dc.DhcpPacket) -> dict[str, object]:
        return {"type": p.msg_type, "server": str(p.opt_ip(dc.OPT_SERVER_ID)),
                "yiaddr": str(p.yiaddr), "siaddr": str(p.siaddr), "file": p.file.decode(),
                "vendor_class": p.options.get(dc.OPT_VENDOR_CLASS, b"").decode(),
                "uuid": p.options.get(dc.OPT_CLIENT_UUID, b"").hex()}

    s.sendto(packet(dc.DISCOVER, 0x1111, {}), ("255.255.255.255", 67))
    offers = collect(0x1111, 4.5)  # dnsmasq pings an address for ~3 s before offering it
    result: dict[str, object] = {"offers": [show(p) for p in offers]}
    site = next((p for p in offers if int(p.yiaddr)), None)
    proxy = next((p for p in offers if not int(p.yiaddr)), None)
    if site is not None:
        s.sendto(packet(dc.REQUEST, 0x2222, {
            dc.OPT_REQUESTED_IP: site.yiaddr.packed,
            dc.OPT_SERVER_ID: site.options[dc.OPT_SERVER_ID]}), ("255.255.255.255", 67))
        acks = collect(0x2222, 1.5)
        result["site_ack"] = [show(p) for p in acks]
        if acks and proxy is not None:
            mask = sum(bin(b).count("1") for b in acks[0].options[dc.OPT_SUBNET_MASK])
            subprocess.run(["ip", "addr", "add", f"{acks[0].yiaddr}/{mask}", "dev", ifname],
                           check=True)
            # PXE spec: the boot-server request goes to the proxy's port 4011, from port 68
            s.sendto(packet(dc.REQUEST, 0x3333, {}, str(acks[0].yiaddr)),
                     (str(proxy.opt_ip(dc.OPT_SERVER_ID)), 4011))
            result["proxy_ack"] = [show(p) for p in collect(0x3333, 1.5)]
    return result


def site_dnsmasq(lab_ns: str, bridge: str, workdir: Path, *, ns: str, ifname: str,
                 peer: str) -> Daemon:
    """A site's own DHCP server, addresses only (10.77.0.50-60, 10-minute leases, no DNS):
    dnsmasq in the namespace ``ns`` (made by the caller), on ``ifname`` (10.77.0.2/24) of a
    veth whose other end, ``peer``, is enslaved to ``bridge`` in ``lab_ns``. Its leases, pid
    file and log (``site-dnsmasq.log``) go to ``workdir``; stop it with :meth:`Daemon.stop`."""
    veth(lab_ns, peer, ns, ifname, b_addr="10.77.0.2/24")
    enslave(lab_ns, peer, bridge)
    return Daemon(nsexec(ns, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
                         f"--interface={ifname}", "--bind-interfaces",
                         "--dhcp-range=10.77.0.50,10.77.0.60,255.255.255.0,10m",
                         f"--dhcp-leasefile={workdir / 'site.leases'}",
                         f"--pid-file={workdir / 'site.pid'}"),
                  workdir / "site-dnsmasq.log", ready="DHCP, IP range")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "probe":
        print(json.dumps(_probe(sys.argv[2])))
    else:
        sys.exit("usage: python -m tests.netns_util probe IFNAME")

