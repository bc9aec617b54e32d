"""CLI: ``sidusctl completion bash|zsh|fish`` and ``sidusctl man --out DIR``.

Both are generated from the click command tree itself, so they never drift from the code:

- completion is click's own mechanism (the shell calls ``sidusctl`` back with
  ``_SIDUSCTL_COMPLETE=<shell>_complete``); this command only prints the script that does it.
- man pages: a small roff writer over click's Command/Group objects (no extra dependency:
  ``click-man`` is unmaintained). One page per top-level command, ``sidusctl.1`` for the
  top level; a group's page documents each of its subcommands in its own subsection.
"""

from __future__ import annotations

import datetime
import inspect
import os
import re
from collections.abc import Iterator
from pathlib import Path

import click
from click.shell_completion import get_completion_class

from sidusctl import __version__
from sidusctl.cli.common import emit_json
from sidusctl.core.errors import ConfigError

PROG = "sidusctl"
COMPLETE_VAR = "_SIDUSCTL_COMPLETE"
SHELLS = ("bash", "zsh", "fish")

# Environment variables read by sidusctl, for the ENVIRONMENT section of sidusctl(1).
ENVIRONMENT = (
    ("SIDUSCTL_STATE", "State directory when --state-dir is not given (default "
                       "/var/lib/sidusctl)."),
    ("SIDUSCTL_IMAGES", "Colon-separated folders searched for IMAGE/image.toml before the "
                        "shipped images."),
    ("SIDUSCTL_CACHE", "Shared .deb cache of sidusctl build (default <state>/cache/apt)."),
    (COMPLETE_VAR, "Set by the shell completion scripts (see sidusctl completion)."),
)


# -- completion --------------------------------------------------------------------------------

def completion_script(root: click.Command, shell: str) -> str:
    """The completion script for ``shell`` (``bash``, ``zsh`` or ``fish``), as click writes it
    for the program ``sidusctl``. Raises :class:`click.BadParameter` for another shell."""
    cls = get_completion_class(shell)
    if cls is None:
        raise click.BadParameter(f"unsupported shell {shell!r}", param_hint="SHELL")
    return cls(root, {}, PROG, COMPLETE_VAR).source()


