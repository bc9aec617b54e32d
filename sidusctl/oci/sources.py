"""Image sources: where the manifest, the config and the layer blobs of an image come from.

Kinds (``kind`` in the import manifest):

- ``docker-archive``: ``docker save`` output. The legacy layout (``manifest.json`` listing
  ``Config`` and ``Layers`` as ``<id>/layer.tar``, often symlinks inside the tar) and the OCI
  layout Docker 25+ writes (``manifest.json`` pointing into ``blobs/sha256/``) are both read
  through ``manifest.json``; ``RepoTags`` picks an image when the archive holds several.
- ``oci-layout``: an OCI image layout (image-spec ``image-layout.md``: ``oci-layout``,
  ``index.json``, ``blobs/<alg>/<hex>``), as a directory or a tar. The ref is matched against
  the ``org.opencontainers.image.ref.name`` (or ``io.containerd.image.name``) annotation;
  image indexes / Docker manifest lists are resolved by platform.
- ``docker-export``: a flat filesystem tarball (``docker export``): one layer, no whiteouts,
  no config.
- ``registry``: ``docker://host[:port]/repo[:tag|@digest]`` (see :mod:`sidusctl.oci.registry`).

Tar sources are read in place: an uncompressed tar is indexed once and each blob read as a
slice of it; a compressed outer tar is first decompressed into a scratch file.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import platform as _platform
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from sidusctl.oci import ImageError
from sidusctl.oci.fields import index_manifests, json_field
from sidusctl.oci.streams import Readable

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
REF_ANNOTATIONS = ("org.opencontainers.image.ref.name", "io.containerd.image.name")
MAX_JSON = 16 << 20

Opener = Callable[[], contextlib.AbstractContextManager[Readable]]


@dataclass
class Layer:
    """One layer to apply: descriptor data (``digest``/``size`` may be None when the source
    does not carry them, as in legacy ``docker save``) and how to open its bytes."""

    index: int
    media_type: str
    digest: str | None
    size: int | None
    diff_id: str | None
    open: Opener = field(repr=False)


@dataclass
class ResolvedImage:
    """An image ready to apply: what the manifest records and the layers in order."""

    kind: str
    source: str
    ref: str | None
    config: dict[str, Any]
    layers: list[Layer]
    manifest_digest: str | None = None
    config_digest: str | None = None
    platform: str | None = None
    repo_tags: list[str] = field(default_factory=list)
    whiteouts: bool = True


# -- platforms ----------------------------------------------------------------------------------

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm",
         "i686": "386", "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x",
         "riscv64": "riscv64"}


def host_platform() -> str:
    """``linux/<GOARCH>`` of this machine (``linux/amd64`` here)."""
    m = _platform.machine()
    arch = _ARCH.get(m, m)
    if m == "armv7l":
        return "linux/arm/v7"
    return f"linux/{arch}"


def parse_platform(text: str) -> tuple[str, str, str | None]:
    """``os/arch[/variant]`` -> (os, arch, variant); ImageError if malformed."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ImageError(f"--platform '{text}' is not os/arch[/variant] (e.g. linux/amd64)")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _plat_str(p: dict[str, Any]) -> str:
    s = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    return s + (f"/{p['variant']}" if p.get("variant") else "")


def select_platform(manifests: list[dict[str, Any]], wanted: str, where: str) -> dict[str, Any]:
    """The descriptor of an index (``manifests``: its descriptors, in order) whose ``platform``
    matches ``wanted`` (``os/arch[/variant]``). :class:`ImageError` naming ``where`` if none
    does, or if a ``platform`` is not a JSON object (``manifests[i].platform``)."""
    os_, arch, variant = parse_platform(wanted)
    plats = [json_field(d, "platform", dict, where, at=f"manifests[{i}]") or {}
             for i, d in enumerate(manifests)]
    cands = []
    for d, p in zip(manifests, plats, strict=True):
        if p.get("os") == os_ and p.get("architecture") == arch and (
                variant is None or p.get("variant") == variant):
            cands.append((d, p))
    if not cands:
        have = ", ".join(sorted({_plat_str(p) for p in plats}))
        raise ImageError(f"{where}: no image for platform {wanted} (the index has: {have})",
                         hint="pick one with --platform")
    # arm64 without a variant asked: prefer v8 or no variant
    cands.sort(key=lambda dp: dp[1].get("variant") not in (None, "v8"))
    return cands[0][0]


