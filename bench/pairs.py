#!/usr/bin/env python3
"""Paired statistics of bench/bootstorm.py's rounds, and their pooling across runs.

bench/bootstorm.py ``--rounds K`` runs its storms in pairs (serve-pxe and the reference, in
alternating order) and reports, from the pairs, the median of the per-round ratios with a
distribution-free 95 % interval (:func:`median_interval`), the ratio of the summed times and
how many rounds serve-pxe won (:func:`pair_stats`). One run of six rounds gives a wide
interval; run as a script, this module pools the rounds of several runs (the lines that
bootstorm's ``--out FILE`` appended), one group per node count, root source, boot way and
``--cold-neighbours``:

    .venv/bin/python bench/pairs.py FILE [FILE ...] [--json]

Pooling is only fair between runs of the same code on the same machine: the script does not
know what code a line was measured on, the reader does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """The sample median of ``values`` and a distribution-free interval for the true median
    of at least ``level`` coverage: ``(low, median, high)``, the order statistics x(k) and
    x(n-k+1) with the largest k such that P(Binomial(n, 1/2) < k) <= (1 - level) / 2 (the
    sign test's interval; Conover, *Practical Nonparametric Statistics*, 3.2). With fewer
    than 6 values no such k exists at 95 %: the interval is then the whole range. ValueError
    on an empty list."""
    xs = sorted(values)
    n = len(xs)
    if not n:
        raise ValueError("median_interval: no values")
    mid = (xs[(n - 1) // 2] + xs[n // 2]) / 2
    tail, k, below = (1 - level) / 2, 0, 0.0  # below: P(B < k + 1) as k grows
    while k < n // 2:
        below += math.comb(n, k) / 2 ** n
        if below > tail:
            break
        k += 1
    k = max(k, 1)
    return xs[k - 1], mid, xs[n - k]


def pair_stats(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Of rounds run in pairs (``{"serve-pxe": s, "reference": s}`` each), the per-round
    ratios serve-pxe / reference: their median with its 95 % interval (:func:`median_interval`),
    the ratio of the summed times, and in how many rounds serve-pxe was faster."""
    ratios = [r["serve-pxe"] / r["reference"] for r in rounds]
    low, mid, high = median_interval(ratios)
    return {"ratios": [round(x, 3) for x in ratios], "median": round(mid, 3),
            "interval_95": [round(low, 3), round(high, 3)],
            "summed": round(sum(r["serve-pxe"] for r in rounds)
                            / sum(r["reference"] for r in rounds), 3),
            "serve_pxe_faster": sum(r["serve-pxe"] < r["reference"] for r in rounds),
            "count": len(rounds)}


def describe(p: dict[str, Any]) -> str:
    """One line for :func:`pair_stats`'s result ``p``."""
    low, high = p["interval_95"]
    return (f"median {p['median']:.3f} (95 % interval {low:.3f}-{high:.3f}), summed "
            f"{p['summed']:.3f}, serve-pxe faster in {p['serve_pxe_faster']} of {p['count']}")


def pool(lines: list[tuple[str, int, str]]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Group the rounds of bootstorm ``--out`` lines (``(file name, line number, text)``) by
    ``"{nodes} nodes, {root}, {boot}"`` (with ``", cold neighbours"`` for such runs):
    ``({group: pair_stats of its rounds and the runs it pooled}, [problems])``; a line that
    is not JSON, or a run without ``rounds`` (one round only: no pairs), is a problem named
    by file and line, and left out."""
    groups: dict[str, list[dict[str, Any]]] = {}
    runs: dict[str, int] = {}
    problems = []
    for name, no, text in lines:
        if not text.strip():
            continue
        try:
            o = json.loads(text)
            key = (f"{int(o['nodes'])} nodes, {o['root']}, {o.get('boot', 'pxelinux')}"
                   + (", cold neighbours" if o.get("cold_neighbours") else ""))
            rounds = [{"serve-pxe": float(r["serve-pxe"]), "reference": float(r["reference"])}
                      for r in o["rounds"]]
        except (ValueError, TypeError, KeyError) as e:
            what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
            problems.append(f"{name}:{no}: not a bootstorm run with rounds ({what})")
            continue
        if not rounds:
            problems.append(f"{name}:{no}: no rounds")
            continue
        groups.setdefault(key, []).extend(rounds)
        runs[key] = runs.get(key, 0) + 1
    return {k: {**pair_stats(v), "runs": runs[k]} for k, v in groups.items()}, problems


def main(argv: list[str] | None = None) -> int:
    """The command line (``argv``, default ``sys.argv[1:]``): one line per group on standard
    output and each problem on standard error, or with ``--json`` one object ``{"groups":
    ..., "problems": [...]}``. Exit status 0, or 2 if any file or line was a problem."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="bench/bootstorm.py --out files")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    lines: list[tuple[str, int, str]] = []
    problems: list[str] = []
    for f in args.files:
        try:
            lines += [(str(f), i, t) for i, t in enumerate(f.read_text().splitlines(), 1)]
        except OSError as e:
            problems.append(f"{f}: {e.strerror}")
    groups, bad = pool(lines)
    problems += bad
    if args.json:
        print(json.dumps({"groups": groups, "problems": problems}, indent=2))
    else:
        for problem in problems:
            print(f"bench/pairs.py: {problem}", file=sys.stderr)
        for key, p in groups.items():
            print(f"{key}: {p['count']} pairs from {p['runs']} runs: serve-pxe / reference, "
                  f"per round: {describe(p)}")
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
