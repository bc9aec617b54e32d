"""The listening socket and the worker threads of :mod:`sidusctl.serve.http`.

Each idle worker blocks in ``accept`` on the listening socket itself (the kernel hands a new
connection to one of them), serves that connection to its end through the server's
``handle`` callback, and waits again: no thread of its own accepts and hands over, and a small
request wakes one thread. When the last idle worker takes a connection, :data:`SPAWN_BATCH`
more are started, up to a cap (past it, connections wait in the listen backlog). A worker
that has waited :data:`IDLE_RETIRE` seconds without a connection ends while more than
:data:`INITIAL_WORKERS` are idle: after a storm of hundreds, the pool shrinks back (as
Apache's ``MaxSpareThreads``) instead of keeping a thread and its stack per node.

This module knows nothing of HTTP: it owns a TCP socket and threads.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable

from sidusctl.core.log import get_logger

log = get_logger("http")

#: workers started with the pool (more are started as connections come)
INITIAL_WORKERS = 8
#: workers started at once when the last idle one takes a connection
SPAWN_BATCH = 8
#: seconds an idle worker waits in ``accept`` before it ends (if more than
#: INITIAL_WORKERS are idle): the listening socket's SO_RCVTIMEO, socket(7)
IDLE_RETIRE = 60.0
#: the listen backlog (listen(2)): a storm connects all at once
LISTEN_BACKLOG = 1024


def timeval(seconds: float) -> bytes:
    """``seconds`` as the ``struct timeval`` (native longs: seconds, microseconds) that
    ``SO_RCVTIMEO`` and ``SO_SNDTIMEO`` take (socket(7))."""
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))


class WorkerPool:
    """A listening TCP socket on ``address``:``port`` (bound to device ``interface`` with
    ``SO_BINDTODEVICE`` unless None) and up to ``cap`` worker threads named
    ``{name}_N``, each calling ``handle(conn, client_ip)`` for one accepted connection (the
    pool closes it afterwards; ``handle`` guards its own errors: one that escapes is logged
    and the worker goes on).

    An accepted socket starts with the listening socket's options (a copy of its struct
    sock): the listening socket's receive timeout is :data:`IDLE_RETIRE` (accept returns
    EAGAIN after that long without a connection) and its send timeout ``send_timeout``
    seconds, so every connection starts with those two (``timeouts``) and needs no
    ``setsockopt`` unless its handler wants others. :class:`OSError` if the socket cannot
    be set up or bound."""

    def __init__(self, address: str, port: int, interface: str | None, cap: int,
                 send_timeout: float, handle: Callable[[socket.socket, str], None],
                 name: str = "sidusctl-http") -> None:
        self.cap = cap
        self.handle = handle
        self.name = name
        self.workers: list[threading.Thread] = []
        self._started = 0  # workers started so far (their names' numbers)
        self._idle = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()  # the connections being served
        self._closing = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if interface:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            self.sock.bind((address, port))
            self.sock.listen(LISTEN_BACKLOG)
            #: (receive, send) timeouts every accepted connection starts with, in seconds
            self.timeouts = (max(IDLE_RETIRE, 0.001), max(1.0, send_timeout))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(self.timeouts[0]))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(self.timeouts[1]))
        except OSError:
            self.sock.close()
            raise
        self.server_address: tuple[str, int] = self.sock.getsockname()

    def start(self) -> None:
        """Start the first :data:`INITIAL_WORKERS` workers."""
        with self._lock:
            for _ in range(min(INITIAL_WORKERS, self.cap)):
                self._spawn()

    def _spawn(self) -> None:
        """Start one more worker (called holding ``_lock``). :class:`RuntimeError` if the
        thread cannot start (counted nowhere then)."""
        t = threading.Thread(target=self._worker, name=f"{self.name}_{self._started}",
                             daemon=True)
        t.start()
        self._started += 1
        self.workers.append(t)
        self._idle += 1

    def _retire(self) -> bool:
        """After an idle wait of IDLE_RETIRE: True (and the worker is no longer counted) if
        this worker should end."""
        with self._lock:
            if self._closing or self._idle <= INITIAL_WORKERS:
                return False
            self._idle -= 1
            self.workers.remove(threading.current_thread())
            return True

    def _worker(self) -> None:
        while not self._closing:
            try:
                conn, addr = self.sock.accept()
            except BlockingIOError:  # SO_RCVTIMEO: no connection for IDLE_RETIRE seconds
                if self._retire():
                    return
                continue
            except OSError as e:
                if self._closing:
                    return
                # ECONNABORTED (reset in the backlog), EMFILE/ENFILE (out of descriptors):
                # the server goes on; a pause keeps a lasting EMFILE from spinning
                log.warning("HTTP: accept failed: %s", e.strerror)
                time.sleep(0.1)
                continue
            with self._lock:
                self._idle -= 1
                if self._idle == 0 and not self._closing:
                    # a storm connects hundreds at once: several more at a time, so that
                    # the ramp-up is not one thread start per connection in series
                    try:
                        for _ in range(min(SPAWN_BATCH, self.cap - len(self.workers))):
                            self._spawn()
                    except RuntimeError as e:  # "can't start new thread": serve with fewer
                        log.warning("HTTP: cannot start another worker: %s", e)
            self._open.add(conn)  # set.add/discard: atomic in CPython, no lock of ours
            try:
                self.handle(conn, addr[0])
            except Exception:  # pragma: no cover (handle guards its own errors)
                log.exception("HTTP %s: internal error", addr[0])
            finally:
                self._open.discard(conn)
                with contextlib.suppress(OSError):
                    conn.close()
                with self._lock:
                    self._idle += 1

    def close(self) -> None:
        """Stop listening, end every connection (a worker sending a body or waiting for a
        request gets an error at once) and wait (5 s at most) for the workers to return."""
        self._closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the workers blocked in accept
        for c in list(self._open):
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 5
        for t in list(self.workers):
            t.join(max(0.0, deadline - time.monotonic()))
        self.sock.close()
