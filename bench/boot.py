#!/usr/bin/env python3
"""Benchmark: seconds from qemu start to the serial login prompt, for one image booted
(a) diskless: root over NFS (nfs-ganesha) with the sidus tmpfs overlay, and
(b) the reference: the same kernel, initrd and root copied onto a local virtio disk
    (ext4 made with ``mkfs.ext4 -d``, no mount needed),
in the same run, one after the other (never two qemu at once). Prints both and the ratio.

qemu runs under TCG (no KVM here), so absolute figures are slow; the ratio is what to compare.
Everything runs inside a private network namespace (loopback only).

    sudo .venv/bin/python bench/boot.py --image minimal [--state-dir DIR] [--runs 1]
    sudo .venv/bin/python bench/boot.py --rootfs /var/tmp/sdt-netboot/rootfs
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidusctl.subsys.ganesha import Export, serve
from tests.qemu_util import QUIET, guest, netns, nfs_append


def _image(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    if args.rootfs:
        root = Path(args.rootfs)
        return (root, sorted((root / "boot").glob("vmlinuz-*"))[-1],
                sorted((root / "boot").glob("initrd.img-*"))[-1])
    from sidusctl.core.paths import state_dir
    from sidusctl.subsys.imagestore import ImageStore
    img = ImageStore(state_dir(args.state_dir)).get(args.image)
    return img.rootfs, img.kernel, img.initrd


def _disk_from_root(root: Path, dest: Path) -> None:
    used = int(subprocess.run(["du", "-sb", str(root)], capture_output=True, text=True,
                              check=True).stdout.split()[0])
    size_mb = int(used * 1.4 / 2**20) + 256
    with open(dest, "wb") as f:
        f.truncate(size_mb * 2**20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "sdt-bench-root", "-d", str(root), str(dest)],
                   check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", default="minimal")
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--rootfs", default=None, help="a root directory with /boot/vmlinuz-*")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root, kernel, initrd = _image(args)
    nfs_times: list[float] = []
    disk_times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="sdt-bench-boot-") as tmp:
        disk = Path(tmp) / "root.img"
        _disk_from_root(root, disk)
        with netns("bboot") as ns, serve([Export(root)], netns=ns, bind_addr=None,
                                         workdir=Path(tmp) / "ganesha"):
            for i in range(args.runs):
                with guest(f"sdt-bench-nfs-{i}", kernel=kernel, initrd=initrd, netns=ns,
                           append=nfs_append(root, "sidus.overlay=tmpfs"),
                           log=Path(tmp) / f"nfs-{i}.log") as g:
                    nfs_times.append(g.wait_login_prompt())
                with guest(f"sdt-bench-disk-{i}", kernel=kernel, initrd=initrd, netns=ns,
                           append=" ".join(["console=ttyS0", "root=/dev/vda", "rw", "panic=-1",
                                                    *QUIET]), disks=(disk,),
                           log=Path(tmp) / f"disk-{i}.log") as g:
                    disk_times.append(g.wait_login_prompt())
    nfs_s = statistics.median(nfs_times)
    disk_s = statistics.median(disk_times)
    result = {"nfs_tmpfs_overlay_s": round(nfs_s, 1), "local_disk_s": round(disk_s, 1),
              "ratio_nfs_over_disk": round(nfs_s / disk_s, 2), "runs": args.runs,
              "accel": "tcg", "reference": "same image on a local virtio disk"}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"boot to login prompt (qemu TCG, median of {args.runs}):")
        print(f"  NFS root + sidus tmpfs overlay : {nfs_s:6.1f} s")
        print(f"  local virtio disk (reference)  : {disk_s:6.1f} s")
        print(f"  ratio NFS/local                : {nfs_s / disk_s:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
