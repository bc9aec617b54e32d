"""sidusctl.serve.http_request and the server's handling of request heads: the parser against
RFC 9112 (request line, fields, versions, keep-alive), a hypothesis fuzz of the parser (only
:class:`BadRequest` may come out), and on a live server on loopback: several requests on one
connection (keep-alive, pipelined, a POST body between two GETs), bad heads answered 400,
431, 501 and 505, and a fuzz of raw bytes that must leave no internal error and a server
that still answers."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidusctl.serve import http
from sidusctl.serve.http_request import HEAD_MAX, BadRequest, parse_head
from tests.fuzz_util import mutations

VALID = [
    b"GET /boot.ipxe HTTP/1.1\r\nHost: 10.0.0.1\r\nUser-Agent: iPXE/1.21.1",
    b"GET /initrd.img HTTP/1.1\r\nHost: x\r\nRange: bytes=10-19\r\nIf-Range: \"a-b\"",
    b"HEAD / HTTP/1.0\r\nConnection: keep-alive",
    b"POST /sidus/report HTTP/1.1\r\nHost: x\r\nContent-Length: 12",
]


def test_request_line_and_fields() -> None:
    r = parse_head(b"\r\nGET /a?b=1 HTTP/1.1\r\nHost: x\r\nRANGE:  bytes=0-1 \r\n"
                   b"Accept: a\r\naccept: b")
    assert (r.method, r.target, r.version) == ("GET", "/a?b=1", "HTTP/1.1")
    assert r.fields == {"host": "x", "range": "bytes=0-1", "accept": "a, b"}
    assert r.line == "GET /a?b=1 HTTP/1.1"
    assert r.keep_alive
    assert not parse_head(b"GET / HTTP/1.1\r\nConnection: Keep-Alive, close").keep_alive
    assert not parse_head(b"GET / HTTP/1.0").keep_alive
    assert parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive").keep_alive


@pytest.mark.parametrize(("head", "code"), [
    (b"GET /", 400),
    (b"GET  / HTTP/1.1", 400),
    (b"G(T / HTTP/1.1", 400),
    (b"GET / FTP/1.1", 400),
    (b"GET / HTTP/2.0", 505),
    (b"GET / HTTP/1.1\r\nHost x", 400),
    (b"GET / HTTP/1.1\r\nHost : x", 400),  # whitespace before the colon (RFC 9112 5.1)
    (b"GET / HTTP/1.1\r\n folded: x", 400),
])
def test_malformed_heads(head: bytes, code: int) -> None:
    with pytest.raises(BadRequest) as e:
        parse_head(head)
    assert e.value.code == code


mutated = mutations(VALID)


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.binary(max_size=300), mutated))
def test_fuzz_parse_raises_only_bad_request(data: bytes) -> None:
    try:
        r = parse_head(data)
    except BadRequest as e:
        assert e.code in (400, 505)
        return
    assert r.method and r.target and r.version in ("HTTP/1.0", "HTTP/1.1")
    assert isinstance(r.keep_alive, bool)


# -- on a live server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, http.HttpServer]]:
    root = tmp_path_factory.mktemp("www")
    (root / "a").write_bytes(b"A" * 1000)
    (root / "b").write_bytes(b"B" * 10)
    reports: list[dict[str, str]] = []

    def on_post(_ip: str, _path: str, form: dict[str, str]) -> int:
        reports.append(form)
        return 204

    cfg = http.HttpConfig(root=root, address="127.0.0.1", port=0, per_client=64,
                          post_paths=("/sidus/report",))
    with http.serve(cfg, on_post=on_post) as srv:
        yield srv.port, srv


def _exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, shut our side, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_keep_alive_pipelined_requests_and_a_post_between(
        server: tuple[int, http.HttpServer]) -> None:
    port, srv = server
    files = srv.stats.files
    out = _exchange(port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"POST /sidus/report HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n"
                          b"stage=x&yHEAD /b HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                          b"GET /a HTTP/1.1\r\n\r\n")  # after close: not answered
    answers = out.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200", b"204", b"200", b"200"], out
    assert answers[0].endswith(b"\r\n\r\n" + b"A" * 1000)
    # a report taken: 204 with no content and no Content-Length (RFC 9110 8.6, 15.3.5)
    assert answers[1].endswith(b"\r\n\r\n") and b"Content-Length" not in answers[1]
    assert b"Content-Length: 10\r\n" in answers[2] and answers[2].endswith(b"\r\n\r\n")
    assert answers[3].endswith(b"\r\n\r\n" + b"B" * 10)
    assert b"Connection: close" in answers[3]
    assert srv.stats.files - files == 2 and srv.stats.internal_errors == 0


def test_repeated_slashes_count_as_one(server: tuple[int, http.HttpServer]) -> None:
    """shim asks for ``//grubx64.efi`` (its own URL's directory, ``/``, joined to the file
    name with another ``/``); ``..`` stays refused however it is written."""
    port, _ = server
    for target in (b"//b", b"///b", b"/./b"):
        out = _exchange(port, b"GET " + target + b" HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"B" * 10), (target, out[:100])
    # a NUL byte names no file: 404, not an internal error
    out = _exchange(port, b"GET /b%00 HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404"), out[:100]
    for target in (b"//../b", b"/x/..//..//b", b"/%2e%2e/b"):
        out = _exchange(port, b"GET " + target + b" HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 403"), (target, out[:100])
    # the root itself (a directory: not a file to serve), however many slashes: 404, not a
    # refusal as if it were outside the served directory
    for target in (b"/", b"//", b"///"):
        out = _exchange(port, b"GET " + target + b" HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 404"), (target, out[:100])


@pytest.mark.parametrize(("data", "code"), [
    (b"GET / HTTP/2.0\r\n\r\n", b"505"),
    (b"BREW /pot HTTP/1.1\r\n\r\n", b"501"),
    (b"GET /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"501"),
    (b"GET /a HTTP/1.1\r\nX: " + b"y" * HEAD_MAX + b"\r\n\r\n", b"431"),
    (b"GET /a HTTP/1.1\r\nbad field\r\n\r\n", b"400"),
    (b"POST /nope HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", b"405"),
    (b"POST /sidus/report HTTP/1.1\r\nContent-Length: 99999\r\n\r\n", b"413"),
])
def test_bad_requests_are_answered_and_closed(server: tuple[int, http.HttpServer],
                                              data: bytes, code: bytes) -> None:
    port, srv = server
    out = _exchange(port, data + b"GET /b HTTP/1.1\r\n\r\n")  # the second is not answered
    assert out.startswith(b"HTTP/1.1 " + code), out[:200]
    assert out.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in out
    assert srv.stats.internal_errors == 0


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(st.binary(max_size=200), mutated.map(lambda b: b + b"\r\n\r\n")),
                min_size=1, max_size=4))
def test_fuzz_live_server(server: tuple[int, http.HttpServer], chunks: list[bytes]) -> None:
    port, srv = server
    _exchange(port, b"".join(chunks))
    assert srv.stats.internal_errors == 0, "the server hit a bug (see the traceback)"
    out = _exchange(port, b"GET /b HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"B" * 10)
