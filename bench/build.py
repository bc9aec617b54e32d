#!/usr/bin/env python3
"""Build benchmark: sidusctl build against the bootstrap tool it drives, side by side.

In one process, for each backend (debootstrap, mmdebstrap), --runs rounds (default 3) of:
  1. plain `<tool> --variant=minbase bookworm DIR` (cold: nothing cached),
  2. `sidusctl build` of bench/recipes/minbase (the same thing) with empty package and
     bootstrap caches,
  3. the same build again with the caches now warm,
and prints the medians and the ratios first/plain (aim <= 1.10) and warm/first (aim <= 0.60).
Rounds are interleaved so that a slow spell of the mirror falls on both sides alike.
Everything lives under a temp dir named sdt-bench-* and is removed at the end.
Run as root: `.venv/bin/python bench/build.py [--backend debootstrap|mmdebstrap|both]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["debootstrap", "mmdebstrap", "both"], default="both")
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds (median reported)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/build.py must run as root (debootstrap, chroot, mounts)")
    backends = ["debootstrap", "mmdebstrap"] if a.backend == "both" else [a.backend]
    results = {}
    with tempfile.TemporaryDirectory(prefix="sdt-bench-", dir="/var/tmp") as tmp:
        for b in backends:
            results[b] = bench(b, Path(tmp), a.runs)
            r = results[b]
            if not a.json:
                for i, rd in enumerate(r["rounds"], 1):  # type: ignore[attr-defined]
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
