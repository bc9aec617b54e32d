#!/usr/bin/env python3
"""Benchmark: a diskless qemu guest PXE-booted to its login prompt (iPXE ROM -> pxelinux.0 ->
kernel + initrd over TFTP -> NFS root + tmpfs overlay), served
(a) by ``sidusctl serve-pxe`` (its DHCP, TFTP and DNS; nfs-ganesha), and
(b) the reference: dnsmasq (DHCP reservation + TFTP, the same rendered tree) and the same
    nfs-ganesha export,
one after the other in the same lab (a network namespace with a bridge, a tap per guest; never
two qemu at once). Prints, per run and as medians, the seconds from qemu's start to the DHCP ACK
and to the login prompt, and the ratio serve-pxe / dnsmasq (1.0 = as fast; above 1 = slower).

qemu runs under TCG here, so the absolute figures are slow; the ratio is what to compare.

    sudo .venv/bin/python bench/pxe_boot.py [--state-dir DIR] [--image minimal] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidusctl.netboot import inventory
from sidusctl.netboot.lab import KERNEL_ARGS_RANDOMIZED, SERVER, LabNode, PxeLab, wait_logins
from sidusctl.netboot.tree import ImageFiles, export_path_for, write_tree
from sidusctl.subsys.ganesha import Export, serve
from sidusctl.subsys.imagestore import ImageStore

SERVE = [sys.executable, "-m", "sidusctl", "serve-pxe"]  # PxeLab's serve_command
NODE = LabNode("node1", "52:54:00:be:00:01", IPv4Address("10.77.0.130"))


def boot_serve_pxe(state: Path, image: str, work: Path) -> dict[str, float]:
    with PxeLab(f"sdt-bp{os.getpid() % 1000}", state, image, [NODE], work,
                serve_command=SERVE, kernel_args=KERNEL_ARGS_RANDOMIZED) as lab:
        lab.start_serve("--nfs", "ganesha")
        g = lab.boot(NODE)
        return wait_logins(lab, [(g, NODE)], 600)[g.name]


def boot_dnsmasq(state: Path, image: str, work: Path) -> dict[str, float]:
    with PxeLab(f"sdt-bq{os.getpid() % 1000}", state, image, [NODE], work,
                serve_command=SERVE, kernel_args=KERNEL_ARGS_RANDOMIZED) as lab:
        inv = inventory.load(lab.nodes_file, known_images=[image])
        img = ImageStore(lab.state, recover=False).get(image)
        write_tree(lab.tftp_root, inv, {image: ImageFiles(
            image, img.kernel, img.initrd, export_path_for(inv, image, img.rootfs))})
        leases = work / "dnsmasq.leases"
        dlog = work / "dnsmasq.log"
        with serve([Export(img.rootfs, clients=(str(inv.network.subnet),))],
                   bind_addr=str(SERVER), netns=lab.netns, workdir=work / "ganesha"), \
                open(dlog, "wb") as out:
            dns = subprocess.Popen(
                ["ip", "netns", "exec", lab.netns, "dnsmasq", "--no-daemon", "--log-dhcp",
                 "--conf-file=/dev/null", "--port=0", f"--interface={lab.bridge}",
                 "--bind-interfaces", "--dhcp-range=10.77.0.100,10.77.0.199,255.255.255.0,1h",
                 f"--dhcp-host={NODE.mac},{NODE.ip},{NODE.name}", "--dhcp-boot=pxelinux.0",
                 "--enable-tftp", f"--tftp-root={lab.tftp_root}",
                 f"--dhcp-leasefile={leases}", f"--pid-file={work / 'dnsmasq.pid'}"],
                stdout=out, stderr=out, start_new_session=True)
            try:
                deadline = time.monotonic() + 15
                while "TFTP root" not in dlog.read_text(errors="replace"):
                    assert dns.poll() is None and time.monotonic() < deadline, dlog.read_text()
                    time.sleep(0.1)
                g = lab.boot(NODE)
                t0 = g.started
                ack = None
                while not g.poll_login_prompt(0.5):
                    if ack is None and f"DHCPACK({lab.bridge}) {NODE.ip}" in \
                            dlog.read_text(errors="replace"):
                        ack = time.monotonic() - t0
                    assert time.monotonic() - t0 < 600, g.tail()
                return {"ack": ack or float("nan"), "login": g.login_prompt_s}
            finally:
                dns.terminate()
                dns.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state-dir", default=os.environ.get("SIDUSCTL_STATE",
                                                         "/var/tmp/sdt-test-state"))
    ap.add_argument("--image", default="minimal")
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    state = Path(args.state_dir)
    ours: list[dict[str, float]] = []
    ref: list[dict[str, float]] = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="sdt-bench-pxe-") as t:
            ours.append(boot_serve_pxe(state, args.image, Path(t) / "a"))
            ref.append(boot_dnsmasq(state, args.image, Path(t) / "b"))
        print(f"run {i + 1}: serve-pxe ack {ours[-1]['ack']:.1f} s login "
              f"{ours[-1]['login']:.1f} s; dnsmasq ack {ref[-1]['ack']:.1f} s login "
              f"{ref[-1]['login']:.1f} s", flush=True)
    med = {k: (statistics.median(r[k] for r in ours), statistics.median(r[k] for r in ref))
           for k in ("ack", "login")}
    print(json.dumps({"runs": args.runs,
                      "serve_pxe": {k: round(v[0], 1) for k, v in med.items()},
                      "dnsmasq": {k: round(v[1], 1) for k, v in med.items()},
                      "ratio_login": round(med["login"][0] / med["login"][1], 2)}, indent=1))


if __name__ == "__main__":
    main()
