"""Byte streams of OCI blobs (image-spec v1.1 ``descriptor.md``, ``layer.md``): a reader that
hashes and counts what passes through it (the blob digest and the diff_id are checked while
streaming, never on a copy), gzip (RFC 1952) decompression with large reads, and the choice of
decompressor (gzip, zstd RFC 8878, or none) by a layer's magic bytes."""

from __future__ import annotations

import hashlib
import io
import zlib
from collections.abc import Callable
from typing import Protocol

import zstandard

CHUNK = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class Readable(Protocol):
    """A binary stream read from the start to the end (a blob's file, an HTTP response):
    ``read(n)`` returns up to ``n`` bytes, all that is left for -1, ``b""`` at the end."""

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes (all that is left for -1); ``b""`` at the end."""
        ...


class HashingReader:
    """Wraps a byte stream; ``read`` passes data through while hashing it (sha256) and
    counting ``bytes``. ``peek(n)`` returns the first bytes without consuming them."""

    def __init__(self, f: Readable, algo: str = "sha256") -> None:
        self._f = f
        self._h = hashlib.new(algo)
        self.algo = algo
        self.bytes = 0
        self._head = b""
        self.on_read: Callable[[int], None] | None = None

    def peek(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer if the stream ends first) without consuming them: they are
        hashed and counted when read."""
        while len(self._head) < n:
            more = self._f.read(n - len(self._head))
            if not more:
                break
            self._head += more
        return self._head[:n]

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream (tarfile needs full reads)."""
        if self._head:
            if n < 0 or n >= len(self._head):
                data = self._head
                self._head = b""
            else:
                data, self._head = self._head[:n], self._head[n:]
        else:
            data = b""
        if n < 0:
            data += self._f.read()
        elif len(data) < n:
            more = self._f.read(n - len(data))
            if more and len(data) + len(more) < n:
                parts: list[bytes] = [data, more]
                got = len(data) + len(more)
                while got < n:
                    more = self._f.read(n - got)
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
            else:
                data += more
        if data:
            self._h.update(data)
            self.bytes += len(data)
            if self.on_read is not None:
                self.on_read(len(data))
        return data

    def drain(self) -> None:
        """Read to the end (the digest must cover trailing padding too)."""
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        """``ALGO:HEX`` of the bytes read so far (``sha256:...``, the form of OCI descriptor
        digests, image-spec ``descriptor.md``)."""
        return f"{self.algo}:{self._h.hexdigest()}"

    # Forward-only positioning, enough for tarfile's "r:" mode reading members in order (it
    # then reads headers and data straight from this object, without its stream-mode
    # buffer copies).
    def tell(self) -> int:
        """The number of bytes read so far (peeked bytes not counted)."""
        return self.bytes

    def seek(self, pos: int, whence: int = 0) -> int:
        """Move forward to ``pos`` (``whence`` 0: from the start, 1: from here), reading and hashing
        the bytes skipped; the position reached (short of ``pos`` if the stream ends first).
        :class:`io.UnsupportedOperation` for a backward seek or one from the end."""
        if whence == 1:
            pos += self.bytes
        elif whence != 0:
            raise io.UnsupportedOperation("seek from the end of a stream")
        if pos < self.bytes:
            raise io.UnsupportedOperation("backward seek in a layer stream")
        while self.bytes < pos:
            if not self.read(min(CHUNK, pos - self.bytes)):
                break
        return self.bytes


class GzipReader:
    """gzip (RFC 1952) decompression with large reads; multi-member streams and trailing
    zero padding handled; CRC-32 and length of each member checked by zlib. EOFError if the
    stream ends inside a member, zlib.error on corrupt data."""

    def __init__(self, raw: Readable) -> None:
        self._raw = raw
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._buf = bytearray()
        self._eof = False

    def _fill(self) -> None:
        while not self._buf and not self._eof:
            if self._d.eof:
                rest = self._d.unused_data or self._raw.read(CHUNK)
                while rest and not rest.strip(b"\0"):
                    rest = self._raw.read(CHUNK)  # zero padding after the last member
                if not rest:
                    self._eof = True
                    return
                self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._buf += self._d.decompress(rest)
                continue
            chunk = self._d.unconsumed_tail or self._raw.read(CHUNK)
            if not chunk:
                raise EOFError("compressed stream ended before the end of a gzip member")
            self._buf += self._d.decompress(chunk, 4 * CHUNK)

    def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` decompressed bytes (all that is left for -1); ``b""`` at the end.
        EOFError or zlib.error as for the class."""
        if n < 0:
            parts: list[bytes] = []
            while True:
                self._fill()
                if not self._buf:
                    return b"".join(parts)
                parts.append(bytes(self._buf))
                self._buf.clear()
        self._fill()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out



def decompressor(raw: HashingReader) -> tuple[str, Readable]:
    """(compression name, uncompressed stream) for a layer blob, by its magic bytes."""
    head = raw.peek(4)
    if head.startswith(_GZIP_MAGIC):
        return "gzip", GzipReader(raw)
    if head.startswith(_ZSTD_MAGIC):
        return "zstd", zstandard.ZstdDecompressor().stream_reader(
            raw, read_size=CHUNK, read_across_frames=True)  # type: ignore[arg-type]
    return "none", raw
