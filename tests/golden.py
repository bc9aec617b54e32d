"""Golden files for the whole suite: ``assert_golden(actual, relpath)`` compares a rendered text
with ``tests/golden/<relpath>``.

- A mismatch fails with a unified diff (golden file first, the actual text second).
- A missing golden file FAILS: a test that writes its own expectation proves nothing.
- ``SIDUSCTL_UPDATE_GOLDEN=1`` (re)writes the golden file instead of comparing, and the test
  passes; review ``git diff tests/golden`` before committing.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
UPDATE_ENV = "SIDUSCTL_UPDATE_GOLDEN"


def updating() -> bool:
    """True when ``SIDUSCTL_UPDATE_GOLDEN=1``: golden files are written, not compared."""
    return os.environ.get(UPDATE_ENV) == "1"


def assert_golden(actual: str, relpath: str) -> None:
    """Assert ``actual`` equals the text of ``tests/golden/<relpath>`` (a relative path, e.g.
    ``pxe/pxelinux.cfg/default``). AssertionError with a unified diff on a mismatch, or naming
    the variable to set when the file does not exist; with ``SIDUSCTL_UPDATE_GOLDEN=1`` the file
    is written (parents created) and nothing is compared."""
    path = GOLDEN_DIR / relpath
    if not path.resolve().is_relative_to(GOLDEN_DIR):
        raise ValueError(f"golden path {relpath!r} leaves {GOLDEN_DIR}")
    if updating():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        return
    if not path.is_file():
        raise AssertionError(f"no golden file {path}: run the test once with {UPDATE_ENV}=1 to "
                             "write it, then review and commit it")
    expected = path.read_text()
    if actual != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), actual.splitlines(keepends=True),
            fromfile=f"golden/{relpath}", tofile="actual"))
        raise AssertionError(f"{relpath} differs from its golden file {path} (rewrite it with "
                             f"{UPDATE_ENV}=1 if the change is intended):\n{diff}")
