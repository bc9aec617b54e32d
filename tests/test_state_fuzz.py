"""Fuzz: the state files sidusctl reads back (serve-pxe's ``serve/status.json``, the vnode
store's ``vnode/state.json``), damaged at random, never give an internal error. A valid file of
each kind is taken, one of its values (at any depth) is replaced by a random JSON value, and
the readers run in-process: the status commands through the real click group (``serve
status``, ``pxe status``, each also with ``--json``, and the ``--watch`` table) and the vnode
store's :meth:`State.from_dict`. Each either succeeds or raises one of sidusctl's own errors
(a StateError naming the file); any other exception is a bug and fails the test."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidusctl.cli.main import cli
from sidusctl.core.errors import SidusError, StateError
from sidusctl.core.state import read_json
from sidusctl.vnode.limits import cgroup_settings
from sidusctl.vnode.store import State

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8)

_NODE = {"name": "n1", "mac": "52:54:00:00:00:01", "ip": "10.0.0.5", "group": None,
         "image": "minimal", "stage": "booted",
         "stages": {"dhcp": 1.0, "files": 2.0, "kernel": 3.0, "root": 4.0, "booted": 5.0},
         "files": ["ipxe/52-54-00-00-00-01.ipxe", "vmlinuz-minimal"], "addresses": [],
         "dhcp": "10.0.0.5", "root": "squashfs-http", "generation": "gen-1", "booted": True}
STATUS = {"pid": 1, "started": 1.0, "updated": time.time(), "internal_errors": 0,
          "dhcp": {"acks": 3, "offers": 3}, "tftp": {"transfers": 2}, "dns": None,
          "http": {"requests": 5},
          "clients": {"52:54:00:00:00:01": {"ack": "10.0.0.5", "at": 1.0}},
          "pxe": {"nodes": [_NODE, {**_NODE, "name": "n2", "mac": "52:54:00:00:00:02",
                                    "ip": "10.0.0.6", "stage": "dhcp", "booted": False}]}}

VNODE_STATE = {
    "version": 1, "hashes": {"p:1:2": "ab"}, "store": {},
    "vnetworks": {"vnet": {"name": "vnet", "cidr": "10.144.0.0/24", "gateway": "10.144.0.254"}},
    "vnodes": {"a": {"name": "a", "image": "minimal", "fs": "cow", "state": "READY",
                     "ifaces": [{"name": "if0", "vnetwork": "vnet", "address": "10.144.0.1"}],
                     "mem": {"mem": 512, "hierarchy": 1}, "cpus": 0.5, "cpuset": "0",
                     "io": [{"device": "/dev/loop0", "read_bps": 1048576}]}}}


def _paths(doc: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place a value sits in ``doc``: dict keys and list indexes, from the top."""
    out = [at]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*at, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*at, i))
    return out


def _damage(doc: Any, where: int, value: Any) -> Any:
    """``doc`` with the value at its ``where``-th place (mod their number) replaced."""
    doc = copy.deepcopy(doc)
    places = _paths(doc)
    at = places[where % len(places)]
    if not at:
        return value
    parent = doc
    for k in at[:-1]:
        parent = parent[k]
    parent[at[-1]] = value
    return doc


def _no_internal_error(args: list[str], state: Path) -> None:
    res = CliRunner().invoke(cli, ["--state-dir", str(state), *args], catch_exceptions=True)
    exc = res.exception
    assert exc is None or isinstance(exc, (SidusError, SystemExit)), (args, repr(exc))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.integers(0, 10**6), value=_JSON)
def test_a_damaged_status_file_gives_no_internal_error(tmp_path: Path, where: int,
                                                       value: Any) -> None:
    path = tmp_path / "serve" / "status.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_damage(STATUS, where, value)))
    for args in (["serve", "status"], ["serve", "status", "--json"], ["pxe", "status"],
                 ["pxe", "status", "--json"],
                 ["pxe", "status", "--watch", "--count", "1", "--interval", "0.2"]):
        _no_internal_error(args, tmp_path)


@settings(max_examples=200, deadline=None)
@given(where=st.integers(0, 10**6), value=_JSON)
def test_a_damaged_vnode_state_is_read_or_refused_as_such(where: int, value: Any) -> None:
    doc = _damage(VNODE_STATE, where, value)
    with contextlib.suppress(SidusError):
        st = State.from_dict(doc, "state.json")
        for vn in st.vnodes.values():  # what a start computes from a vnode read back
            cgroup_settings(vn)


def test_the_valid_documents_are_read(tmp_path: Path) -> None:
    """The fuzz starts from files the readers accept (so a damage is what they refuse)."""
    State.from_dict(copy.deepcopy(VNODE_STATE), "state.json")
    path = tmp_path / "serve" / "status.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(STATUS))
    for args in (["serve", "status"], ["pxe", "status", "--json"]):
        res = CliRunner().invoke(cli, ["--state-dir", str(tmp_path), *args])
        assert res.exit_code == 0, (args, res.output, res.exception)


#: values no random draw above reaches: an integer too large for a C long (kill(2)'s pid) and
#: one too large for a float, a pid kill(2) takes for a process group, NaN and infinity, and
#: nesting deeper than the JSON decoder's recursion limit
_EXTREME: tuple[Any, ...] = (10**30, 10**400, 0, -1, float("nan"), float("inf"))
_DEEP = "[" * 200000


def test_extreme_values_anywhere_give_no_internal_error_in_pxe_status(tmp_path: Path) -> None:
    """Each place of a valid status file, in turn, given each of :data:`_EXTREME`; and a file
    nested too deeply: ``pxe status`` (text and ``--json``; ``--watch`` sleeps, so it is left
    to tests/test_status_bad_input.py) shows it or refuses it as a damaged file."""
    path = tmp_path / "serve" / "status.json"
    path.parent.mkdir(parents=True)
    docs = [json.dumps(_damage(STATUS, where, value))
            for where in range(len(_paths(STATUS))) for value in _EXTREME]
    for doc in [*docs, _DEEP]:
        path.write_text(doc)
        for args in (["pxe", "status"], ["pxe", "status", "--json"]):
            _no_internal_error(args, tmp_path)


def test_read_json_refuses_a_file_nested_too_deeply(tmp_path: Path) -> None:
    f = tmp_path / "state.json"
    f.write_text(_DEEP)
    with pytest.raises(StateError, match=f"{f}: unreadable state file.*nested too deeply"):
        read_json(f)
