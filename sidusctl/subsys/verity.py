"""dm-verity hash trees for read-only images: the node checks each block it reads, not the
whole file before it boots.

A squashfs-http node used to hash the whole downloaded file (SHA-256) before mounting it; a
node that boots reads a fraction of its root. With a hash tree appended to the file and its
root hash on the kernel command line, the node's kernel (dm-verity) checks every 4 KiB block
against the tree when it is first read, and a block that does not match is an I/O error,
never wrong data.

The layout is dm-verity's format version 1 without a superblock, as ``veritysetup format
--no-superblock --hash-offset`` writes it (Linux ``Documentation/admin-guide/device-mapper/
verity.rst``; cryptsetup's ``lib/verity/verity_hash.c``), so that ``veritysetup verify``
checks what :func:`append_tree` wrote:

- the data: ``data_blocks`` blocks of :data:`BLOCK` bytes (the file padded with zeros);
- right after it (``hash_start`` = ``data_blocks``, in blocks), the tree: level 0 holds
  ``sha256(salt + block)`` of each data block, :data:`PER_BLOCK` digests per hash block
  (zero-padded); level ``i + 1`` holds the digests of level ``i``'s blocks, until a level fits
  in one block. The levels are stored from the top one down to level 0;
- the root hash: ``sha256(salt + top block)`` (with one data block and no level, the digest of
  that block).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sidusctl.core.errors import SidusError

#: data and hash block size, bytes (dm-verity's usual 4096: the page size)
BLOCK = 4096
#: digests per hash block (32-byte SHA-256 digests)
PER_BLOCK = BLOCK // 32
ALGORITHM = "sha256"


@dataclass(frozen=True)
class VerityInfo:
    """The dm-verity parameters of a file whose tree :func:`append_tree` wrote:
    ``data_blocks`` (the data's size in :data:`BLOCK` blocks; the tree starts right after,
    at block ``data_blocks``), ``root_hash`` and ``salt`` (hex), ``tree_blocks`` (the tree's
    size in blocks)."""

    data_blocks: int
    root_hash: str
    salt: str
    tree_blocks: int

    @property
    def hash_start(self) -> int:
        """Where the tree starts, in blocks from the file's start."""
        return self.data_blocks

    def kernel_arg(self) -> str:
        """``DATA_BLOCKS:ROOT_HASH:SALT``, the value of the node's ``sidus.verity=``."""
        return f"{self.data_blocks}:{self.root_hash}:{self.salt}"

    def as_dict(self) -> dict[str, Any]:
        """The four fields by name, as an export's record (JSON) holds them."""
        return {"data_blocks": self.data_blocks, "root_hash": self.root_hash,
                "salt": self.salt, "tree_blocks": self.tree_blocks}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VerityInfo:
        """The inverse of :meth:`as_dict`; :class:`ValueError`, :class:`KeyError` or
        :class:`TypeError` when ``raw`` is not one."""
        info = cls(int(raw["data_blocks"]), str(raw["root_hash"]), str(raw["salt"]),
                   int(raw["tree_blocks"]))
        bytes.fromhex(info.root_hash)
        bytes.fromhex(info.salt)
        if info.data_blocks < 1 or info.tree_blocks < 0 or len(info.root_hash) != 64:
            raise ValueError(f"not a verity record: {raw}")
        return info


def levels(data_blocks: int) -> list[int]:
    """The number of hash blocks of each level, level 0 first, for ``data_blocks`` data
    blocks (the kernel's ``verity_ctr``: as many levels as it takes for
    ``(data_blocks - 1) >> (7 * levels)`` to reach 0)."""
    out = []
    n = 0
    while (data_blocks - 1) >> (7 * n):
        n += 1
    for i in range(n):
        out.append(-(-data_blocks // PER_BLOCK ** (i + 1)))
    return out


def _digests(f: BinaryIO, count: int, salted: Any, whole: Any) -> bytes:
    """The salted digest of each of ``count`` blocks read from ``f`` (the last one padded
    with zeros), concatenated; every byte read also goes into ``whole``."""
    out = bytearray()
    for _ in range(count):
        block = f.read(BLOCK)
        whole.update(block)
        if len(block) < BLOCK:
            block += bytes(BLOCK - len(block))
        h = salted.copy()
        h.update(block)
        out += h.digest()
    return bytes(out)


def _pack(digests: bytes) -> list[bytes]:
    """``digests`` cut into hash blocks, the last one padded with zeros."""
    blocks = [digests[i:i + BLOCK] for i in range(0, len(digests), BLOCK)]
    if blocks and len(blocks[-1]) < BLOCK:
        blocks[-1] += bytes(BLOCK - len(blocks[-1]))
    return blocks


def append_tree(path: Path, salt: bytes) -> tuple[VerityInfo, str]:
    """Pad ``path`` with zeros to whole :data:`BLOCK` blocks and append its dm-verity hash
    tree (salted with ``salt``, 1-256 bytes; the same file and salt give the same bytes).
    Returns the verity parameters and the SHA-256 (hex) of the whole file as it is now. One
    pass over the data. The file is written in place: make it on a temp path, then rename.
    Raises :class:`SidusError` for an empty file or a salt out of range; :class:`OSError`."""
    if not 1 <= len(salt) <= 256:
        raise SidusError(f"verity salt of {len(salt)} bytes (expected 1-256)")
    size = path.stat().st_size
    if size == 0:
        raise SidusError(f"{path} is empty: nothing to protect with a hash tree")
    data_blocks = -(-size // BLOCK)
    salted = hashlib.sha256(salt)
    whole = hashlib.sha256()
    with open(path, "r+b") as f:
        level = _digests(f, data_blocks, salted, whole)
        pad = data_blocks * BLOCK - size
        if pad:
            f.write(bytes(pad))
            whole.update(bytes(pad))
        tree: list[list[bytes]] = []
        for count in levels(data_blocks):
            blocks = _pack(level)
            if len(blocks) != count:
                raise AssertionError(f"verity level of {len(blocks)} blocks, expected {count}")
            tree.append(blocks)
            level = b"".join(_salted_digest(salted, b) for b in blocks)
        # the top level is one block, so ``level`` is now its digest: the root hash (with
        # one data block and no level, that block's digest)
        root = level.hex()
        for blocks in reversed(tree):
            for b in blocks:
                f.write(b)
                whole.update(b)
        f.flush()
        os.fsync(f.fileno())
    return VerityInfo(data_blocks, root, salt.hex(), sum(len(b) for b in tree)), whole.hexdigest()


def _salted_digest(salted: Any, block: bytes) -> bytes:
    h = salted.copy()
    h.update(block)
    return bytes(h.digest())
