"""Logging setup: one ``sidusctl`` logger tree; the CLI chooses the level and the handler.
Long-running servers write their log from a thread of its own (:func:`background`)."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import queue
from collections.abc import Iterator


def get_logger(name: str) -> logging.Logger:
    """The logger ``sidusctl.<name>``."""
    return logging.getLogger(f"sidusctl.{name}")


def setup(debug: bool = False, quiet: bool = False) -> None:
    """Log to stderr: debug with ``--debug``, warnings only with ``quiet``, else info."""
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    root = logging.getLogger("sidusctl")
    root.setLevel(level)
    if not root.handlers:
        sh = logging.StreamHandler()
        sh.setFormatter(logging.Formatter("sidusctl: %(levelname)s: %(message)s"))
        root.addHandler(sh)
    for h in root.handlers:
        h.setLevel(level)


class _QueueHandler(logging.handlers.QueueHandler):
    """A :class:`~logging.handlers.QueueHandler` that takes no lock of its own: putting on a
    :class:`queue.SimpleQueue` is thread-safe, and the record is prepared in the calling
    thread only. (The base class holds its handler lock around every put; hundreds of HTTP
    connection threads logging at once queued on that lock.)"""

    def handle(self, record: logging.LogRecord) -> bool:
        rv = self.filter(record)
        if rv:
            self.emit(record)
        return bool(rv)


@contextlib.contextmanager
def background() -> Iterator[None]:
    """While the block runs, the ``sidusctl`` logger's handlers write from a thread of their
    own (:class:`logging.handlers.QueueListener`): a thread that logs (the event loop
    answering DHCP and TFTP, an HTTP connection's thread) formats its record and queues it,
    and does not wait for the write to stderr nor for another thread's write. Every queued
    record is written before the block exits; the handlers are then put back."""
    root = logging.getLogger("sidusctl")
    handlers = list(root.handlers)
    if not handlers:
        yield
        return
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(q, *handlers, respect_handler_level=True)
    qh = _QueueHandler(q)
    for h in handlers:
        root.removeHandler(h)
    root.addHandler(qh)
    listener.start()
    try:
        yield
    finally:
        root.removeHandler(qh)
        listener.stop()
        for h in handlers:
            root.addHandler(h)
