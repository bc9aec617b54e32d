"""``sidusctl``: the top-level command group, error mapping and signal handling.

SIGTERM is turned into an :class:`Interrupted` exception (as SIGINT is into KeyboardInterrupt)
so that every context manager (mounts, chroot sessions, servers) unwinds and cleans up.
"""

from __future__ import annotations

import importlib
import signal
import sys
import traceback
from types import FrameType
from typing import Any

import click

from sidusctl import __version__
from sidusctl.cli.common import Ctx
from sidusctl.core import log as logsetup
from sidusctl.core.errors import Interrupted, SidusError
from sidusctl.core.paths import state_dir as resolve_state_dir

# -- command registration ----------------------------------------------------------------------
# Each module's register(cli) adds its commands. They are imported only when their command is
# run (or listed by --help): `sidusctl build` then starts without importing pyroute2, the vnode
# runtime or the servers (`sidusctl build --help`: 0.43 s -> 0.17 s). "servepxe" adds
# `pxe export` and `pxe status` to the pxe group, so it is loaded with "pxe".
LAZY_COMMANDS: dict[str, tuple[str, ...]] = {
    "build": ("build",), "update": ("build",), "chroot": ("build",),
    "image": ("image",),
    "import": ("imports",),
    "pxe": ("pxe", "servepxe"), "serve-pxe": ("pxe", "servepxe"),
    "serve": ("serve",),
    "vnode": ("vnode",), "pnode": ("pnode",),
    "demo": ("demo",),
    "completion": ("docs",), "man": ("docs",),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use, from :data:`LAZY_COMMANDS`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loaded: set[str] = set()

    def _load(self, modules: tuple[str, ...]) -> None:
        for name in modules:
            if name not in self._loaded:
                importlib.import_module(f"sidusctl.cli.{name}").register(self)
                self._loaded.add(name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The names of the commands already registered and of every lazy one in
        :data:`LAZY_COMMANDS`, sorted; imports nothing."""
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name``, importing its module(s) first if it is a lazy one; None if
        there is no such command."""
        if cmd_name in LAZY_COMMANDS:
            self._load(LAZY_COMMANDS[cmd_name])
        return super().get_command(ctx, cmd_name)

    def load_all(self) -> None:
        """Import every command module (tests and documentation tools use this)."""
        for modules in LAZY_COMMANDS.values():
            self._load(modules)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted("SIGTERM")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="State directory (default $SIDUSCTL_STATE or /var/lib/sidusctl).")
@click.option("--debug", is_flag=True, help="Debug logging and tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.version_option(__version__, prog_name="sidusctl")
@click.pass_context
def cli(ctx: click.Context, state_dir: str | None, debug: bool, quiet: bool) -> None:
    """Build Debian roots, netboot diskless machines from them, import OCI images and run
    Distem-style virtual nodes."""
    logsetup.setup(debug=debug, quiet=quiet)
    ctx.obj = Ctx(state=resolve_state_dir(state_dir), debug=debug)


def _err(text: str) -> None:
    # Plain, unwrapped text: messages are read by people and grepped by scripts.
    if sys.stderr.isatty():
        text = f"\033[31m{text}\033[0m"
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def main() -> None:
    """Console-script entry point: run the CLI, map errors to one message and an exit code."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    debug = "--debug" in sys.argv
    try:
        # one program name and completion variable whether started as the console script or
        # as `python -m sidusctl`
        cli.main(standalone_mode=False, prog_name="sidusctl", complete_var="_SIDUSCTL_COMPLETE")
    except click.exceptions.Abort as e:
        # click turns KeyboardInterrupt (SIGINT) into Abort; the context managers have run.
        if isinstance(e.__context__, KeyboardInterrupt):
            if debug:
                traceback.print_exception(e.__context__)
            _err("sidusctl: interrupted by SIGINT; cleaned up")
        else:
            _err("sidusctl: aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        _err("sidusctl: interrupted by SIGINT; cleaned up")
        sys.exit(130)
    except Interrupted as e:
        if debug:
            traceback.print_exc()
        _err(f"sidusctl: {e}")
        sys.exit(e.exit_code)
    except SidusError as e:
        if debug:
            traceback.print_exc()
        _err(f"sidusctl: error: {e}")
        sys.exit(e.exit_code)
    except Exception as e:
        signame = _interrupt_within(e)
        if signame is not None:
            # a signal that arrived while Python ran a hook that wraps what it raises (class
            # creation's __set_name__ in 3.11: RuntimeError), e.g. during a lazy import
            if debug:
                traceback.print_exc()
            _err(f"sidusctl: interrupted by {signame}; cleaned up")
            sys.exit(130)
        traceback.print_exc()
        _err("sidusctl: internal error (a bug: please report it with the traceback above)")
        sys.exit(70)


def _interrupt_within(e: BaseException) -> str | None:
    """The signal (``SIGINT``, ``SIGTERM``) whose exception caused ``e`` (its ``__cause__``
    and ``__context__`` chain), or None."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, Interrupted):
            return cur.signame
        if isinstance(cur, KeyboardInterrupt):
            return "SIGINT"
        cur = cur.__cause__ or cur.__context__
    return None


if __name__ == "__main__":
    main()
