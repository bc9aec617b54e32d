"""A running ``sidusctl serve-pxe`` whose surroundings change, in sdt- network namespaces (the
lab of :mod:`tests.test_serve_pxe`):

- a second serve-pxe on the same state directory, TFTP root or interface is refused (exit
  5) before it writes anything: the first's tree, status and holds stay as they were;
- SIGTERM while a reload packs a squashfs (mksquashfs held at a gate) ends serve-pxe at once
  with exit 0, and nothing is written after (the pack's child ends with it);
- a reload that needs a server serve-pxe did not start (HTTP for ``squashfs-http``) is
  refused and changes nothing served; one naming an image the start did not use gets that
  image's squashfs served over HTTP;
- an inventory edit made while serve-pxe starts (its start-up pack held at the gate) is
  reloaded once the servers run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests import test_serve_pxe
from tests.netns_util import Daemon, bridge, uniq
from tests.test_serve_pxe import (
    GATE,
    NODES,
    SQUASH_NODES,
    Lab,
    _cfg,
    _cli,
    _store_image,
    _wait,
    _write,
)

lab = test_serve_pxe.lab  # the fixture: two namespaces, a bridge, a stand-in image

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
              pytest.mark.skipif(shutil.which("mksquashfs") is None,
                                 reason="squashfs-tools missing")]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file of a tree: (inode, mtime in ns), to tell whether anything was written."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")}


def _address(lab: Lab) -> None:
    """node1's address on the client's link, for curl and getent (no DHCP client here)."""
    subprocess.run(["ip", "-n", lab.cli, "addr", "add", "10.77.0.130/24", "dev", lab.cif],
                   check=True)


def _gated(lab: Lab) -> tuple[Path, tuple[str, ...]]:
    """A mksquashfs held at a gate (open at first) on serve-pxe's PATH: the gate, the env."""
    bindir = lab.tmp / "bin"
    bindir.mkdir()
    (bindir / "mksquashfs").write_text(GATE.format(real=shutil.which("mksquashfs")))
    (bindir / "mksquashfs").chmod(0o755)
    gate = lab.tmp / "gate"
    Path(f"{gate}.go").touch()
    return gate, (f"PATH={bindir}:{os.environ['PATH']}", f"SDT_GATE={gate}")


def test_a_second_serve_pxe_is_refused_before_it_writes_anything(lab: Lab) -> None:
    _address(lab)
    d = lab.start("--nfs", "off")
    try:
        tftp = lab.state / "serve-pxe" / "tftp"
        status = lab.state / "serve" / "status.json"
        _wait(status.exists, "the first status")
        before, status_before = _tree(tftp), status.read_bytes()
        holds = sorted((lab.state / "images" / "minimal" / "holds").glob("*"))
        holds_before = [p.read_bytes() for p in holds]
        other = NODES.replace('name = "node2"', 'name = "node3"')
        lab.nodes.with_name("other.toml").write_text(other)
        # the same state directory (another inventory): refused, nothing of it written
        r = _cli(lab.state, "serve-pxe", "--nodes", str(lab.nodes.with_name("other.toml")),
                 "--interface", lab.br, "--nfs", "off", ns=lab.srv)
        assert r.returncode == 5, r.stderr
        assert f"the serve-pxe state {lab.state / 'serve'}" in r.stderr
        assert f"pid {d.proc.pid}" in r.stderr and "another serve-pxe serves it" in r.stderr
        # the same interface, another state and tree
        state2 = lab.tmp / "state2"
        _store_image(state2, "minimal")
        r = _cli(state2, "serve-pxe", "--nodes", str(lab.nodes), "--interface", lab.br,
                 "--nfs", "off", ns=lab.srv)
        assert r.returncode == 5, r.stderr
        assert f"interface {lab.br} is served by another serve-pxe" in r.stderr
        assert not (state2 / "serve-pxe").exists()
        # the same TFTP root, from another state directory on another interface
        br2 = uniq("xg")
        bridge(lab.srv, br2, "10.78.0.1/24")
        lab.nodes.with_name("net2.toml").write_text(NODES.replace("10.77.0.", "10.78.0."))
        r = _cli(state2, "serve-pxe", "--nodes", str(lab.nodes.with_name("net2.toml")),
                 "--interface", br2, "--nfs", "off", "--tftp-root", str(tftp), ns=lab.srv)
        assert r.returncode == 5, r.stderr
        assert f"the TFTP root {tftp}" in r.stderr and "Traceback" not in r.stderr
        # nor does a pxe render of its tree replace it (nor remove its generations' kernels)
        r = _cli(lab.state, "pxe", "render", "--nodes", str(lab.nodes), "--tftp-root",
                 str(tftp))
        assert r.returncode == 5 and f"the TFTP root {tftp}" in r.stderr, r.stderr
        # the first one's files as they were, and it still serves
        assert _tree(tftp) == before
        assert status.read_bytes() == status_before or \
            f'"pid":{d.proc.pid}' in status.read_text()
        assert [p.read_bytes() for p in holds] == holds_before
        assert "vmlinuz-minimal" in _cfg(lab)
    finally:
        rc = d.stop()
    assert rc == 0, d.text()[-3000:]


