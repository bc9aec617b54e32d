"""``sidusctl serve-pxe`` and ``sidusctl pxe status`` inside sdt- network namespaces: a server
namespace with a bridge that serve-pxe is bound to, a client namespace on a veth enslaved to
that bridge. Real peers only: busybox udhcpc gets the node's reserved address and boot file,
curl fetches its per-MAC pxelinux config over TFTP and the kernel over HTTP, getent resolves
the node names through our DNS, showmount lists the NFS export (nfs-ganesha); the inventory
is reloaded when it changes and on SIGHUP (a bad one refused, the old one kept); SIGTERM
stops everything; a bad inventory is refused before anything starts. ``--proxy`` next to a
dnsmasq acting as the site's DHCP server; and the ``pxe export --format dnsmasq`` output run
for real by dnsmasq, handing udhcpc the node's reservation and boot file.

A node keeps the image it booted, for an ``nfs`` root too: three generations published
through the real image store while a node reported running the first; the first's
directory survives the third publish (held in the store) and stays NFS-exported next to
the new one, and ``pxe status`` shows the generation it runs, the next one, and what its
kernel reported (lockdown, Secure Boot). A reload packs a new generation's squashfs in a
worker: a real DHCP exchange (udhcpc), TFTP and HTTP are answered while mksquashfs is held
at a gate (event order, no timing).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns_util import REPO, Daemon, bridge, enslave, netns, nsexec, site_dnsmasq, uniq, veth

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


def _store_image(state: Path, name: str, marker: str = "") -> str:
    """A built image in a real store, made with the store's API (a tiny rootfs, stand-in
    kernel and initrd; ``marker`` in /etc/marker); the new generation's name. A second call
    within the same second waits for the next one (generations are named by the second)."""
    from sidusctl.subsys.imagestore import ImageStore

    store = ImageStore(state)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    if store.exists(name):
        while time.strftime("%Y%m%dT%H%M%S") == stamp:
            time.sleep(0.05)
    with store.new_generation(name) as gen:
        (gen.rootfs / "etc").mkdir(parents=True)
        (gen.rootfs / "etc" / "hostname").write_text("sidus\n")
        (gen.rootfs / "etc" / "marker").write_text(marker + "\n")
        (gen.dir / f"vmlinuz-{name}").write_bytes(KERNEL)
        (gen.dir / f"initrd.img-{name}").write_bytes(INITRD)
        gen.write_manifest({"name": name, "kind": "test"})
    return store.get(name).dir.name


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

    def start(self, *extra: str, log: str = "serve-pxe.log",
              env: tuple[str, ...] = ()) -> Daemon:
        # A private /run (in a private mount namespace that ends with the process): rpcbind
        # refuses to start while another one, in any namespace, holds /run/rpcbind.lock
        return Daemon(nsexec(self.srv, "env", *env, "unshare", "-m", "sh", "-c",
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
        rootfs = lab.state / "images" / "minimal" / "current" / "rootfs"
        gen = rootfs.resolve().parent.name  # the kernel and initrd of that generation
        kernel, initrd = f"boot/minimal/{gen}/vmlinuz-minimal", \
            f"boot/minimal/{gen}/initrd.img-minimal"
        assert f"KERNEL {kernel}" in r.stdout and f"initrd={initrd}" in r.stdout
        assert f"nfsroot=10.77.0.1:{rootfs.resolve()}" in r.stdout
        for f in (kernel, initrd):
            r = lab.c("curl", "-sS", "-o", str(lab.tmp / Path(f).name), f"tftp://10.77.0.1/{f}")
            assert r.returncode == 0, r.stderr
        assert (lab.tmp / "initrd.img-minimal").read_bytes() == INITRD
        # HTTP for iPXE: the script and the kernel, from the interface's address only
        r = lab.c("curl", "-sS", "-f", "http://10.77.0.1/boot.ipxe")
        assert r.returncode == 0 and r.stdout.startswith("#!ipxe"), r.stderr
        r = lab.c("curl", "-sS", "-f", "-o", str(lab.tmp / "k"), f"http://10.77.0.1/{kernel}")
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
        files = st["node1"]["files"]
        assert isinstance(files, list)
        assert {"pxelinux.cfg/01-52-54-00-ec-33-81", kernel, initrd, "boot.ipxe"} <= set(files)
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
        # SIGHUP reloads too. The log is written in batches (core.log.BATCH_WAIT), so DNS can
        # change before the watch's reload line is in the file: wait for both, then count.
        m = d.text().count("reloaded the configuration")
        _write(lab.nodes, NODES)
        _wait(lambda: lab.c("getent", "hosts", "node3.cluster.test").returncode != 0,
              "node3 gone after the inventory changed back")
        _wait(lambda: d.text().count("reloaded the configuration") > m,
              "the reload of the inventory changed back to be logged")
        text = d.text()
        n, watched = text.count("reloaded the configuration"), text.count("changed: reloading")
        d.proc.send_signal(signal.SIGHUP)
        _wait(lambda: d.text().count("reloaded the configuration") > n, "SIGHUP reload")
        # the reload came from the signal, not from the watch seeing the file change again
        assert d.text().count("changed: reloading") == watched
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
    assert f"{lab.nodes}:3: key 'network.server'" in r.stderr, r.stderr  # with its line
    assert not tftp.exists()
    r = _cli(lab.state, "pxe", "status")
    assert r.returncode != 0 and "no status" in r.stderr


def test_proxy_next_to_a_site_dhcp_server(lab: Lab) -> None:
    """serve-pxe --proxy gives PXE clients the boot file and no address; dnsmasq (in its own
    namespace on the same bridge) is the site's DHCP server."""
    site_ns, site_if, site_peer = uniq("xd"), uniq("xe"), uniq("xf")
    with netns(site_ns):
        site = site_dnsmasq(lab.srv, lab.br, lab.tmp, ns=site_ns, ifname=site_if,
                            peer=site_peer)
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


