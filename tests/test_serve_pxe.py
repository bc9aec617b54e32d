"""``sidusctl serve-pxe`` and ``sidusctl pxe status`` inside sdt- network namespaces: a server
namespace with a bridge that serve-pxe is bound to, a client namespace on a veth enslaved to
that bridge. Real peers only: busybox udhcpc gets the node's reserved address and boot file,
curl fetches its per-MAC pxelinux config over TFTP and the kernel over HTTP, getent resolves
the node names through our DNS, showmount lists the NFS export (nfs-ganesha); the inventory
is reloaded when it changes and on SIGHUP (a bad one refused, the old one kept); SIGTERM
stops everything; a bad inventory is refused before anything starts. ``--proxy`` next to a
dnsmasq acting as the site's DHCP server; and the ``pxe export --format dnsmasq`` output run
for real by dnsmasq, handing udhcpc the node's reservation and boot file.
"""

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

from tests.netns_util import REPO, Daemon, bridge, enslave, netns, nsexec, uniq, veth

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

MAC1 = "52:54:00:ec:33:81"
MAC2 = "52:54:00:ec:33:82"
MAC3 = "52:54:00:ec:33:83"
NODES = f"""\
[network]
subnet = "10.77.0.0/24"
server = "10.77.0.1"
domain = "cluster.test"

[defaults]
image = "minimal"

[[nodes]]
name = "node1"
mac = "{MAC1}"
ip = "10.77.0.130"

[[nodes]]
name = "node2"
mac = "{MAC2}"
ip = "10.77.0.131"
"""
NODE3 = f'\n[[nodes]]\nname = "node3"\nmac = "{MAC3}"\nip = "10.77.0.132"\n'
KERNEL = bytes(range(256)) * 700       # stand-ins: these tests serve files, they boot nothing
INITRD = b"initrd" * 50000
SCRIPT = """#!/bin/sh
case "$1" in
  bound|renew) env | grep -E '^(ip|hostname|domain|siaddr|boot_file|dns)=' | sort \
      > "$OUT.tmp" && mv "$OUT.tmp" "$OUT" ;;
esac
exit 0
"""


def _store_image(state: Path, name: str) -> None:
    """A built image in a real store, made with the store's API (a tiny rootfs, stand-in
    kernel and initrd)."""
    from sidusctl.subsys.imagestore import ImageStore

    with ImageStore(state).new_generation(name) as gen:
        (gen.rootfs / "etc").mkdir(parents=True)
        (gen.rootfs / "etc" / "hostname").write_text("sidus\n")
        (gen.dir / f"vmlinuz-{name}").write_bytes(KERNEL)
        (gen.dir / f"initrd.img-{name}").write_bytes(INITRD)
        gen.write_manifest({"name": name, "kind": "test"})


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cli(state: Path, *args: str, ns: str | None = None,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "sidusctl", "--state-dir", str(state), *args]
    return subprocess.run(nsexec(ns, *argv) if ns else argv, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, check=False)