# -- blob stores --------------------------------------------------------------------------------

class _Slice:
    """A read-only window [offset, offset+size) of an open file."""

    def __init__(self, f: BinaryIO, offset: int, size: int) -> None:
        self._f = f
        self._left = size
        f.seek(offset)

    def read(self, n: int = -1, /) -> bytes:
        if self._left <= 0:
            return b""
        if n < 0 or n > self._left:
            n = self._left
        data = self._f.read(n)
        self._left -= len(data)
        return data


class BlobStore:
    """Files of an image directory or of an (uncompressed) tar, by relative path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._members: dict[str, tarfile.TarInfo] | None = None
        if path.is_file():
            try:
                with tarfile.open(path, "r:") as tf:
                    self._members = {}
                    for m in tf:
                        self._members[_norm(m.name)] = m
            except tarfile.TarError as e:
                raise ImageError(f"{path}: not a readable tar archive ({e})") from e

    def names(self) -> list[str]:
        """Every entry's relative path (``/``-separated, directories included): the tar's member
        names without ``./`` or a trailing ``/``, or every path below the directory."""
        if self._members is not None:
            return list(self._members)
        return [p.relative_to(self.path).as_posix() for p in self.path.rglob("*")]

    def _member(self, name: str, depth: int = 0) -> tarfile.TarInfo | None:
        assert self._members is not None
        m = self._members.get(_norm(name))
        if m is not None and m.issym() and depth < 8:
            target = os.path.normpath(os.path.join(os.path.dirname(_norm(name)), m.linkname))
            return self._member(target, depth + 1)
        if m is not None and m.islnk() and depth < 8:
            return self._member(m.linkname, depth + 1)
        return m

    def exists(self, name: str) -> bool:
        """Whether ``name`` is a regular file here, links followed (in a directory: only to files
        inside it)."""
        if self._members is not None:
            m = self._member(name)
            return m is not None and m.isreg()
        return self._file(name) is not None

    def _file(self, name: str) -> Path | None:
        n = _norm(name)
        if n.startswith("../") or n == ".." or n.startswith("/"):
            return None
        p = (self.path / n).resolve()
        root = self.path.resolve()
        if not str(p).startswith(str(root) + "/") or not p.is_file():
            return None
        return p

    def size(self, name: str) -> int:
        """The size of the file ``name`` in bytes; :class:`ImageError` if it is missing or not a
        regular file."""
        if self._members is not None:
            m = self._member(name)
            if m is None or not m.isreg():
                raise ImageError(f"{self.path}: '{name}' is missing from the archive")
            return m.size
        f = self._file(name)
        if f is None:
            raise ImageError(f"{self.path}: '{name}' is missing")
        return f.stat().st_size

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[Readable]:
        """A context manager yielding the file ``name`` as a :class:`Readable` (in a tar: a window
        on its data); :class:`ImageError` if it is missing or not a regular file."""
        if self._members is not None:
            m = self._member(name)
            if m is None or not m.isreg():
                raise ImageError(f"{self.path}: '{name}' is missing from the archive")
            with open(self.path, "rb") as f:
                yield _Slice(f, m.offset_data, m.size)
            return
        p = self._file(name)
        if p is None:
            raise ImageError(f"{self.path}: '{name}' is missing")
        with open(p, "rb") as f:
            yield f

    def read_json(self, name: str) -> Any:
        """The file ``name`` parsed as JSON (any JSON value); :class:`ImageError` if it is missing,
        larger than 16 MiB or not valid JSON."""
        if self.size(name) > MAX_JSON:
            raise ImageError(f"{self.path}: '{name}' is too large for a JSON document")
        with self.open(name) as f:
            data = f.read()
        try:
            return json.loads(data)
        except ValueError as e:
            raise ImageError(f"{self.path}: '{name}' is not valid JSON ({e})") from e


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def blob_path(digest: str, where: str) -> str:
    """The path of blob ``digest`` inside an OCI image layout (image-spec ``image-layout.md``:
    ``blobs/<algorithm>/<encoded>``). Only ``sha256`` digests; :class:`ImageError` naming
    ``where`` for another algorithm or a malformed digest (a path out of the layout cannot
    be made from one)."""
    if not DIGEST_RE.match(digest):
        raise ImageError(f"{where}: unsupported or malformed digest '{digest}'",
                         hint="only sha256 digests are supported")
    return "blobs/sha256/" + digest.split(":", 1)[1]


# -- detection ----------------------------------------------------------------------------------

def compression_of(path: Path) -> str:
    """``"gzip"``, ``"zstd"`` or ``"none"``, from the first bytes of the file at ``path`` (gzip:
    1f 8b, RFC 1952 section 2.3.1; zstd: 28 b5 2f fd, RFC 8878 section 3.1.1), whatever a
    layer's media type claims."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return "none"


