"""Bad image metadata given to ``sidusctl import`` is a clear error (exit 2) naming the file and
the key, what was found and what was expected, never an internal error: ``index.json`` of an
OCI layout, ``manifest.json`` of a ``docker save`` archive, image manifests and configs (read
by the same code for layouts and registries), and ``docker://`` references with a bad port.
Fast: hand-written JSON in ``tmp_path``, a registry stub on loopback, no image built."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import sidusctl
from tests.refusals import assert_refused as _bad

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sidusctl import needs root")


def _import(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return sidusctl("import", *args, state=tmp / "state", timeout=120)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- OCI layout: index.json ---------------------------------------------------------------------

INDEX_CASES: dict[str, tuple[Any, list[str], list[str]]] = {
    # name: (index.json, extra CLI args, what the message must name)
    "platform-string": (
        {"manifests": [{"digest": "sha256:aa", "platform": "linux/amd64"},
                       {"digest": "sha256:bb", "platform": "linux/arm64"}]},
        [], ["index.json", "'manifests[0].platform'", "a string", "expected a JSON object"]),
    "platform-os-number": (
        {"manifests": [{"digest": "sha256:aa", "platform": {"os": 5, "architecture": "amd64"}},
                       {"digest": "sha256:bb", "platform": {"os": "linux"}}]},
        [], ["'manifests[0].platform.os'", "a number (5)", "expected a string"]),
    "annotations-string": (
        {"manifests": [{"digest": "sha256:aa", "annotations": "zz"}, {"digest": "sha256:bb"}]},
        [], ["index.json", "'manifests[0].annotations'", "a string", "expected a JSON object"]),
    "annotations-list-with-ref": (
        {"manifests": [{"digest": "sha256:aa", "annotations": ["x"]}]},
        ["--ref", "x"], ["'manifests[0].annotations'", "a list", "expected a JSON object"]),
    "manifests-string": (
        {"manifests": "x"}, [], ["index.json", "'manifests'", "expected a list"]),
    "manifests-item-number": (
        {"manifests": [5]}, [], ["'manifests[0]'", "a number (5)", "expected a JSON object"]),
    "digest-number": (
        {"manifests": [{"digest": 5}]}, [], ["'manifests[0].digest'", "expected a string"]),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_bad_oci_index(tmp_path: Path, case: str) -> None:
    index, args, needles = INDEX_CASES[case]
    layout = tmp_path / "layout"
    layout.mkdir()
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps(index))
    _bad(_import(tmp_path, str(layout), "sdt-bad", *args), 2, *needles)


# -- docker save: manifest.json and the image config --------------------------------------------

DOCKER_CASES: dict[str, tuple[Any, Any, list[str], list[str]]] = {
    # name: (manifest.json, c.json, extra CLI args, what the message must name)
    "repotags-number": ([{"Config": "c.json", "Layers": [], "RepoTags": 5}], None, [],
                        ["manifest.json", "'[0].RepoTags'", "a number (5)",
                         "expected a list of strings"]),
    "repotags-item-number-with-ref": (
        [{"Config": "c.json", "Layers": [], "RepoTags": [5]}], None, ["--ref", "a:b"],
        ["manifest.json", "'[0].RepoTags[0]'", "a number (5)", "expected a string"]),
    "config-path-number": ([{"Config": 5, "Layers": []}], None, [],
                           ["manifest.json", "'[0].Config'", "expected a string"]),
    "layers-string": ([{"Config": "c.json", "Layers": "l.tar"}], None, [],
                      ["manifest.json", "'[0].Layers'", "expected a list of strings"]),
    "layers-item-object": ([{"Config": "c.json", "Layers": [{}]}], None, [],
                           ["'[0].Layers[0]'", "a JSON object", "expected a string"]),
    "rootfs-string": ([{"Config": "c.json", "Layers": []}], {"rootfs": "x"}, [],
                      ["c.json", "'rootfs'", 'a string ("x")', "expected a JSON object"]),
    "rootfs-missing": ([{"Config": "c.json", "Layers": []}], {}, [],
                       ["c.json", "'rootfs' is missing"]),
    "diff-ids-string": ([{"Config": "c.json", "Layers": []}], {"rootfs": {"diff_ids": "x"}}, [],
                        ["c.json", "'rootfs.diff_ids'", "expected a list of strings"]),
    "diff-ids-item-number": ([{"Config": "c.json", "Layers": []}],
                             {"rootfs": {"diff_ids": [5]}}, [],
                             ["c.json", "'rootfs.diff_ids[0]'", "expected a string"]),
}
_EMPTY_ROOTFS = {"rootfs": {"type": "layers", "diff_ids": []}}
# fields of the image config's "config" object (and the platform) the importer reads
_CONFIG_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("config-string", {"config": "x"}, "'config'", "expected a JSON object"),
    ("architecture-number", {"architecture": 5}, "'architecture'", "expected a string"),
    ("env-number", {"config": {"Env": 5}}, "'config.Env'", "expected a list of strings"),
    ("env-item-object", {"config": {"Env": [{}]}}, "'config.Env[0]'", "expected a string"),
    ("cmd-string", {"config": {"Cmd": "sh"}}, "'config.Cmd'", "expected a list of strings"),
    ("user-number", {"config": {"User": 0}}, "'config.User'", "expected a string"),
    ("labels-list", {"config": {"Labels": ["a"]}}, "'config.Labels'",
     "expected a JSON object"),
    ("exposed-ports-list", {"config": {"ExposedPorts": ["80/tcp"]}}, "'config.ExposedPorts'",
     "expected a JSON object"),
    ("volumes-string", {"config": {"Volumes": "/data"}}, "'config.Volumes'",
     "expected a JSON object")]
for _name, _cfg, _key, _expected in _CONFIG_CASES:
    DOCKER_CASES[_name] = ([{"Config": "c.json", "Layers": []}], {**_EMPTY_ROOTFS, **_cfg}, [],
                           ["c.json", _key, _expected])


@pytest.mark.parametrize("case", list(DOCKER_CASES))
def test_bad_docker_archive(tmp_path: Path, case: str) -> None:
    manifest, config, args, needles = DOCKER_CASES[case]
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "manifest.json").write_text(json.dumps(manifest))
    (archive / "c.json").write_text(json.dumps(config if config is not None else _EMPTY_ROOTFS))
    _bad(_import(tmp_path, str(archive), "sdt-bad", *args), 2, *needles)


# -- OCI layout: image manifests (the code registries share) ------------------------------------

LAYER = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:" + "0" * 64,
         "size": 10}
ONE_DIFF_ID = {"rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]}}
MANIFEST_CASES: dict[str, tuple[Any, Any, list[str]]] = {
    # name: (manifest with "CONFIG" for the config's digest, config, what the message must name)
    "config-string": ({"schemaVersion": 2, "config": "x", "layers": []}, _EMPTY_ROOTFS,
                      ["manifest sha256:", "'config'", "expected a JSON object"]),
    "config-digest-number": ({"schemaVersion": 2, "config": {"digest": 5}, "layers": []},
                             _EMPTY_ROOTFS, ["'config.digest'", "expected a string"]),
    "layers-object": ({"schemaVersion": 2, "config": "CONFIG", "layers": {}}, _EMPTY_ROOTFS,
                      ["'layers'", "expected a list of JSON objects"]),
    "layer-string": ({"schemaVersion": 2, "config": "CONFIG", "layers": ["x"]}, ONE_DIFF_ID,
                     ["'layers[0]'", 'a string ("x")', "expected a JSON object"]),
    "layer-digest-list": ({"schemaVersion": 2, "config": "CONFIG",
                           "layers": [{**LAYER, "digest": ["x"]}]}, ONE_DIFF_ID,
                          ["'layers[0].digest'", "expected a string"]),
    "layer-size-string": ({"schemaVersion": 2, "config": "CONFIG",
                           "layers": [{**LAYER, "size": "10"}]}, ONE_DIFF_ID,
                          ["'layers[0].size'", "expected an integer"]),
    "layer-media-type-number": ({"schemaVersion": 2, "config": "CONFIG",
                                 "layers": [{**LAYER, "mediaType": 5}]}, ONE_DIFF_ID,
                                ["'layers[0].mediaType'", "expected a string"]),
    "media-type-list": ({"schemaVersion": 2, "mediaType": [], "config": "CONFIG", "layers": []},
                        _EMPTY_ROOTFS, ["'mediaType'", "expected a string"]),
    "config-rootfs-string": ({"schemaVersion": 2, "config": "CONFIG", "layers": []},
                             {"rootfs": "x"}, ["config sha256:", "'rootfs'",
                                               "expected a JSON object"]),
    "nested-index-manifests-string": (
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
         "manifests": "x"}, _EMPTY_ROOTFS, ["manifest sha256:", "'manifests'",
                                             "expected a list of JSON objects"]),
    "nested-index-platform-string": (
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
         "manifests": [{"digest": "sha256:" + "2" * 64, "platform": "linux/amd64"}]},
        _EMPTY_ROOTFS, ["'manifests[0].platform'", "expected a JSON object"]),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_bad_image_manifest(tmp_path: Path, case: str) -> None:
    manifest, config, needles = MANIFEST_CASES[case]
    layout = tmp_path / "layout"
    blobs = layout / "blobs/sha256"
    blobs.mkdir(parents=True)

    def put(doc: Any) -> str:
        data = json.dumps(doc).encode()
        (blobs / _digest(data)[7:]).write_bytes(data)
        return _digest(data)

    cfg_digest = put(config)
    if manifest.get("config") == "CONFIG":
        manifest = {**manifest, "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                           "digest": cfg_digest, "size": 1}}
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(manifest)}]}))
    _bad(_import(tmp_path, str(layout), "sdt-bad"), 2, *needles)


# -- registries -----------------------------------------------------------------------------------

@pytest.mark.parametrize("host,port", [("127.0.0.1:abc", "abc"), ("127.0.0.1:70000", "70000"),
                                       ("127.0.0.1:0", "0"), ("localhost:", ""),
                                       ("127.0.0.1:+80", "+80")])
def test_bad_registry_port(tmp_path: Path, host: str, port: str) -> None:
    ref = f"docker://{host}/a:b"
    _bad(_import(tmp_path, ref, "sdt-bad", "--insecure"), 2, ref, f"port '{port}'",
         "1 to 65535")


class _Stub(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the JSON document of the server's ``body``."""

    server: _StubServer

    def do_GET(self) -> None:
        body = self.server.body
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _StubServer(http.server.HTTPServer):
    """A one-document registry stub on a free loopback port."""

    body = b"{}"


@pytest.fixture
def stub() -> Iterator[_StubServer]:
    srv = _StubServer(("127.0.0.1", 0), _Stub)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)


@pytest.mark.parametrize("doc,needles", [
    ({"manifests": "x"}, ["'manifests'", "expected a list of JSON objects"]),
    ({"manifests": [{"digest": "sha256:" + "2" * 64, "platform": "linux/amd64"}]},
     ["'manifests[0].platform'", "expected a JSON object"]),
    ({"mediaType": 5, "config": {}, "layers": []}, ["'mediaType'", "expected a string"]),
    ({"schemaVersion": 2, "config": "x", "layers": []}, ["'config'", "expected a JSON object"]),
], ids=["manifests-string", "platform-string", "media-type-number", "config-string"])
def test_bad_registry_manifest(tmp_path: Path, stub: _StubServer, doc: Any,
                               needles: list[str]) -> None:
    stub.body = json.dumps(doc).encode()
    ref = f"docker://127.0.0.1:{stub.server_port}/a:b"
    _bad(_import(tmp_path, ref, "sdt-bad", "--insecure"), 2, ref, "manifest", *needles)
