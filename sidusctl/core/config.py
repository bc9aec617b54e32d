"""The typed configuration layer every user file goes through (recipes, the node inventory,
platform files, reservations): a TOML line mapper (:class:`Lines`), the base model
(:class:`Frozen`: frozen, unknown keys refused, strict types), and :class:`Checker`, which
validates data into pydantic models and turns *every* problem -- TOML syntax, each pydantic
``ValidationError`` entry, and the cross-field checks the callers add -- into a
:class:`~sidusctl.core.errors.ConfigError` (file, line, key, what was found, what was expected),
all raised together as :class:`~sidusctl.core.errors.ConfigErrors` (CLI exit code 2).

Messages read ``nodes.toml:12: key 'nodes[1].mac': found 'zz' (expected a MAC address such as
52:54:00:12:34:56)``. Custom validators raise ``ValueError(<what is expected>)``: its text
becomes the ``expected`` part.
"""

from __future__ import annotations

import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from sidusctl.core.errors import ConfigError, ConfigErrors

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


class Frozen(BaseModel):
    """Base of every model of a user file: immutable, unknown keys refused, no coercion
    (TOML already gives native types; ``"1"`` is not an integer, ``1`` is not ``true``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


def as_tuple(v: object) -> object:
    """A list (what TOML gives for an array) as a tuple, for the frozen models' tuple fields
    under strict mode; anything else unchanged, for the field's own validation to judge."""
    return tuple(v) if isinstance(v, list) else v


Tup = Annotated[tuple[str, ...], BeforeValidator(as_tuple)]
"""A TOML array of strings, kept as a tuple (strict mode takes no list for a tuple)."""


# -- line numbers ------------------------------------------------------------------------------

_HEADER_RE = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"""^\s*((?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+)(?:\s*\.\s*(?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+))*)\s*=""")
_PART_RE = re.compile(r""""([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+)""")


def _parts(dotted: str) -> list[str]:
    return [a or b or c for a, b, c in _PART_RE.findall(dotted)]


class Lines:
    """Finds the line of any key path in TOML text (tomllib keeps no positions):
    ``("network", "subnet")``, ``("nodes", 3, "mac")`` (arrays of tables counted, nested ones
    too), ``("vnodes", 0, "mem", "mem")`` (inside an inline table: the line of ``mem``). A path
    not written in the file resolves to its longest written prefix (a missing key: its table's
    header); None if not even the first key is there."""

    def __init__(self, text: str) -> None:
        self.where: dict[Loc, int] = {}
        arrays: dict[tuple[str, ...], int] = {}  # array-of-tables name path -> current index
        table: Loc = ()
        in_multiline = False
        for n, line in enumerate(text.splitlines(), 1):
            if line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1:
                in_multiline = not in_multiline
                if not in_multiline:
                    continue
            if in_multiline and not _KEY_RE.match(line):
                continue
            h = _HEADER_RE.match(line)
            if h and not _KEY_RE.match(line):
                names = _parts(h.group(2))
                resolved: list[str | int] = []
                for i, name in enumerate(names):
                    resolved.append(name)
                    key = tuple(names[: i + 1])
                    last = i == len(names) - 1
                    if last and h.group(1) == "[[":
                        arrays[key] = arrays.get(key, -1) + 1
                        # a new parent element restarts its nested arrays
                        for k in [k for k in arrays if len(k) > len(key) and k[: len(key)] == key]:
                            del arrays[k]
                        resolved.append(arrays[key])
                    elif key in arrays:
                        resolved.append(arrays[key])
                table = tuple(resolved)
                self.where.setdefault(table, n)
                continue
            km = _KEY_RE.match(line)
            if km:
                path = (*table, *_parts(km.group(1)))
                self.where.setdefault(path, n)
                for i in range(len(table) + 1, len(path)):
                    self.where.setdefault(path[:i], n)

    def line(self, loc: Sequence[str | int]) -> int | None:
        """The line of ``loc`` or of its longest written prefix (see the class doc)."""
        path = tuple(loc)
        while path:
            if path in self.where:
                return self.where[path]
            path = path[:-1]
        return None


# -- keys, found, expected ---------------------------------------------------------------------

def key_name(loc: Sequence[str | int]) -> str:
    """``("nodes", 1, "mac")`` -> ``nodes[1].mac``."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


_EXPECT = {
    "string_type": "a string", "int_type": "an integer", "int_parsing": "an integer",
    "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
    "bool_parsing": "true or false", "list_type": "a list", "tuple_type": "a list",
    "dict_type": "a table", "model_type": "a table", "model_attributes_type": "a table",
    "missing": None, "extra_forbidden": None,
}


def _expected(err: Mapping[str, Any]) -> str:
    typ = str(err.get("type", ""))
    ctx = err.get("ctx") or {}
    if typ in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if typ == "literal_error" and "expected" in ctx:
        return "one of " + str(ctx["expected"]).replace(" or ", ", ")
    if _EXPECT.get(typ):
        return str(_EXPECT[typ])
    for bound, word in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if bound in ctx:
            return f"a number {word} {ctx[bound]}"
    return str(err.get("msg", "a valid value"))


def _found(v: object) -> str:
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, bool):
        return "true" if v else "false"
    r = repr(v)
    kind = type(v).__name__
    return f"{kind} {r}" if not isinstance(v, str) else r


def _unwrap(tp: Any) -> Any:
    """``tp`` without ``Annotated`` and without an optional's ``None``; None if it is a union
    of several types."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return None
            tp = args[0]
        else:
            return tp


