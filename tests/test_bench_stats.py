"""bench/pairs.py: bench/bootstorm.py's paired statistics: the median of the per-round ratios and its
distribution-free interval (the sign test's order statistics), checked against binomial
tail values worked by hand, and the summed-times ratio and win count of a set of rounds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import pairs
from bench.pairs import median_interval, pair_stats


@pytest.mark.parametrize(("n", "k"), [(6, 1), (9, 2), (18, 5), (30, 10)])
def test_interval_uses_the_largest_k_of_tail_at_most_2_5_percent(n: int, k: int) -> None:
    # e.g. n = 18: P(B <= 4) = 4048 / 2^18 = 0.0154, P(B <= 5) = 12616 / 2^18 = 0.048
    assert sum(math.comb(n, i) for i in range(k)) / 2 ** n <= 0.025
    assert sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n > 0.025
    xs = [float(x) for x in range(n, 0, -1)]  # unsorted on purpose
    low, mid, high = median_interval(xs)
    assert (low, high) == (k, n - k + 1)
    assert mid == (n + 1) / 2


def test_too_few_values_give_the_whole_range_and_none_is_an_error() -> None:
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 2.0, 3.0)
    assert median_interval([2.0]) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="no values"):
        median_interval([])


def test_pair_stats_of_rounds() -> None:
    rounds = [{"serve-pxe": 5.2, "reference": 4.8}, {"serve-pxe": 4.5, "reference": 5.0},
              {"serve-pxe": 4.9, "reference": 4.9}]
    p = pair_stats(rounds)
    assert p["ratios"] == [1.083, 0.9, 1.0]
    assert p["median"] == 1.0 and p["interval_95"] == [0.9, 1.083]
    assert p["summed"] == round(14.6 / 14.7, 3)
    assert p["serve_pxe_faster"] == 1 and p["count"] == 3


def run_line(nodes: int, boot: str, times: list[tuple[float, float]], cold: bool = False) -> str:
    return json.dumps({"nodes": nodes, "root": "squashfs-http", "boot": boot,
                       "cold_neighbours": cold,
                       "rounds": [{"serve-pxe": a, "reference": b, "first": "serve-pxe"}
                                  for a, b in times]})


def test_runs_are_pooled_per_group_and_bad_lines_named(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    one.write_text(run_line(200, "ipxe-http", [(5.0, 4.0), (4.0, 5.0)]) + "\n"
                   + run_line(50, "ipxe-http", [(2.0, 2.0)]) + "\n"
                   + run_line(200, "ipxe-http", [(6.0, 5.0)], cold=True) + "\n")
    two.write_text(run_line(200, "ipxe-http", [(3.0, 3.0)]) + "\n\n{not json\n"
                   + json.dumps({"nodes": 200, "root": "nfs"}) + "\n")
    assert pairs.main([str(one), str(two), str(tmp_path / "absent.jsonl"), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    big = out["groups"]["200 nodes, squashfs-http, ipxe-http"]
    assert big["count"] == 3 and big["runs"] == 2
    assert big["ratios"] == [1.25, 0.8, 1.0] and big["median"] == 1.0
    assert big["summed"] == 1.0 and big["serve_pxe_faster"] == 1
    assert out["groups"]["50 nodes, squashfs-http, ipxe-http"]["count"] == 1
    assert out["groups"]["200 nodes, squashfs-http, ipxe-http, cold neighbours"]["ratios"] == [1.2]
    assert len(out["groups"]) == 3
    assert out["problems"][0] == f"{tmp_path / 'absent.jsonl'}: No such file or directory"
    assert out["problems"][1].startswith(f"{two}:3: not a bootstorm run")
    assert out["problems"][2] == f"{two}:4: not a bootstorm run with rounds (missing key 'rounds')"
    assert len(out["problems"]) == 3


def test_the_report_names_each_group_on_one_line(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "run.jsonl"
    f.write_text(run_line(500, "pxelinux", [(9.0, 10.0)] * 6))
    assert pairs.main([str(f)]) == 0
    assert capsys.readouterr().out == (
        "500 nodes, squashfs-http, pxelinux: 6 pairs from 1 runs: serve-pxe / reference, "
        "per round: median 0.900 (95 % interval 0.900-0.900), summed 0.900, serve-pxe "
        "faster in 6 of 6\n")
