"""Registry pulls over the OCI distribution API (distribution-spec v1.1 "pull"; Docker
registry HTTP API v2): ``docker://host[:port]/repo[:tag|@sha256:digest]``.

- ``GET /v2/<repo>/manifests/<ref>`` with the OCI and Docker v2 manifest/index media types in
  ``Accept``; an index (manifest list) is resolved by platform; a manifest fetched by digest
  is checked against it.
- ``GET /v2/<repo>/blobs/<digest>`` for the config (checked) and the layers, streamed straight
  into the layer applier (which checks size, digest and diff_id; redirects to blob storage
  are followed without forwarding credentials to another host, as httpx does).
- Auth: anonymous first; on ``401`` the ``WWW-Authenticate`` challenge decides: ``Bearer``
  (token from the realm with ``service`` and ``scope=repository:<repo>:pull``, with basic
  credentials if any; Docker token spec) or ``Basic`` (RFC 7617).
- Credentials: ``--creds user:pass``, else ``$SIDUSCTL_REGISTRY_CREDS``, else an auth file
  (``--authfile``, ``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json``,
  ``~/.config/containers/auth.json``, ``~/.docker/config.json``: ``auths[host].auth``).
- ``--insecure``: plain HTTP (test registries on loopback). HTTPS otherwise, verified.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sidusctl.oci import ImageError
from sidusctl.oci.fields import index_manifests, json_field
from sidusctl.oci.sources import (
    DIGEST_RE,
    INDEX_TYPES,
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    Opener,
    ResolvedImage,
    from_manifest,
    host_platform,
    select_platform,
    verified_json,
)
from sidusctl.oci.streams import Readable

ACCEPT = ", ".join((MT_OCI_INDEX, MT_OCI_MANIFEST, MT_DOCKER_LIST, MT_DOCKER_MANIFEST))
MAX_MANIFEST = 4 << 20
DOCKER_HUB = "registry-1.docker.io"
_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)"
                      r"[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
# a registry host: a DNS name, an IPv4 address or a [bracketed] IPv6 address, then ":port"
_HOST_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>.*))?$")


@dataclass(frozen=True)
class Reference:
    """A parsed ``docker://`` reference: ``host`` (with port), ``repo``, ``tag`` or ``digest``."""

    host: str
    repo: str
    tag: str | None
    digest: str | None

    @property
    def ref(self) -> str:
        """What the manifest is asked for by: the digest if given, else the tag, else ``latest``."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return f"docker://{self.host}/{self.repo}" + (f"@{self.digest}" if self.digest
                                                        else f":{self.tag}")


def parse_reference(text: str) -> Reference:
    """``docker://host[:port]/repo[:tag|@sha256:hex]`` -> Reference; ImageError if malformed.
    Without a registry host (``docker://debian:12``) Docker Hub and ``library/`` are implied."""
    rest = text.removeprefix("docker://")
    digest = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not DIGEST_RE.match(digest):
            raise ImageError(f"{text}: '{digest}' is not a sha256:<64 hex> digest")
    first, _, path = rest.partition("/")
    if path and ("." in first or ":" in first or first == "localhost"):
        host = first
        _check_host(host, text)
    else:
        host, path = DOCKER_HUB, rest if "/" in rest else f"library/{rest}"
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise ImageError(f"{text}: '{tag}' is not a valid tag")
    if not path or not _REPO_RE.match(path):
        raise ImageError(f"{text}: '{path}' is not a valid repository name",
                         hint="docker://HOST[:PORT]/REPO:TAG or docker://HOST/REPO@sha256:...")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(host, path, tag, digest)


def _check_host(host: str, text: str) -> None:
    """ImageError naming ``text`` unless ``host`` is ``NAME[:PORT]`` with PORT 1-65535."""
    m = _HOST_RE.match(host)
    if not m:
        raise ImageError(f"{text}: '{host}' is not a valid registry host",
                         hint="docker://HOST[:PORT]/REPO:TAG")
    port = m.group("port")
    if port is not None and not (re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
        raise ImageError(f"{text}: port '{port}' of registry host '{host}' is not a number "
                         "from 1 to 65535")


def _auth_files(authfile: Path | None) -> list[Path]:
    if authfile is not None:
        return [authfile]
    out = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        out.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        out.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers/auth.json")
    home = Path.home()
    out += [home / ".config/containers/auth.json", home / ".docker/config.json"]
    return out


def find_creds(host: str, creds: str | None, authfile: Path | None) -> tuple[str, str] | None:
    """(user, password) for ``host`` from the option, the environment or an auth file."""
    creds = creds or os.environ.get("SIDUSCTL_REGISTRY_CREDS")
    if creds:
        user, sep, pw = creds.partition(":")
        if not sep:
            raise ImageError("--creds must be USER:PASSWORD")
        return user, pw
    for f in _auth_files(authfile):
        try:
            doc = json.loads(f.read_text())
        except FileNotFoundError:
            if authfile is not None:
                raise ImageError(f"{f}: auth file not found") from None
            continue
        except (OSError, ValueError) as e:
            raise ImageError(f"{f}: unreadable auth file ({e})") from e
        auths = doc.get("auths") if isinstance(doc, dict) else None
        if not isinstance(auths, dict):
            continue
        for key in (host, f"https://{host}", f"http://{host}", f"https://{host}/v1/"):
            entry = auths.get(key)
            if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
                try:
                    raw = base64.b64decode(entry["auth"]).decode()
                except ValueError as e:  # binascii.Error, UnicodeDecodeError
                    raise ImageError(f"{f}: key 'auths.{key}.auth' is not base64 of "
                                     f"USER:PASSWORD ({e})") from e
                user, _, pw = raw.partition(":")
                return user, pw
    return None


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class _IterReader:
    """``read(n)`` over an iterator of byte chunks (an HTTP response body)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._it = chunks
        self._buf = bytearray()
        self._eof = False

    def read(self, n: int = -1, /) -> bytes:
        while not self._eof and (n < 0 or len(self._buf) < n):
            try:
                self._buf += next(self._it)
            except StopIteration:
                self._eof = True
        if n < 0 or n >= len(self._buf):
            out = bytes(self._buf)
            self._buf.clear()
        else:
            out = bytes(self._buf[:n])
            del self._buf[:n]
        return out


class RegistryClient:
    """A pull-only client for one repository (``Reference``)."""

    def __init__(self, ref: Reference, *, insecure: bool = False, creds: str | None = None,
                 authfile: Path | None = None) -> None:
        self.ref = ref
        self.base = f"{'http' if insecure else 'https'}://{ref.host}/v2/{ref.repo}"
        self.creds = find_creds(ref.host, creds, authfile)
        self.auth: str | None = None
        self.client = httpx.Client(follow_redirects=True,
                                   timeout=httpx.Timeout(30.0, read=300.0))

    def close(self) -> None:
        """Close the HTTP client and its connections (idempotent); openers made by :meth:`opener`
        cannot be used after it."""
        self.client.close()

    def _authenticate(self, resp: httpx.Response) -> None:
        header = resp.headers.get("www-authenticate", "")
        scheme, params = _challenge(header)
        if scheme == "basic":
            if self.creds is None:
                raise ImageError(f"{self.ref}: the registry wants credentials (Basic auth)",
                                 hint="pass --creds USER:PASSWORD or --authfile")
            raw = f"{self.creds[0]}:{self.creds[1]}".encode()
            self.auth = "Basic " + base64.b64encode(raw).decode()
            return
        if scheme != "bearer" or "realm" not in params:
            raise ImageError(f"{self.ref}: unsupported auth challenge '{header}'")
        q = {"service": params.get("service", ""),
             "scope": params.get("scope") or f"repository:{self.ref.repo}:pull"}
        try:
            r = self.client.get(params["realm"], params={k: v for k, v in q.items() if v},
                                auth=self.creds)
        except httpx.HTTPError as e:
            raise ImageError(f"{self.ref}: token server {params['realm']} unreachable ({e})") \
                from e
        if r.status_code in (401, 403):
            raise ImageError(f"{self.ref}: the token server refused the credentials "
                             f"(HTTP {r.status_code})")
        if r.status_code != 200:
            raise ImageError(f"{self.ref}: token server answered HTTP {r.status_code}")
        try:
            doc = r.json()
        except ValueError as e:
            raise ImageError(f"{self.ref}: token server sent no JSON") from e
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str):
            raise ImageError(f"{self.ref}: token server sent no token")
        self.auth = f"Bearer {token}"

    def _send(self, path: str, accept: str | None = None) -> httpx.Response:
        """GET base+path (streamed; caller closes), authenticating once on 401."""
        for attempt in range(2):
            headers = {"Accept": accept} if accept else {}
            if self.auth:
                headers["Authorization"] = self.auth
            req = self.client.build_request("GET", self.base + path, headers=headers)
            try:
                resp = self.client.send(req, stream=True)
            except httpx.HTTPError as e:
                raise ImageError(f"{self.ref}: cannot reach the registry at {self.ref.host} "
                                 f"({e})", hint="--insecure for a plain-HTTP registry") from e
            if resp.status_code == 401 and attempt == 0:
                resp.close()
                self._authenticate(resp)
                continue
            if resp.status_code == 401:
                resp.close()
                raise ImageError(f"{self.ref}: the registry refused the credentials (HTTP 401)")
            if resp.status_code == 404:
                resp.close()
                raise ImageError(f"{self.ref}: {path.lstrip('/')} not found in the registry")
            if resp.status_code != 200:
                resp.close()
                raise ImageError(f"{self.ref}: GET {path} answered HTTP {resp.status_code}")
            return resp
        raise AssertionError("unreachable")

    def _small(self, path: str, accept: str | None = None) -> tuple[bytes, httpx.Response]:
        resp = self._send(path, accept)
        try:
            data = bytearray()
            for chunk in resp.iter_bytes():
                data += chunk
                if len(data) > MAX_MANIFEST:
                    raise ImageError(f"{self.ref}: {path} is larger than {MAX_MANIFEST} bytes")
            return bytes(data), resp
        finally:
            resp.close()

    def manifest(self, ref: str) -> tuple[bytes, dict[str, Any], str]:
        """(raw bytes, parsed JSON, digest) of the manifest or index ``ref``."""
        data, resp = self._small(f"/manifests/{ref}", ACCEPT)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if ref.startswith("sha256:") and digest != ref:
            raise ImageError(f"{self.ref}: manifest {ref} has digest {digest}")
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise ImageError(f"{self.ref}: manifest {ref} is not JSON ({e})") from e
        if not isinstance(doc, dict):
            raise ImageError(f"{self.ref}: manifest {ref} is not a JSON object")
        if not doc.get("mediaType") and resp.headers.get("content-type"):
            doc["mediaType"] = resp.headers["content-type"].split(";")[0].strip()
        return data, doc, digest

    def blob_json(self, digest: str) -> tuple[bytes, Any]:
        """``(raw bytes, parsed JSON)`` of the blob ``digest`` (at most 4 MiB), checked against the
        digest. :class:`ImageError` if the registry cannot be reached or refuses, or the blob is too
        large, does not match or is not JSON."""
        data, _ = self._small(f"/blobs/{digest}")
        return data, verified_json(data, digest, str(self.ref))

    def opener(self, digest: str) -> Opener:
        """An :data:`Opener` for the blob ``digest``: each use GETs it and yields its body as it
        comes (not decoded, not checked here), closing the response at the block's end;
        :class:`ImageError` when the GET fails."""
        @contextlib.contextmanager
        def _open() -> Iterator[Readable]:
            resp = self._send(f"/blobs/{digest}")
            try:
                yield _IterReader(resp.iter_raw(1 << 20))
            finally:
                resp.close()

        return _open


def resolve(source: str, *, platform: str | None, insecure: bool = False,
            creds: str | None = None, authfile: Path | None = None) -> ResolvedImage:
    """Resolve a ``docker://`` reference to a :class:`ResolvedImage` whose layers stream from
    the registry. The HTTP client stays open for the layer openers (closed at process exit)."""
    ref = parse_reference(source)
    client = RegistryClient(ref, insecure=insecure, creds=creds, authfile=authfile)
    wanted = platform or host_platform()
    _, doc, digest = client.manifest(ref.ref)
    explicit = platform is not None
    for _ in range(3):
        where = f"{ref}: manifest {digest}"
        mt = json_field(doc, "mediaType", str, where) or ""
        if mt in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
            desc = select_platform(index_manifests(doc, where), wanted, where)
            if not isinstance(desc.get("digest"), str):
                raise ImageError(f"{ref}: an index entry has no digest")
            _, doc, digest = client.manifest(desc["digest"])
            explicit = True
            continue
        img = from_manifest(doc, digest, client.blob_json, client.opener, kind="registry",
                            source=source, ref=ref.ref, wanted=wanted, explicit=explicit)
        return img
    raise ImageError(f"{ref}: image indexes nested too deep")
