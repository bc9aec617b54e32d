"""HTTP/1.x request heads, read and parsed for :mod:`sidusctl.serve.http` (RFC 9112 sections
2-5; field names are case-insensitive, RFC 9110 section 5.1).

Why not :class:`http.server.BaseHTTPRequestHandler`: it parses the header fields with the
``email`` package into a ``Message`` and reads through a buffered file object, which was
most of the server's CPU for a small request in a boot storm (``bench/http_serve.py``). A
boot server needs the request line and a few fields (``Range``, ``If-Range``,
``Content-Length``, ``Connection``); this module reads the head with one ``recv`` in the
common case and splits it once.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

#: bytes a request head (request line and fields) may take; a longer one gets 431
#: (RFC 6585 section 5)
HEAD_MAX = 16384
_RECV = 8192
#: a token (RFC 9110 section 5.6.2): a method, a field name
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class BadRequest(Exception):
    """A request head the server cannot take: answered with ``code`` (400, 431, 505) and
    the connection closed."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code
        self.why = why


@dataclass(frozen=True)
class Request:
    """One parsed request head: ``method`` (as sent, e.g. ``GET``), ``target`` (the
    request-target as sent, e.g. ``/boot.ipxe?x=1``), ``version`` (``HTTP/1.0`` or
    ``HTTP/1.1``), ``fields`` (lower-case names; a repeated field's values joined with
    ``", "``, RFC 9110 section 5.3) and ``line``, the request line for the access log."""

    method: str
    target: str
    version: str
    fields: dict[str, str]
    line: str

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request after this one: HTTP/1.1 unless
        ``Connection: close``, HTTP/1.0 only with ``Connection: keep-alive`` (RFC 9112
        section 9.3)."""
        tokens = {t.strip().lower() for t in self.fields.get("connection", "").split(",")}
        if self.version == "HTTP/1.1":
            return "close" not in tokens
        return "keep-alive" in tokens


def parse_head(head: bytes) -> Request:
    """The request in ``head``: the bytes before the empty line ending the fields (without
    it). :class:`BadRequest` (400) for a malformed request line or field, 505 for a version
    other than HTTP/1.0 and HTTP/1.1. Empty lines before the request line are skipped
    (RFC 9112 section 2.2)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover (latin-1 decodes every byte)
        raise BadRequest(400, "undecodable request head") from None
    lines = text.lstrip("\r\n").split("\r\n")
    line = lines[0]
    parts = line.split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise BadRequest(400, f"malformed request line {line[:80]!r}")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise BadRequest(400, f"malformed method {method[:40]!r}")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if not version.startswith("HTTP/"):
            raise BadRequest(400, f"malformed request line {line[:80]!r}")
        raise BadRequest(505, f"version {version[:20]!r} not supported")
    fields: dict[str, str] = {}
    for f in lines[1:]:
        name, sep, value = f.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            # no colon, or whitespace before it (RFC 9112 section 5.1: must be rejected),
            # or a line folded with leading whitespace (obsolete, section 5.2)
            raise BadRequest(400, f"malformed header field {f[:80]!r}")
        key = name.lower()
        value = value.strip(" \t")
        fields[key] = f"{fields[key]}, {value}" if key in fields else value
    return Request(method, target, version, fields, line)


def read_head(sock: socket.socket, pending: bytes) -> tuple[bytes, bytes] | None:
    """Read from ``sock`` (blocking, with its timeout) until a request head is complete (the
    empty line after the fields, RFC 9112 section 2.1):
    ``(head, rest)``, ``head`` without the empty line ending it, ``rest`` what followed (a
    body's first bytes, or the next request's). ``pending``: bytes left over from the last
    request on this connection. None when the client closed the connection before sending
    anything. :class:`BadRequest` (431) when the head passes :data:`HEAD_MAX` bytes;
    :class:`ConnectionResetError` when the connection ends inside a head. Socket errors
    (timeout, reset) propagate."""
    data = pending
    start = 0  # where the empty line may begin: the bytes before were searched
    while True:
        end = data.find(b"\r\n\r\n", start)
        if end > HEAD_MAX or (end < 0 and len(data) > HEAD_MAX):
            raise BadRequest(431, f"request head over {HEAD_MAX} bytes")
        if end >= 0:
            return data[:end], data[end + 4:]
        start = max(0, len(data) - 3)
        chunk = sock.recv(_RECV)
        if not chunk:
            if data.strip(b"\r\n"):
                raise ConnectionResetError("connection closed inside a request head")
            return None
        data += chunk


def read_body(sock: socket.socket, pending: bytes, length: int) -> tuple[bytes, bytes]:
    """``length`` bytes of body (the request's ``Content-Length``, RFC 9112 section 6.2):
    ``(body, rest)``, taken from what ``pending`` holds and then from ``sock``; ``rest`` is
    what was read past the body (a pipelined request). :class:`ConnectionResetError` if the
    client closes before the end; socket errors (timeout, reset) propagate."""
    data = pending
    while len(data) < length:
        chunk = sock.recv(max(_RECV, length - len(data)))
        if not chunk:
            raise ConnectionResetError("connection closed inside a request body")
        data += chunk
    return data[:length], data[length:]