def _fields(model: type[BaseModel] | None, loc: Sequence[str | int]) -> list[str] | None:
    """The keys allowed in the table at ``loc`` below ``model`` (best effort: None where the
    type there is not one model)."""
    tp: Any = model
    for p in loc:
        tp = _unwrap(tp)
        if isinstance(p, int):
            targs = typing.get_args(tp)
            if not targs:
                return None
            tp = targs[0]
        elif isinstance(tp, type) and issubclass(tp, BaseModel) and p in tp.model_fields:
            tp = tp.model_fields[p].annotation
        elif typing.get_origin(tp) in (dict, Mapping):
            tp = typing.get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [f.alias or n for n, f in tp.model_fields.items()]
    return None


# -- the checker -------------------------------------------------------------------------------

class Checker:
    """Collects every problem of one user file. ``file`` names it in messages; ``text`` (the
    TOML source) gives line numbers. :meth:`validate` returns the model or None (its problems
    recorded), :meth:`error` records a cross-field problem, :meth:`done` raises
    :class:`ConfigErrors` if anything was recorded (sorted by line)."""

    def __init__(self, file: str, text: str = "") -> None:
        self.file = file
        self.lines = Lines(text)
        self.errors: list[ConfigError] = []

    def line(self, loc: Sequence[str | int]) -> int | None:
        """The line number (from 1) of the key path ``loc`` in ``text``, or of its longest written
        prefix; None if not even its first key is there (see :class:`Lines`)."""
        return self.lines.line(loc)

    def error(self, loc: Sequence[str | int] | str | None, problem: str,
              expected: str | None = None, *, line: int | None = None,
              label: str | None = None) -> None:
        """Record a problem at ``loc`` (a key path, or a dotted string shown as is); ``label``
        replaces the shown key; ``line`` overrides the looked-up one."""
        if isinstance(loc, str) or loc is None:
            key = label or loc
            ln = line
        else:
            key = label or key_name(loc)
            ln = line if line is not None else self.line(loc)
        self.errors.append(ConfigError(self.file, key or None, problem, expected=expected,
                                       line=ln))

    def validate(self, model: type[M], data: object, loc: Loc = (), *,
                 label: Sequence[str | int] | None = None,
                 context: dict[str, Any] | None = None) -> M | None:
        """``model.model_validate(data)``; each error is recorded at ``loc`` + its own ``loc``
        (shown with ``label`` instead of ``loc`` if given). None if anything failed."""
        try:
            return model.model_validate(data, context=context)
        except ValidationError as e:
            for err in e.errors(include_url=False):
                self.add_pydantic(err, loc, label=label, model=model)
            return None

    def add_pydantic(self, err: Mapping[str, Any], loc: Loc = (), *,
                     label: Sequence[str | int] | None = None,
                     model: type[BaseModel] | None = None) -> None:
        """Record one entry of ``ValidationError.errors()``."""
        own = tuple(p for p in err.get("loc", ()) if isinstance(p, int)
                    or not (("[" in p and "]" in p) or p.startswith("function-")))
        full = (*loc, *own)
        shown = key_name((*(label if label is not None else loc), *own))
        typ = err.get("type")
        if typ == "missing":
            self.error(full, "missing", _EXPECT.get("missing") or None, label=shown,
                       line=self.line(full[:-1]) if full else None)
        elif typ == "extra_forbidden":
            allowed = _fields(model, own[:-1])
            self.error(full, "unknown key",
                       "one of " + ", ".join(allowed) if allowed else None, label=shown)
        else:
            self.error(full, f"found {_found(err.get('input'))}", _expected(err), label=shown)

    def done(self) -> None:
        """Raise :class:`ConfigErrors` (in file order, line-less problems first) if any."""
        if self.errors:
            raise ConfigErrors(sorted(self.errors, key=lambda e: e.line or 0))


def parse_toml(text: str, file: str) -> dict[str, Any]:
    """``tomllib.loads`` with a syntax error as :class:`ConfigErrors` naming file and line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        # tomllib says "at end of document" for what runs to the end (an unclosed string or
        # list): the last line
        line = int(m.group(1)) if m else max(1, len(text.splitlines()))
        raise ConfigErrors([ConfigError(file, None, f"not valid TOML: {e}", line=line)]) from e


def read_text(path: object, what: str = "file") -> str:
    """The text of a user file; :class:`ConfigErrors` if it is missing or unreadable."""
    from pathlib import Path

    p = Path(str(path))
    try:
        return p.read_text()
    except FileNotFoundError as e:
        raise ConfigErrors([ConfigError(str(p), None, f"no such {what}")]) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigErrors([ConfigError(str(p), None, f"cannot read: {e}")]) from e


def load_toml(text: str, model: type[M], file: str, *,
              context: dict[str, Any] | None = None) -> M:
    """Validate TOML ``text`` into ``model``: every problem (syntax, each field) raised at once
    as :class:`ConfigErrors`, each with file and line."""
    data = parse_toml(text, file)
    c = Checker(file, text)
    out = c.validate(model, data, context=context)
    c.done()
    assert out is not None
    return out

