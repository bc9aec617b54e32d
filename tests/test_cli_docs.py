"""``sidusctl completion`` (click's env-var protocol) and ``sidusctl man`` (roff pages that
man/groff render without a warning)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sidusctl.cli import main as climain
from sidusctl.cli.docs import COMPLETE_VAR, man_pages

# The console script in a few lines (``python -m sidusctl`` would be named "python -m sidusctl"
# by click, whose completion variable is then another one).
AS_CONSOLE_SCRIPT = ("import sys; sys.argv[0] = 'sidusctl'\n"
                     "from sidusctl.cli.main import main\nmain()")


def _run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", AS_CONSOLE_SCRIPT, *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})}, cwd=cwd,
                          check=False)


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_prints_clicks_script(shell: str) -> None:
    res = _run("completion", shell)
    assert res.returncode == 0, res.stderr
    assert COMPLETE_VAR == "_SIDUSCTL_COMPLETE"
    assert res.stdout.strip() and COMPLETE_VAR in res.stdout
    assert f"{shell}_complete" in res.stdout  # the instruction the script sends back


def test_completion_rejects_another_shell() -> None:
    res = _run("completion", "tcsh")
    assert res.returncode == 2 and "tcsh" in res.stderr


def test_completion_protocol_offers_commands_and_subcommands() -> None:
    res = _run(env={COMPLETE_VAR: "bash_complete", "COMP_WORDS": "sidusctl vn",
                    "COMP_CWORD": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["plain,vnode"]
    res = _run(env={COMPLETE_VAR: "bash_complete", "COMP_WORDS": "sidusctl pxe re",
                    "COMP_CWORD": "2"})
    assert "plain,render" in res.stdout.split()
    res = _run(env={COMPLETE_VAR: "bash_complete", "COMP_WORDS": "sidusctl build --ch",
                    "COMP_CWORD": "2"})
    assert "plain,--check" in res.stdout.split()


def test_man_pages_one_per_command_from_the_tree() -> None:
    pages = man_pages(climain.cli, date="2024-01-02")
    expected = {"sidusctl.1", *(f"sidusctl-{n}.1" for n in climain.LAZY_COMMANDS)}
    assert set(pages) == expected
    assert {"sidusctl-build.1", "sidusctl-image.1", "sidusctl-vnode.1", "sidusctl-pxe.1",
            "sidusctl-man.1", "sidusctl-completion.1"} <= set(pages)
    for name, text in pages.items():
        assert text.startswith(f'.TH "{name[:-2].upper().replace("-", chr(92) + "-")}" "1" '
                               '"2024-01-02"'), name
        assert "\n\n" not in text and all(line == line.rstrip() for line in text.splitlines())
    # a group's page documents its subcommands and their options
    pxe = pages["sidusctl-pxe.1"]
    assert '.SS "sidusctl pxe render"' in pxe and "\\-\\-tftp\\-root" in pxe
    assert "\\-\\-check" in pages["sidusctl-build.1"]
    assert "SIDUSCTL_STATE" in pages["sidusctl.1"] and "sidusctl\\-vnode" in pages["sidusctl.1"]


def _roff_checker() -> list[str] | None:
    if shutil.which("man"):
        return ["man", "--warnings", "-l", "-Tutf8"]
    if shutil.which("groff"):
        return ["groff", "-ww", "-man", "-Tutf8"]
    return None


@pytest.mark.skipif(_roff_checker() is None, reason="neither man (man-db) nor groff installed")
def test_man_command_writes_pages_that_render_without_warnings(tmp_path: Path) -> None:
    out = tmp_path / "man"
    res = _run("man", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    files = sorted(out.iterdir())
    assert sorted(p.name for p in files) == sorted(
        ["sidusctl.1", *(f"sidusctl-{n}.1" for n in climain.LAZY_COMMANDS)])
    assert sorted(res.stdout.split()) == [str(p) for p in files]
    checker = _roff_checker()
    assert checker is not None
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8"}
    for page in files:
        r = subprocess.run([*checker, str(page)], capture_output=True, text=True, env=env,
                           timeout=60, check=False)
        assert r.returncode == 0 and r.stderr == "", f"{page.name}: {r.stderr}"
        assert r.stdout.strip(), page.name
    # every option of `sidusctl build` made it to its rendered page
    r = subprocess.run([*checker, str(out / "sidusctl-build.1")], capture_output=True,
                       text=True, env=env, timeout=60, check=True)
    text = re.sub(".\b", "", r.stdout).replace("\u2010", "-")  # no overstrike, ASCII hyphens
    for opt in ("--backend", "--tar", "--out", "--cache-dir", "--check", "--json"):
        assert opt in text, opt
