"""tests/at_once.py: scenarios run at once, all waited for, every failure reported."""

from __future__ import annotations

import threading
import time

import pytest

from tests.at_once import (
    at_once,
    in_turn,
    run_ahead,
    run_or_replay_each,
    two_at_a_time,
)


def test_scenarios_overlap_and_all_are_waited_for() -> None:
    both = threading.Barrier(2, timeout=10)  # passes only if the two run at the same time
    done: list[str] = []

    def scenario(name: str) -> None:
        both.wait()
        done.append(name)

    at_once(lambda: scenario("a"), lambda: scenario("b"))
    assert sorted(done) == ["a", "b"]


def test_first_failure_raised_with_the_others_as_notes_after_all_ended() -> None:
    ended: list[str] = []

    def fails(msg: str) -> None:
        raise AssertionError(msg)

    def slow() -> None:
        time.sleep(0.3)
        ended.append("slow")

    with pytest.raises(AssertionError, match="first") as info:
        at_once(lambda: fails("first"), slow, lambda: fails("second"))
    assert ended == ["slow"]  # the failure did not cut the other scenario short
    assert any("second" in n for n in info.value.__notes__)


def test_in_turn_runs_every_scenario_in_order_past_failures_and_skips() -> None:
    ran: list[str] = []

    def step(name: str, fail: BaseException | None = None) -> None:
        ran.append(name)
        if fail is not None:
            raise fail

    with pytest.raises(AssertionError, match="failed") as info:
        in_turn(lambda: step("a", pytest.skip.Exception("skipped")),
                lambda: step("b", AssertionError("failed")), lambda: step("c"))
    assert ran == ["a", "b", "c"]  # neither the skip nor the failure stopped the turn
    # the failure is raised, not the earlier skip, which is a note
    assert any("skipped" in n for n in info.value.__notes__)
    with pytest.raises(KeyboardInterrupt):
        in_turn(lambda: step("d", KeyboardInterrupt()), lambda: step("e"))
    assert ran[-1] == "d"  # Ctrl-C stops it


def test_run_ahead_keeps_the_outcome_for_its_test_which_raises_it_once() -> None:
    ran: list[str] = []
    run_ahead("sdt-pass", lambda: ran.append("ahead"))

    def fails() -> None:
        raise AssertionError("ahead failed")

    run_ahead("sdt-fail", fails)
    assert ran == ["ahead"]  # neither outcome raised by run_ahead
    # the later test: not run again, its outcome replayed once
    assert run_or_replay_each({"sdt-pass": lambda: ran.append("again")}) == ["sdt-pass"]
    with pytest.raises(AssertionError, match="ahead failed"):
        run_or_replay_each({"sdt-fail": lambda: ran.append("again")})
    assert ran == ["ahead"]
    # not run ahead (or replayed already): the test runs it itself
    assert run_or_replay_each({"sdt-pass": lambda: ran.append("itself")}) == []
    assert ran == ["ahead", "itself"]


def test_two_at_a_time_runs_two_at_once_raises_its_own_and_keeps_the_ahead_outcomes() -> None:
    both = threading.Barrier(2, timeout=10)  # passes only if two run at the same time
    ran: list[str] = []

    def step(name: str, fail: bool = False) -> None:
        ran.append(name)
        if fail:
            raise AssertionError(f"{name} failed")

    def overlapping(name: str, fail: bool = False) -> None:
        both.wait()
        step(name, fail)

    with pytest.raises(AssertionError, match="own failed") as info:
        two_at_a_time([lambda: overlapping("own", fail=True), lambda: step("own2", fail=True)],
                      [("sdt-a", lambda: overlapping("a")), ("sdt-b", lambda: step("b", True)),
                       ("sdt-c", lambda: step("c"))])
    assert sorted(ran) == ["a", "b", "c", "own", "own2"]  # every one ran, past failures
    assert any("own2 failed" in n for n in info.value.__notes__)
    assert not any("b failed" in n for n in info.value.__notes__)  # b's is left to its test
    # the later test: a and b replayed (b's failure raised), c not run again
    with pytest.raises(AssertionError, match="b failed"):
        run_or_replay_each({"sdt-a": lambda: step("a2"), "sdt-b": lambda: step("b2")})
    assert run_or_replay_each({"sdt-c": lambda: step("c2")}) == ["sdt-c"]
    assert "a2" not in ran and "b2" not in ran and "c2" not in ran
    # no failure of its own: nothing raised, the keys run ahead returned
    assert two_at_a_time([lambda: step("own3")], [("sdt-d", lambda: step("d", True))]) \
        == ["sdt-d"]
    with pytest.raises(AssertionError, match="d failed"):
        run_or_replay_each({"sdt-d": lambda: None})


def test_run_or_replay_each_reports_a_failure_now_and_one_ahead() -> None:
    def fails(msg: str) -> None:
        raise AssertionError(msg)

    run_ahead("sdt-x", lambda: fails("ahead"))
    with pytest.raises(AssertionError, match="now") as info:
        run_or_replay_each({"sdt-x": lambda: None, "sdt-y": lambda: fails("now")})
    assert any("ahead" in n for n in info.value.__notes__)