def decompress_to(src: Path, comp: str, dest: Path) -> None:
    """Write ``src`` decompressed into ``dest`` (created or truncated), streamed in 1 MiB
    pieces: ``comp`` ``"gzip"``, else zstd (:func:`compression_of`'s answer; not for
    ``"none"``). Raises OSError, or the decompressor's error on corrupt input."""
    with open(src, "rb") as fi, open(dest, "wb") as fo:
        if comp == "gzip":
            with gzip.GzipFile(fileobj=fi) as g:
                shutil.copyfileobj(g, fo, 1 << 20)
        else:
            zstandard.ZstdDecompressor().copy_stream(fi, fo)


def _top_names_streamed(path: Path) -> set[str]:
    names = set()
    try:
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                n = _norm(m.name)
                if n in ("manifest.json", "index.json", "oci-layout"):
                    names.add(n)
    except (tarfile.TarError, EOFError, zstandard.ZstdError, OSError) as e:
        raise ImageError(f"{path}: not a readable (compressed) tar archive ({e})") from e
    return names


def open_source(source: str, *, ref: str | None, platform: str | None,
                scratch: Path) -> ResolvedImage:
    """Resolve a local SOURCE (path, or ``docker-archive:``/``oci:``/``oci-archive:``/
    ``docker-export:`` prefixed path, optionally ``:REF`` suffixed as skopeo writes it)."""
    kind = "auto"
    path_s = source
    for prefix, k in (("docker-archive:", "docker-archive"), ("oci-archive:", "oci-layout"),
                      ("oci:", "oci-layout"), ("docker-export:", "docker-export")):
        if source.startswith(prefix):
            kind = k
            path_s, _, suffix = source[len(prefix):].partition(":")
            if suffix:
                if ref and ref != suffix:
                    raise ImageError(f"{source}: names ref '{suffix}' but --ref is '{ref}'")
                ref = suffix
            break
    path = Path(path_s)
    if not path.exists():
        raise ImageError(f"{path}: no such file or directory",
                         hint="SOURCE is a docker save archive, an OCI layout (dir or tar), a "
                              "docker export tarball or docker://host/repo:tag")
    wanted = platform or host_platform()
    if path.is_dir():
        store = BlobStore(path)
        if store.exists("index.json"):
            return _oci(store, source, ref, wanted, platform is not None)
        if store.exists("manifest.json"):
            return _docker_archive(store, source, ref, wanted, platform is not None)
        raise ImageError(f"{path}: a directory without index.json (OCI layout) or "
                         "manifest.json (docker save)")
    comp = compression_of(path)
    if comp != "none":
        top = _top_names_streamed(path) if kind == "auto" else set()
        if kind == "docker-export" or (kind == "auto" and not top & {"manifest.json",
                                                                      "index.json"}):
            return _export(path, source)
        plain = scratch / "source.tar"
        scratch.mkdir(parents=True, exist_ok=True)
        decompress_to(path, comp, plain)
        path = plain
    if kind == "docker-export":
        return _export(path, source)
    store = BlobStore(path)
    if kind in ("auto", "docker-archive") and store.exists("manifest.json"):
        return _docker_archive(store, source, ref, wanted, platform is not None)
    if kind in ("auto", "oci-layout") and store.exists("index.json"):
        return _oci(store, source, ref, wanted, platform is not None)
    if kind != "auto":
        raise ImageError(f"{path}: not a {kind} (no "
                         f"{'manifest.json' if kind == 'docker-archive' else 'index.json'})")
    return _export(path, source)


