"""Helpers for the import tests: test images made with the real tools (buildah with its own
temporary storage, umoci, skopeo), a file-by-file tree comparison, and hand-made layer tars for
what no tool will produce (escapes, bad digests, hard links to lower layers)."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.proc_util import terminate

BUSYBOX = "/bin/busybox"


def _mounts_under(path: Path) -> list[str]:
    p = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f
                if ln.split()[4] == p or ln.split()[4].startswith(p + "/")]


class Buildah:
    """buildah with private storage (overlay driver, so deletions of whole directories become
    opaque whiteouts) in an ``sdt-buildah-*`` temp dir; chroot isolation. ``cleanup()``
    removes containers, images, leftover mounts and the storage."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sdt-buildah-", dir="/var/tmp"))
        self.base = ["buildah", "--root", str(self.dir / "root"), "--runroot",
                     str(self.dir / "run"), "--storage-driver", "overlay"]

    def __call__(self, *args: str) -> str:
        r = subprocess.run([*self.base, *args], capture_output=True, text=True, check=False,
                           timeout=300, env={**os.environ, "BUILDAH_ISOLATION": "chroot",
                                             "STORAGE_DRIVER": "overlay"})
        if r.returncode != 0:
            raise RuntimeError(f"buildah {' '.join(args)} failed: {r.stderr[-2000:]}")
        return r.stdout.strip()

    def run(self, ctr: str, script: str) -> None:
        self("run", "--isolation", "chroot", ctr, "--", "/bin/sh", "-c",
             script)

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self("rm", "--all")
        with contextlib.suppress(Exception):
            self("rmi", "--all", "--force")
        for m in sorted(_mounts_under(self.dir), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def busybox_tree(dest: Path, *, extra_users: bool = True) -> Path:
    """A small rootfs: static busybox with its applets (symlinks), passwd/group with user
    ``app`` (1000:1000) and ``svc`` (1001:2000 via group ``svcgrp``), and a few entries that
    exercise metadata: setuid mode, odd owners, an xattr, directories to delete later."""
    for d in ("bin", "etc", "home/app", "tmp", "opt/old", "d/x", "d/y", "var/log", "run"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, dest / "bin/busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    for a in applets:
        if a != "busybox" and not (dest / "bin" / a).exists():
            os.symlink("busybox", dest / "bin" / a)
    (dest / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
        + ("svc:x:1001:1001:svc:/var/svc:/bin/sh\n" if extra_users else ""))
    (dest / "etc/group").write_text("root:x:0:\napp:x:1000:\nsvcgrp:x:2000:svc\n")
    os.chown(dest / "home/app", 1000, 1000)
    os.chmod(dest / "tmp", 0o1777)
    (dest / "opt/old/a").write_text("old a\n")
    (dest / "opt/old/b").write_text("old b\n")
    (dest / "d/x/a").write_text("x/a\n")
    (dest / "d/y/b").write_text("y/b\n")
    (dest / "bin/suid").write_bytes(b"#!/bin/sh\necho suid\n")
    os.chmod(dest / "bin/suid", 0o4755)
    (dest / "var/log/owned").write_text("owned by 1234:5678\n")
    os.chown(dest / "var/log/owned", 1234, 5678)
    (dest / "etc/xattr-file").write_text("has a user xattr\n")
    os.setxattr(dest / "etc/xattr-file", "user.sdt", b"hello")
    return dest


def tar_of(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A tar (PAX format) of hand-made entries, as bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def ti(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *, mode: int = 0o644,
       uid: int = 0, gid: int = 0, link: str = "", mtime: int = 1_700_000_000,
       xattrs: dict[str, str] | None = None) -> tuple[tarfile.TarInfo, bytes | None]:
    t = tarfile.TarInfo(name)
    t.type = kind
    t.mode = mode
    t.uid, t.gid = uid, gid
    t.mtime = mtime
    t.linkname = link
    if xattrs:
        t.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    if kind == tarfile.REGTYPE:
        t.size = len(data)
        return t, data
    if kind == tarfile.DIRTYPE and mode == 0o644:
        t.mode = 0o755
    return t, None


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_oci_layout(dest: Path, layers: list[bytes], config: dict[str, Any] | None = None, *,
                     compress: bool = True, ref: str = "latest",
                     diff_ids: list[str] | None = None) -> Path:
    """An OCI image layout with the given layer tars (gzip'd unless ``compress`` is False);
    ``diff_ids`` overrides the config's (to make a bad digest)."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        d = sha256(data)
        (blobs / d.split(":")[1]).write_bytes(data)
        return d

    descs = []
    for layer in layers:
        blob = gzip.compress(layer, mtime=0) if compress else layer
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar"
                      + ("+gzip" if compress else ""), "digest": put(blob), "size": len(blob)})
    cfg = {"architecture": "amd64", "os": "linux", "config": (config or {}),
           "rootfs": {"type": "layers",
                      "diff_ids": diff_ids or [sha256(x) for x in layers]}}
    cfg_b = json.dumps(cfg).encode()
    man = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": put(cfg_b), "size": len(cfg_b)}, "layers": descs}
    man_b = json.dumps(man).encode()
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(man_b),
         "size": len(man_b), "annotations": {"org.opencontainers.image.ref.name": ref}}]}))
    return dest


# -- tree comparison ----------------------------------------------------------------------------

def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """path -> (type, mode, uid, gid, size, sha256, link target, rdev, xattrs) for every entry
    under ``root`` (root itself excluded), plus hard-link groups under key ``"<links>"``."""
    out: dict[str, tuple[Any, ...]] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            mode = st.st_mode
            digest = size = link = rdev = None
            if stat.S_ISREG(mode):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for chunk in iter(functools.partial(f.read, 1 << 20), b""):
                        h.update(chunk)
                digest, size = h.hexdigest(), st.st_size
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(mode):
                link = os.readlink(p)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            try:
                names = os.listxattr(p, follow_symlinks=False)
            except OSError:
                names = []
            xa = tuple(sorted((k, os.getxattr(p, k, follow_symlinks=False)) for k in names))
            out[rel] = (stat.S_IFMT(mode), stat.S_IMODE(mode) if not stat.S_ISLNK(mode) else None,
                        st.st_uid, st.st_gid, size, digest, link, rdev, xa)
    out["<links>"] = (tuple(sorted(tuple(sorted(g)) for g in inodes.values() if len(g) > 1)),)
    return out


def without(t: dict[str, tuple[Any, ...]], files: list[str],
            ref: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """``t`` less the runtime files sidusctl added (and the parent directories it had to make
    for them, i.e. those absent from ``ref``)."""
    drop = set()
    for f in files:
        rel = f.lstrip("/")
        drop.add(rel)
        parent = os.path.dirname(rel)
        while parent and parent not in ref:
            drop.add(parent)
            parent = os.path.dirname(parent)
    return {k: v for k, v in t.items() if k not in drop}


def diff_trees(a: dict[str, tuple[Any, ...]], b: dict[str, tuple[Any, ...]]) -> list[str]:
    """Human-readable differences (empty when identical)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            out.append(f"only in umoci: {k}")
        elif k not in b:
            out.append(f"only in sidusctl: {k}")
        elif a[k] != b[k]:
            out.append(f"differs: {k}: sidusctl {a[k]} != umoci {b[k]}")
    return out


def umoci_unpack(layout: Path, ref: str, dest: Path) -> Path:
    """``umoci unpack`` of ``layout:ref`` into the bundle ``dest``; returns its rootfs."""
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{ref}", str(dest)], check=True,
                   capture_output=True, timeout=300)
    return dest / "rootfs"


@contextlib.contextmanager
def sdt_tempdir(prefix: str = "sdt-oci-") -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Registry:
    """Debian's ``docker-registry`` (distribution) on 127.0.0.1:<free port>, own config and
    storage in an ``sdt-registry-*`` dir; ``htpasswd=(user, password)`` turns on Basic auth.
    Stopped (SIGTERM, then SIGKILL) and removed by ``stop()``."""

    def __init__(self, htpasswd: tuple[str, str] | None = None,
                 auth_yaml: str = "") -> None:
        import socket
        import time
        import urllib.error
        import urllib.request

        self.dir = Path(tempfile.mkdtemp(prefix="sdt-registry-", dir="/var/tmp"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        auth = auth_yaml
        if htpasswd:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                import crypt  # bcrypt through libxcrypt; the registry accepts only bcrypt
            pw = crypt.crypt(htpasswd[1], crypt.mksalt(crypt.METHOD_BLOWFISH))
            (self.dir / "htpasswd").write_text(f"{htpasswd[0]}:{pw}\n")
            auth = (f"auth:\n  htpasswd:\n    realm: sdt\n    path: {self.dir / 'htpasswd'}\n")
        (self.dir / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {self.dir / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n" + auth)
        self.log = open(self.dir / "log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(["docker-registry", "serve", str(self.dir / "config.yml")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # 401 with auth on: it is up
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("docker-registry did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        terminate(self.proc, timeout=10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class TokenServer:
    """A Docker-token-spec auth server on 127.0.0.1 for ``docker-registry``'s ``auth: token``:
    checks Basic credentials, answers ``{"token": JWT}`` (RS256, the signing certificate in
    the ``x5c`` header) granting the requested scope. Key and certificate made with openssl."""

    def __init__(self, work: Path, user: str, password: str) -> None:
        import base64
        import http.server
        import threading
        import time
        import urllib.parse

        self.key, self.cert = work / "token.key", work / "token.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "1", "-subj", "/CN=sdt-token", "-keyout", str(self.key), "-out",
                        str(self.cert)], check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
                             check=True, capture_output=True).stdout
        x5c = base64.b64encode(der).decode()
        key = self.key
        self.issued = 0
        outer = self

        def b64(b: bytes) -> str:
            return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                want = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
                if self.headers.get("Authorization") != want:
                    self.send_response(401)
                    self.end_headers()
                    return
                q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                access = []
                for scope in q.get("scope", []):
                    typ, name, actions = scope.split(":")
                    access.append({"type": typ, "name": name, "actions": actions.split(",")})
                now = int(time.time())
                header = {"alg": "RS256", "typ": "JWT", "x5c": [x5c]}
                claims = {"iss": "sdt-issuer", "sub": user, "aud": q.get("service", [""])[0],
                          "exp": now + 600, "nbf": now - 10, "iat": now,
                          "jti": f"sdt-{now}-{outer.issued}", "access": access}
                signing = (b64(json.dumps(header).encode()) + "." +
                           b64(json.dumps(claims).encode()))
                sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key)],
                                     input=signing.encode(), capture_output=True,
                                     check=True).stdout
                body = json.dumps({"token": signing + "." + b64(sig)}).encode()
                outer.issued += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def registry_auth(self) -> str:
        return (f"auth:\n  token:\n    realm: {self.url}\n    service: sdt-registry\n"
                f"    issuer: sdt-issuer\n    rootcertbundle: {self.cert}\n")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
