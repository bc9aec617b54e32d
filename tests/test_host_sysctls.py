"""Host sysctls raised for many containers (fs.inotify.*, sidusctl/subsys/lxc.py HOST_SYSCTLS):
logged at info before the change, the previous values recorded in the vnode store's state.json,
and restored by ``vnode deinit``, but only where the host still holds the value we set.

Real writes to /proc/sys (root). To stay harmless for anything else running on the host, the
tests only ever move a limit between the wanted value minus one and the wanted value (or
above it), and put the original values back in a ``finally``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidusctl.subsys import lxc
from sidusctl.vnode.store import State, Store
from tests.conftest import sidusctl

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="writes /proc/sys (root)")

KEY = "fs/inotify/max_user_instances"
WANT = lxc.HOST_SYSCTLS[KEY]
PROC = Path("/proc/sys")


def _get(key: str) -> int:
    return int((PROC / key).read_text().split()[0])


def _set(key: str, value: int) -> None:
    (PROC / key).write_text(f"{value}\n")


@pytest.fixture
def host_sysctls() -> Iterator[dict[str, int]]:
    """The original values, written back after the test whatever happens; the other limits
    are left at or above what we want, so that only ``KEY`` is raised here."""
    orig = {k: _get(k) for k in lxc.HOST_SYSCTLS}
    try:
        for k, want in lxc.HOST_SYSCTLS.items():
            if k != KEY and orig[k] < want:
                _set(k, want)
        yield orig
    finally:
        for k, v in orig.items():
            _set(k, v)


class _SeesValueAtEmit(logging.Handler):
    """Records (message, value of KEY when the record was emitted): proves 'log, then act'."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: list[tuple[str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.getMessage(), _get(KEY)))


def test_init_raises_logs_first_records_and_deinit_restores(tmp_path: Path,
                                                           host_sysctls: dict[str, int]) -> None:
    _set(KEY, WANT - 1)
    store = Store(tmp_path / "state")
    h = _SeesValueAtEmit()
    logger = logging.getLogger("sidusctl")
    old_level = logger.level
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
    try:
        with store.transaction() as st:
            store.init(st)
        assert _get(KEY) == WANT
        name = KEY.replace("/", ".")
        raised = [(m, v) for m, v in h.seen if m.startswith(f"raising host sysctl {name}")]
        assert raised == [(f"raising host sysctl {name} from {WANT - 1} to {WANT} (many "
                           "containers; restored by 'sidusctl vnode deinit')", WANT - 1)]
        saved = json.loads(store.state_file.read_text())["store"]["host_sysctls"]
        assert saved == {KEY: {"before": WANT - 1, "set": WANT}}

        # every start calls ready(): nothing more to raise, the record is kept as it was
        with store.transaction() as st:
            store.ready(st)
            store.init(st)  # a second init keeps the record too
        assert json.loads(store.state_file.read_text())["store"]["host_sysctls"] == saved

        with store.transaction() as st:
            store.deinit(st)
        assert _get(KEY) == WANT - 1
        assert "host_sysctls" not in json.loads(store.state_file.read_text())["store"]
        assert any(m == f"restoring host sysctl {name} from {WANT} to {WANT - 1}"
                   for m, _ in h.seen)
    finally:
        logger.removeHandler(h)
        logger.setLevel(old_level)


def test_deinit_leaves_a_value_someone_else_changed(tmp_path: Path,
                                                    host_sysctls: dict[str, int]) -> None:
    _set(KEY, WANT - 1)
    store = Store(tmp_path / "state")
    with store.transaction() as st:
        store.init(st)
    assert _get(KEY) == WANT
    _set(KEY, WANT + 7)  # an administrator raised it further meanwhile
    with store.transaction() as st:
        store.deinit(st)
    assert _get(KEY) == WANT + 7


def test_nothing_recorded_when_nothing_raised(tmp_path: Path,
                                              host_sysctls: dict[str, int]) -> None:
    _set(KEY, WANT + 1)
    st = State.from_dict({})
    Store(tmp_path / "state").init(st)
    assert "host_sysctls" not in st.store and _get(KEY) == WANT + 1


def test_cli_vnode_init_then_deinit_restores(tmp_path: Path,
                                             host_sysctls: dict[str, int]) -> None:
    _set(KEY, WANT - 1)
    state = tmp_path / "state"
    r = sidusctl("vnode", "init", state=state, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _get(KEY) == WANT
    assert f"raising host sysctl {KEY.replace('/', '.')} from {WANT - 1} to {WANT}" in r.stderr
    st = json.loads((state / "vnode" / "state.json").read_text())
    assert st["store"]["host_sysctls"] == {KEY: {"before": WANT - 1, "set": WANT}}
    r = sidusctl("vnode", "deinit", state=state, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _get(KEY) == WANT - 1
