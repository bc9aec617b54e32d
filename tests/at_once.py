"""Two or more whole test scenarios run at once, for scenarios that each keep one core busy
with one TCG guest: the CI machine has two cores, and a guest booting alone leaves the other
one idle (docs/testing.md: the CI budget)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


def at_once(*scenarios: Callable[[], None]) -> None:
    """Runs each of ``scenarios`` (a scenario: its own lab, guests, checks and clean-up; none
    shares a namespace, a bridge or a guest name with another) in a thread of its own and
    waits for all of them, also when one fails early (each ends by its own timeouts and
    removes what it made). Raises the first failure, in the order given; the others' are
    added to it as notes (PEP 678), so that none is lost."""
    with ThreadPoolExecutor(max_workers=len(scenarios), thread_name_prefix="sdt-scenario") as ex:
        futures = [ex.submit(s) for s in scenarios]
    errors = [e for e in (f.exception() for f in futures) if e is not None]
    if not errors:
        return
    first = errors[0]
    for other in errors[1:]:
        first.add_note(f"another scenario failed at the same time: {other!r}")
    raise first
