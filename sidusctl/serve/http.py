"""A read-only HTTP/1.1 file server for boot storms: kernels, initrds and squashfs images to
hundreds of clients at once.

Owns one listening socket (bound to an address and, like the DHCP/TFTP/DNS sockets, to one
device with ``SO_BINDTODEVICE``) and worker threads, one per connection being served: each
idle worker waits in ``accept`` itself, and more are started when none is left idle
(:mod:`sidusctl.serve.http_pool`). Request heads are read and parsed by
:mod:`sidusctl.serve.http_request`; keep-alive connections carry several requests (RFC 9112
section 9.3). Idle or stalled connections end after the kernel's socket timeouts.
Files are sent with ``sendfile(2)`` (no copy through Python); ``Range: bytes=A-B``, ``A-``
and ``-N`` get ``206 Partial Content`` with ``Content-Range`` and an unsatisfiable range
``416`` (RFC 9110 sections 14.1-14.4, 15.3.7, 15.5.17); a multi-range request gets the whole
file (``200``: RFC 9110 allows a server to ignore Range). ``Accept-Ranges: bytes`` and an
``ETag`` (size and mtime) tell a client it may resume; ``If-Range`` with another ETag gets the
whole file.

Limits (:class:`HttpConfig`): ``max_clients`` connections at once and ``per_client`` per
client address; past them a request gets ``503 Service Unavailable`` with ``Retry-After``
(RFC 9110 section 10.2.3), counted in ``refused`` and logged. Files come from ``root`` and from
``mounts`` (URL prefix → directory), found and checked by :mod:`sidusctl.serve.http_files`:
names leaving their directory (``..``, symlinks out) are refused (403). ``POST`` to a path
in ``post_paths`` hands the form fields (``application/x-www-form-urlencoded``) to
``on_post``. This module knows no inventory and no image: it is given directories and
callbacks.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path

from sidusctl.core.errors import SidusError
from sidusctl.core.log import get_logger
from sidusctl.serve.http_files import ServedTree, parse_range
from sidusctl.serve.http_pool import WorkerPool, timeval
from sidusctl.serve.http_request import BadRequest, Request, parse_head, read_body, read_head

log = get_logger("http")

#: seconds a refused client is told to wait (Retry-After)
RETRY_AFTER = 2
#: worker threads beyond ``max_clients``: with every slot taken, new connections are still
#: answered 503 at once by these
SPARE_WORKERS = 32
#: bytes: a body up to this size leaves in the same segments as its head (``MSG_MORE``); a
#: larger one is sent corked (:func:`_corked`)
CORK_MAX = 65536
_MAX_FORM = 4096
_REASONS = {s.value: s.phrase for s in HTTPStatus}


@dataclass(frozen=True)
class HttpConfig:
    """``root``: the directory served at ``/``; ``mounts``: ``(url prefix, directory)`` pairs
    (e.g. ``("/squashfs/minimal/", Path(...))``); ``address``/``port`` to listen on,
    ``interface`` to bind to (None only on loopback: tests, benchmarks); ``max_clients``
    (connections at once) and ``per_client`` (at once from one address); ``post_paths``:
    paths accepting a POSTed form."""

    root: Path
    address: str = "0.0.0.0"
    port: int = 80
    interface: str | None = None
    mounts: tuple[tuple[str, Path], ...] = ()
    max_clients: int = 512
    per_client: int = 4
    post_paths: tuple[str, ...] = ()


@dataclass
class HttpStats:
    """Counters since start: ``requests``, ``files`` delivered whole or in part (``ranges``:
    206 answers), ``bytes_sent`` (bodies), ``not_found``, ``refused`` (503: over a limit),
    ``denied`` (403), ``posts``, ``active`` connections and their ``peak``, ``aborted``
    (client gone mid-body), ``idle_closed`` (connections the server ended after
    :attr:`_Handler.timeout` seconds without a whole request head: a client that kept its
    connection open and never used it again held a worker and a slot of ``max_clients`` and
    ``per_client`` that long), ``internal_errors`` (bugs).

    A request's counts are added before its client can have the whole answer, so a client
    that has its answer reads counters that include it. A body is counted whole when it
    starts; one cut short takes back the bytes that did not go out (``bytes_sent`` runs
    ahead meanwhile, by the bodies on their way)."""

    requests: int = 0
    files: int = 0
    ranges: int = 0
    bytes_sent: int = 0
    not_found: int = 0
    refused: int = 0
    denied: int = 0
    posts: int = 0
    active: int = 0
    peak: int = 0
    aborted: int = 0
    idle_closed: int = 0
    internal_errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        """Add each value of ``kw`` to the counter of that name, under the lock (from any
        thread); AttributeError for a name that is not a counter."""
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        """A consistent copy of every counter by its field name (taken under the lock)."""
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class _Server:
    """What a running server shares between its connections: the configuration, the
    counters, the callbacks, the served tree, the per-client connection counts, and the
    listening socket with its worker threads (:class:`~sidusctl.serve.http_pool.WorkerPool`,
    which calls :meth:`handle` for each connection)."""

    def __init__(self, cfg: HttpConfig, on_file: Callable[[str, str, int], None] | None,
                 on_post: Callable[[str, str, dict[str, str]], int] | None) -> None:
        self.cfg = cfg
        self.stats = HttpStats()
        self.on_file = on_file
        self.on_post = on_post
        self.by_client: dict[str, int] = {}
        self.count_lock = threading.Lock()
        self.tree = ServedTree(cfg.root, cfg.mounts)
        self.pool = WorkerPool(cfg.address, cfg.port, cfg.interface,
                               cfg.max_clients + SPARE_WORKERS, _Handler.timeout, self.handle)

    def add_mounts(self, mounts: tuple[tuple[str, Path], ...]) -> None:
        """Serve ``mounts`` (``(URL prefix, directory)``) too, from the next request on (a
        reload naming a new image); the mounts served so far stay (a node may be resuming a
        download from one)."""
        have = set(self.cfg.mounts)
        new = tuple(m for m in mounts if m not in have)
        if new:
            self.cfg = replace(self.cfg, mounts=self.cfg.mounts + new)
            self.tree = ServedTree(self.cfg.root, self.cfg.mounts)  # one reference swapped
            log.info("HTTP: now also serving %s",
                     ", ".join(f"{p} -> {d}" for p, d in new))

    def handle(self, conn: socket.socket, client: str) -> None:
        """Serve one connection (called by a worker of the pool)."""
        try:
            _Handler(self, conn, client).run()
        except Exception:  # a bug outside the handler's own guards
            self.stats.add(internal_errors=1)
            log.exception("HTTP %s: internal error", client)

    def enter(self, client: str) -> str | None:
        """Count a new connection from ``client``; the reason if it is over a limit."""
        with self.count_lock:
            if self.stats.active >= self.cfg.max_clients:
                return f"{self.stats.active} connections (max_clients {self.cfg.max_clients})"
            n = self.by_client.get(client, 0)
            if n >= self.cfg.per_client:
                return f"{n} connections from this client (per_client {self.cfg.per_client})"
            self.by_client[client] = n + 1
            self.stats.active += 1
            self.stats.peak = max(self.stats.peak, self.stats.active)
            return None

    def leave(self, client: str) -> None:
        with self.count_lock:
            self.stats.active -= 1
            n = self.by_client.get(client, 1) - 1
            if n <= 0:
                self.by_client.pop(client, None)
            else:
                self.by_client[client] = n


class _Date:
    """The ``Date`` field value (RFC 9110 section 6.6.1), formatted once per second."""

    def __init__(self) -> None:
        self._sec = -1
        self._text = ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self._sec:  # two threads may both format it: same text
            self._text = formatdate(now, usegmt=True)
            self._sec = now
        return self._text


_date = _Date()


class _Handler:
    """One connection, from its first request to its end: requests read one after the
    other (keep-alive, RFC 9112 section 9.3), each answered and counted."""

    #: seconds a connection may sit idle or stalled, reading or sending (a slot is held
    #: meanwhile): the kernel's own socket timeouts (SO_RCVTIMEO, SO_SNDTIMEO)
    timeout = 60

    def __init__(self, server: _Server, conn: socket.socket, client: str) -> None:
        self.server = server
        self.conn = conn
        self.client = client
        self.refused: str | None = None

    def run(self) -> None:
        srv, conn = self.server, self.conn
        timeout = max(1.0, self.timeout)
        # the listening socket's timeouts were inherited (WorkerPool): set only those that
        # differ
        inherited = srv.pool.timeouts
        if inherited[0] != timeout:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(timeout))
        if inherited[1] != timeout:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(timeout))
        self.refused = srv.enter(self.client)
        try:
            pending = b""
            while True:
                try:
                    got = read_head(conn, pending)
                except (BlockingIOError, TimeoutError):  # SO_RCVTIMEO: idle too long
                    srv.stats.add(idle_closed=1)
                    log.debug("HTTP %s: no request for %g s, connection closed", self.client,
                              timeout)
                    return
                except OSError as e:  # reset, unreachable...: only the socket is read here
                    srv.stats.add(aborted=1)
                    log.debug("HTTP %s: connection ended inside a request: %s", self.client, e)
                    return
                except BadRequest as e:
                    self._bad(e)
                    return
                if got is None:
                    return
                head, pending = got
                try:
                    req = parse_head(head)
                except BadRequest as e:
                    self._bad(e)
                    return
                keep, pending = self._answer(req, pending)
                if not keep:
                    return
        finally:
            if self.refused is None:
                srv.leave(self.client)

    # -- answers ---------------------------------------------------------------------------

    def _send_head(self, code: int, fields: str, keep: bool) -> bytes:
        """The status line and fields of an answer (``fields``: ``"Name: value\\r\\n"``
        lines), as bytes."""
        close = "" if keep else "Connection: close\r\n"
        return (f"HTTP/1.1 {code} {_REASONS[code]}\r\nServer: sidusctl\r\nDate: {_date()}\r\n"
                f"{fields}{close}\r\n").encode("latin-1")

    def _simple(self, req: Request | None, code: int, keep: bool, counts: dict[str, int],
                fields: str = "") -> None:
        """A short text answer (``"404 Not Found\\n"``), logged as the access line; a 204
        (a node's report taken) has neither content nor ``Content-Length`` (RFC 9110
        sections 8.6 and 15.3.5). ``counts``: the request's counts, added before the answer
        goes out (:class:`HttpStats`)."""
        self._count(counts)
        if code == 204:
            self.conn.sendall(self._send_head(code, fields, keep))
            log.info('HTTP %s: "%s" %d -', self.client, req.line if req else "-", code)
            return
        body = f"{code} {_REASONS[code]}\n".encode()
        head = self._send_head(code, f"{fields}Content-Type: text/plain\r\n"
                               f"Content-Length: {len(body)}\r\n", keep)
        self.conn.sendall(head if req is not None and req.method == "HEAD" else head + body)
        log.info('HTTP %s: "%s" %d -', self.client, req.line if req else "-", code)

    def _bad(self, e: BadRequest) -> None:
        log.info("HTTP %s: bad request: %s (%d)", self.client, e.why, e.code)
        with contextlib.suppress(OSError):
            self._simple(None, e.code, keep=False, counts={"requests": 1})

    def _answer(self, req: Request, pending: bytes) -> tuple[bool, bytes]:
        """Answer ``req``: (whether the connection may go on, the bytes read past it)."""
        counts = {"requests": 1}  # added to the server's counters once, at the end
        try:
            if self.refused is not None:
                counts["refused"] = 1
                log.warning("HTTP %s: %s %s refused (503): %s", self.client, req.method,
                            req.target, self.refused)
                self._simple(req, 503, keep=False, counts=counts,
                             fields=f"Retry-After: {RETRY_AFTER}\r\n")
                return False, b""
            if "transfer-encoding" in req.fields:  # RFC 9112 section 6.1: not understood
                self._simple(req, 501, keep=False, counts=counts)
                return False, b""
            if req.method == "POST":
                return self._post(req, pending, counts)
            if req.method not in ("GET", "HEAD"):
                self._simple(req, 501, keep=False, counts=counts)
                return False, b""
            # a GET or HEAD with a body: not read, so the connection ends after the answer
            keep = req.keep_alive and req.fields.get("content-length", "0").strip() == "0"
            return self._serve_file(req, counts, keep), pending
        except (ConnectionError, TimeoutError, BlockingIOError):
            counts["aborted"] = 1  # BlockingIOError: SO_SNDTIMEO ran out
            return False, b""
        except Exception:
            counts["internal_errors"] = 1
            log.exception("HTTP %s: internal error on %s", self.client, req.target)
            return False, b""
        finally:
            self._count(counts)

    def _count(self, counts: dict[str, int]) -> None:
        """Add what a request gathered in ``counts`` to the server's counters, under one
        lock for all of them (hundreds of connection threads: every lock taken is one more
        place to queue), and empty it: added once, whichever of the request's ends (the
        answer sent, a refusal, an error) comes first."""
        if counts:
            self.server.stats.add(**counts)
            counts.clear()

    def _serve_file(self, req: Request, counts: dict[str, int], keep: bool) -> bool:
        head_only = req.method == "HEAD"
        try:
            opened = self.server.tree.open_file(req.target)
        except (OSError, ValueError):  # no such file, not a regular file, a loop of
            # symlinks, no access; ValueError: a NUL byte (%00), which names no file
            counts["not_found"] = 1
            log.info("HTTP %s: %s not found", self.client, req.target)
            self._simple(req, 404, keep, counts=counts)
            return keep
        if opened is None:
            counts["denied"] = 1
            log.warning("HTTP %s: %s denied (outside the served directories)", self.client,
                        req.target)
            self._simple(req, 403, keep, counts=counts)
            return keep
        fd, st = opened
        try:
            size = st.st_size
            etag = f'"{size:x}-{st.st_mtime_ns:x}"'
            rng: tuple[int, int] | str | None = None
            header = req.fields.get("range")
            if header is not None:
                rng = parse_range(header, size)
                if_range = req.fields.get("if-range")
                if if_range is not None and if_range.strip() != etag:
                    rng = None
            if rng == "unsatisfiable":
                self._simple(req, 416, keep, counts, f"Content-Range: bytes */{size}\r\n")
                return keep
            if isinstance(rng, tuple):
                first, last = rng
                code, fields = 206, f"Content-Range: bytes {first}-{last}/{size}\r\n"
            else:
                first, last = 0, size - 1
                code, fields = 200, ""
            length = last - first + 1
            head = self._send_head(code, (
                f"{fields}Content-Type: application/octet-stream\r\n"
                f"Content-Length: {length}\r\nAccept-Ranges: bytes\r\nETag: {etag}\r\n"
                f"Last-Modified: {formatdate(st.st_mtime, usegmt=True)}\r\n"), keep)
            if head_only:
                self._count(counts)  # before the client has its answer (HttpStats)
                self.conn.sendall(head)
                log.info('HTTP %s: "%s" %d -', self.client, req.line, code)
                return keep
            # the body counted whole before the client can have it; what did not go out is
            # taken back (a send that raised: all of it, the abort counted by _answer)
            counts.update(bytes_sent=length, files=1, ranges=int(isinstance(rng, tuple)))
            self._count(counts)
            try:
                # a large body corked: only full segments until its last byte (nginx's
                # tcp_nopush), so a client whose window reopens a little at a time is not
                # sent a small segment each time (performance.md, session 34); a small one
                # leaves in the same segment as its head (MSG_MORE), not two
                small = length <= CORK_MAX
                with contextlib.nullcontext() if small else _corked(self.conn):
                    self.conn.sendall(head, socket.MSG_MORE if small and length else 0)
                    sent = _sendfile(self.conn, fd, first, length)
            except BaseException:
                self.server.stats.add(bytes_sent=-length)
                raise
            log.info('HTTP %s: "%s" %d %d', self.client, req.line, code, sent)
            if sent < length:
                self.server.stats.add(bytes_sent=sent - length, aborted=1)
                return False
        finally:
            os.close(fd)
        if self.server.on_file is not None:
            self.server.on_file(self.client, req.target.split("?", 1)[0], length)
        return keep

    def _post(self, req: Request, pending: bytes, counts: dict[str, int]) -> tuple[bool, bytes]:
        path = req.target.split("?", 1)[0]
        try:
            n = int(req.fields.get("content-length", "0"))
        except ValueError:
            n = -1
        if path not in self.server.cfg.post_paths or self.server.on_post is None:
            self._simple(req, 405 if n >= 0 else 400, keep=False, counts=counts)
            return False, b""
        if not 0 <= n <= _MAX_FORM:
            self._simple(req, 413 if n > _MAX_FORM else 400, keep=False, counts=counts)
            return False, b""
        raw, pending = read_body(self.conn, pending, n)
        body = raw.decode("utf-8", "replace")
        form = {k: v for k, v in urllib.parse.parse_qsl(body, keep_blank_values=True)}
        counts["posts"] = 1
        try:
            code = self.server.on_post(self.client, path, form)
        except Exception:
            counts["internal_errors"] = 1
            log.exception("HTTP %s: internal error on POST %s", self.client, path)
            code = 500
        keep = req.keep_alive
        self._simple(req, code, keep, counts=counts)
        return keep, pending


@contextlib.contextmanager
def _corked(sock: socket.socket) -> Iterator[None]:
    """``TCP_CORK`` on the TCP socket ``sock`` for the block (tcp(7)): only full segments
    leave until the block ends, then what is left is pushed; nginx's ``tcp_nopush`` with
    ``sendfile``. Taken off however the block ends (a connection that goes on must not keep
    it: the kernel would hold its next answer's last segment up to 200 ms). :class:`OSError`
    if the option cannot be set."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)


def _sendfile(sock: socket.socket, src: int, offset: int, count: int) -> int:
    """``count`` bytes of the file open on descriptor ``src`` from ``offset`` to ``sock``
    with ``sendfile(2)``; the bytes sent, fewer if the client went away or took nothing for
    the socket's send timeout.

    The socket is blocking, with the kernel's own send timeout (``SO_SNDTIMEO``, socket(7),
    set by the handler): one ``sendfile`` call then carries the whole body without coming
    back to Python, where :meth:`socket.socket.sendfile` (a non-blocking socket, a ``poll``
    between calls) returns after each send buffer's worth. In a storm of hundreds of
    downloads, each return is a thread taking the interpreter lock again, which the event
    loop answering DHCP and TFTP waits for."""
    fd = sock.fileno()
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(fd, src, offset + sent, count - sent)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            break  # BlockingIOError: SO_SNDTIMEO ran out with nothing sent
        if n == 0:  # the file ends early (truncated since its size was read)
            break
        sent += n
    return sent


class HttpServer:
    """A running server: ``stats``, ``port`` (the bound one: useful with port 0)."""

    def __init__(self, srv: _Server) -> None:
        self._srv = srv

    @property
    def stats(self) -> HttpStats:
        """The server's live counters (:class:`HttpStats`), shared with its threads."""
        return self._srv.stats

    @property
    def port(self) -> int:
        """The TCP port bound: ``cfg.port``, or the kernel's choice when that was 0."""
        return int(self._srv.pool.server_address[1])

    def add_mounts(self, mounts: tuple[tuple[str, Path], ...]) -> None:
        """Serve ``mounts`` too (``(URL prefix, directory)`` pairs); see
        :meth:`_Server.add_mounts`."""
        self._srv.add_mounts(mounts)


@contextlib.contextmanager
def serve(cfg: HttpConfig, *, on_file: Callable[[str, str, int], None] | None = None,
          on_post: Callable[[str, str, dict[str, str]], int] | None = None
          ) -> Iterator[HttpServer]:
    """Serve ``cfg`` from worker threads until the block ends. ``on_file(client_ip, path,
    bytes)`` after each file (or range) delivered; ``on_post(client_ip, path, form) ->
    status code`` for the POSTs of ``cfg.post_paths``. Both are called from the connection's
    thread. :class:`SidusError` if the address cannot be bound. Leaving the block ends the
    connections still open and waits for the workers (5 s at most)."""
    try:
        srv = _Server(cfg, on_file, on_post)
    except OSError as e:
        raise SidusError(f"HTTP server: cannot listen on {cfg.address}:{cfg.port} "
                         f"({e.strerror})") from e
    try:
        srv.pool.start()
        log.info("HTTP serving %s%s on %s:%d (max %d clients, %d per client)", cfg.root,
                 "".join(f", {p} -> {d}" for p, d in cfg.mounts), cfg.address,
                 srv.pool.server_address[1], cfg.max_clients, cfg.per_client)
        yield HttpServer(srv)
    finally:
        srv.pool.close()
