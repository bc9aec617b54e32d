"""The simulated nodes' HTTP client (tests/storm_proto.py) on loopback: as iPXE, a node's boot
files share one keep-alive connection to serve-pxe's HTTP server; a connection the server
says it will close, or closes while idle, is opened again; without a pool each request has a
connection of its own, as busybox wget. The storm bench's connection counts rest on this."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from sidusctl.serve import http
from tests.storm_proto import HttpPool, Tally, http_req

FILES = {f"/f{i}": os.urandom(1000 + 300_000 * i) for i in range(4)}


def _fetch_all(port: int, pool: HttpPool | None) -> tuple[Tally, dict[str, str], list[str]]:
    """GET every file of FILES in turn; the tally, each body's SHA-256 by path, and the
    ``Connection`` header of each answer."""
    tally = Tally()

    async def main() -> tuple[dict[str, str], list[str]]:
        got: dict[str, str] = {}
        said: list[str] = []
        try:
            for path in FILES:
                h = hashlib.sha256()
                code, hdrs = await http_req("127.0.0.1", "127.0.0.1", port, "GET", path, tally,
                                            sink=h, pool=pool)
                assert code == 200, (path, code)
                got[path] = h.hexdigest()
                said.append(hdrs.get("connection", ""))
        finally:
            if pool is not None:
                await pool.close()
        return got, said

    got, said = asyncio.run(main())
    return tally, got, said


WANT = {p: hashlib.sha256(b).hexdigest() for p, b in FILES.items()}


def test_a_pool_carries_a_nodes_files_on_one_connection_to_serve_pxe(tmp_path: Path) -> None:
    for p, b in FILES.items():
        (tmp_path / p.lstrip("/")).write_bytes(b)
    with http.serve(http.HttpConfig(root=tmp_path, address="127.0.0.1", port=0)) as srv:
        tally, got, _ = _fetch_all(srv.port, HttpPool())
        assert got == WANT
        assert tally.http_connections == 1
        assert tally.http_bytes == sum(len(b) for b in FILES.values())
        st = srv.stats.as_dict()
        assert st["requests"] == 4 and st["peak"] == 1
        # without a pool: a connection per request, each closed by the client's header
        tally, got, _ = _fetch_all(srv.port, None)
        assert got == WANT and tally.http_connections == 4


class _Server:
    """A loopback HTTP/1.1 server answering FILES, counting connections; after each answer it
    either says ``Connection: close`` (``say_close``) or keeps quiet and closes the connection
    anyway (a server whose idle timeout is shorter than the client's pool)."""

    def __init__(self, say_close: bool) -> None:
        self.say_close = say_close
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        line = await reader.readline()
        while await reader.readline() not in (b"\r\n", b""):
            pass
        body = FILES[line.split()[1].decode()]
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n"
        head += "Connection: close\r\n" if self.say_close else ""
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
        writer.close()


def _against(server: _Server) -> tuple[Tally, dict[str, str], list[str]]:
    async def main() -> tuple[Tally, dict[str, str], list[str]]:
        srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            return await asyncio.to_thread(_fetch_all, port, HttpPool())
        finally:
            srv.close()
            await srv.wait_closed()
    return asyncio.run(main())


def test_a_pooled_connection_the_server_ends_is_opened_again() -> None:
    told = _Server(say_close=True)
    tally, got, said = _against(told)
    assert got == WANT and said == ["close"] * 4
    assert tally.http_connections == told.connections == 4
    # closed without a word while idle: the request on it gets no answer, and goes again on
    # a new connection (iPXE's pool_reopen)
    silent = _Server(say_close=False)
    tally, got, said = _against(silent)
    assert got == WANT and said == [""] * 4
    assert tally.http_connections == silent.connections == 4