@click.command("completion")
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion_cmd(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
    bash:  eval "$(sidusctl completion bash)"      (in ~/.bashrc), or
           sidusctl completion bash > /etc/bash_completion.d/sidusctl
    zsh:   eval "$(sidusctl completion zsh)"       (in ~/.zshrc)
    fish:  sidusctl completion fish > ~/.config/fish/completions/sidusctl.fish
    """
    script = completion_script(ctx.find_root().command, shell)
    click.echo(script, nl=not script.endswith("\n"))


# -- man pages ---------------------------------------------------------------------------------

def _esc(text: str) -> str:
    """Escape ``text`` for a roff text line or macro argument (no line-start handling)."""
    return text.replace("\\", "\\e").replace("-", "\\-")


def _lines(text: str) -> list[str]:
    """roff lines for one paragraph's worth of plain lines: escaped, never starting with a
    control character, never empty."""
    out = []
    for line in text.splitlines():
        line = line.rstrip()
        if not line:
            continue
        line = _esc(line)
        out.append("\\&" + line if line[0] in ".'" else line)
    return out


def _help_roff(text: str | None) -> list[str]:
    """A click help text as roff: paragraphs (``.PP``), ``\\b`` paragraphs kept verbatim
    (``.nf``/``.fi``), everything after ``\\f`` dropped (click's own rules)."""
    if not text:
        return []
    text = inspect.cleandoc(text).split("\f")[0]
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        out.append(".PP")
        if para.lstrip().startswith("\b"):
            out += [".nf", *_lines(para.lstrip()[1:].lstrip("\n")), ".fi"]
        else:
            out += _lines(" ".join(line.strip() for line in para.splitlines()))
    return out


def _options_roff(cmd: click.Command, ctx: click.Context) -> list[str]:
    out: list[str] = []
    for param in cmd.get_params(ctx):
        if isinstance(param, click.Argument):  # shown in the synopsis
            continue
        rec = param.get_help_record(ctx)
        if rec is None:
            continue
        opts, help_text = rec
        out += [".TP", f"\\fB{_esc(opts)}\\fR"]
        out += _lines(" ".join(help_text.split())) if help_text.strip() else []
    return out


def _synopsis(cmd: click.Command, ctx: click.Context) -> list[str]:
    return [".nf", f"\\fB{_esc(ctx.command_path)}\\fR "
            + _esc(" ".join(cmd.collect_usage_pieces(ctx))), ".fi"]


def _subcommands(group: click.Group, ctx: click.Context) -> Iterator[tuple[click.Command,
                                                                           click.Context]]:
    """Every visible subcommand of ``group`` (recursively, depth first), with its context."""
    for name in group.list_commands(ctx):
        sub = group.get_command(ctx, name)
        if sub is None or sub.hidden:
            continue
        sub_ctx = click.Context(sub, info_name=name, parent=ctx)
        yield sub, sub_ctx
        if isinstance(sub, click.Group):
            yield from _subcommands(sub, sub_ctx)


def _page_name(ctx: click.Context) -> str:
    return ctx.command_path.replace(" ", "-")


def _header(ctx: click.Context, short: str, date: str) -> list[str]:
    name = _page_name(ctx)
    return [f'.TH "{_esc(name.upper())}" "1" "{date}" "sidusctl {__version__}" '
            '"sidusctl manual"',
            ".SH NAME", f"{_esc(name)} \\- {_esc(short)}" if short else _esc(name)]


def _man_date() -> str:
    """``$SOURCE_DATE_EPOCH`` (reproducible builds: seconds since 1970-01-01 UTC, a decimal
    integer) or today, as YYYY-MM-DD. :class:`ConfigError` for a value that is not such a
    date."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    try:
        when = datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
    except (ValueError, OverflowError, OSError):
        raise ConfigError("$SOURCE_DATE_EPOCH", None, f"found {epoch!r}",
                          expected="seconds since 1970-01-01 UTC, such as 1700000000 "
                                   "(reproducible-builds.org)") from None
    return when.strftime("%Y-%m-%d")


def _command_page(cmd: click.Command, ctx: click.Context, date: str) -> str:
    """The page of one top-level command (a group's page documents every subcommand)."""
    out = _header(ctx, cmd.get_short_help_str(limit=80), date)
    out += [".SH SYNOPSIS", *_synopsis(cmd, ctx)]
    out += [".SH DESCRIPTION", *_help_roff(cmd.help)]
    opts = _options_roff(cmd, ctx)
    if opts:
        out += [".SH OPTIONS", *opts]
    if isinstance(cmd, click.Group):
        out.append(".SH COMMANDS")
        for sub, sub_ctx in _subcommands(cmd, ctx):
            out += [f'.SS "{_esc(sub_ctx.command_path)}"', *_synopsis(sub, sub_ctx),
                    *_help_roff(sub.help)]
            sub_opts = _options_roff(sub, sub_ctx)
            if sub_opts:
                out += [".PP", "Options:", ".RS", *sub_opts, ".RE"]
    out += [".SH SEE ALSO", f"\\fB{PROG}\\fR(1)"]
    return "\n".join(out) + "\n"


def _root_page(root: click.Group, ctx: click.Context, pages: list[str], date: str) -> str:
    out = _header(ctx, root.get_short_help_str(limit=80), date)
    out += [".SH SYNOPSIS", *_synopsis(root, ctx)]
    out += [".SH DESCRIPTION", *_help_roff(root.help), ".SH OPTIONS", *_options_roff(root, ctx)]
    out.append(".SH COMMANDS")
    for name in root.list_commands(ctx):
        cmd = root.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        out += [".TP", f"\\fB{_esc(name)}\\fR", *_lines(cmd.get_short_help_str(limit=120)),
                f"See \\fB{_esc(f'{PROG}-{name}')}\\fR(1)."]
    out.append(".SH ENVIRONMENT")
    for var, text in ENVIRONMENT:
        out += [".TP", f"\\fB{_esc(var)}\\fR", *_lines(text)]
    out += [".SH SEE ALSO", ",\n".join(f"\\fB{_esc(p)}\\fR(1)" for p in pages)]
    return "\n".join(out) + "\n"


def man_pages(root: click.Group, date: str | None = None) -> dict[str, str]:
    """Every man page of ``root`` (the ``sidusctl`` group): ``{"sidusctl.1": roff,
    "sidusctl-build.1": roff, ...}``, one per visible top-level command. ``date`` (YYYY-MM-DD)
    defaults to ``$SOURCE_DATE_EPOCH`` or today. Imports every command module (lazy groups load
    on ``get_command``)."""
    date = date or _man_date()
    ctx = click.Context(root, info_name=PROG)
    pages: dict[str, str] = {}
    for name in root.list_commands(ctx):
        cmd = root.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        sub_ctx = click.Context(cmd, info_name=name, parent=ctx)
        pages[f"{_page_name(sub_ctx)}.1"] = _command_page(cmd, sub_ctx, date)
    see_also = [p.removesuffix(".1") for p in pages]
    return {f"{PROG}.1": _root_page(root, ctx, see_also, date), **pages}


@click.command("man")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write the pages to (created if missing).")
@click.option("--json", "as_json", is_flag=True, help="Print the files written as JSON.")
@click.pass_context
def man_cmd(ctx: click.Context, out: Path, as_json: bool) -> None:
    """Write the man pages (roff, section 1) generated from the command tree to --out:
    sidusctl.1 and one sidusctl-COMMAND.1 per command. Read one with man -l FILE."""
    root = ctx.find_root().command
    if not isinstance(root, click.Group):  # pragma: no cover - the root is the sidusctl group
        raise click.UsageError("man: the root command is not a group")
    pages = man_pages(root)  # before anything is written: it checks $SOURCE_DATE_EPOCH
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for fname, text in pages.items():
            (out / fname).write_text(text)
            written.append(str(out.absolute() / fname))
    except OSError as e:
        raise ConfigError("--out", None, f"cannot write the pages to {out}: {e.strerror}",
                          expected="a directory this user can write") from None
    if as_json:
        emit_json({"out": str(out.absolute()), "pages": written})
    else:
        for p in written:
            click.echo(p)


def register(cli: click.Group) -> None:
    """Add completion and man to the top-level group."""
    cli.add_command(completion_cmd)
    cli.add_command(man_cmd)