@dataclass
class Lab:
    srv: str
    cli: str
    br: str
    cif: str
    tmp: Path
    state: Path
    nodes: Path

    def start(self, *extra: str, log: str = "serve-pxe.log") -> Daemon:
        # A private /run (in a private mount namespace that ends with the process): rpcbind
        # refuses to start while another one, in any namespace, holds /run/rpcbind.lock
        return Daemon(nsexec(self.srv, "unshare", "-m", "sh", "-c",
                             'mount -t tmpfs sdt-run /run && exec "$@"', "sh",
                             sys.executable, "-m", "sidusctl", "--state-dir",
                             str(self.state), "serve-pxe", "--nodes", str(self.nodes),
                             "--interface", self.br, *extra),
                      self.tmp / log, ready="ready:", timeout=60)

    def c(self, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run(nsexec(self.cli, *argv), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def udhcpc(self) -> dict[str, str]:
        script = self.tmp / "dump.sh"
        script.write_text(SCRIPT)
        script.chmod(0o755)
        out = self.tmp / "udhcpc.env"
        out.unlink(missing_ok=True)
        r = self.c("env", f"OUT={out}", "busybox", "udhcpc", "-i", self.cif, "-f", "-q", "-n",
                   "-t", "4", "-T", "1", "-s", str(script),
                   "-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000", timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        return dict(line.split("=", 1) for line in out.read_text().splitlines())

    def status(self) -> dict[str, dict[str, object]]:
        r = _cli(self.state, "pxe", "status", "--json")
        assert r.returncode == 0, r.stderr
        return {n["name"]: n for n in json.loads(r.stdout)["nodes"]}


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    srv, cli = uniq("xs"), uniq("xc")
    br, sif, cif = uniq("xb"), uniq("xv"), uniq("xw")
    state = tmp_path / "state"
    _store_image(state, "minimal")
    nodes = tmp_path / "nodes.toml"
    nodes.write_text(NODES)
    with netns(srv), netns(cli, resolv="nameserver 10.77.0.1\nsearch cluster.test\n"):
        bridge(srv, br, "10.77.0.1/24")
        veth(srv, sif, cli, cif, b_mac=MAC1)
        enslave(srv, sif, br)
        yield Lab(srv, cli, br, cif, tmp_path, state, nodes)


def _wait(cond: object, what: str, timeout: float = 15) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow  # nfs-ganesha
def test_serve_pxe_end_to_end_with_real_clients(lab: Lab) -> None:
    d = lab.start("--http")
    try:
        # DHCP: the reservation and the BIOS boot file from the inventory
        env = lab.udhcpc()
        assert env["ip"] == "10.77.0.130"
        assert env["hostname"] == "node1"
        assert env["domain"] == "cluster.test"
        assert env["siaddr"] == "10.77.0.1"
        assert env["boot_file"] == "pxelinux.0"
        assert env["dns"].strip() == "10.77.0.1"
        subprocess.run(["ip", "-n", lab.cli, "addr", "add", "10.77.0.130/24", "dev", lab.cif],
                       check=True)
        # TFTP: the per-MAC pxelinux config rendered from the inventory, then kernel + initrd
        r = lab.c("curl", "-sS", "tftp://10.77.0.1/pxelinux.cfg/01-52-54-00-ec-33-81")
        assert r.returncode == 0, r.stderr
        assert "KERNEL vmlinuz-minimal" in r.stdout
        rootfs = lab.state / "images" / "minimal" / "current" / "rootfs"
        assert f"nfsroot=10.77.0.1:{rootfs.resolve()}" in r.stdout
        for f in ("vmlinuz-minimal", "initrd.img-minimal"):
            r = lab.c("curl", "-sS", "-o", str(lab.tmp / f), f"tftp://10.77.0.1/{f}")
            assert r.returncode == 0, r.stderr
        assert (lab.tmp / "initrd.img-minimal").read_bytes() == INITRD
        # HTTP for iPXE: the script and the kernel, from the interface's address only
        r = lab.c("curl", "-sS", "-f", "http://10.77.0.1/boot.ipxe")
        assert r.returncode == 0 and r.stdout.startswith("#!ipxe"), r.stderr
        r = lab.c("curl", "-sS", "-f", "-o", str(lab.tmp / "k"), "http://10.77.0.1/vmlinuz-minimal")
        assert r.returncode == 0 and (lab.tmp / "k").read_bytes() == KERNEL
        assert lab.c("curl", "-sS", "-f", "http://10.77.0.1/pxelinux.cfg/").returncode != 0
        # DNS: A and PTR for the inventory's names
        r = lab.c("getent", "hosts", "node2.cluster.test")
        assert r.stdout.split()[:1] == ["10.77.0.131"], r.stdout + r.stderr
        r = lab.c("getent", "hosts", "10.77.0.130")
        assert "node1.cluster.test" in r.stdout, r.stdout + r.stderr
        # NFS: the image's root exported read-only to the subnet (nfs-ganesha here)
        r = lab.c("showmount", "-e", "10.77.0.1")
        assert r.returncode == 0 and str(rootfs.resolve()) in r.stdout, r.stdout + r.stderr
        # the booted kernel asks DHCP again: the node counts as booted
        assert lab.udhcpc()["ip"] == "10.77.0.130"
        _wait(lambda: lab.status()["node1"]["booted"], "node1 booted in pxe status", 10)
        st = lab.status()
        assert st["node1"]["dhcp"] == "10.77.0.130"
        assert {"pxelinux.cfg/01-52-54-00-ec-33-81", "vmlinuz-minimal", "initrd.img-minimal",
                "boot.ipxe"} <= set(st["node1"]["files"])  # type: ignore[arg-type]
        assert st["node2"] == {**st["node2"], "dhcp": None, "files": [], "booted": False}
        text = _cli(lab.state, "pxe", "status").stdout
        assert "node1" in text and "booted: yes" in text and "no DHCP yet" in text

        # reload when the inventory changes: node3 appears in DNS and in the TFTP tree
        _write(lab.nodes, NODES + NODE3)
        _wait(lambda: lab.c("getent", "hosts", "node3.cluster.test").stdout.startswith(
            "10.77.0.132"), "node3 in DNS after the inventory changed")
        r = lab.c("curl", "-sS", "tftp://10.77.0.1/pxelinux.cfg/01-52-54-00-ec-33-83")
        assert r.returncode == 0 and "node3" in r.stdout
        # a bad inventory is refused at reload, with file and line; the old one stays
        _write(lab.nodes, NODES + NODE3.replace(MAC3, "52:54:00:ec:33"))
        _wait(lambda: "reload refused" in d.text(), "the bad inventory to be refused")
        assert f"{lab.nodes}:21: key 'nodes.node3.mac'" in d.text()
        assert lab.c("getent", "hosts", "node3.cluster.test").stdout.startswith("10.77.0.132")
        # SIGHUP reloads too
        _write(lab.nodes, NODES)
        _wait(lambda: lab.c("getent", "hosts", "node3.cluster.test").returncode != 0,
              "node3 gone after the inventory changed back")
        n = d.text().count("reloaded the configuration")
        d.proc.send_signal(signal.SIGHUP)
        _wait(lambda: d.text().count("reloaded the configuration") == n + 1, "SIGHUP reload")
    finally:
        rc = d.stop()
    assert rc == 0, d.text()[-3000:]
    # SIGTERM stopped everything it started: no ganesha, no rpcbind left in the namespace
    assert subprocess.run(["ip", "netns", "pids", lab.srv], capture_output=True,
                          text=True).stdout.split() == []


def test_bad_inventory_is_refused_before_anything_starts(lab: Lab) -> None:
    lab.nodes.write_text(NODES.replace('ip = "10.77.0.131"', 'ip = "10.78.0.131"'))
    tftp = lab.tmp / "tftp"
    r = _cli(lab.state, "serve-pxe", "--nodes", str(lab.nodes), "--interface", lab.br,
             "--tftp-root", str(tftp), ns=lab.srv)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"sidusctl: error: {lab.nodes}:17: key 'nodes.node2.ip': 10.78.0.131 is "
                     "outside the subnet 10.77.0.0/24 (expected an address in 10.77.0.0/24)"]
    assert not tftp.exists() and not (lab.state / "serve" / "status.json").exists()
    # the server address must be the interface's
    lab.nodes.write_text(NODES.replace('server = "10.77.0.1"', 'server = "10.77.0.2"'))
    r = _cli(lab.state, "serve-pxe", "--nodes", str(lab.nodes), "--interface", lab.br,
             "--tftp-root", str(tftp), ns=lab.srv)
    assert r.returncode == 2 and "10.77.0.2 is not the address of interface" in r.stderr
    assert not tftp.exists()
    r = _cli(lab.state, "pxe", "status")
    assert r.returncode != 0 and "no status" in r.stderr


def test_proxy_next_to_a_site_dhcp_server(lab: Lab) -> None:
    """serve-pxe --proxy gives PXE clients the boot file and no address; dnsmasq (in its own
    namespace on the same bridge) is the site's DHCP server."""
    site_ns, site_if, site_peer = uniq("xd"), uniq("xe"), uniq("xf")
    with netns(site_ns):
        veth(lab.srv, site_peer, site_ns, site_if, b_addr="10.77.0.2/24")
        enslave(lab.srv, site_peer, lab.br)
        site = Daemon(nsexec(site_ns, "dnsmasq", "--no-daemon", "--conf-file=/dev/null",
                             "--port=0", f"--interface={site_if}", "--bind-interfaces",
                             "--dhcp-range=10.77.0.50,10.77.0.60,255.255.255.0,10m",
                             f"--dhcp-leasefile={lab.tmp / 'site.leases'}",
                             f"--pid-file={lab.tmp / 'site.pid'}"),
                      lab.tmp / "site.log", ready="DHCP, IP range")
        d = lab.start("--proxy", "--nfs", "off", log="proxy.log")
        try:
            r = subprocess.run(nsexec(lab.cli, sys.executable, "-m", "tests.netns_util",
                                      "probe", lab.cif), capture_output=True, text=True,
                               timeout=30, cwd=REPO, check=True)
            res = json.loads(r.stdout)
            proxy = [o for o in res["offers"] if o["server"] == "10.77.0.1"]
            assert len(proxy) == 1, res
            assert proxy[0]["yiaddr"] == "0.0.0.0" and proxy[0]["file"] == "pxelinux.0"
            assert res["site_ack"][0]["yiaddr"].startswith("10.77.0.5")
            assert res["proxy_ack"][0]["file"] == "pxelinux.0"
        finally:
            d.stop()
            site.stop()
    assert " -> ACK 10.77" not in d.text()  # the addresses are the site server's business


def test_exported_dnsmasq_config_runs(lab: Lab) -> None:
    """The dnsmasq export is not only syntactically right: dnsmasq running it (in the server
    namespace, on the bridge) gives udhcpc the reservation, next-server and boot file."""
    tftp = lab.tmp / "tftp"
    tftp.mkdir()
    conf = lab.tmp / "dnsmasq.conf"
    r = _cli(lab.state, "pxe", "export", "--nodes", str(lab.nodes), "--format", "dnsmasq",
             "--interface", lab.br, "--tftp-root", str(tftp), "--out", str(conf))
    assert r.returncode == 0, r.stderr
    site = Daemon(nsexec(lab.srv, "dnsmasq", "--no-daemon", f"--conf-file={conf}", "--port=0",
                         f"--dhcp-leasefile={lab.tmp / 'd.leases'}",
                         f"--pid-file={lab.tmp / 'd.pid'}"),
                  lab.tmp / "dnsmasq.log", ready="TFTP root")
    try:
        env = lab.udhcpc()
    finally:
        site.stop()
    assert (env["ip"], env["hostname"], env["siaddr"], env["boot_file"], env["domain"]) == \
        ("10.77.0.130", "node1", "10.77.0.1", "pxelinux.0", "cluster.test"), site.text()
