#!/usr/bin/env python3
"""Benchmark: ``sidusctl import`` against ``umoci unpack`` (the reference unpacker) on the same
multi-layer OCI image, side by side, at two layer sizes.

Prints, per layer size: wall time of each tool, the ratio sidusctl/umoci (aim: <= 1.2), and
the peak RSS of each (aim for sidusctl: flat in the layer size, as layers are streamed).

The image (3 gzip layers: many small files, a few large ones, deletions by whiteout in the
upper layers) is generated with tarfile into a temp dir under /var/tmp (``sdt-bench-*``),
removed afterwards. Needs root (owners) and umoci. Usage::

    sudo .venv/bin/python bench/import.py [--sizes 32,256] [--runs 2]
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# sidusctl's import service (what `sidusctl import` runs after parsing its options)
SERVICE = """
import sys
from pathlib import Path
from sidusctl.oci.importer import ImportOptions, import_image
from sidusctl.subsys.imagestore import ImageStore
import_image(ImageStore(Path(sys.argv[1])), sys.argv[2], "bench", ImportOptions())
"""


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_layer(path: Path, index: int, size_mb: int, rng: random.Random) -> str:
    """Write a gzip'd layer tar of about ``size_mb`` MiB to ``path``; returns its diff_id."""
    block = rng.randbytes(1 << 16)  # compressible ~2:1 once repeated with noise
    h = hashlib.sha256()

    class _Tee(io.RawIOBase):
        def __init__(self, gz: gzip.GzipFile) -> None:
            self.gz = gz

        def write(self, b: bytes) -> int:  # type: ignore[override]
            h.update(b)
            self.gz.write(b)
            return len(b)

        def writable(self) -> bool:
            return True

    target = size_mb << 20
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1,
                                                mtime=0) as gz:
        tee = _Tee(gz)
        with tarfile.open(fileobj=tee, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            written = 0
            d = 0
            if index > 0:  # delete some of the layer below: whiteouts
                for k in range(0, 200, 7):
                    ti = tarfile.TarInfo(f"l{index - 1}/d{k % 20}/.wh.f{k}")
                    tf.addfile(ti, io.BytesIO(b""))
            while written < target:
                dname = f"l{index}/d{d % 20}"
                if d < 20:
                    ti = tarfile.TarInfo(dname)
                    ti.type = tarfile.DIRTYPE
                    ti.mode = 0o755
                    tf.addfile(ti)
                # like a distribution's files: 97% small (1-16 KiB), 3% large (256 KiB-4 MiB)
                small = rng.random() < 0.97
                n = rng.randint(1, 16) << 10 if small else rng.randint(1, 16) << 18
                data = (block * (n // len(block) + 1))[:n]
                data = rng.randbytes(64) + data[64:]
                ti = tarfile.TarInfo(f"{dname}/f{d}")
                ti.size = n
                ti.mode = 0o644
                ti.uid = ti.gid = 1000 if d % 3 == 0 else 0
                tf.addfile(ti, io.BytesIO(data))
                written += n
                d += 1
    return "sha256:" + h.hexdigest()


def make_image(dest: Path, size_mb: int, layers: int = 3) -> None:
    rng = random.Random(42)
    blobs = dest / "blobs/sha256"
    blobs.mkdir(parents=True)
    descs, diff_ids = [], []
    for i in range(layers):
        tmp = dest / f"layer{i}.tgz"
        diff_ids.append(make_layer(tmp, i, size_mb, rng))
        data_digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            for chunk in iter(functools.partial(f.read, 1 << 20), b""):
                data_digest.update(chunk)
        d = "sha256:" + data_digest.hexdigest()
        size = tmp.stat().st_size
        os.replace(tmp, blobs / d[7:])
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d,
                      "size": size})
    cfg = json.dumps({"architecture": "amd64", "os": "linux",
                      "config": {"Cmd": ["/bin/sh"]},
                      "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    (blobs / _sha(cfg)[7:]).write_bytes(cfg)
    man = json.dumps({"schemaVersion": 2,
                      "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": _sha(cfg), "size": len(cfg)},
                      "layers": descs}).encode()
    (blobs / _sha(man)[7:]).write_bytes(man)
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _sha(man),
         "size": len(man), "annotations": {"org.opencontainers.image.ref.name": "bench"}}]}))


def timed(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in MiB) of one run of ``argv``."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.monotonic() - t0
    if status != 0:
        err = p.stderr.read().decode() if p.stderr else ""
        raise SystemExit(f"{argv[0]} failed: {err[-2000:]}")
    return dt, ru.ru_maxrss // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32,256", help="layer sizes in MiB (comma-separated)")
    ap.add_argument("--runs", type=int, default=2, help="runs per tool (best time kept)")
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("umoci"):
        raise SystemExit("needs root and umoci (apt-get install umoci)")
    work = Path(tempfile.mkdtemp(prefix="sdt-bench-", dir="/var/tmp"))
    rows = []
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            img = work / f"img{size}"
            make_image(img, size)
            best: dict[str, tuple[float, int]] = {}
            for _ in range(args.runs):
                for tool in ("umoci", "sidusctl", "sidusctl-cli"):
                    out = work / f"out-{tool}"
                    shutil.rmtree(out, ignore_errors=True)
                    subprocess.run(["sync"], check=True)
                    if tool == "umoci":
                        argv = ["umoci", "unpack", "--image", f"{img}:bench", str(out)]
                    elif tool == "sidusctl":  # the import service, in a fresh process
                        argv = [sys.executable, "-c", SERVICE, str(out), f"oci:{img}:bench"]
                    else:  # the whole CLI (its start-up imports every command module)
                        argv = [sys.executable, "-m", "sidusctl", "--state-dir", str(out),
                                "-q", "import", f"oci:{img}:bench", "bench"]
                    dt, rss = timed(argv)
                    if tool not in best or dt < best[tool][0]:
                        best[tool] = (dt, max(rss, best.get(tool, (0, 0))[1]))
                    shutil.rmtree(out, ignore_errors=True)
            ratio = best["sidusctl"][0] / best["umoci"][0]
            rows.append((size, best, ratio))
            shutil.rmtree(img)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'layers':>14} | {'umoci s':>8} {'RSS MiB':>8} | {'sidusctl s':>10} "
          f"{'RSS MiB':>8} | ratio | {'CLI s':>6} {'RSS MiB':>8} | ratio")
    for size, best, ratio in rows:
        cli = best["sidusctl-cli"]
        print(f"{'3 x ' + str(size) + ' MiB':>14} | {best['umoci'][0]:8.2f} "
              f"{best['umoci'][1]:8d} | {best['sidusctl'][0]:10.2f} {best['sidusctl'][1]:8d}"
              f" | {ratio:.2f}x | {cli[0]:6.2f} {cli[1]:8d} | {cli[0] / best['umoci'][0]:.2f}x")


if __name__ == "__main__":
    main()
