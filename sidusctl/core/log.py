"""Logging setup: one ``sidusctl`` logger tree; the CLI chooses the level and the handler.
Long-running servers write their log from a thread of its own (:func:`background`)."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import queue
import threading
import time
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


#: seconds the writer thread lets records gather after the first of a batch: in a storm,
#: one wake-up and one write per batch, not per line
BATCH_WAIT = 0.05


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

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """The message merged with its arguments now (they may change once the call
        returns), in place: without a traceback to render, neither the base class's
        formatting of the whole record nor its copy of it is needed (the record is not used
        by the caller again)."""
        if record.exc_info or record.stack_info:
            full: logging.LogRecord = super().prepare(record)  # the traceback as text
            return full
        record.message = record.msg = record.getMessage()
        record.args = None
        return record


class _Writer:
    """The thread that hands the queued records to the handlers, a batch at a time: it waits
    for a record, lets more gather for :data:`BATCH_WAIT` seconds, then writes all of them,
    with one ``write`` and one flush per :class:`logging.StreamHandler` for the whole batch.
    (:class:`logging.handlers.QueueListener` wakes for every record and each of its writes
    is a system call: in a 500-node storm, thousands of wake-ups contending with the
    connection threads for the interpreter lock.) Idle, it sleeps until the next record."""

    _STOP = logging.makeLogRecord({"msg": "stop"})

    def __init__(self, q: queue.SimpleQueue[logging.LogRecord],
                 handlers: list[logging.Handler]) -> None:
        self.q = q
        self.handlers = handlers
        self.thread = threading.Thread(target=self._run, name="sidusctl-log", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        self.q.put(self._STOP)
        self.thread.join()

    def _run(self) -> None:
        while True:
            batch = [self.q.get()]
            if batch[0] is not self._STOP:
                time.sleep(BATCH_WAIT)
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self.q.get_nowait())
            stop = any(r is self._STOP for r in batch)
            self.write([r for r in batch if r is not self._STOP])
            if stop:
                return

    def write(self, batch: list[logging.LogRecord]) -> None:
        for h in self.handlers:
            mine = [r for r in batch if r.levelno >= h.level]
            if not mine:
                continue
            if type(h) is not logging.StreamHandler:  # a file, syslog...: its own emit
                for r in mine:
                    h.handle(r)
                continue
            lines = [h.format(r) for r in mine if h.filter(r)]
            try:
                with h.lock or contextlib.nullcontext():
                    h.stream.write(h.terminator.join(lines) + h.terminator)
                    h.flush()
            except Exception:  # as StreamHandler.emit: reported, the server goes on
                h.handleError(mine[0])


@contextlib.contextmanager
def background() -> Iterator[None]:
    """While the block runs, the ``sidusctl`` logger's handlers write from a thread of their
    own (:class:`_Writer`, in batches): a thread that logs (the event loop answering DHCP
    and TFTP, an HTTP connection's thread) merges its message and queues the record, and
    does not wait for the write to stderr nor for another thread's write. Lines reach the
    handlers up to :data:`BATCH_WAIT` seconds later. Every queued record is written before
    the block exits; the handlers are then put back."""
    root = logging.getLogger("sidusctl")
    handlers = list(root.handlers)
    if not handlers:
        yield
        return
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = _Writer(q, handlers)
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
