"""A cold NFSv3 client per simulated node, for the ``nfs`` root of bench/bootstorm.py: just
enough ONC RPC (RFC 5531, record marking over TCP), portmapper (RFC 1833), MOUNT and NFSv3
(RFC 1813) to replay the reads a real boot makes (bench/nfs-boot-reads.txt) and check the
files read by SHA-256. Not a general NFS client."""

from __future__ import annotations

import asyncio
import hashlib
import random
import struct
from pathlib import Path
from typing import Any

RPC_NFS, RPC_MOUNT, RPC_PMAP = 100003, 100005, 100000
NFS3_GETATTR, NFS3_LOOKUP, NFS3_ACCESS, NFS3_READLINK, NFS3_READ = 1, 3, 4, 5, 6
NFS3_READDIRPLUS = 17
FATTR3 = 84  # bytes of a fattr3 (RFC 1813 2.6)


class Xdr:
    """Just enough XDR (RFC 4506) to read NFSv3 replies."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.d, self.p = data, pos

    def u32(self) -> int:
        v = struct.unpack_from(">I", self.d, self.p)[0]
        self.p += 4
        return int(v)

    def u64(self) -> int:
        v = struct.unpack_from(">Q", self.d, self.p)[0]
        self.p += 8
        return int(v)

    def opaque(self) -> bytes:
        n = self.u32()
        v = self.d[self.p:self.p + n]
        self.p += (n + 3) & ~3
        return v

    def skip(self, n: int) -> None:
        self.p += n

    def post_op_attr(self) -> tuple[int, int] | None:
        """(type, size) of a post_op_attr, or None."""
        if not self.u32():
            return None
        ftype = struct.unpack_from(">I", self.d, self.p)[0]
        size = struct.unpack_from(">Q", self.d, self.p + 20)[0]
        self.p += FATTR3
        return int(ftype), int(size)


def xdr_opaque(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b + bytes(-len(b) % 4)


AUTH_SYS = struct.pack(">I", 1) + xdr_opaque(struct.pack(">I", 0) + xdr_opaque(b"sdt-storm")
                                             + struct.pack(">III", 0, 0, 0))


class Rpc:
    """One ONC RPC connection over TCP (record marking, RFC 5531 11), calls one at a time, as
    a node's single mount does for one process reading its boot files in turn."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, tally: Any) -> None:
        self.r, self.w, self.tally, self.xid = r, w, tally, random.getrandbits(31)

    @classmethod
    async def connect(cls, src: str, server: str, port: int, tally: Any) -> Rpc:
        for attempt in range(8):
            try:
                r, w = await asyncio.open_connection(server, port, local_addr=(src, 0))
                return cls(r, w, tally)
            except OSError:
                tally.nfs_retries += 1
                await asyncio.sleep(0.5 * (attempt + 1))
        raise RuntimeError(f"no TCP connection to {server}:{port}")

    async def call(self, prog: int, vers: int, proc: int, args: bytes) -> Xdr:
        self.xid = (self.xid + 1) & 0xFFFFFFFF
        body = (struct.pack(">IIIIII", self.xid, 0, 2, prog, vers, proc) + AUTH_SYS
                + struct.pack(">II", 0, 0) + args)
        self.w.write(struct.pack(">I", 0x80000000 | len(body)) + body)
        reply = b""
        while True:
            mark = struct.unpack(">I", await self.r.readexactly(4))[0]
            reply += await self.r.readexactly(mark & 0x7FFFFFFF)
            if mark & 0x80000000:
                break
        x = Xdr(reply)
        xid, mtype, stat = x.u32(), x.u32(), x.u32()
        if xid != self.xid or mtype != 1 or stat != 0:
            raise RuntimeError(f"RPC {prog}/{proc}: bad reply (xid {xid}, stat {stat})")
        x.u32()
        x.opaque()  # verifier
        if (acc := x.u32()) != 0:
            raise RuntimeError(f"RPC {prog}/{proc}: not accepted ({acc})")
        self.tally.nfs_calls += 1
        return x

    def close(self) -> None:
        self.w.close()


async def getport(src: str, server: str, prog: int, vers: int, tally: Any) -> int:
    rpc = await Rpc.connect(src, server, 111, tally)
    try:
        x = await rpc.call(RPC_PMAP, 2, 3, struct.pack(">IIII", prog, vers, 6, 0))
        return x.u32()
    finally:
        rpc.close()


