"""What the TFTP tests share: the server running on its own event loop in a thread
(:class:`Live`), the served tree (:func:`make_root`), valid datagrams of each kind for
the fuzz tests (:data:`VALID`), and small helpers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from sidusctl.serve.tftp import TftpConfig, TftpServer

VALID = [b"\x00\x01pxelinux.0\x00octet\x00blksize\x001468\x00tsize\x000\x00",
         b"\x00\x04\x00\x01", b"\x00\x05\x00\x08cancel\x00", b"\x00\x03\x00\x01data",
         b"\x00\x02up\x00octet\x00"]
"""One valid datagram of each kind (RRQ with options, ACK, ERROR, DATA, WRQ): the seeds the
fuzz tests mutate."""

T = TypeVar("T")


class Live:
    """The server running on its own event loop in a thread."""

    def __init__(self, root: Path, **kw: object) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        cfg = TftpConfig(root=root, address="127.0.0.1", port=0, **kw)  # type: ignore[arg-type]

        async def make() -> TftpServer:
            s = TftpServer(cfg)
            await s.start()
            return s

        self.server = asyncio.run_coroutine_threadsafe(make(), self.loop).result(5)
        self.port = self.server.port

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a client coroutine on a separate loop in this thread."""
        return asyncio.run(coro)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def make_root(r: Path) -> Path:
    """Fill the empty directory ``r`` with the files the live tests fetch: ``small.bin``
    (70,001 bytes), ``exact.bin`` (20 blocks of 1468: ends with an empty DATA block),
    ``pxelinux.cfg/default``, ``big.bin`` (33 MiB + 1 byte: block numbers roll over at
    blksize 512), symlinks leading out (``escape``, ``escapedir``) and one inside
    (``inside``). Returns ``r``."""
    (r / "small.bin").write_bytes(os.urandom(70_001))
    (r / "exact.bin").write_bytes(os.urandom(1468 * 20))  # ends with an empty DATA block
    (r / "pxelinux.cfg").mkdir()
    (r / "pxelinux.cfg" / "default").write_text("DEFAULT linux\n")
    big = r / "big.bin"
    with big.open("wb") as f:  # 33 MiB + 1 byte: block numbers roll over at blksize 512
        chunk = os.urandom(1 << 20)
        for i in range(33):
            f.write(bytes([i]) + chunk[1:])
        f.write(b"x")
    (r / "escape").symlink_to("/etc/passwd")
    (r / "escapedir").symlink_to("/etc")
    (r / "inside").symlink_to("small.bin")
    return r


def sha(p: Path | bytes) -> str:
    """The SHA-256 of a file's content or of bytes, in hex."""
    return hashlib.sha256(p if isinstance(p, bytes) else p.read_bytes()).hexdigest()


def wait_for(cond: object, secs: float = 10) -> None:
    """Poll ``cond()`` every 20 ms until true or ``secs`` pass (a bound, not a timed
    assertion: the caller asserts what it waited for)."""
    deadline = time.monotonic() + secs
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.02)


