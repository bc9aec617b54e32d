"""The top-level command group: lazy loading of command modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import click
import pytest

from sidusctl.cli import main as climain


def test_lazy_table_names_exactly_the_registered_commands() -> None:
    # each command, loaded alone in a fresh group, comes from the modules the table names
    for name, modules in climain.LAZY_COMMANDS.items():
        g = climain.LazyGroup("t")
        g._load(modules)
        assert name in g.commands, f"{name}: not registered by {modules}"
    every = climain.LazyGroup("all")
    every.load_all()
    assert set(every.commands) == set(climain.LAZY_COMMANDS)
    pxe = every.commands["pxe"]
    assert isinstance(pxe, click.Group) and {"export", "status", "render"} <= set(pxe.commands)


def _loaded_after(argv: list[str], modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a run of ``sidusctl ARGV`` (in this process's Python) imported."""
    code = (f"import sys; sys.argv = ['sidusctl', *{argv!r}]\n"
            "from sidusctl.cli.main import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            f"print('LOADED', [m for m in {modules!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("LOADED "))
    return list(ast.literal_eval(line[len("LOADED "):]))


def test_pnode_side_commands_import_only_what_they_use(tmp_path: Path) -> None:
    # a pnode runs sidusctl for each of the frontend's commands, and a pnode that is a TCG
    # guest pays seconds per module: status/exec/wait need no netlink and no fan-out,
    # facts needs netlink but neither the platform file's models nor ClusterShell
    # (each list names first the module the command itself needs: it did run)
    heavy = ("pyroute2", "ClusterShell.Task", "sidusctl.vnode.cluster")
    state = ["--state-dir", str(tmp_path)]
    assert _loaded_after([*state, "vnode", "status", "--json"],
                         ("sidusctl.vnode.platform", *heavy)) == ["sidusctl.vnode.platform"]
    assert _loaded_after([*state, "vnode", "exec", "--help"],
                         ("sidusctl.cli.vnode", *heavy)) == ["sidusctl.cli.vnode"]
    assert _loaded_after([*state, "pnode", "facts", "--help"],
                         ("sidusctl.cli.pnode", *heavy, "sidusctl.vnode.platform_file")) == \
        ["sidusctl.cli.pnode"]


def test_build_does_not_import_the_vnode_runtime_or_the_servers() -> None:
    code = ("import sys; sys.argv = ['sidusctl', 'build', '--help']\n"
            "from sidusctl.cli.main import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('pyroute2', 'sidusctl.vnode', 'sidusctl.serve.supervisor') "
            "if m in sys.modules]\n"
            "print('LOADED', bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "LOADED []" in out.stdout, out.stdout
    top = subprocess.run([sys.executable, "-m", "sidusctl", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for name in climain.LAZY_COMMANDS:
        assert f"  {name} " in top


def test_a_sigterm_python_wraps_is_reported_as_an_interrupt(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A SIGTERM that arrives while Python creates a class (a lazily imported command's
    module: its fields' ``__set_name__``) reaches the CLI as a RuntimeError (Python 3.11 wraps
    what that hook raises): it is an interrupt (exit 130), not an internal error (exit 70, a
    traceback; seen by a helper's probe, 1 ``vnode list`` in 40). The signal's exact moment
    cannot be caused at will, so the hook raises it here."""
    import signal

    import sidusctl.cli.main as main_mod
    from sidusctl.core.errors import Interrupted

    class Field:
        def __set_name__(self, owner: type, name: str) -> None:
            raise Interrupted("SIGTERM")

    def lazy_import(**kw: object) -> None:
        type("VNode", (), {"ifaces": Field()})

    monkeypatch.setattr(main_mod.cli, "main", lazy_import)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as ex:
            main_mod.main()
    finally:
        signal.signal(signal.SIGTERM, before)
    assert ex.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGTERM; cleaned up" in err and "Traceback" not in err
