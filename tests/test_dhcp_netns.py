"""The DHCP server against real clients, inside sdt- network namespaces: busybox udhcpc and ISC
dhclient get their reserved address and options; a MAC without a reservation gets a pool
address; leases survive ``kill -9`` and no address is given twice; proxyDHCP next to dnsmasq
acting as the site's DHCP server; malformed datagrams on the wire are dropped and counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns_util import (
    REPO,
    Daemon,
    bridge,
    enslave,
    netns,
    nsexec,
    sidusctl_serve,
    uniq,
    veth,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

RESERVED_MAC = "52:54:00:ec:33:81"
SCRIPT = """#!/bin/sh
# udhcpc calls this with $1 = deconfig|bound|renew|nak; dhclient with $reason
case "${1:-$reason}" in
  bound|renew|BOUND|RENEW|REBOOT)
    env | grep -E '^(ip|subnet|router|dns|hostname|domain|siaddr|boot_file|lease|serverid|new_[a-z_]+)=' \
      | sort > "$OUT.tmp" && mv "$OUT.tmp" "$OUT" ;;
esac
exit 0
"""


@dataclass
class Lab:
    server_ns: str
    client_ns: str
    server_if: str
    client_if: str
    tmp: Path
    state: Path
    reservations: Path

    def serve(self, *extra: str, log: str = "serve.log") -> Daemon:
        return sidusctl_serve(self.server_ns, self.state, "--interface", self.server_if,
                              "--reservations", str(self.reservations),
                              "--router", "10.77.0.254", "--domain", "cluster.test",
                              "--lease-time", "600", *extra, log=self.tmp / log)

    def udhcpc(self, out: str, *extra: str) -> dict[str, str]:
        script = self.tmp / "dump.sh"
        script.write_text(SCRIPT)
        script.chmod(0o755)
        outf = self.tmp / out
        r = subprocess.run(nsexec(self.client_ns, "env", f"OUT={outf}", "busybox", "udhcpc",
                                  "-i", self.client_if, "-f", "-q", "-n", "-t", "4", "-T", "1",
                                  "-s", str(script), "-V", "PXEClient:Arch:00000:UNDI:002001",
                                  "-x", "0x5d:0000", *extra),
                           capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        return dict(line.split("=", 1) for line in outf.read_text().splitlines())

    def set_client_mac(self, mac: str) -> None:
        subprocess.run(["ip", "-n", self.client_ns, "link", "set", self.client_if, "address", mac],
                       check=True)

    def leases(self) -> list[dict[str, object]]:
        r = subprocess.run([sys.executable, "-m", "sidusctl", "--state-dir", str(self.state),
                            "serve", "leases", "--json"], capture_output=True, text=True,
                           check=True, cwd=REPO)
        out: list[dict[str, object]] = json.loads(r.stdout)
        return out


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    s_ns, c_ns = uniq("ds"), uniq("dc")
    s_if, c_if = uniq("vs"), uniq("vc")
    res = tmp_path / "reservations"
    res.write_text(f"# mac ip hostname\n{RESERVED_MAC.upper()}  10.77.0.130  node1\n"
                   "52-54-00-00-00-02 10.77.0.131 node2 custom.0\n")
    with netns(s_ns), netns(c_ns):
        veth(s_ns, s_if, c_ns, c_if, a_addr="10.77.0.1/24", b_mac=RESERVED_MAC)
        yield Lab(s_ns, c_ns, s_if, c_if, tmp_path, tmp_path / "state", res)


def test_udhcpc_gets_its_reservation_with_options(lab: Lab) -> None:
    d = lab.serve()
    try:
        env = lab.udhcpc("u1")
        assert env["ip"] == "10.77.0.130"
        assert env["subnet"] == "255.255.255.0"
        assert env["router"] == "10.77.0.254"
        assert env["dns"].strip() == "10.77.0.1"
        assert env["hostname"] == "node1"
        assert env["domain"] == "cluster.test"
        assert env["siaddr"] == "10.77.0.1"
        assert env["boot_file"] == "pxelinux.0"  # option 93 = 0: BIOS
        assert env["lease"] == "600"
        assert env["serverid"] == "10.77.0.1"
        assert [(x["ip"], x["mac"], x["hostname"]) for x in lab.leases()] == \
            [("10.77.0.130", RESERVED_MAC, "node1")]
    finally:
        d.stop()
    log = d.text()
    assert f"DHCP {RESERVED_MAC}: DISCOVER -> OFFER 10.77.0.130 (reservation node1" in log
    assert f"DHCP {RESERVED_MAC}: REQUEST (selecting) -> ACK 10.77.0.130" in log


def test_dhclient_gets_its_reservation(lab: Lab) -> None:
    d = lab.serve()
    out = lab.tmp / "dh"
    script = lab.tmp / "dump-dh.sh"
    script.write_text(SCRIPT.replace("$OUT", str(out)))  # dhclient gives its script a clean env
    script.chmod(0o755)
    proc = subprocess.Popen(nsexec(lab.client_ns, "dhclient", "-d", "-1",
                                   "-sf", str(script), "-lf", str(lab.tmp / "dhclient.leases"),
                                   "-pf", str(lab.tmp / "dhclient.pid"), lab.client_if),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 20
        while not out.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert out.exists(), "dhclient got no lease"
        env = dict(line.split("=", 1) for line in out.read_text().splitlines())
        assert env["new_ip_address"] == "10.77.0.130"
        assert env["new_host_name"] == "node1"
        assert env["new_domain_name"] == "cluster.test"
        assert env["new_routers"] == "10.77.0.254"
        assert env["new_dhcp_lease_time"] == "600"
    finally:
        proc.terminate()
        proc.wait(10)
        d.stop()


def test_unknown_mac_pool_or_ignored(lab: Lab) -> None:
    lab.set_client_mac("02:00:00:00:00:09")
    d = lab.serve()  # no pool: unknown MACs are ignored
    try:
        r = subprocess.run(nsexec(lab.client_ns, "busybox", "udhcpc", "-i", lab.client_if, "-f",
                                  "-q", "-n", "-t", "2", "-T", "1", "-s", "/bin/true"),
                           capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode != 0
    finally:
        d.stop()
    assert "DHCP 02:00:00:00:00:09: ignored: DISCOVER: unknown MAC and unknown = ignore" in d.text()
    d = lab.serve("--pool", "10.77.0.100-10.77.0.110", log="serve2.log")
    try:
        env = lab.udhcpc("u2")
        assert env["ip"] == "10.77.0.100"
        assert "hostname" not in env  # no reservation, no name
    finally:
        d.stop()


def test_leases_survive_kill_9_and_no_address_is_given_twice(lab: Lab) -> None:
    pool = ("--pool", "10.77.0.100-10.77.0.101")
    lab.set_client_mac("02:00:00:00:00:0a")
    d = lab.serve(*pool)
    first = lab.udhcpc("a")["ip"]
    d.kill9()  # no clean shutdown: the lease must already be on disk
    assert [(x["ip"], x["mac"]) for x in lab.leases()] == [(first, "02:00:00:00:00:0a")]
    d = lab.serve(*pool, log="serve2.log")  # the flock died with the killed process
    try:
        lab.set_client_mac("02:00:00:00:00:0b")
        second = lab.udhcpc("b")["ip"]
        assert second != first
        lab.set_client_mac("02:00:00:00:00:0c")  # pool exhausted: nothing for a third
        r = subprocess.run(nsexec(lab.client_ns, "busybox", "udhcpc", "-i", lab.client_if, "-f",
                                  "-q", "-n", "-t", "2", "-T", "1", "-s", "/bin/true"),
                           capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode != 0
        lab.set_client_mac("02:00:00:00:00:0a")  # the first client again: same address
        assert lab.udhcpc("a2", "-r", first)["ip"] == first
        ips = [str(x["ip"]) for x in lab.leases()]
        assert sorted(ips) == sorted({first, second})
    finally:
        d.stop()
    assert "pool exhausted" in d.text()


def test_malformed_datagrams_are_dropped_and_counted(lab: Lab) -> None:
    d = lab.serve()
    try:
        code = (
            "import socket,os\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_BROADCAST,1)\n"
            f"s.setsockopt(socket.SOL_SOCKET,25,b'{lab.client_if}')\n"
            "good=bytearray(300);good[0]=1;good[1]=1;good[2]=6;good[236:240]=bytes.fromhex('63825363')\n"
            "for p in [b'',b'x'*10,bytes(good[:239]),bytes(good[:236])+b'\\0\\0\\0\\0',"
            "bytes(good[:240])+b'\\x35\\x09\\x01',os.urandom(400)]:\n"
            "    s.sendto(p,('255.255.255.255',67))\n")
        subprocess.run(nsexec(lab.client_ns, sys.executable, "-c", code), check=True, timeout=20)
        assert lab.udhcpc("after")["ip"] == "10.77.0.130"
        time.sleep(2.5)  # one status write
        r = subprocess.run([sys.executable, "-m", "sidusctl", "--state-dir", str(lab.state),
                            "serve", "status", "--json"], capture_output=True, text=True,
                           check=True, cwd=REPO)
        status = json.loads(r.stdout)
        assert status["dhcp"]["malformed"] >= 5
        # bad input is not a bug: nothing counted as an internal error anywhere
        assert status["dhcp"]["internal_errors"] == 0 and status["internal_errors"] == 0
        assert status["clients"][RESERVED_MAC]["ack"] == "10.77.0.130"
    finally:
        d.stop()


def test_proxy_dhcp_next_to_dnsmasq(tmp_path: Path) -> None:
    s_ns, d_ns, c_ns = uniq("ps"), uniq("pd"), uniq("pc")
    br = uniq("pbr")
    with netns(s_ns), netns(d_ns), netns(c_ns):
        bridge(s_ns, br, "10.78.0.1/24")
        veth(s_ns, uniq("pa"), d_ns, uniq("pb"), b_addr="10.78.0.2/24")
        veth(s_ns, uniq("pe"), c_ns, uniq("pf"))
        enslave(s_ns, uniq("pa"), br)
        enslave(s_ns, uniq("pe"), br)
        site = Daemon(nsexec(d_ns, "dnsmasq", "--no-daemon", "--conf-file=/dev/null",
                             "--port=0", f"--interface={uniq('pb')}", "--bind-interfaces",
                             "--dhcp-range=10.78.0.50,10.78.0.60,255.255.255.0,10m",
                             f"--dhcp-leasefile={tmp_path / 'dnsmasq.leases'}",
                             f"--pid-file={tmp_path / 'dnsmasq.pid'}", "--log-dhcp"),
                      tmp_path / "dnsmasq.log", ready="DHCP, IP range")
        proxy = sidusctl_serve(s_ns, tmp_path / "state", "--interface", br, "--proxy",
                               "--boot-bios", "pxelinux.0", log=tmp_path / "proxy.log")
        try:
            r = subprocess.run(nsexec(c_ns, sys.executable, "-m", "tests.netns_util", "probe",
                                      uniq("pf")), capture_output=True, text=True, timeout=30,
                               cwd=REPO, check=True)
            res = json.loads(r.stdout)
            offers = res["offers"]
            site_offers = [o for o in offers if o["server"] == "10.78.0.2"]
            proxy_offers = [o for o in offers if o["server"] == "10.78.0.1"]
            assert len(site_offers) == 1 and site_offers[0]["yiaddr"].startswith("10.78.0.")
            assert len(proxy_offers) == 1
            po = proxy_offers[0]
            assert po["yiaddr"] == "0.0.0.0"  # proxyDHCP never gives an address
            assert po["vendor_class"] == "PXEClient"
            assert po["file"] == "pxelinux.0" and po["siaddr"] == "10.78.0.1"
            assert po["uuid"] == "00" + bytes(range(16)).hex()
            assert res["site_ack"][0]["server"] == "10.78.0.2"
            pa = res["proxy_ack"]
            assert len(pa) == 1 and pa[0]["type"] == 5 and pa[0]["yiaddr"] == "0.0.0.0"
            assert pa[0]["file"] == "pxelinux.0"
            # a non-PXE client is left to the site server alone
            r = subprocess.run(nsexec(c_ns, "busybox", "udhcpc", "-i", uniq("pf"), "-f", "-q",
                                      "-n", "-t", "3", "-T", "1", "-s", "/bin/true"),
                               capture_output=True, text=True, timeout=30, check=False)
            assert r.returncode == 0, r.stdout + r.stderr
        finally:
            proxy.stop()
            site.stop()
        log = proxy.text()
        assert "proxy DISCOVER on port 67 -> OFFER (no address; boot file pxelinux.0" in log
        assert "proxy REQUEST on port 4011 -> ACK" in log
        assert " -> ACK 10.78" not in log


def test_lease_store_refuses_a_second_server(lab: Lab) -> None:
    d = lab.serve()
    try:
        r = subprocess.run(nsexec(lab.server_ns, sys.executable, "-m", "sidusctl", "--state-dir",
                                  str(lab.state), "serve", "run", "--interface", lab.server_if,
                                  "--reservations", str(lab.reservations)),
                           capture_output=True, text=True, timeout=30, cwd=REPO, check=False)
        assert r.returncode != 0
        assert "in use by another sidusctl process" in r.stderr
    finally:
        d.stop()


def test_bad_reservations_file_gets_one_clear_message(lab: Lab) -> None:
    lab.reservations.write_text("52:54:00:ec:33:81 10.77.0.130 node1\nnot-a-mac 10.77.0.9\n")
    r = subprocess.run(nsexec(lab.server_ns, sys.executable, "-m", "sidusctl", "--state-dir",
                              str(lab.state), "serve", "run", "--interface", lab.server_if,
                              "--reservations", str(lab.reservations)),
                       capture_output=True, text=True, timeout=30, cwd=REPO, check=False)
    assert r.returncode == 2
    # core/config's message shape: file:line: found VALUE (expected WHAT)
    assert f"{lab.reservations}:2: found 'not-a-mac' (expected a MAC address" in r.stderr
    assert "Traceback" not in r.stderr
    lab.reservations.write_text("52:54:00:ec:33:81 10.9.9.9 node1\n")
    r = subprocess.run(nsexec(lab.server_ns, sys.executable, "-m", "sidusctl", "--state-dir",
                              str(lab.state), "serve", "run", "--interface", lab.server_if,
                              "--reservations", str(lab.reservations)),
                       capture_output=True, text=True, timeout=30, cwd=REPO, check=False)
    assert r.returncode == 2 and "outside 10.77.0.0/24" in r.stderr


def test_refuses_an_interface_that_does_not_exist(tmp_path: Path) -> None:
    with netns(uniq("dx")) as ns:
        r = subprocess.run(nsexec(ns, sys.executable, "-m", "sidusctl", "--state-dir",
                                  str(tmp_path), "serve", "run", "--interface", "sdt-nosuch"),
                           capture_output=True, text=True, timeout=30, cwd=REPO, check=False)
    assert r.returncode == 3 and "interface sdt-nosuch: no IPv4 address" in r.stderr



def test_sighup_reloads_reservations(lab: Lab) -> None:
    d = lab.serve()
    try:
        lab.set_client_mac("52:54:00:00:00:03")
        lab.reservations.write_text(lab.reservations.read_text()
                                    + "52:54:00:00:00:03 10.77.0.132 node3\n")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while "reloaded the configuration" not in d.text() and time.time() < deadline:
            time.sleep(0.1)
        env = lab.udhcpc("u3")
        assert (env["ip"], env["hostname"]) == ("10.77.0.132", "node3")
    finally:
        assert d.stop() == 0


def test_pxe_flow_dhcp_then_tftp_from_next_server(lab: Lab) -> None:
    root = lab.tmp / "tftp"
    root.mkdir()
    (root / "pxelinux.0").write_bytes(os.urandom(42_430))
    d = lab.serve("--tftp-root", str(root))
    try:
        env = lab.udhcpc("u4")
        subprocess.run(["ip", "-n", lab.client_ns, "addr", "add", f"{env['ip']}/24", "dev",
                        lab.client_if], check=True)
        out = lab.tmp / "got"
        subprocess.run(nsexec(lab.client_ns, "curl", "-sS", "--max-time", "20", "--tftp-blksize",
                              "1468", "-o", str(out),
                              f"tftp://{env['siaddr']}/{env['boot_file']}"), check=True)
        assert out.read_bytes() == (root / "pxelinux.0").read_bytes()
    finally:
        d.stop()
    assert "TFTP 10.77.0.130:" in d.text() and "sent 'pxelinux.0'" in d.text()


def test_nothing_answers_on_another_interface(lab: Lab) -> None:
    """The servers are bound to --interface only: a client on a second link of the same
    namespace hears nothing, neither DHCP nor TFTP."""
    other_ns = uniq("do")
    with netns(other_ns):
        veth(lab.server_ns, uniq("vo"), other_ns, uniq("vp"), a_addr="10.66.0.1/24",
             b_addr="10.66.0.2/24", b_mac=RESERVED_MAC)
        root = lab.tmp / "tftp"
        root.mkdir()
        (root / "f").write_text("x")
        d = lab.serve("--tftp-root", str(root), "--pool", "10.77.0.100-10.77.0.110")
        try:
            r = subprocess.run(nsexec(other_ns, "busybox", "udhcpc", "-i", uniq("vp"), "-f", "-q",
                                      "-n", "-t", "2", "-T", "1", "-s", "/bin/true"),
                               capture_output=True, text=True, timeout=30, check=False)
            assert r.returncode != 0
            r = subprocess.run(nsexec(other_ns, "curl", "-sS", "--max-time", "4", "-o", "/dev/null",
                                      "tftp://10.66.0.1/f"), capture_output=True, text=True,
                               timeout=30, check=False)
            assert r.returncode != 0
        finally:
            d.stop()
        assert RESERVED_MAC not in d.text() and "RRQ" not in d.text()
