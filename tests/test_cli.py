"""The top-level command group: lazy loading of command modules."""

from __future__ import annotations

import subprocess
import sys

import click

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
