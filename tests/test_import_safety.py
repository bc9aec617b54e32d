"""Malicious and broken images are refused with one clear message, and nothing is written
outside the target root (nor left half-done inside the store). Layers are hand-made with
tarfile: no image tool will write these."""

from __future__ import annotations

import gzip
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import sidusctl
from tests.oci_helpers import sdt_tempdir, sha256, tar_of, ti, write_oci_layout

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

D, F, L, H = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
UP = "../" * 24  # far more than enough to reach / from the rootfs


@pytest.fixture
def canary() -> Iterator[Path]:
    """A directory outside the store that escapes would aim at, holding ``victim``."""
    with sdt_tempdir("sdt-canary-") as d:
        (d / "victim").write_text("intact\n")
        yield d


def _snapshot(d: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        out[str(p)] = (st.st_mode, st.st_nlink, p.read_bytes() if p.is_file() else b"")
    return out


def _cases(c: str) -> dict[str, tuple[list[bytes], str]]:
    """name -> (layers, expected message part). ``c`` is the canary path (absolute)."""
    rel = UP + c.lstrip("/")
    return {
        "dotdot-entry": ([tar_of([ti("a/", D), ti(f"a/{rel}/pwned", data=b"x")])],
                         "contains a '..' component"),
        "absolute-entry": ([tar_of([ti(f"{c}/pwned", data=b"x")])], "is an absolute path"),
        "symlink-parent-earlier-layer": (
            [tar_of([ti("evil", L, link=c)]), tar_of([ti("evil/pwned", data=b"x")])],
            "a symlink"),
        "relative-symlink-parent": (
            [tar_of([ti("evil", L, link=rel)]), tar_of([ti("evil/pwned", data=b"x")])],
            "a symlink"),
        "symlink-parent-same-layer": (
            [tar_of([ti("evil", L, link=c), ti("evil/pwned", data=b"x")])], "a symlink"),
        "hardlink-absolute": ([tar_of([ti("hl", H, link="/etc/passwd")])],
                              "is an absolute path"),
        "hardlink-dotdot": ([tar_of([ti("hl", H, link=rel + "/victim")])],
                            "contains a '..' component"),
        "hardlink-through-symlink": (
            [tar_of([ti("etc2", L, link="/etc")]), tar_of([ti("hl", H, link="etc2/passwd")])],
            "a symlink"),
        "hardlink-missing-target": ([tar_of([ti("hl", H, link="nothere")])], "missing"),
        "whiteout-dotdot": ([tar_of([ti("a/", D), ti("a/b/", D)]),
                             tar_of([ti("a/b/.wh...", F)])], "names '..'"),
        "whiteout-dot": ([tar_of([ti("a/", D)]), tar_of([ti("a/.wh..", F)])], "names '.'"),
        "whiteout-through-symlink": (
            [tar_of([ti("lnk", L, link=c)]), tar_of([ti("lnk/.wh.victim", F)])], "a symlink"),
        "opaque-through-symlink": (
            [tar_of([ti("lnk", L, link=c)]), tar_of([ti("lnk/.wh..wh..opq", F)])], "a symlink"),
    }


CASES = list(_cases("/x"))


@pytest.mark.parametrize("case", CASES)
def test_escape_refused(case: str, canary: Path) -> None:
    layers, expect = _cases(str(canary))[case]
    passwd = os.stat("/etc/passwd")
    before = _snapshot(canary)
    with sdt_tempdir() as work, sdt_tempdir("sdt-state-") as state:
        write_oci_layout(work / "oci", layers)
        r = sidusctl("import", str(work / "oci"), "sdt-evil", state=state)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert expect in r.stderr and "layer" in r.stderr
        assert "Traceback" not in r.stderr
        assert _snapshot(canary) == before
        assert os.stat("/etc/passwd").st_nlink == passwd.st_nlink
        # nothing half-done in the store: the refused first import leaves no image directory
        # (not even one holding only its .lock)
        d = state / "images" / "sdt-evil"
        assert not d.exists(), sorted(os.listdir(d))


def test_symlink_replaced_not_followed(canary: Path) -> None:
    """A later layer writing a regular file where an earlier one put a symlink to outside
    replaces the symlink; the outside file stays intact. This image is valid."""
    layers = [tar_of([ti("evil", L, link=str(canary / "victim"))]),
              tar_of([ti("evil", data=b"inside\n")])]
    before = _snapshot(canary)
    with sdt_tempdir() as work, sdt_tempdir("sdt-state-") as state:
        write_oci_layout(work / "oci", layers)
        r = sidusctl("import", str(work / "oci"), "sdt-ok", "--json", state=state)
        assert r.returncode == 0, r.stderr
        root = state / "images/sdt-ok/current/rootfs"
        assert (root / "evil").read_text() == "inside\n" and not (root / "evil").is_symlink()
    assert _snapshot(canary) == before


def _layout_with(work: Path, blob: bytes, diff_id: str, compress: bool = False) -> Path:
    """A layout whose single layer blob is ``blob`` verbatim (digest/size made to match)."""
    out = write_oci_layout(work / "oci", [b"placeholder"], compress=False, diff_ids=[diff_id])
    import json

    index = json.loads((out / "index.json").read_text())
    mpath = out / "blobs/sha256" / index["manifests"][0]["digest"][7:]
    man = json.loads(mpath.read_text())
    (out / "blobs/sha256" / sha256(blob)[7:]).write_bytes(blob)
    man["layers"][0].update(digest=sha256(blob), size=len(blob))
    if compress:
        man["layers"][0]["mediaType"] += "+gzip"
    mb = json.dumps(man).encode()
    (out / "blobs/sha256" / sha256(mb)[7:]).write_bytes(mb)
    index["manifests"][0].update(digest=sha256(mb), size=len(mb))
    (out / "index.json").write_text(json.dumps(index))
    return out


GOOD = tar_of([ti("bin/", D), ti("bin/big", data=os.urandom(200_000)), ti("etc/", D),
               ti("etc/hostname", data=b"sdt\n")])


@pytest.mark.parametrize("case", ["bad-diff-id", "bad-blob-digest", "truncated-tar",
                                  "truncated-gzip", "garbage"])
def test_corrupt_layers_refused(case: str) -> None:
    with sdt_tempdir() as work, sdt_tempdir("sdt-state-") as state:
        if case == "bad-diff-id":
            layout = _layout_with(work, GOOD, sha256(b"something else"))
            expect = "does not match the config's diff_id"
        elif case == "bad-blob-digest":
            layout = _layout_with(work, GOOD, sha256(GOOD))
            blob = layout / "blobs/sha256" / sha256(GOOD)[7:]
            data = bytearray(blob.read_bytes())
            data[-20000] ^= 0xFF  # flip a byte inside bin/big's data, size unchanged
            blob.write_bytes(bytes(data))
            expect = "does not match the manifest's"
        elif case == "truncated-tar":
            cut = GOOD[:150_000]
            layout = _layout_with(work, cut, sha256(GOOD))
            expect = "truncated or corrupt"
        elif case == "truncated-gzip":
            gz = gzip.compress(GOOD)
            layout = _layout_with(work, gz[: len(gz) // 2], sha256(GOOD), compress=True)
            expect = "truncated or corrupt"
        else:
            layout = _layout_with(work, b"\x1f\x8b" + os.urandom(5000), sha256(GOOD))
            expect = "truncated or corrupt"
        r = sidusctl("import", str(layout), "sdt-bad", state=state)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert expect in r.stderr and "layer 1" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        d = state / "images" / "sdt-bad"
        assert not d.exists() or sorted(os.listdir(d)) == [".lock"]


def test_replaced_directories_and_mtimes() -> None:
    """Valid: a directory replaced by a symlink and another by a file in later layers (the
    directory mtimes restored at the end must not touch them, nor fail); directory mtimes
    come from the headers even after children were added."""
    layers = [tar_of([ti("a/", D, mtime=1_000_000_000), ti("a/b/", D, mtime=1_000_000_001),
                      ti("c/", D, mtime=1_000_000_002), ti("c/d", data=b"d"),
                      ti("keep/", D, mtime=1_111_111_111)]),
              tar_of([ti("a", L, link="keep"), ti("c", data=b"now a file", mtime=1_200_000_000),
                      ti("keep/new", data=b"n")])]
    with sdt_tempdir() as work, sdt_tempdir("sdt-state-") as state:
        write_oci_layout(work / "oci", layers)
        r = sidusctl("import", str(work / "oci"), "sdt-ok", state=state)
        assert r.returncode == 0, r.stderr
        root = state / "images/sdt-ok/current/rootfs"
        assert os.readlink(root / "a") == "keep" and (root / "c").read_bytes() == b"now a file"
        assert int((root / "c").stat().st_mtime) == 1_200_000_000
        assert int((root / "keep").stat().st_mtime) == 1_111_111_111


def test_xattrs_and_capabilities_kept() -> None:
    """PAX xattr records: a file capability (binary value) and a user xattr are set; an
    SELinux label (the build host's) is not."""
    cap = b"\x01\x00\x00\x02\x00\x04\x00\x00" + b"\x00" * 12  # cap_net_bind_service+ep, v2
    ping = ti("bin/ping", data=b"\x7fELF", mode=0o755,
              xattrs={"security.capability": cap.decode("utf-8", "surrogateescape"),
                      "user.note": "hello", "security.selinux": "system_u:object_r:bin_t:s0"})
    with sdt_tempdir() as work, sdt_tempdir("sdt-state-") as state:
        write_oci_layout(work / "oci", [tar_of([ti("bin/", D), ping])])
        r = sidusctl("import", str(work / "oci"), "sdt-caps", state=state)
        assert r.returncode == 0, r.stderr
        f = state / "images/sdt-caps/current/rootfs/bin/ping"
        assert os.getxattr(f, "security.capability") == cap
        assert os.getxattr(f, "user.note") == b"hello"
        assert "security.selinux" not in os.listxattr(f)
        gc = subprocess.run(["getcap", str(f)], capture_output=True, text=True)
        if gc.returncode == 0:
            assert "cap_net_bind_service" in gc.stdout


class _Zeros:
    def __init__(self, n: int) -> None:
        self.left = n

    def read(self, k: int = -1) -> bytes:
        k = self.left if k < 0 else min(k, self.left)
        self.left -= k
        return bytes(k)


def test_sigterm_mid_layer_leaves_nothing() -> None:
    """SIGTERM while a big layer is being written: exit 130, the half-written generation is
    removed, no current generation appears."""
    import signal
    import time

    from tests.conftest import SIDUSCTL

    size = 768 << 20
    with sdt_tempdir() as work, sdt_tempdir("sdt-state-") as state:
        layer = work / "layer.tar.gz"
        with gzip.open(layer, "wb", compresslevel=1) as gz, \
                tarfile.open(fileobj=gz, mode="w|") as tf:
            big = tarfile.TarInfo("big")
            big.size = size
            tf.addfile(big, _Zeros(size))
        layout = _layout_with(work, layer.read_bytes(), sha256(b"unchecked"), compress=True)
        p = subprocess.Popen([*SIDUSCTL, "--state-dir", str(state), "import", str(layout),
                              "sdt-int"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            d = state / "images" / "sdt-int"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                big_files = list(d.glob(".building-*/rootfs/big")) if d.exists() else []
                if big_files and big_files[0].stat().st_size > (64 << 20):
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the import never started writing the layer")
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 130, err
        assert b"interrupted by SIGTERM" in err
        assert not d.exists(), sorted(os.listdir(d))  # a refused first import leaves no dir
