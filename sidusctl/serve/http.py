"""A read-only HTTP/1.1 file server for boot storms: kernels, initrds and squashfs images to
hundreds of clients at once.

Owns one listening socket (bound to an address and, like the DHCP/TFTP/DNS sockets, to one
device with ``SO_BINDTODEVICE``) and a pool of worker threads, one per connection being
served (:class:`concurrent.futures.ThreadPoolExecutor`: a thread is started only when none is
idle, then reused; starting one per connection cost more than the rest of a small request).
Files are sent with ``sendfile(2)`` (no copy through Python); ``Range: bytes=A-B``, ``A-``
and ``-N`` get ``206 Partial Content`` with ``Content-Range`` and an unsatisfiable range
``416`` (RFC 9110 sections 14.1-14.4, 15.3.7, 15.5.17); a multi-range request gets the whole
file (``200``: RFC 9110 allows a server to ignore Range). ``Accept-Ranges: bytes`` and an
``ETag`` (size and mtime) tell a client it may resume; ``If-Range`` with another ETag gets the
whole file.

Limits (:class:`HttpConfig`): ``max_clients`` connections at once and ``per_client`` per
client address; past them a request gets ``503 Service Unavailable`` with ``Retry-After``
(RFC 9110 section 10.2.3), counted in ``refused`` and logged. Files come from ``root`` and from
``mounts`` (URL prefix → directory); names leaving their directory (``..``, symlinks out) are
refused (403). ``POST`` to a path in ``post_paths`` hands the form fields
(``application/x-www-form-urlencoded``) to ``on_post``. This module knows no inventory and no
image: it is given directories and callbacks.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.server
import os
import socket
import stat
import struct
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

from sidusctl.core.errors import SidusError
from sidusctl.core.log import get_logger

log = get_logger("http")

_SO_BINDTODEVICE = 25
#: seconds a refused client is told to wait (Retry-After)
RETRY_AFTER = 2
#: worker threads beyond ``max_clients``: with every slot taken, new connections are still
#: answered 503 at once by these
SPARE_WORKERS = 32
_MAX_FORM = 4096


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
    (client gone mid-body), ``internal_errors`` (bugs)."""

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
    internal_errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """The one byte range ``(first, last)`` (inclusive) that a ``Range`` header value asks of
    a ``size``-byte file; None when the header is to be ignored (not ``bytes=``, several
    ranges, malformed: the whole file is sent); ``"unsatisfiable"`` when it starts past the
    end (416). RFC 9110 section 14.1.2."""
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    a, sep, b = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if a == "":
            n = int(b)
            if n <= 0:
                return "unsatisfiable" if n == 0 else None
            return (max(0, size - n), size - 1) if size else "unsatisfiable"
        first = int(a)
        last = int(b) if b else size - 1
    except ValueError:
        return None
    if first < 0 or (b and last < first):
        return None
    if first >= size:
        return "unsatisfiable"
    return first, min(last, size - 1)


