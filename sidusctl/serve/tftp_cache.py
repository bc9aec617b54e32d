"""The DATA packets of the files a TFTP server is sending, built once per file and block size
and shared by every transfer of that file (:class:`PacketCache`).

In a boot storm hundreds of nodes fetch the same kernel and initrd in lock-step (RFC 1350):
about 4,300 DATA packets each at blksize 1468 for 6 MiB. With the packets built, answering
an ACK is a list lookup and one ``send``, instead of a read, a header packed and the block
copied into a new packet for every node and block (bench/bootstorm.py: the server's
Python time per block was what serve-pxe paid more than dnsmasq)."""

from __future__ import annotations

import os
from collections import OrderedDict

from sidusctl.serve import tftp_codec as tc

#: bytes of packets kept, all files together (least recently used files dropped first)
CACHE_LIMIT = 128 << 20
#: bytes: a larger file is not cached (its transfers read their blocks themselves)
MAX_FILE = 64 << 20


def build_packets(data: bytes, blksize: int) -> list[bytes]:
    """The DATA packets of ``data`` (RFC 1350 section 5: opcode 3, the 16-bit block number,
    ``blksize`` bytes of data, RFC 2348): packet ``i`` (0-based) carries block ``i + 1``,
    numbered modulo 65536 (the number rolls over to 0 after 65535); the last is shorter than
    ``blksize``, empty when the size is a multiple of it. ``len(data) // blksize + 1``
    packets. Pure."""
    view = memoryview(data)
    encode = tc.encode_data
    return [encode(i + 1, view[off:off + blksize])
            for i, off in enumerate(range(0, len(data) + 1, blksize))]


class PacketCache:
    """Packets by file (device, inode, size, modification time in ns) and block size, at most
    ``limit`` bytes in all (packet payload and headers), files over ``max_file`` bytes left
    out. Used from the event loop's thread only (no lock)."""

    def __init__(self, limit: int = CACHE_LIMIT, max_file: int = MAX_FILE) -> None:
        self.limit = limit
        self.max_file = max_file
        self._entries: OrderedDict[tuple[int, ...], tuple[list[bytes], int]] = OrderedDict()
        self.size = 0  # bytes held
        self.hits = 0
        self.misses = 0

    def get(self, fd: int, st: os.stat_result, blksize: int) -> list[bytes] | None:
        """The packets of the open regular file ``fd`` (``st``: its fstat) at ``blksize``;
        built from the file on a miss. None if the file is over ``max_file`` or ``limit``
        bytes, or if it could not be read whole (shorter than ``st`` says: being rewritten;
        the transfer then reads its blocks itself). Raises OSError from reading ``fd``."""
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, blksize)
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return hit[0]
        size = st.st_size
        cost = size + (size // blksize + 1) * 4
        if size > self.max_file or cost > self.limit:
            return None
        self.misses += 1
        data = os.pread(fd, size, 0)
        if len(data) != size:
            return None
        packets = build_packets(data, blksize)
        self._entries[key] = (packets, cost)
        self.size += cost
        while self.size > self.limit:
            _, (_, old) = self._entries.popitem(last=False)
            self.size -= old
        return packets