def _export(path: Path, source: str) -> ResolvedImage:
    size = path.stat().st_size

    @contextlib.contextmanager
    def opener() -> Iterator[Readable]:
        with open(path, "rb") as f:
            yield f

    return ResolvedImage(kind="docker-export", source=source, ref=None, config={},
                         layers=[Layer(0, "application/x-tar", None, size, None, opener)],
                         whiteouts=False)


def _check_config(config: Any, where: str, nlayers: int) -> dict[str, Any]:
    """``config`` if it is an image config (image-spec ``config.md``) whose fields read here or
    by the importer have their JSON types, with one diff_id per layer; ImageError otherwise."""
    if not isinstance(config, dict):
        raise ImageError(f"{where}: the image config is not a JSON object")
    rootfs = json_field(config, "rootfs", dict, where, required=True)
    diff_ids = json_field(rootfs, "diff_ids", list, where, at="rootfs", items=str, required=True)
    for k in ("os", "architecture", "variant"):
        json_field(config, k, str, where)
    cfg = json_field(config, "config", dict, where)
    if cfg is not None:
        for k in ("Entrypoint", "Cmd", "Env"):
            json_field(cfg, k, list, where, at="config", items=str)
        for k in ("User", "WorkingDir"):
            json_field(cfg, k, str, where, at="config")
        for k in ("Labels", "ExposedPorts", "Volumes"):
            json_field(cfg, k, dict, where, at="config")
    if len(diff_ids) != nlayers:
        raise ImageError(f"{where}: the manifest lists {nlayers} layers but the config has "
                         f"{len(diff_ids)} diff_ids")
    return config


def _platform_check(config: dict[str, Any], wanted: str, explicit: bool, where: str) -> str:
    have = _plat_str({"os": config.get("os"), "architecture": config.get("architecture"),
                      "variant": config.get("variant")})
    if explicit:
        os_, arch, variant = parse_platform(wanted)
        if (config.get("os"), config.get("architecture")) != (os_, arch) or (
                variant and config.get("variant") != variant):
            raise ImageError(f"{where}: the image is for {have}, not {wanted}")
    return have


def _docker_archive(store: BlobStore, source: str, ref: str | None, wanted: str,
                    explicit: bool) -> ResolvedImage:
    entries = store.read_json("manifest.json")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict)
                                                               for e in entries):
        raise ImageError(f"{source}: manifest.json is not a non-empty list of images")
    where = f"{source}: manifest.json"
    tags = [json_field(e, "RepoTags", list, where, at=f"[{i}]", items=str) or []
            for i, e in enumerate(entries)]
    n = _pick_docker(tags, ref, source)
    chosen = entries[n]
    cfg_path = json_field(chosen, "Config", str, where, at=f"[{n}]", required=True)
    layers = json_field(chosen, "Layers", list, where, at=f"[{n}]", items=str, required=True)
    config = _check_config(store.read_json(cfg_path), f"{source}: {cfg_path}", len(layers))
    diff_ids = config["rootfs"]["diff_ids"]
    cfg_digest = None
    m = re.match(r"^(?:blobs/sha256/|)([0-9a-f]{64})(?:\.json)?$", _norm(cfg_path))
    if m:
        cfg_digest = "sha256:" + m.group(1)
    out = []
    for i, lp in enumerate(layers):
        if not store.exists(lp):
            raise ImageError(f"{source}: layer {i + 1} '{lp}' is missing from the archive")
        dm = re.match(r"^blobs/sha256/([0-9a-f]{64})$", _norm(lp))
        digest = "sha256:" + dm.group(1) if dm else None
        out.append(Layer(i, "", digest, store.size(lp), diff_ids[i],
                         _opener(store, lp)))
    plat = _platform_check(config, wanted, explicit, source)
    return ResolvedImage(kind="docker-archive", source=source, ref=ref, config=config,
                         layers=out, config_digest=cfg_digest, platform=plat,
                         repo_tags=tags[n])