class _Server(http.server.HTTPServer):
    request_queue_size = 1024  # listen backlog: a storm connects all at once

    def __init__(self, cfg: HttpConfig, on_file: Callable[[str, str, int], None] | None,
                 on_post: Callable[[str, str, dict[str, str]], int] | None) -> None:
        self.cfg = cfg
        self.stats = HttpStats()
        self.on_file = on_file
        self.on_post = on_post
        self.by_client: dict[str, int] = {}
        self.count_lock = threading.Lock()
        self.roots = [("/", os.path.realpath(cfg.root))] + [
            (p if p.endswith("/") else p + "/", os.path.realpath(d)) for p, d in cfg.mounts]
        self.roots.sort(key=lambda x: -len(x[0]))  # longest prefix first
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=cfg.max_clients + SPARE_WORKERS, thread_name_prefix="sidusctl-http")
        self._open: set[socket.socket] = set()  # the connections being served
        super().__init__((cfg.address, cfg.port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the accepted connection to a worker (socketserver calls this from the
        accepting thread)."""
        self._pool.submit(self._work, request, client_address)

    def _work(self, request: Any, client_address: Any) -> None:
        # set.add and set.discard are atomic in CPython (one call holding the interpreter
        # lock): no lock of ours per connection for them
        self._open.add(request)
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._open.discard(request)
            self.shutdown_request(request)

    def server_close(self) -> None:
        """Stop listening and end every connection: a worker blocked sending a body or
        waiting for a request gets an error at once (the pool's threads are joined when the
        interpreter exits, so none may wait out its timeout)."""
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for c in list(self._open):
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.cfg.interface:
            self.socket.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE,
                                   self.cfg.interface.encode())
        super().server_bind()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An exception outside the handler's own guards (socketserver would print it to
        stderr): a client that reset or timed out while its request line was read is counted
        as aborted, anything else as an internal error, logged with its traceback."""
        err = sys.exc_info()[1]
        client = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        if isinstance(err, (ConnectionResetError, BrokenPipeError, TimeoutError)):
            self.stats.add(aborted=1)
            log.debug("HTTP %s: connection ended before a request: %s", client, err)
            return
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

    def resolve(self, url_path: str) -> str | None:
        """The real path of the file a URL path names under its root or mount; None if it
        leaves it (a ``..`` component, or symlinks resolving outside)."""
        path = urllib.parse.unquote(url_path.split("?", 1)[0].split("#", 1)[0])
        for prefix, base in self.roots:
            if path.startswith(prefix) or path + "/" == prefix:
                rel = path[len(prefix):]
                if ".." in rel.split("/"):
                    return None
                target = os.path.realpath(os.path.join(base, rel))
                if target != base and not target.startswith(base.rstrip(os.sep) + os.sep):
                    return None
                return target
        return None


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "sidusctl"
    timeout = 60  # seconds a connection may sit idle or stalled (a slot is held meanwhile)

    def setup(self) -> None:
        super().setup()
        self._client = self.client_address[0]
        self._counted = False
        why = self.server.enter(self._client)
        self._refused = why
        if why is None:
            self._counted = True

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._counted:
                self.server.leave(self._client)

    def log_message(self, format: str, *args: Any) -> None:
        # one access line per request at info, as a web server's access log
        log.info("HTTP %s: %s", self.client_address[0], format % args)

    def _refuse(self, counts: dict[str, int]) -> bool:
        if self._refused is None:
            return False
        counts["refused"] = 1
        self._count(counts)  # before the client has its answer
        log.warning("HTTP %s: %s %s refused (503): %s", self._client, self.command, self.path,
                    self._refused)
        self.send_response(503)
        self.send_header("Retry-After", str(RETRY_AFTER))
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        return True

    def _simple(self, code: int, extra: dict[str, str] | None = None) -> None:
        body = f"{code} {http.server.BaseHTTPRequestHandler.responses[code][0]}\n".encode()
        self.send_response(code)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._get(head=True)

    def do_GET(self) -> None:
        self._get(head=False)

    def _count(self, counts: dict[str, int]) -> None:
        """Add what a request gathered in ``counts`` to the server's counters, under one
        lock for all of them (hundreds of connection threads: every lock taken is one more
        place to queue), and empty it: added once, whichever of the request's ends (the
        answer sent, a refusal, an error) comes first."""
        if counts:
            self.server.stats.add(**counts)
            counts.clear()

    def _get(self, head: bool) -> None:
        counts = {"requests": 1}  # added by _count
        try:
            if self._refuse(counts):
                return
            self._serve_file(head, counts)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            counts["aborted"] = 1
            self.close_connection = True
        except Exception:
            counts["internal_errors"] = 1
            log.exception("HTTP %s: internal error on %s", self._client, self.path)
            self.close_connection = True
        finally:
            self._count(counts)

    def _serve_file(self, head: bool, counts: dict[str, int]) -> None:
        target = self.server.resolve(self.path)
        if target is None:
            counts["denied"] = 1
            log.warning("HTTP %s: %s denied (outside the served directories)", self._client,
                        self.path)
            self._simple(403)
            return
        try:
            f = open(target, "rb")  # noqa: SIM115 (closed by the with below)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
            counts["not_found"] = 1
            log.info("HTTP %s: %s not found", self._client, self.path)
            self._simple(404)
            return
        with f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                counts["not_found"] = 1
                self._simple(404)
                return
            size = st.st_size
            etag = f'"{size:x}-{st.st_mtime_ns:x}"'
            rng: tuple[int, int] | str | None = None
            header = self.headers.get("Range")
            if header is not None:
                rng = parse_range(header, size)
                if_range = self.headers.get("If-Range")
                if if_range is not None and if_range.strip() != etag:
                    rng = None
            if rng == "unsatisfiable":
                self._simple(416, {"Content-Range": f"bytes */{size}"})
                return
            if isinstance(rng, tuple):
                first, last = rng
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            else:
                first, last = 0, size - 1
                self.send_response(200)
            length = last - first + 1
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", formatdate(st.st_mtime, usegmt=True))
            self.end_headers()
            if head:
                return
            self.wfile.flush()
            sent = _sendfile(self.connection, f, first, length, self.timeout)
            counts.update(bytes_sent=sent, files=1, ranges=int(isinstance(rng, tuple)))
            if sent < length:
                counts["aborted"] = 1
            self._count(counts)  # as soon as the body is out
            if sent < length:
                self.close_connection = True
                return
        if self.server.on_file is not None:
            self.server.on_file(self._client, self.path.split("?", 1)[0], length)

    def do_POST(self) -> None:
        counts = {"requests": 1}
        try:
            self._post(counts)
        finally:
            self._count(counts)

    def _post(self, counts: dict[str, int]) -> None:
        if self._refuse(counts):
            return
        path = self.path.split("?", 1)[0]
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = -1
        if path not in self.server.cfg.post_paths or self.server.on_post is None:
            self._simple(405 if n >= 0 else 400)
            self.close_connection = True
            return
        if not 0 <= n <= _MAX_FORM:
            self._simple(413 if n > _MAX_FORM else 400)
            self.close_connection = True
            return
        body = self.rfile.read(n).decode("utf-8", "replace")
        form = {k: v for k, v in urllib.parse.parse_qsl(body, keep_blank_values=True)}
        counts["posts"] = 1
        try:
            code = self.server.on_post(self._client, path, form)
        except Exception:
            counts["internal_errors"] = 1
            log.exception("HTTP %s: internal error on POST %s", self._client, path)
            code = 500
        self._simple(code)


def _sendfile(sock: socket.socket, f: Any, offset: int, count: int, timeout: float) -> int:
    """``count`` bytes of file ``f`` from ``offset`` to ``sock`` with ``sendfile(2)``; the
    bytes sent, fewer if the client went away or took nothing for ``timeout`` seconds.

    The socket is made blocking for the body, with the kernel's own send timeout
    (``SO_SNDTIMEO``, socket(7)): one ``sendfile`` call then carries the whole body without
    coming back to Python, where :meth:`socket.socket.sendfile` (a non-blocking socket, a
    ``poll`` between calls) returns after each send buffer's worth. In a storm of hundreds
    of downloads, each return is a thread taking the interpreter lock again, which the event
    loop answering DHCP and TFTP waits for. The socket's timeout is restored after."""
    fd, src = sock.fileno(), f.fileno()
    sec = max(1, int(timeout))
    sock.setblocking(True)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, 0))
    sent = 0
    try:
        while sent < count:
            try:
                n = os.sendfile(fd, src, offset + sent, count - sent)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                break  # BlockingIOError: SO_SNDTIMEO ran out with nothing sent
            if n == 0:  # the file ends early (truncated since its size was read)
                break
            sent += n
    finally:
        sock.settimeout(timeout)
    return sent


