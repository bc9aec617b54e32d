"""What a running serve-pxe holds and watches: one serve-pxe per state directory, TFTP root
and interface (:func:`claim`), and the files whose change reloads it (:class:`Watcher`).

Two serve-pxe on one state directory or one TFTP root overwrite each other's boot tree,
status and image holds; two on one interface both answer every DHCP request. :func:`claim`
refuses the second (:class:`BusyError`, exit 5) before it writes anything: an ``flock`` on
``<state>/serve/serve-pxe.lock`` and on ``<tftp root>/.sidusctl-serve.lock`` (:func:`hold_tree`),
and a Unix socket bound to the abstract name ``sidusctl-serve-pxe@<interface>`` (unix(7):
abstract names belong to the network namespace, so serve-pxe in other namespaces may use
interfaces of the same name). The kernel drops all three when the process ends, however it
ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from sidusctl.core.errors import BusyError
from sidusctl.core.log import get_logger
from sidusctl.core.state import FileLock

log = get_logger("serve.pxe")

#: the TFTP root's lock file, held while a serve-pxe serves the tree
SERVE_LOCK = ".sidusctl-serve.lock"


@contextlib.contextmanager
def claim(serve_dir: Path, interface: str) -> Iterator[None]:
    """Hold ``serve_dir`` (made if missing) and ``interface`` for one serve-pxe until the
    block ends. :class:`BusyError` naming what another serve-pxe holds (and its pid when the
    lock file has it); :class:`StateError` if the lock file cannot be made. Nothing is held
    after a refusal. The TFTP root is held by :func:`hold_tree`, once the configuration is
    known to be good (a refused one leaves no tree behind)."""
    with contextlib.ExitStack() as held:
        held.callback(_hold(serve_dir / "serve-pxe.lock",
                            f"the serve-pxe state {serve_dir}").release)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        held.callback(sock.close)
        try:
            sock.bind(f"\0sidusctl-serve-pxe@{interface}")
        except OSError as e:
            raise BusyError(f"interface {interface} is served by another serve-pxe in this "
                            f"network namespace ({e.strerror})",
                            hint="stop that serve-pxe first") from None
        yield


def hold_tree(tftp_root: Path) -> FileLock:
    """The lock on ``tftp_root`` (which must exist) held for one serve-pxe: release it when
    serving ends. :class:`BusyError` if another serve-pxe serves the tree; :class:`StateError`
    if the lock file cannot be opened."""
    return _hold(tftp_root / SERVE_LOCK, f"the TFTP root {tftp_root}")


def check_tree_free(tftp_root: Path, patience: float = 2.0) -> None:
    """:class:`BusyError` if a serve-pxe serves ``tftp_root`` (``pxe render`` must not
    replace its tree). The lock is taken and let go at once; another command doing the same
    holds it for an instant, serve-pxe for as long as it serves: the check retries for
    ``patience`` seconds before it answers busy. :class:`StateError` as :func:`hold_tree`."""
    deadline = time.monotonic() + patience
    while True:
        try:
            hold_tree(tftp_root).release()
            return
        except BusyError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _hold(path: Path, what: str) -> FileLock:
    lock = FileLock(path, what)
    try:
        return lock.acquire()
    except BusyError as e:
        raise BusyError(f"{e.message} (another serve-pxe serves it)",
                        hint="stop that serve-pxe, or give another --state-dir or "
                             "--tftp-root") from None


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _target(link: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return None


class Watcher:
    """A thread sending this process SIGHUP (a reload) when the inventory ``nodes`` changes
    (its mtime, size or inode) or when an image's ``current`` link (:attr:`links`, by image)
    leads elsewhere than the generation the last load used (:attr:`loaded`, by image).

    Made before the first load (the inventory's state then is its baseline), started once
    the servers run (:meth:`start`): an edit or a new generation during the start is
    reloaded at the first check, and so is a SIGHUP that arrived meanwhile (:meth:`hup`).
    A vanished inventory or image is said once (a warning): the servers keep the last good
    configuration."""

    def __init__(self, nodes: Path, links: Callable[[], Mapping[str, Path]],
                 loaded: Callable[[], Mapping[str, str]], interval: float = 1.0) -> None:
        self.nodes = nodes
        self.links = links
        self.loaded = loaded
        self.interval = interval
        self._last = _stat(nodes)
        self._pending = threading.Event()
        self._asked: dict[str, str | None] = {}
        self._stop = threading.Event()

    def hup(self, signum: int = 0, frame: object = None) -> None:
        """A SIGHUP before the servers handle it (a signal handler): reloaded at the first
        check."""
        self._pending.set()

    def start(self) -> threading.Thread:
        """Watch from now on, every ``interval`` seconds, until :meth:`stop`."""
        t = threading.Thread(target=self._loop, name="sidusctl-watch", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        """End the watching thread (at its next check)."""
        self._stop.set()

    def check(self) -> str | None:
        """One check: why a reload is due (and the state that asked for it recorded, so
        that one change asks once), or None."""
        why = None
        if self._pending.is_set():
            self._pending.clear()
            why = "SIGHUP during the start"
        now = _stat(self.nodes)
        if now != self._last:
            if now is None:
                log.warning("%s is gone: the last configuration stays in force", self.nodes)
            else:
                why = why or f"{self.nodes} changed"
            self._last = now
        loaded = self.loaded()
        for image, link in self.links().items():
            target = _target(link)
            if target == loaded.get(image):
                self._asked.pop(image, None)
                continue
            if image in self._asked and target == self._asked[image]:
                continue  # asked for already (a reload refused stays refused)
            self._asked[image] = target
            if target is None:
                log.warning("image '%s' has no current generation any more (%s): nodes get "
                            "what was served last", image, link)
            else:
                why = why or f"image '{image}' has a new generation ({target})"
        return why

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            why = self.check()
            if why is not None:
                log.info("%s: reloading", why)
                os.kill(os.getpid(), signal.SIGHUP)
