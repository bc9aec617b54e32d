"""bench/bootstorm.py's paired statistics: the median of the per-round ratios and its
distribution-free interval (the sign test's order statistics), checked against binomial
tail values worked by hand, and the summed-times ratio and win count of a set of rounds."""

from __future__ import annotations

import math

import pytest

from bench.bootstorm import median_interval, pair_stats


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
