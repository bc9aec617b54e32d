"""dm-verity hash trees (sidusctl.subsys.verity) against cryptsetup's ``veritysetup``, the
reference implementation of the format: what ``append_tree`` writes, ``veritysetup verify``
accepts with the same root hash, salt and offsets, and refuses once a data or tree byte
changed. No kernel device-mapper is needed (``verify`` checks in userspace); the kernel side
is proven by the squashfs-http guest of tests/test_squashfs_boot.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sidusctl.core.errors import SidusError
from sidusctl.netboot import squash
from sidusctl.subsys import verity
from tests.conftest import sidusctl
from tests.test_squashfs import make_store

pytestmark = pytest.mark.skipif(shutil.which("veritysetup") is None,
                                reason="cryptsetup-bin missing (scripts/setup-host)")

SALT = bytes(range(1, 33))


def veritysetup_verify(path: Path, info: verity.VerityInfo) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["veritysetup", "verify", str(path), str(path), info.root_hash, "--no-superblock",
         f"--salt={info.salt}", f"--data-blocks={info.data_blocks}",
         f"--hash-offset={info.hash_start * verity.BLOCK}", "--hash=sha256",
         f"--data-block-size={verity.BLOCK}", f"--hash-block-size={verity.BLOCK}"],
        capture_output=True, text=True, check=False)


def veritysetup_root(data: Path, tmp: Path, info: verity.VerityInfo) -> str:
    """The root hash ``veritysetup format`` computes for ``data`` (its own tree file)."""
    r = subprocess.run(["veritysetup", "format", str(data), str(tmp / "ref.tree"),
                        "--no-superblock", f"--salt={info.salt}",
                        f"--data-blocks={info.data_blocks}"],
                       capture_output=True, text=True, check=True)
    line = next(x for x in r.stdout.splitlines() if x.startswith("Root hash:"))
    return line.split(":", 1)[1].strip()


@pytest.mark.parametrize("size", [1, 4096, 4097, 128 * 4096, 128 * 4096 + 1,
                                  128 * 128 * 4096 + 5])
def test_tree_matches_veritysetup(tmp_path: Path, size: int) -> None:
    """Sizes around the edges: one partial block (no level), one block, two, one full
    level-0 hash block, one more (two levels), and past 128 * 128 blocks (three levels)."""
    data = tmp_path / "img"
    with open(data, "wb") as f:
        f.write(os.urandom(min(size, 1 << 20)))
        f.truncate(size)
    original = data.read_bytes()
    info, sha = verity.append_tree(data, SALT)
    assert info.data_blocks == -(-size // verity.BLOCK)
    assert info.tree_blocks == sum(verity.levels(info.data_blocks))
    raw = data.read_bytes()
    assert len(raw) == (info.data_blocks + info.tree_blocks) * verity.BLOCK
    assert raw[:size] == original and raw[size:info.data_blocks * verity.BLOCK].count(0) == \
        info.data_blocks * verity.BLOCK - size
    assert sha == hashlib.sha256(raw).hexdigest()
    r = veritysetup_verify(data, info)
    assert r.returncode == 0, r.stdout + r.stderr
    padded = tmp_path / "padded"
    padded.write_bytes(raw[:info.data_blocks * verity.BLOCK])
    assert veritysetup_root(padded, tmp_path, info) == info.root_hash


def test_levels_follow_the_kernel() -> None:
    assert verity.levels(1) == []
    assert verity.levels(2) == [1]
    assert verity.levels(128) == [1]
    assert verity.levels(129) == [2, 1]
    assert verity.levels(128 * 128) == [128, 1]
    assert verity.levels(128 * 128 + 1) == [129, 2, 1]


@pytest.mark.parametrize("where", ["data", "tree", "padding"])
def test_a_changed_byte_is_refused(tmp_path: Path, where: str) -> None:
    data = tmp_path / "img"
    data.write_bytes(os.urandom(300 * 4096 + 100))
    info, _ = verity.append_tree(data, SALT)
    offset = {"data": 123 * 4096 + 7, "padding": 300 * 4096 + 200,
              "tree": info.hash_start * verity.BLOCK + 4096 + 40}[where]
    with open(data, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
    r = veritysetup_verify(data, info)
    assert r.returncode != 0, f"veritysetup accepted a file changed in its {where}"


def test_same_file_same_salt_same_bytes_and_bad_input(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    payload = os.urandom(9000)
    a.write_bytes(payload)
    b.write_bytes(payload)
    ia, sa = verity.append_tree(a, SALT)
    ib, sb = verity.append_tree(b, SALT)
    assert (ia, sa) == (ib, sb) and a.read_bytes() == b.read_bytes()
    assert ia.kernel_arg() == f"3:{ia.root_hash}:{SALT.hex()}"
    assert verity.VerityInfo.from_dict(ia.as_dict()) == ia
    for bad in ({"data_blocks": 0, "root_hash": "00" * 32, "salt": "01", "tree_blocks": 0},
                {"data_blocks": 3, "root_hash": "zz", "salt": "01", "tree_blocks": 1},
                {"data_blocks": 3}):
        with pytest.raises((ValueError, KeyError, TypeError)):
            verity.VerityInfo.from_dict(bad)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(SidusError, match="empty"):
        verity.append_tree(empty, SALT)
    with pytest.raises(SidusError, match="salt"):
        verity.append_tree(a, b"")


@pytest.mark.skipif(shutil.which("mksquashfs") is None, reason="squashfs-tools missing")
def test_an_export_ends_with_its_tree_and_is_still_a_squashfs(tmp_path: Path) -> None:
    """The export's record carries the tree's parameters, veritysetup accepts the file, the
    salt is the packed squashfs's digest (same tree, same bytes), and the squashfs tools
    still read the file with the tree after it (as a squashfs-nfs node's loop mount does)."""
    state = tmp_path / "state"
    make_store(state, ["gen-20260101T000000-1"])
    ex, how = squash.export(state, "img")
    assert how == "built" and ex.verity is not None
    assert veritysetup_verify(ex.path, ex.verity).returncode == 0
    raw = ex.path.read_bytes()
    assert ex.size == len(raw) and ex.sha256 == hashlib.sha256(raw).hexdigest()
    # mksquashfs pads to 4 KiB: the data blocks are the packed squashfs, salted with its digest
    assert ex.verity.salt == hashlib.sha256(raw[:ex.verity.data_blocks * verity.BLOCK]).hexdigest()
    again = squash.find(state, "img", "gen-20260101T000000-1")
    assert again is not None and again.verity == ex.verity
    out = tmp_path / "out"
    subprocess.run(["unsquashfs", "-q", "-d", str(out), str(ex.path)], check=True,
                   capture_output=True)
    assert (out / "etc/hostname").read_text() == "node\n"
    # packed again from the same tree (by the command): the same bytes, tree included
    r = sidusctl("pxe", "squashfs", "img", "--force", state=state)
    assert r.returncode == 0, r.stderr
    assert f"built ({ex.size} bytes, sha256 {ex.sha256}, verity root hash " \
        f"{ex.verity.root_hash})" in (r.stdout + r.stderr).replace("\n", ""), r.stderr
    assert ex.path.read_bytes() == raw
