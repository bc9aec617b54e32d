#!/usr/bin/env python3
"""Benchmark: create + start vnodes with copy-on-write roots (btrfs snapshots) against distinct
roots (a full private copy, i.e. ``cp -a`` of the image: the reference), in the same run, on a
loop-backed btrfs store under /var/tmp.

Prints seconds per vnode (create+start) for each mode, the ratio distinct/cow, the disk used
per cow vnode once booted, and the wall time until all cow vnodes answer SSH.

    sudo .venv/bin/python bench/vnode.py --image minimal [--state-dir DIR] [--count 50]
                                          [--distinct 50] [--json]

``--image`` is an image name of the state directory's image store, as ``sidusctl vnode create
--image`` takes it (``--state-dir`` as sidusctl's: the option, else $SIDUSCTL_STATE, else the
default state directory; the image must have been built with ``--tar``), or the path of a
rootfs tarball. The benchmark's own vnodes, networks and store live in a private state directory
(/var/tmp/sdt-bench-vnode-<pid>): it never touches the vnodes of the given state directory.

Everything it makes is named sdt-bench-vnode-* and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidusctl import vnode
from sidusctl.core.errors import NotFoundError
from sidusctl.core.paths import state_dir
from sidusctl.subsys.imagestore import ImageStore
from sidusctl.subsys.tarball import COMPRESSIONS


def resolve_tarball(image: str, state: Path) -> Path:
    """``image``: a rootfs tarball path (has a ``/`` or a tarball suffix, as the vnode store
    tells them apart) or an image name in ``state``'s image store -> the tarball's path.
    NotFoundError if there is no such file or image, or the image has no tarball."""
    if "/" in image or any(image.endswith(s) for s in COMPRESSIONS):
        p = Path(image)
        if not p.is_file():
            raise NotFoundError(f"image tarball {image} does not exist")
        return p.resolve()
    img = ImageStore(state, recover=False).get(image)  # NotFoundError names the known ones
    if img.tarball is None:
        raise NotFoundError(f"image {image!r} in {state} has no rootfs tarball",
                            hint=f"sidusctl --state-dir {state} build {image} --tar")
    return img.tarball


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", required=True,
                    help="image name (in --state-dir's image store) or rootfs tarball path")
    ap.add_argument("--state-dir", default=None,
                    help="sidusctl state directory holding the image (default as sidusctl's: "
                         "$SIDUSCTL_STATE, else its default)")
    ap.add_argument("--count", type=int, default=50, help="cow vnodes (default 50)")
    ap.add_argument("--distinct", type=int, default=50, help="distinct vnodes (default 50)")
    ap.add_argument("--store-size", default=None, help="btrfs image size (default: sized to fit)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/vnode.py needs root", file=sys.stderr)
        return 2
    try:
        image = resolve_tarball(a.image, state_dir(a.state_dir))
    except NotFoundError as e:
        print(f"bench/vnode.py: {e}", file=sys.stderr)
        return 4

    state = Path(f"/var/tmp/sdt-bench-vnode-{os.getpid()}")
    p = vnode.open(state)
    res: dict[str, object] = {"count_cow": a.count, "count_distinct": a.distinct}
    try:
        # Size the store: the image (unpacked, about 2.5x a compressed tarball) once per
        # distinct vnode, plus the cache and headroom.
        img_size = image.stat().st_size
        size = int(a.store_size[:-1]) << 30 if a.store_size else \
            (img_size * 3 * (a.distinct + 2)) + (4 << 30)
        p.init(btrfs_image=size)
        p.net_create("sdt-bvn", "10.240.0.0/20")

        t0 = time.monotonic()
        p.create("sdt-bv-warm", str(image), fs="cow", ifaces=["if0:sdt-bvn"])
        res["unpack_s"] = round(time.monotonic() - t0, 2)
        p.destroy("sdt-bv-warm")

        # -- cow ------------------------------------------------------------------------
        used0 = p.store.disk_used() or 0
        cow_names = [f"sdt-bvc{i}" for i in range(a.count)]
        t_create = 0.0
        t_start = 0.0
        t0 = time.monotonic()
        for n in cow_names:
            t = time.monotonic()
            p.create(n, str(image), fs="cow", ifaces=["if0:sdt-bvn"])
            t_create += time.monotonic() - t
            t = time.monotonic()
            p.start(n)
            t_start += time.monotonic() - t
        t_started = time.monotonic()
        cow_root = sum(p.timings[n]["root"] for n in cow_names) / a.count
        ssh = p.wait(cow_names, timeout=600)
        t_ssh = time.monotonic()
        missing = [n for n, v in ssh.items() if v is None]
        time.sleep(3)
        used1 = p.store.disk_used() or 0
        res.update({
            "cow_create_s_per_vnode": round(t_create / a.count, 4),
            "cow_start_s_per_vnode": round(t_start / a.count, 4),
            "cow_create_start_s_per_vnode": round((t_create + t_start) / a.count, 4),
            "cow_root_s_per_vnode": round(cow_root, 4),
            "cow_disk_mib_per_vnode": round((used1 - used0) / a.count / 2**20, 2),
            "cow_all_ssh_wall_s": round(t_ssh - t0, 1),
            "cow_ssh_after_last_start_s": round(t_ssh - t_started, 1),
            "cow_ssh_missing": missing,
        })
        for n in cow_names:
            p.destroy(n)

        # -- distinct (reference: a full copy, cp -a) ---------------------------------
        dist_names = [f"sdt-bvd{i}" for i in range(a.distinct)]
        t_create = t_start = dist_root = 0.0
        for n in dist_names:
            t = time.monotonic()
            p.create(n, str(image), fs="distinct", ifaces=["if0:sdt-bvn"])
            t_create += time.monotonic() - t
            t = time.monotonic()
            p.start(n)  # the copy happens here (Distem: start copies the filesystem)
            t_start += time.monotonic() - t
            dist_root += p.timings[n]["root"]
            p.stop(n)  # free the copy before the next one: the disk need not hold them all
        if a.distinct:
            res.update({
                "distinct_create_s_per_vnode": round(t_create / a.distinct, 4),
                "distinct_start_s_per_vnode": round(t_start / a.distinct, 4),
                "distinct_create_start_s_per_vnode": round((t_create + t_start) / a.distinct, 4),
            })
            res["distinct_root_s_per_vnode"] = round(dist_root / a.distinct, 4)
            res["ratio_root_distinct_over_cow"] = round(dist_root / a.distinct / cow_root, 1)
            res["ratio_distinct_over_cow"] = round(
                float(res["distinct_create_start_s_per_vnode"])  # type: ignore[arg-type]
                / float(res["cow_create_start_s_per_vnode"]), 1)  # type: ignore[arg-type]
        for n in dist_names:
            p.destroy(n)
    finally:
        for v in p.list() if (state / "vnode").exists() else []:
            try:
                p.destroy(v["name"])
            except Exception as e:  # keep cleaning
                print(f"cleanup of {v['name']}: {e}", file=sys.stderr)
        try:
            p.deinit()
        except Exception as e:
            print(f"cleanup: {e}", file=sys.stderr)
            subprocess.run(["umount", "-l", str(state / "vnode" / "store")], check=False)
        shutil.rmtree(state, ignore_errors=True)

    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"vnode benchmark ({a.count} cow, {a.distinct} distinct; image {a.image}: {image})")
        print(f"  image unpack (once)            {res['unpack_s']} s")
        print(f"  cow: create+start per vnode    {res['cow_create_start_s_per_vnode']} s "
              f"(create {res['cow_create_s_per_vnode']} s, start {res['cow_start_s_per_vnode']} s)")
        if a.distinct:
            print(f"  distinct (cp -a): per vnode    {res['distinct_create_start_s_per_vnode']} s")
            print(f"  ratio distinct/cow             {res['ratio_distinct_over_cow']}x create+start")
            print(f"  root only: cow {res['cow_root_s_per_vnode']} s (btrfs snapshot), distinct "
                  f"{res['distinct_root_s_per_vnode']} s (cp -a): "
                  f"{res['ratio_root_distinct_over_cow']}x (aim >= 20x)")
        print(f"  disk per booted cow vnode      {res['cow_disk_mib_per_vnode']} MiB (aim < 5 MiB)")
        print(f"  all {a.count} cow vnodes answer SSH  {res['cow_all_ssh_wall_s']} s from the first "
              f"create ({res['cow_ssh_after_last_start_s']} s after the last start; aim < 60 s)")
        if res["cow_ssh_missing"]:
            print(f"  NO SSH: {res['cow_ssh_missing']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