async def nfs_boot_reads(src: str, server: str, export: str, entries: list[tuple[str, int, str]],
                         rsize: int, tally: Any, check: set[str]) -> dict[str, str]:
    """What a node's kernel does for its NFS root from cold caches: the portmapper for MOUNT
    and NFS, MNT, then for each entry of the recorded boot (in order) a LOOKUP of every path
    component not looked up yet, and for a file ACCESS and READs of ``rsize`` to the end, a
    directory READDIRPLUS to the end, a symlink READLINK. Returns the SHA-256 of the files
    named in ``check``; raises RuntimeError on any NFS error or short file."""
    mport = await getport(src, server, RPC_MOUNT, 3, tally)
    nport = await getport(src, server, RPC_NFS, 3, tally)
    m = await Rpc.connect(src, server, mport, tally)
    try:
        x = await m.call(RPC_MOUNT, 3, 1, xdr_opaque(export.encode()))
        if (st := x.u32()) != 0:
            raise RuntimeError(f"MNT {export}: status {st}")
        root = x.opaque()
    finally:
        m.close()
    nfs = await Rpc.connect(src, server, nport, tally)
    fhs: dict[str, bytes] = {"": root}
    digests: dict[str, str] = {}
    try:
        await nfs.call(RPC_NFS, 3, NFS3_GETATTR, xdr_opaque(root))

        async def lookup(path: str) -> bytes:
            if path in fhs:
                return fhs[path]
            parent, _, name = path.rpartition("/")
            dfh = await lookup(parent)
            x = await nfs.call(RPC_NFS, 3, NFS3_LOOKUP, xdr_opaque(dfh) + xdr_opaque(name.encode()))
            if (st := x.u32()) != 0:
                raise RuntimeError(f"LOOKUP {path}: NFS3 status {st}")
            fhs[path] = x.opaque()
            return fhs[path]

        for kind, size, path in entries:
            fh = await lookup(path.strip("/"))
            if kind == "f":
                await nfs.call(RPC_NFS, 3, NFS3_ACCESS, xdr_opaque(fh) + struct.pack(">I", 0x3F))
                h = hashlib.sha256() if path in check else None
                off = 0
                while True:
                    x = await nfs.call(RPC_NFS, 3, NFS3_READ,
                                       xdr_opaque(fh) + struct.pack(">QI", off, rsize))
                    if (st := x.u32()) != 0:
                        raise RuntimeError(f"READ {path} at {off}: NFS3 status {st}")
                    x.post_op_attr()
                    x.u32()
                    eof = x.u32()
                    data = x.opaque()
                    if h is not None:
                        h.update(data)
                    off += len(data)
                    if eof or not data:
                        break
                tally.bytes += off
                if off != size:
                    raise RuntimeError(f"{path}: read {off} bytes, the file has {size}")
                if h is not None:
                    digests[path] = h.hexdigest()
            elif kind == "d":
                cookie, verf = 0, bytes(8)
                while True:
                    x = await nfs.call(RPC_NFS, 3, NFS3_READDIRPLUS, xdr_opaque(fh) + struct.pack(
                        ">Q", cookie) + verf + struct.pack(">II", 4096, 32768))
                    if (st := x.u32()) != 0:
                        raise RuntimeError(f"READDIRPLUS {path}: NFS3 status {st}")
                    x.post_op_attr()
                    verf = x.d[x.p:x.p + 8]
                    x.skip(8)
                    while x.u32():
                        x.u64()
                        x.opaque()
                        cookie = x.u64()
                        x.post_op_attr()
                        if x.u32():
                            x.opaque()
                    if x.u32():
                        break
            else:
                x = await nfs.call(RPC_NFS, 3, NFS3_READLINK, xdr_opaque(fh))
                if (st := x.u32()) != 0:
                    raise RuntimeError(f"READLINK {path}: NFS3 status {st}")
    finally:
        nfs.close()
    return digests


def load_reads(path: Path) -> list[tuple[str, int, str]]:
    """The recorded boot (bench/boot.py --record-reads): (kind, size, path) in order."""
    out = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            kind, size, p = line.split(" ", 2)
            out.append((kind, int(size) if size != "-" else 0, p))
    return out