def _cfg(lab: Lab) -> str:
    r = lab.c("curl", "-sS", "tftp://10.77.0.1/pxelinux.cfg/01-52-54-00-ec-33-81")
    assert r.returncode == 0, r.stderr
    return r.stdout


def _exports(lab: Lab) -> str:
    r = lab.c("showmount", "-e", "10.77.0.1")
    assert r.returncode == 0, r.stderr
    return r.stdout


def _post(lab: Lab, form: str) -> None:
    """What a node's report says (the booted unit POSTs the same form with bash)."""
    r = lab.c("curl", "-sS", "-f", "--data", form, "http://10.77.0.1/sidus/report")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow  # nfs-ganesha
def test_nfs_root_keeps_the_generation_it_booted(lab: Lab) -> None:
    """An ``nfs``-root node that booted generation 1 keeps it through two more publishes:
    the store would delete it at the third (it keeps current and previous), the hold in the
    store keeps it, and it stays exported; new boots get the newest."""
    images = lab.state / "images" / "minimal"
    gen1 = (images / "current").resolve().name
    subprocess.run(["ip", "-n", lab.cli, "addr", "add", "10.77.0.130/24", "dev", lab.cif],
                   check=True)
    d = lab.start("--http", "--nfs", "ganesha")
    try:
        root1 = images / gen1 / "rootfs"
        assert f"nfsroot=10.77.0.1:{root1}," in _cfg(lab) and f"sidus.gen={gen1}" in _cfg(lab)
        assert str(root1) in _exports(lab)
        # the node booted gen1 and says so, with what its kernel says
        _post(lab, f"mac={MAC1}&stage=booted&detail=nfs+{gen1}&lockdown=integrity"
                   "&secureboot=on&modfail=")
        _wait(lambda: lab.status()["node1"]["generation"] == gen1, "node1 on gen1 in status")

        gen2 = _store_image(lab.state, "minimal", "2")
        _wait(lambda: f"sidus.gen={gen2}" in _cfg(lab), "the tree naming gen2", 60)
        assert str(images / gen2 / "rootfs") in _exports(lab)  # exported before named
        gen3 = _store_image(lab.state, "minimal", "3")
        # the third publish: the store keeps current (gen3) and previous (gen2) ... and gen1,
        # which a running node holds
        assert (root1 / "etc" / "marker").exists(), "gen1 deleted under a running node"
        held = json.loads((images / "holds" / f"serve-pxe@{lab.br}.json").read_text())
        assert gen1 in held, held
        _wait(lambda: f"sidus.gen={gen3}" in _cfg(lab), "the tree naming gen3", 60)
        _wait(lambda: lab.status()["node1"]["next"] == gen3, "pxe status naming gen3 next")
        exports = _exports(lab)
        assert str(root1) in exports and str(images / gen3 / "rootfs") in exports, exports
        st = lab.status()["node1"]
        assert (st["root"], st["generation"], st["next"]) == ("nfs", gen1, gen3), st
        assert (st["lockdown"], st["secure_boot"], st["modules_failed"]) == \
            ("integrity", "on", None), st
        text = _cli(lab.state, "pxe", "status").stdout
        assert f"nfs: runs {gen1}, next {gen3}" in text and \
            "secure boot on, lockdown integrity" in text, text
        # a module the kernel refused is shown (the initramfs hook's overlay report)
        _post(lab, f"mac={MAC1}&stage=overlay&detail=nfs+{gen1}+tmpfs+none"
                   "&lockdown=integrity&secureboot=on&modfail=overlay")
        _wait(lambda: lab.status()["node1"]["modules_failed"] == "overlay", "modfail shown")
        assert "MODULES NOT LOADED: overlay" in _cli(lab.state, "pxe", "status").stdout
        # the next report of the same facts with none refused clears it
        _post(lab, f"mac={MAC1}&stage=booted&detail=nfs+{gen1}&lockdown=integrity"
                   "&secureboot=on&modfail=")
        _wait(lambda: lab.status()["node1"]["modules_failed"] is None, "modfail cleared")
        # a malformed field is refused
        r = lab.c("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--data",
                  f"mac={MAC1}&stage=booted&lockdown=x%20y", "http://10.77.0.1/sidus/report")
        assert r.stdout == "400", r.stdout
    finally:
        rc = d.stop()
    assert rc == 0, d.text()[-3000:]


