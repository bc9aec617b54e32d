"""tests/at_once.py: scenarios run at once, all waited for, every failure reported."""

from __future__ import annotations

import threading
import time

import pytest

from tests.at_once import (
    at_once,
    in_turn,
    run_ahead,
    run_ahead_while,
    run_or_replay_each,
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


def test_run_ahead_while_busy_then_the_test_runs_the_rest_and_replays_the_outcomes() -> None:
    busy = threading.Event()
    busy.set()
    ran: list[str] = []

    def fails() -> None:
        ran.append("b")
        busy.clear()  # the other thread is done: nothing after this one starts
        raise AssertionError("b failed ahead")

    assert run_ahead_while(busy, [("sdt-a", lambda: ran.append("a")), ("sdt-b", fails),
                                  ("sdt-c", lambda: ran.append("c"))]) == ["sdt-a", "sdt-b"]
    assert ran == ["a", "b"]
    # the later test: a and b replayed (b's failure raised), c run now; all of them reported
    with pytest.raises(AssertionError, match="b failed ahead"):
        run_or_replay_each({"sdt-a": lambda: ran.append("again"), "sdt-b": fails,
                            "sdt-c": lambda: ran.append("c")})
    assert ran == ["a", "b", "c"]
    # replayed once: a second call runs them all, at once
    assert run_or_replay_each({"sdt-a": lambda: ran.append("a2"),
                               "sdt-c": lambda: ran.append("c2")}) == []
    assert sorted(ran[3:]) == ["a2", "c2"]


def test_run_or_replay_each_reports_a_failure_now_and_one_ahead() -> None:
    def fails(msg: str) -> None:
        raise AssertionError(msg)

    run_ahead("sdt-x", lambda: fails("ahead"))
    with pytest.raises(AssertionError, match="now") as info:
        run_or_replay_each({"sdt-x": lambda: None, "sdt-y": lambda: fails("now")})
    assert any("ahead" in n for n in info.value.__notes__)
