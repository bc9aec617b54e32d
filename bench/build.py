#!/usr/bin/env python3
"""Build benchmark: sidusctl build against the bootstrap tool it drives, side by side.

In one process, for each backend (debootstrap, mmdebstrap), --runs rounds (default 3) of:
  1. plain `<tool> --variant=minbase bookworm DIR` (cold: nothing cached),
  2. `sidusctl build` of bench/recipes/minbase (the same thing) with empty package and
     bootstrap caches,
  3. the same build again with the caches now warm,
and prints the medians and the ratios first/plain (aim <= 1.10) and warm/first (aim <= 0.60).
Rounds are interleaved so that a slow spell of the mirror falls on both sides alike.
With --incremental, instead: the stage cache on a copy of images/minimal, --runs times (in a
fresh state directory each time): the first build (empty stage cache; the package and
bootstrap caches as --cache-dir has them), then a rebuild with no change, with one site file
changed (/etc/motd's template), and with one package added (`tree`), next to apt's own time for
that package (`apt-get install tree` in a chroot of the image, .deb already cached). The
package added runs as a delta on the first build's stage cache entry. ``--state-fs btrfs`` puts
the state directory on a loop-mounted btrfs (sdt-bench-*.img), where the stage cache restores
and saves by snapshot instead of copying the root. Everything lives under a temp dir named
sdt-bench-* and is removed at the end.
Run as root: `.venv/bin/python bench/build.py [--backend debootstrap|mmdebstrap|both]
[--incremental [--cache-dir DIR] [--state-fs ext4|btrfs]]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "bench" / "recipes" / "minbase"


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   env={**os.environ, **(env or {})})
    return time.monotonic() - t0


def bench(backend: str, work: Path, runs: int) -> dict[str, object]:
    """``runs`` rounds of plain tool / sidusctl first build / warm rebuild, interleaved so that
    the mirror's and the network's moods fall on both sides alike; medians are the result."""
    plain_dir = work / f"plain-{backend}"
    if backend == "debootstrap":
        plain = ["debootstrap", "--variant=minbase", "bookworm", str(plain_dir)]
    else:
        plain = ["mmdebstrap", "--variant=minbase", "--format=directory", "bookworm",
                 str(plain_dir)]
    rounds = []
    for i in range(runs):
        t_plain = timed(plain)
        shutil.rmtree(plain_dir)
        state = work / f"state-{backend}-{i}"
        cache = work / f"cache-{backend}-{i}" / "apt"  # empty apt and bootstrap caches
        cmd = [sys.executable, "-m", "sidusctl", "-q", "--state-dir", str(state), "build",
               str(RECIPE), "--backend", backend, "--cache-dir", str(cache)]
        t_first = timed(cmd)
        t_warm = timed(cmd)
        shutil.rmtree(state)
        shutil.rmtree(cache.parent)
        rounds.append({"plain_s": round(t_plain, 2), "first_s": round(t_first, 2),
                       "warm_s": round(t_warm, 2)})
    med = {k: statistics.median(r[k] for r in rounds) for k in ("plain_s", "first_s", "warm_s")}
    return {"rounds": rounds, **{k: round(v, 2) for k, v in med.items()},
            "first_over_plain": round(med["first_s"] / med["plain_s"], 3),
            "warm_over_first": round(med["warm_s"] / med["first_s"], 3)}


@contextlib.contextmanager
def state_fs(work: Path, fs: str) -> Iterator[Path]:
    """The directory the state directories go in: ``work`` itself, or a btrfs made on a sparse
    loop file under it (12 GiB), mounted for the duration and removed after."""
    if fs != "btrfs":
        yield work
        return
    img, mnt = work / "sdt-bench-state.img", work / "btrfs"
    with open(img, "wb") as f:
        f.truncate(12 * 2**30)
    subprocess.run(["mkfs.btrfs", "-q", "-L", "sdt-bench", str(img)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def incremental(work: Path, runs: int, cache: Path | None, fs: str = "ext4") -> dict[str, object]:
    """First build, then no change / one site file / one package added, ``runs`` rounds."""
    with state_fs(work, fs) as where:
        return _incremental(work, where, runs, cache)


def _incremental(work: Path, where: Path, runs: int, cache: Path | None) -> dict[str, object]:
    rounds: list[dict[str, Any]] = []
    for i in range(runs):
        rec = work / f"round-{i}" / "minimal"  # the folder names the image
        shutil.copytree(REPO / "images" / "minimal", rec)  # (makes round-i/ too)
        state = where / f"state-inc-{i}"
        apt = cache or work / f"cache-inc-{i}" / "apt"
        base = [sys.executable, "-m", "sidusctl", "-q", "--state-dir", str(state)]
        cmd = [*base, "build", str(rec / "image.toml"), "--cache-dir", str(apt)]
        stages: dict[str, object] = {}

        def build(case: str, cmd: list[str] = cmd, state: Path = state,
                  stages: dict[str, object] = stages) -> float:
            t = timed(cmd)
            stages[case] = json.loads((state / "images" / "minimal" / "current" /
                                       "manifest.json").read_text())["timings_s"]
            return t

        r: dict[str, float] = {"first_s": build("first"), "no_change_s": build("no_change")}
        motd = rec / "files" / "motd.j2"
        motd.write_text(motd.read_text() + "changed by bench/build.py\n")
        r["site_file_s"] = build("site_file")
        # apt's own time on a generation of its own: a first chroot makes the generation
        # private (it may share files with the stage cache), the timed one only runs apt
        chroot = [*base, "chroot", "minimal"]
        timed([*chroot, "true"], {"SIDUSCTL_CACHE": str(apt)})
        r["apt_install_tree_s"] = timed([*chroot, "apt-get", "install", "-y", "-q", "tree"],
                                        {"SIDUSCTL_CACHE": str(apt)})
        toml = rec / "image.toml"
        toml.write_text(toml.read_text().replace('"open-iscsi"]', '"open-iscsi", "tree"]'))
        r["package_added_s"] = build("package_added")
        shutil.rmtree(state)
        if cache is None:
            shutil.rmtree(apt.parent)
        rounds.append({**{k: round(v, 2) for k, v in r.items()}, "timings_s": stages})
    keys = [k for k in rounds[0] if k != "timings_s"]
    med = {k: round(statistics.median(float(rd[k]) for rd in rounds), 2) for k in keys}
    return {"rounds": rounds, **med,
            "no_change_over_first": round(med["no_change_s"] / med["first_s"], 3),
            "site_file_over_first": round(med["site_file_s"] / med["first_s"], 3),
            "package_added_minus_apt_s": round(med["package_added_s"] - med["apt_install_tree_s"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["debootstrap", "mmdebstrap", "both"], default="both")
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds (median reported)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--incremental", action="store_true",
                    help="the stage cache cases on images/minimal instead")
    ap.add_argument("--state-fs", choices=["ext4", "btrfs"], default="ext4",
                    help="with --incremental: btrfs puts the state directory on a loop btrfs")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="with --incremental: a .deb cache to use (default: empty, per round)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/build.py must run as root (debootstrap, chroot, mounts)")
    if a.incremental:
        with tempfile.TemporaryDirectory(prefix="sdt-bench-", dir="/var/tmp") as tmp:
            res = incremental(Path(tmp), a.runs, a.cache_dir, a.state_fs)
        if a.json:
            print(json.dumps(res, indent=2))
            return
        rds: list[dict[str, float]] = res["rounds"]  # type: ignore[assignment]
        for i, rd in enumerate(rds, 1):
            print(f"round {i}: " + ", ".join(f"{k} {v}" for k, v in rd.items()), flush=True)
        print(f"median: first {res['first_s']} s | no change {res['no_change_s']} s "
              f"({res['no_change_over_first']}x, aim <= 15 s) | site file {res['site_file_s']} s "
              f"({res['site_file_over_first']}x, aim <= 15 s) | package added "
              f"{res['package_added_s']} s (apt alone {res['apt_install_tree_s']} s; aim: apt + "
              f"15 s)", flush=True)
        return
    backends = ["debootstrap", "mmdebstrap"] if a.backend == "both" else [a.backend]
    results = {}
    with tempfile.TemporaryDirectory(prefix="sdt-bench-", dir="/var/tmp") as tmp:
        for b in backends:
            results[b] = bench(b, Path(tmp), a.runs)
            r = results[b]
            if not a.json:
                for i, rd in enumerate(r["rounds"], 1):  # type: ignore[arg-type]
                    print(f"{b:12} round {i}: plain {rd['plain_s']:.1f} s, first "
                          f"{rd['first_s']:.1f} s, warm {rd['warm_s']:.1f} s", flush=True)
                print(f"{b:12} median: plain {r['plain_s']:6.1f} s | sidusctl first {r['first_s']:6.1f} s "
                      f"({r['first_over_plain']:.2f}x plain, aim <= 1.10) | warm rebuild "
                      f"{r['warm_s']:6.1f} s ({r['warm_over_first']:.2f}x first, aim <= 0.60)",
                      flush=True)
    if a.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