def test_sigterm_during_a_reload_ends_serve_pxe_at_once_and_writes_nothing_after(
        lab: Lab) -> None:
    lab.nodes.write_text(SQUASH_NODES)
    gate, env = _gated(lab)
    d = lab.start("--nfs", "off", env=env)
    stopped = False
    try:
        tftp = lab.state / "serve-pxe" / "tftp"
        Path(f"{gate}.go").unlink()
        Path(f"{gate}.started").unlink()
        _store_image(lab.state, "minimal", "2")
        _wait(lambda: Path(f"{gate}.started").exists(), "the reload's pack to start", 60)
        before = _tree(tftp)
        d.proc.send_signal(signal.SIGTERM)
        # ends without the gate opening (it waited for the pack, then wrote the new tree)
        rc = d.proc.wait(20)
        stopped = True
        assert rc == 0, d.text()[-3000:]
        # the pack's child (the gate, as mksquashfs) ended with it
        deadline = time.monotonic() + 10
        while subprocess.run(["pgrep", "-f", str(lab.tmp / "bin")],
                             capture_output=True, check=False).returncode == 0:
            assert time.monotonic() < deadline, "the reload's mksquashfs outlived serve-pxe"
            time.sleep(0.1)
        Path(f"{gate}.go").touch()
        time.sleep(1)
        assert _tree(tftp) == before
        assert "reloaded the configuration" not in d.text()
    finally:
        Path(f"{gate}.go").touch()
        if not stopped:
            d.stop()


