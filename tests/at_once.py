"""Two or more whole test scenarios run at once, for scenarios that each keep one core busy
with one TCG guest: the CI machine has two cores, and a guest booting alone leaves the other
one idle (docs/testing.md: the CI budget)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest


def at_once(*scenarios: Callable[[], None]) -> None:
    """Runs each of ``scenarios`` (a scenario: its own lab, guests, checks and clean-up; none
    shares a namespace, a bridge or a guest name with another) in a thread of its own and
    waits for all of them, also when one fails early (each ends by its own timeouts and
    removes what it made). Raises the first failure, in the order given; the others' are
    added to it as notes (PEP 678), so that none is lost."""
    with ThreadPoolExecutor(max_workers=len(scenarios), thread_name_prefix="sdt-scenario") as ex:
        futures = [ex.submit(s) for s in scenarios]
    _raise_first([e for e in (f.exception() for f in futures) if e is not None],
                 "another scenario failed at the same time")


def in_turn(*scenarios: Callable[[], None]) -> None:
    """Runs ``scenarios`` one after the other, each also when an earlier one failed or was
    skipped (pytest's skip is a BaseException; only Ctrl-C stops the turn); raises the first
    failure with the others added as notes (as :func:`at_once`)."""
    errors: list[BaseException] = []
    for s in scenarios:
        try:
            s()
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # every scenario runs; all failures (and skips) are kept
            errors.append(e)
    _raise_first(errors, "a later scenario failed too")


def _raise_first(errors: list[BaseException], note: str) -> None:
    """Raises the first of ``errors`` (if any) that is not a pytest skip, else the first skip,
    with each other one added to it as a note (PEP 678): a skip never hides a failure."""
    if not errors:
        return
    errors = sorted(errors, key=lambda e: isinstance(e, pytest.skip.Exception))
    for other in errors[1:]:
        errors[0].add_note(f"{note}: {other!r}")
    raise errors[0]


# -- scenarios run ahead of their own test ---------------------------------------------------------
# A test may run scenarios of later tests of the session for them: tests/test_pnode_guest.py
# runs its pnode guest in the background while other tests run (tests/pnode_image.py), and
# then the scenarios of tests/test_secureboot.py and tests/test_http_boot_uefi.py two at a
# time with its own; those tests then only report the outcome of what ran ahead, and run the
# rest themselves (all of it when run alone).

#: key -> the outcome of a scenario :func:`run_ahead` ran: None (it passed) or its exception
_AHEAD: dict[str, BaseException | None] = {}


def run_ahead(key: str, scenario: Callable[[], None]) -> None:
    """Runs ``scenario`` now on behalf of the later test that calls :func:`run_or_replay_each`
    with ``key`` among its scenarios, and keeps its outcome for that test instead of raising
    it (a skip too)."""
    try:
        scenario()
    except BaseException as e:  # kept for its own test, which raises it (pytest's skip too)
        if isinstance(e, KeyboardInterrupt):
            raise
        _AHEAD[key] = e
    else:
        _AHEAD[key] = None


def two_at_a_time(own: Sequence[Callable[[], None]],
                  ahead: Sequence[tuple[str, Callable[[], None]]] = ()) -> list[str]:
    """Runs the caller's ``own`` scenarios, then the ``ahead`` ones ((key, scenario) pairs,
    run with :func:`run_ahead` for their later tests), two at a time (two threads take them in
    this order: the two cores each keep one guest busy) and waits for all of them. Raises the
    first failure of ``own`` (the others as notes); the outcomes of ``ahead`` are left to their
    tests (:func:`run_or_replay_each`). Returns the keys that ran ahead."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="sdt-scenario") as ex:
        mine = [ex.submit(s) for s in own]
        for key, scenario in ahead:
            ex.submit(run_ahead, key, scenario)
    _raise_first([e for e in (f.exception() for f in mine) if e is not None],
                 "another scenario failed too")
    return [key for key, _ in ahead]


def run_or_replay_each(scenarios: Mapping[str, Callable[[], None]]) -> list[str]:
    """A test's ``scenarios`` (key -> scenario): the outcome of each that ran ahead, and the
    others run now, at once (:func:`at_once`). Raises the first failure, the others added as
    notes (a skip never hides a failure); returns the keys that had run ahead."""
    ahead = [k for k in scenarios if k in _AHEAD]
    errors = [e for e in (_AHEAD.pop(k) for k in ahead) if e is not None]
    rest = [s for k, s in scenarios.items() if k not in ahead]
    if rest:
        try:
            at_once(*rest)
        except BaseException as e:  # kept with the replayed failures, raised below
            if isinstance(e, KeyboardInterrupt):
                raise
            errors.insert(0, e)
    _raise_first(errors, "another of the test's scenarios failed too")
    return ahead
