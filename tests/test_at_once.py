"""tests/at_once.py: scenarios run at once, all waited for, every failure reported."""

from __future__ import annotations

import threading
import time

import pytest

from tests.at_once import at_once


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