def test_reloads_that_need_another_server_are_refused_and_new_images_are_served(
        lab: Lab) -> None:
    """Started without HTTP (no squashfs-http node, no --http): a reload making node1
    squashfs-http is refused, naming the node and its line, and the tree stays. Started with
    --http: a reload moving node1 to an image the start did not name serves that image's
    squashfs."""
    _address(lab)
    d = lab.start("--nfs", "off")
    try:
        tftp = lab.state / "serve-pxe" / "tftp"
        before = _tree(tftp)
        _write(lab.nodes, SQUASH_NODES)
        _wait(lambda: "reload refused" in d.text(), "the reload to be refused", 30)
        text = d.text()
        assert "key 'root': node 'node1': root 'squashfs-http' needs its HTTP server" in text
        assert f"{lab.nodes}:" in text and "a restart of serve-pxe" in text
        assert _tree(tftp) == before and "squashfs" not in _cfg(lab)
        # pxe status says so too, not only the log
        def refused() -> bool:
            r = _cli(lab.state, "pxe", "status")
            return "REFUSED, the previous configuration stays in force" in r.stdout
        _wait(refused, "pxe status to show the refused reload")
        r = _cli(lab.state, "pxe", "status", "--json")
        rel = json.loads(r.stdout)["reload"]
        assert rel["ok"] is False and "needs its HTTP server" in rel["error"], rel
    finally:
        assert d.stop() == 0, d.text()[-3000:]
    _write(lab.nodes, NODES)
    d = lab.start("--nfs", "off", "--http", log="http.log")
    try:
        gen = _store_image(lab.state, "other")
        _write(lab.nodes, SQUASH_NODES + '\n[[nodes]]\nname = "node3"\n'
               'mac = "52:54:00:ec:33:83"\nip = "10.77.0.132"\nimage = "other"\n'
               'root = "squashfs-http"\n')
        _wait(lambda: "reloaded the configuration" in d.text(), "the reload", 60)
        r = lab.c("curl", "-sS", "-f", "-o", "/dev/null", "-w", "%{http_code}",
                  f"http://10.77.0.1/squashfs/other/{gen}.squashfs")
        assert r.stdout == "200", r.stdout + r.stderr
    finally:
        assert d.stop() == 0, d.text()[-3000:]


def test_an_edit_made_while_serve_pxe_starts_is_reloaded(lab: Lab) -> None:
    _address(lab)
    lab.nodes.write_text(SQUASH_NODES)
    gate, env = _gated(lab)
    Path(f"{gate}.go").unlink()  # the start-up pack waits
    started: list[Daemon] = []
    t = threading.Thread(target=lambda: started.append(lab.start("--nfs", "off", env=env)))
    t.start()
    try:
        _wait(lambda: Path(f"{gate}.started").exists(), "the start-up pack", 60)
        _write(lab.nodes, SQUASH_NODES.replace('name = "node2"', 'name = "node9"'))
        Path(f"{gate}.go").touch()
        t.join(90)
        assert started, "serve-pxe did not start"
        d = started[0]
        _wait(lambda: "reloaded the configuration" in d.text(), "the reload", 60)
        r = lab.c("getent", "hosts", "node9.cluster.test")
        assert "10.77.0.131" in r.stdout, r.stdout + r.stderr
    finally:
        Path(f"{gate}.go").touch()
        t.join(90)
        for d in started:
            assert d.stop() == 0, d.text()[-3000:]


def test_a_new_generation_leaves_the_kernel_a_node_was_told_to_fetch(lab: Lab) -> None:
    """A node that read its configuration just before a new generation was published
    fetches the kernel and initrd that configuration names: they are named by generation and
    stay served (over TFTP and HTTP) next to the new ones, which the next configuration
    names. (They were one file per image, replaced under the node: kernel B, root A.)"""
    import re

    _address(lab)
    d = lab.start("--nfs", "off", "--http")
    try:
        def named() -> tuple[str, str]:
            cfg = _cfg(lab)
            k, i = re.search(r"KERNEL (\S+)", cfg), re.search(r"initrd=(\S+)", cfg)
            assert k is not None and i is not None, cfg
            return k[1], i[1]

        old = named()
        gen2 = _store_image(lab.state, "minimal", "2")
        _wait(lambda: "reloaded the configuration" in d.text(), "the reload", 60)
        new = named()
        assert new != old and all(f"/{gen2}/" in f for f in new), (old, new)
        for f in old + new:
            r = lab.c("curl", "-sS", "-f", "-o", "/dev/null", "-w", "%{http_code}",
                      f"http://10.77.0.1/{f}")
            assert r.stdout == "200", (f, r.stdout + r.stderr)
            r = lab.c("curl", "-sS", "-o", str(lab.tmp / "got"), f"tftp://10.77.0.1/{f}")
            assert r.returncode == 0, (f, r.stderr)
    finally:
        assert d.stop() == 0, d.text()[-3000:]