SQUASH_NODES = NODES.replace('ip = "10.77.0.130"', 'ip = "10.77.0.130"\nroot = "squashfs-http"')
GATE = """#!/bin/sh
# mksquashfs held at a gate: "$SDT_GATE.started" says a pack began, "$SDT_GATE.go" lets it run
: >"$SDT_GATE.started"
while [ ! -e "$SDT_GATE.go" ]; do sleep 0.05; done
exec {real} "$@"
"""


@pytest.mark.skipif(shutil.which("mksquashfs") is None, reason="squashfs-tools missing")
def test_reload_packs_in_a_worker_while_dhcp_answers(lab: Lab) -> None:
    """A new generation of a ``squashfs-http`` node's image: serve-pxe packs it during the
    reload. With mksquashfs held at a gate (started, not finished), a real DHCP exchange
    gets its OFFER and ACK, TFTP and HTTP answer, and the old tree is still served; once
    the gate opens, the reload completes and the tree names the new generation."""
    from sidusctl.netboot import squash

    lab.nodes.write_text(SQUASH_NODES)
    bindir = lab.tmp / "bin"
    bindir.mkdir()
    (bindir / "mksquashfs").write_text(GATE.format(real=shutil.which("mksquashfs")))
    (bindir / "mksquashfs").chmod(0o755)
    gate = lab.tmp / "gate"
    Path(f"{gate}.go").touch()  # the start-up pack passes
    d = lab.start("--nfs", "off", env=(f"PATH={bindir}:{os.environ['PATH']}",
                                      f"SDT_GATE={gate}"))
    try:
        gen1 = (lab.state / "images" / "minimal" / "current").resolve().name
        assert Path(f"{gate}.started").exists()  # the gate is on serve-pxe's path
        Path(f"{gate}.go").unlink()
        Path(f"{gate}.started").unlink()
        gen2 = _store_image(lab.state, "minimal", "2")
        _wait(lambda: Path(f"{gate}.started").exists(), "the reload's pack to start", 60)
        # the pack is held: DHCP, TFTP and HTTP answer all the same, with the old tree
        env = lab.udhcpc()
        assert env["ip"] == "10.77.0.130" and env["boot_file"] == "pxelinux.0", env
        subprocess.run(["ip", "-n", lab.cli, "addr", "add", "10.77.0.130/24", "dev", lab.cif],
                       check=True)
        assert f"{gen1}.squashfs" in _cfg(lab)
        r = lab.c("curl", "-sS", "-f", "-o", "/dev/null", "-w", "%{http_code}",
                  f"http://10.77.0.1/squashfs/minimal/{gen1}.squashfs")
        assert r.stdout == "200", r.stdout + r.stderr
        # ... and all of it before the pack ended (it cannot end while the gate is shut)
        assert not Path(f"{gate}.go").exists()
        assert squash.find(lab.state, "minimal", gen2) is None
        # the log is written in batches (core.log.BATCH_WAIT): wait for the lines to be in it
        pack_line = f"squashfs: packing {lab.state}/images/minimal/{gen2}"
        def dhcp_after_packing() -> bool:
            _, found, tail = d.text().rpartition(pack_line)
            return bool(found) and f"DHCP {MAC1}: DISCOVER -> OFFER" in tail

        _wait(dhcp_after_packing, "the DHCP exchange logged after the pack started")
        text = d.text()
        packing = text.rindex(pack_line)
        assert "reloaded the configuration" not in text[packing:]
        Path(f"{gate}.go").touch()
        _wait(lambda: "reloaded the configuration" in d.text()[packing:], "the reload", 60)
        assert f"{gen2}.squashfs" in _cfg(lab)
        _wait(lambda: lab.status()["node1"]["next"] == gen2, "pxe status naming gen2 next")
    finally:
        Path(f"{gate}.go").touch()
        rc = d.stop()
    assert rc == 0, d.text()[-3000:]
