"""Fuzz: image metadata damaged at random never gives an internal error when a source is
resolved (:func:`sidusctl.oci.sources.open_source`, what ``sidusctl import`` runs first, and
the code registries share for manifests and configs). An OCI layout (``index.json`` -> image
manifest -> config, each blob named by its digest) and a ``docker save`` directory
(``manifest.json`` -> config) are written from valid documents with one value, at any depth of
one document, replaced by a random JSON value; the digests are computed after the damage, so
the damaged document is read, not refused as corrupt. Resolving either succeeds or raises
sidusctl's own error (ImageError); any other exception fails the test."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidusctl.core.errors import SidusError
from sidusctl.oci.sources import open_source
from tests.test_state_fuzz import _JSON, _damage

CONFIG = {"architecture": "amd64", "os": "linux",
          "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "User": "0", "WorkingDir": "/",
                     "Labels": {"a": "b"}, "ExposedPorts": {"80/tcp": {}}, "Volumes": {"/d": {}}},
          "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]}}
MANIFEST = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": "CONFIG", "size": 1},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": "sha256:" + "0" * 64, "size": 10, "urls": []}]}
INDEX = {"schemaVersion": 2, "manifests": [
    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "MANIFEST", "size": 1,
     "platform": {"os": "linux", "architecture": "amd64"},
     "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}
DOCKER = [{"Config": "c.json", "RepoTags": ["x:latest"], "Layers": ["l/layer.tar"]}]


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _fill(doc: Any, placeholder: str, digest: str) -> Any:
    """``doc`` with every string ``placeholder`` replaced by ``digest``."""
    if doc == placeholder:
        return digest
    if isinstance(doc, dict):
        return {k: _fill(v, placeholder, digest) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_fill(v, placeholder, digest) for v in doc]
    return doc


def _layout(root: Path, which: int, where: int, value: Any) -> Path:
    """An OCI layout whose document ``which`` (0 config, 1 manifest, 2 index) is damaged."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(doc: Any) -> str:
        data = json.dumps(doc).encode()
        (blobs / _digest(data)[7:]).write_bytes(data)
        return _digest(data)

    config = _damage(CONFIG, where, value) if which == 0 else copy.deepcopy(CONFIG)
    manifest = _fill(MANIFEST, "CONFIG", put(config))
    manifest = _damage(manifest, where, value) if which == 1 else manifest
    index = _fill(INDEX, "MANIFEST", put(manifest))
    index = _damage(index, where, value) if which == 2 else index
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps(index))
    return root


def _docker(root: Path, which: int, where: int, value: Any) -> Path:
    """A ``docker save`` directory whose manifest.json (``which`` even) or config is damaged."""
    root.mkdir()
    (root / "l").mkdir()
    (root / "l" / "layer.tar").write_bytes(b"\0" * 1024)
    docs = (_damage(DOCKER, where, value), CONFIG) if which % 2 == 0 else \
        (DOCKER, _damage(CONFIG, where, value))
    (root / "manifest.json").write_text(json.dumps(docs[0]))
    (root / "c.json").write_text(json.dumps(docs[1]))
    return root


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), where=st.integers(0, 10**6), value=_JSON,
       ref=st.sampled_from([None, "latest", "x:latest"]))
def test_damaged_image_metadata_is_resolved_or_refused(
        tmp_path_factory: Any, which: int, where: int, value: Any, ref: str | None) -> None:
    base = tmp_path_factory.mktemp("sdt-ocifuzz")
    for src in (_layout(base / "layout", which, where, value),
                _docker(base / "archive", which, where, value)):
        with contextlib.suppress(SidusError):
            open_source(str(src), ref=ref if src.name == "archive" or ref != "x:latest"
                        else None, platform=None, scratch=base / "scratch")


def test_the_valid_sources_resolve(tmp_path: Path) -> None:
    """The fuzz starts from sources that resolve (so a damage is what is refused)."""
    img = open_source(str(_layout(tmp_path / "layout", 3, 0, None)), ref=None, platform=None,
                      scratch=tmp_path / "s")
    assert img.config["config"]["Cmd"] == ["sh"] and len(img.layers) == 1
    img = open_source(str(_docker(tmp_path / "archive", 1, 0, CONFIG)), ref="x:latest",
                      platform=None, scratch=tmp_path / "s")
    assert img.repo_tags == ["x:latest"] and len(img.layers) == 1
