"""The house standards, enforced: mypy --strict on sidusctl/ and on tests/ and bench/, ruff on
the Python code, shellcheck on every shell script that ships or runs at boot (initramfs hooks
and scripts, the setup and CI scripts, shell templates rendered into images)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)


def test_mypy_strict() -> None:
    r = _run([str(BIN / "mypy")])  # configuration in pyproject.toml: strict, files = sidusctl
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_mypy_strict_on_tests_and_bench() -> None:
    # the same strictness for the code that proves and measures sidusctl (the test and bench
    # modules are scripts in folders, hence the explicit package bases)
    r = _run([str(BIN / "mypy"), "--strict", "--explicit-package-bases", "tests", "bench"])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_ruff() -> None:
    r = _run([str(BIN / "ruff"), "check", "sidusctl", "tests", "bench"])
    assert r.returncode == 0, r.stdout[-4000:]


def _shell_scripts() -> list[Path]:
    found = [REPO / "scripts/setup-host", REPO / ".ci/run"]
    for base in (REPO / "initramfs", REPO / "templates"):
        for p in sorted(base.rglob("*")):
            if p.is_file() and p.suffix != ".j2":  # templates: checked rendered, in their tests
                head = p.read_bytes()[:64]
                if head.startswith((b"#!/bin/sh", b"#!/bin/bash", b"#!/usr/bin/env sh",
                                    b"#!/usr/bin/env bash")):
                    found.append(p)
    return found


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck(script: Path) -> None:
    r = _run(["shellcheck", "-x", str(script)])
    assert r.returncode == 0, r.stdout[-4000:]
