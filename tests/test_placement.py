"""Placement of vnodes on pnodes (sidusctl.vnode.placement): pure, deterministic, and a
platform that does not fit is refused naming every vnode left out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidusctl.vnode.placement import Capacity, Demand, PlacementError, place

PN = [Capacity("pn1", 4, 4096), Capacity("pn2", 4, 4096), Capacity("pn3", 2, 2048)]


def _counts(plan: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in plan.values():
        out[p] = out.get(p, 0) + 1
    return out


def test_pack_fills_the_first_pnode_first() -> None:
    ds = [Demand(f"n{i}", cpus=1) for i in range(9)]
    plan = place(ds, PN, policy="pack")
    assert _counts(plan) == {"pn1": 4, "pn2": 4, "pn3": 1}
    assert [plan[f"n{i}"] for i in range(4)] == ["pn1"] * 4


def test_pack_with_max_per_pnode_is_deter_packing() -> None:
    ds = [Demand(f"n{i}") for i in range(9)]
    assert _counts(place(ds, PN, policy="pack", max_per_pnode=3)) == \
        {"pn1": 3, "pn2": 3, "pn3": 3}


def test_spread_round_robins_and_explicit_host_wins() -> None:
    ds = [Demand("fixed", host="pn3"), *[Demand(f"n{i}") for i in range(6)]]
    plan = place(ds, PN, policy="spread")
    assert plan["fixed"] == "pn3"
    assert _counts(plan) == {"pn1": 3, "pn2": 2, "pn3": 2}
    assert plan["n0"] == "pn1" and plan["n1"] == "pn2"


def test_memory_counts_with_the_host_reserve() -> None:
    # 4096 MiB less the 256 MiB reserve: 3840 for vnodes
    assert place([Demand("big", mem_mib=3800), Demand("b2", mem_mib=3000)], PN) == \
        {"big": "pn1", "b2": "pn2"}
    with pytest.raises(PlacementError, match="3840 MiB of memory free, 3900 asked"):
        place([Demand("huge", mem_mib=3900)], PN)


def test_a_platform_too_big_names_every_vnode_left_out() -> None:
    ds = [Demand(f"n{i}", cpus=2) for i in range(7)]  # 14 cores asked, 10 there
    with pytest.raises(PlacementError) as ei:
        place(ds, PN)
    assert sorted(ei.value.unplaced) == ["n5", "n6"]
    assert "pn3 has 0 of 2 cores free, 2 asked" in str(ei.value)
    assert ei.value.exit_code == 2


def test_unknown_host_and_small_store() -> None:
    with pytest.raises(PlacementError, match="'pn9' is not one of the pnodes"):
        place([Demand("a", host="pn9")], PN)
    small = [Capacity("pn1", 4, 4096, store_free_mib=10), Capacity("pn2", 4, 4096)]
    assert place([Demand("a")], small, need_store_mib=100) == {"a": "pn2"}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3000), st.sampled_from(
    [None, "pn1", "pn2", "pn3"])), max_size=30), st.sampled_from(["pack", "spread"]),
    st.one_of(st.none(), st.integers(1, 10)))
def test_fuzz_plans_respect_capacity_and_are_deterministic(
        raw: list[tuple[int, int, str | None]], policy: str, max_per: int | None) -> None:
    ds = [Demand(f"v{i}", cpus=c, mem_mib=m, host=h) for i, (c, m, h) in enumerate(raw)]
    try:
        plan = place(ds, PN, policy=policy, max_per_pnode=max_per)  # type: ignore[arg-type]
    except PlacementError as e:
        assert e.unplaced and set(e.unplaced) <= {d.name for d in ds}
        return
    assert plan == place(ds, PN, policy=policy, max_per_pnode=max_per)  # type: ignore[arg-type]
    assert set(plan) == {d.name for d in ds}
    for p in PN:
        mine = [d for d in ds if plan[d.name] == p.name]
        assert sum(d.cpus for d in mine) <= p.cores
        assert sum(d.mem_mib for d in mine) <= p.mem_mib - 256
        assert max_per is None or len(mine) <= max_per
    assert all(plan[d.name] == d.host for d in ds if d.host)