def _opener(store: BlobStore, name: str) -> Opener:
    return lambda: store.open(name)


def _ref_matches(tag: str, ref: str) -> bool:
    if tag == ref:
        return True
    # "debian:12" matches "docker.io/library/debian:12" and "localhost/debian:12"
    return tag.endswith("/" + ref)


def _pick_docker(repo_tags: list[list[str]], ref: str | None, source: str) -> int:
    """The index of the image to import, given each image's (checked) ``RepoTags``."""
    tags = [t for ts in repo_tags for t in ts]
    if ref:
        hits = [i for i, ts in enumerate(repo_tags) if any(_ref_matches(t, ref) for t in ts)]
        if not hits:
            raise ImageError(f"{source}: no image tagged '{ref}' (the archive has: "
                             f"{', '.join(tags) or 'untagged images only'})")
        return hits[0]
    if len(repo_tags) > 1:
        raise ImageError(f"{source}: the archive holds {len(repo_tags)} images; pick one with "
                         f"--ref NAME:TAG (tags: {', '.join(tags) or 'none'})")
    return 0


def _oci(store: BlobStore, source: str, ref: str | None, wanted: str,
         explicit: bool) -> ResolvedImage:
    index = store.read_json("index.json")
    if not isinstance(index, dict):
        raise ImageError(f"{source}: index.json is not a JSON object")
    mans = index_manifests(index, f"{source}: index.json")  # annotations, platform: objects
    if ref:
        hits = [d for d in mans if any(
            _ref_matches(str((d.get("annotations") or {}).get(a, "")), ref)
            for a in REF_ANNOTATIONS)]
        if not hits:
            have = sorted({str((d.get("annotations") or {}).get(REF_ANNOTATIONS[0], "-"))
                           for d in mans})
            raise ImageError(f"{source}: no manifest with ref '{ref}' (refs: {', '.join(have)})")
        mans = hits
    if len(mans) > 1:
        if all(d.get("platform") for d in mans):
            desc = select_platform(mans, wanted, f"{source}: index.json")
        else:
            have = sorted({str((d.get("annotations") or {}).get(REF_ANNOTATIONS[0], "-"))
                           for d in mans})
            raise ImageError(f"{source}: the layout holds {len(mans)} images; pick one with "
                             f"--ref (refs: {', '.join(have)})")
    elif mans:
        desc = mans[0]
    else:
        raise ImageError(f"{source}: index.json lists no manifest")
    return resolve_manifest(
        lambda d: _read_blob_json(store, d, source), lambda d: _opener(store, blob_path(d, source)),
        desc, kind="oci-layout", source=source, ref=ref, wanted=wanted, explicit=explicit)


def _read_blob_json(store: BlobStore, digest: str, source: str) -> tuple[bytes, Any]:

    name = blob_path(digest, source)
    if not store.exists(name):
        raise ImageError(f"{source}: blob {digest} is missing")
    if store.size(name) > MAX_JSON:
        raise ImageError(f"{source}: blob {digest} is too large for a JSON document")
    with store.open(name) as f:
        data = f.read()
    return data, verified_json(data, digest, source, "corrupt layout")


def verified_json(data: bytes, digest: str, source: str, why: str = "") -> Any:
    """``data`` decoded as JSON after checking it hashes to ``digest`` ("sha256:<hex>", OCI
    image spec, descriptors); ImageError naming ``source`` and the blob otherwise."""
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != digest:
        raise ImageError(f"{source}: blob {digest} has digest {got}" + (f" ({why})" if why else ""))
    try:
        return json.loads(data)
    except ValueError as e:
        raise ImageError(f"{source}: blob {digest} is not valid JSON ({e})") from e