class HttpServer:
    """A running server: ``stats``, ``port`` (the bound one: useful with port 0)."""

    def __init__(self, srv: _Server, thread: threading.Thread) -> None:
        self._srv = srv
        self._thread = thread

    @property
    def stats(self) -> HttpStats:
        return self._srv.stats

    @property
    def port(self) -> int:
        return int(self._srv.server_address[1])


@contextlib.contextmanager
def serve(cfg: HttpConfig, *, on_file: Callable[[str, str, int], None] | None = None,
          on_post: Callable[[str, str, dict[str, str]], int] | None = None
          ) -> Iterator[HttpServer]:
    """Serve ``cfg`` in a thread until the block ends. ``on_file(client_ip, path, bytes)``
    after each file (or range) delivered; ``on_post(client_ip, path, form) -> status code``
    for the POSTs of ``cfg.post_paths``. Both are called from the connection's thread.
    :class:`SidusError` if the address cannot be bound."""
    try:
        srv = _Server(cfg, on_file, on_post)
    except OSError as e:
        raise SidusError(f"HTTP server: cannot listen on {cfg.address}:{cfg.port} "
                         f"({e.strerror})") from e
    t = threading.Thread(target=srv.serve_forever, name="sidusctl-http", daemon=True)
    t.start()
    log.info("HTTP serving %s%s on %s:%d (max %d clients, %d per client)", cfg.root,
             "".join(f", {p} -> {d}" for p, d in cfg.mounts), cfg.address,
             srv.server_address[1], cfg.max_clients, cfg.per_client)
    try:
        yield HttpServer(srv, t)
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)
