"""Typed reads of the JSON documents an image is made of (``index.json``, ``manifest.json``,
manifests, image configs): a field of the wrong JSON type is an :class:`ImageError` naming the
document, the key, what was found and what was expected, never a crash further on."""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar, overload

from sidusctl.oci import ImageError

T = TypeVar("T")

_NAMES: dict[type, tuple[str, str]] = {
    dict: ("a JSON object", "JSON objects"), list: ("a list", "lists"),
    str: ("a string", "strings"), int: ("an integer", "integers")}


def json_kind(value: Any) -> str:
    """How a parsed JSON ``value`` is named in an error: its JSON type, followed by the value
    itself when that is short (``a string ("linux/amd64")``, ``null``, ``a number (5)``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        name = "a boolean"
    elif isinstance(value, (int, float)):
        name = "a number"
    else:
        name = _NAMES.get(type(value), ("a " + type(value).__name__, ""))[0]
    text = json.dumps(value, ensure_ascii=True, default=str)
    return f"{name} ({text})" if len(text) <= 40 else name


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _wrong(where: str, key: str, value: Any, expected: str) -> ImageError:
    return ImageError(f"{where}: key '{key}': found {json_kind(value)} (expected {expected})")


@overload
def json_field(doc: dict[str, Any], key: str, kind: type[T], where: str, *, at: str = ...,
               items: type | None = ..., required: Literal[True]) -> T: ...


@overload
def json_field(doc: dict[str, Any], key: str, kind: type[T], where: str, *, at: str = ...,
               items: type | None = ..., required: bool = ...) -> T | None: ...


def json_field(doc: dict[str, Any], key: str, kind: type[T], where: str, *, at: str = "",
               items: type | None = None, required: bool = False) -> T | None:
    """``doc[key]`` checked to be a ``kind`` (``dict``, ``list``, ``str`` or ``int``; a boolean
    is no integer) and, for a list with ``items`` given, every element an ``items``. An absent
    or ``null`` field is None unless ``required``. ``where`` names the document (``SOURCE:
    index.json``), ``at`` the path of ``doc`` inside it (``manifests[0]``), so the error says
    ``key 'manifests[0].platform'``. Raises :class:`ImageError` naming where, the key, what
    was found and what was expected."""
    name = f"{at}.{key}" if at else key
    what = _NAMES[kind][0] if items is None else f"a list of {_NAMES[items][1]}"
    value = doc.get(key)
    if value is None:
        if required:
            raise ImageError(f"{where}: key '{name}' is missing (expected {what})")
        return None
    if not _is(value, kind):
        raise _wrong(where, name, value, what)
    if items is not None:
        for i, item in enumerate(value):
            if not _is(item, items):
                raise _wrong(where, f"{name}[{i}]", item, _NAMES[items][0])
    out: T = value
    return out


def index_manifests(doc: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The ``manifests`` list of an image index / Docker manifest list ``doc`` (image-spec
    ``image-index.md``), every descriptor checked: a JSON object whose ``digest`` and
    ``mediaType`` are strings and whose ``platform`` (with string ``os``, ``architecture``,
    ``variant``) and ``annotations`` are objects, when present. :class:`ImageError` naming
    ``where`` and the key (``manifests[1].platform``) otherwise, or if the list is missing."""
    mans: list[Any] = json_field(doc, "manifests", list, where, items=dict, required=True)
    for i, d in enumerate(mans):
        at = f"manifests[{i}]"
        for k in ("digest", "mediaType"):
            json_field(d, k, str, where, at=at)
        json_field(d, "annotations", dict, where, at=at)
        plat = json_field(d, "platform", dict, where, at=at)
        for k in ("os", "architecture", "variant"):
            if plat is not None:
                json_field(plat, k, str, where, at=f"{at}.platform")
    return mans