def resolve_manifest(read_json: Callable[[str], tuple[bytes, Any]],
                     opener: Callable[[str], Opener], desc: dict[str, Any], *, kind: str,
                     source: str, ref: str | None, wanted: str,
                     explicit: bool) -> ResolvedImage:
    """Follow a descriptor (index -> manifest by platform) to a :class:`ResolvedImage`.
    ``read_json(digest)`` returns a verified blob's (bytes, parsed JSON); ``opener(digest)``
    opens a layer blob. Shared by OCI layouts and registries."""
    digest = desc.get("digest")
    for _ in range(4):  # index -> (nested index) -> manifest
        if not isinstance(digest, str):
            raise ImageError(f"{source}: a descriptor has no digest")
        _, doc = read_json(digest)
        if not isinstance(doc, dict):
            raise ImageError(f"{source}: {digest} is not a JSON object")
        where = f"{source}: manifest {digest}"
        mt = (json_field(doc, "mediaType", str, where)
              or json_field(desc, "mediaType", str, where) or "")
        if mt in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
            desc = select_platform(index_manifests(doc, where), wanted, where)
            digest = desc.get("digest")
            explicit = True
            continue
        return from_manifest(doc, digest, read_json, opener, kind=kind, source=source, ref=ref,
                              wanted=wanted, explicit=explicit)
    raise ImageError(f"{source}: image indexes nested too deep")


def from_manifest(doc: dict[str, Any], digest: str,
                   read_json: Callable[[str], tuple[bytes, Any]],
                   opener: Callable[[str], Opener], *, kind: str, source: str,
                   ref: str | None, wanted: str, explicit: bool) -> ResolvedImage:
    """The :class:`ResolvedImage` an image manifest ``doc`` (OCI image-spec ``manifest.md``,
    or Docker's schema 2) with digest ``digest`` describes: its config, read through
    ``read_json(digest) -> (bytes, parsed JSON)`` and checked, and its layers in order, each
    with its descriptor, its ``diff_id`` from the config and ``opener(digest)`` to read it.
    ``wanted``/``explicit``: the platform asked for and whether the user named it. Raises
    :class:`ImageError` naming ``source`` for schema 1, a missing config or layer digest, a
    foreign layer to be fetched from elsewhere, or a config that does not match."""
    if doc.get("schemaVersion") == 1:
        raise ImageError(f"{source}: Docker image manifest schema 1 is not supported")
    where = f"{source}: manifest {digest}"
    cfg = json_field(doc, "config", dict, where, required=True)
    layers: list[dict[str, Any]] = json_field(doc, "layers", list, where, items=dict, required=True)
    cfg_digest = json_field(cfg, "digest", str, where, at="config", required=True)
    _, config = read_json(cfg_digest)
    config = _check_config(config, f"{source}: config {cfg_digest}", len(layers))
    diff_ids = config["rootfs"]["diff_ids"]
    out = []
    for i, ld in enumerate(layers):
        at = f"layers[{i}]"
        ldigest = json_field(ld, "digest", str, where, at=at, required=True)
        mt = json_field(ld, "mediaType", str, where, at=at) or ""
        urls = json_field(ld, "urls", list, where, at=at, items=str)
        if ("nondistributable" in mt or "foreign" in mt) and urls:
            raise ImageError(f"{source}: layer {i + 1} is a foreign layer ({mt}) fetched "
                             "from elsewhere; not supported")
        out.append(Layer(i, mt, ldigest, json_field(ld, "size", int, where, at=at),
                         diff_ids[i], opener(ldigest)))
    plat = _platform_check(config, wanted, explicit, source)
    return ResolvedImage(kind=kind, source=source, ref=ref, config=config, layers=out,
                         manifest_digest=digest, config_digest=cfg_digest, platform=plat)
