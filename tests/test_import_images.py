"""``sidusctl import`` of images made by real tools (buildah, umoci, skopeo), in every source
format, compared file by file with ``umoci unpack`` of the same image."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import sidusctl
from tests.oci_helpers import (
    Buildah,
    busybox_tree,
    diff_trees,
    sdt_tempdir,
    tar_of,
    ti,
    tree,
    umoci_unpack,
    without,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (owners, device nodes)")

# exec-form CMD: "$0" keeps one argument with spaces and ';' intact, $GREETING comes from Env
CMD = ["/bin/sh", "-c",
       'echo "$0" > /data/out; id -u >> /data/out; id -g >> /data/out; pwd >> /data/out; '
       'echo "$GREETING" >> /data/out; exec sleep 600',
       "one arg; with spaces"]


WRAPPER = "/usr/local/libexec/sidusctl/oci-cmd.sh"


class Images:
    """Paths of the test image in every format, plus umoci's unpacked tree of it."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.layout = work / "oci"           # OCI layout dir, refs v1 (2 layers) and v2 (3)
        self.docker_archive = work / "docker-archive.tar"
        self.oci_archive = work / "oci-archive.tar"
        self.zstd = work / "oci-zstd"
        self.docker25 = work / "docker25.tar"
        self.docker_legacy = work / "docker-legacy.tar"  # <id>/layer.tar, as Docker <25
        self.docker_multi = work / "docker-multi.tar"  # docker save of v2 and v1
        self.multi = work / "multi"          # OCI layout holding an index of 2 platforms
        self.umoci_root = work / "umoci" / "rootfs"
        self.umoci_tree: dict[str, Any] = {}


def _skopeo(*args: str) -> None:
    subprocess.run(["skopeo", "--insecure-policy", *args], check=True, capture_output=True,
                   timeout=300)


def _docker25_archive(plain_layout: Path, dest: Path, tag: str) -> None:
    """What Docker 25+ ``docker save`` writes: an OCI layout plus a manifest.json whose Config
    and Layers point into blobs/sha256 (built from skopeo's uncompressed layout)."""
    index = json.loads((plain_layout / "index.json").read_text())
    man_digest = index["manifests"][0]["digest"].split(":")[1]
    man = json.loads((plain_layout / "blobs/sha256" / man_digest).read_text())
    entry = [{"Config": "blobs/sha256/" + man["config"]["digest"].split(":")[1],
              "RepoTags": [tag],
              "Layers": ["blobs/sha256/" + lay["digest"].split(":")[1] for lay in man["layers"]]}]
    (plain_layout / "manifest.json").write_text(json.dumps(entry))
    with tarfile.open(dest, "w") as tf:
        for name in ("blobs", "oci-layout", "index.json", "manifest.json"):
            tf.add(plain_layout / name, arcname=name)


def _merge_docker_archives(archives: list[Path], dest: Path) -> None:
    """One docker-archive holding the images of several (what ``docker save a b`` writes):
    the members of each, manifest.json entries concatenated."""
    entries: list[Any] = []
    with tarfile.open(dest, "w") as out:
        seen = set()
        for a in archives:
            with tarfile.open(a) as tf:
                for m in tf:
                    if m.name == "manifest.json":
                        f = tf.extractfile(m)
                        assert f is not None
                        entries += json.loads(f.read())
                    elif m.name not in seen and m.name != "repositories":
                        seen.add(m.name)
                        out.addfile(m, tf.extractfile(m) if m.isreg() else None)
        data = json.dumps(entries).encode()
        ti = tarfile.TarInfo("manifest.json")
        ti.size = len(data)
        out.addfile(ti, io.BytesIO(data))


def _docker_legacy_dirs(archive: Path, dest: Path) -> None:
    """The layout ``docker save`` wrote before Docker 25: ``<id>/layer.tar`` (+ ``json``,
    ``VERSION``) per layer, manifest.json pointing at them; the first layer's ``layer.tar`` is
    a symlink into another directory, as docker writes for layers it already stored."""
    with tarfile.open(archive) as tf:
        man = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
        with tarfile.open(dest, "w") as out:
            layers = []
            for i, name in enumerate(man[0]["Layers"]):
                lid = hashlib.sha256(f"sdt-layer-{i}".encode()).hexdigest()
                m = tf.getmember(name)
                real = f"{lid}/layer.tar"
                if i == 0:
                    real = f"{hashlib.sha256(b'shared').hexdigest()}/layer.tar"
                    link = tarfile.TarInfo(f"{lid}/layer.tar")
                    link.type = tarfile.SYMTYPE
                    link.linkname = f"../{real}"
                    out.addfile(link)
                m2 = tarfile.TarInfo(real)
                m2.size = m.size
                out.addfile(m2, tf.extractfile(m))
                for extra, data in (("VERSION", b"1.0"), ("json", b"{}")):
                    e = tarfile.TarInfo(f"{lid}/{extra}")
                    e.size = len(data)
                    out.addfile(e, io.BytesIO(data))
                layers.append(f"{lid}/layer.tar")
            cfg = tf.getmember(man[0]["Config"])
            out.addfile(cfg, tf.extractfile(cfg))
            man[0]["Layers"] = layers
            data = json.dumps(man).encode()
            ti = tarfile.TarInfo("manifest.json")
            ti.size = len(data)
            out.addfile(ti, io.BytesIO(data))


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    b = Buildah()
    with sdt_tempdir() as work:
        try:
            im = Images(work)
            base = busybox_tree(work / "base")
            c1 = b("from", "scratch")
            b("add", c1, str(base), "/")
            b("commit", "-q", c1, "sdt-l1")
            c2 = b("from", "sdt-l1")
            # deletes files, replaces a directory with a file, makes an opaque directory
            # (overlay: rm -rf + mkdir), hard-links a lower-layer file (copied up), a fifo,
            # a device node and a directory owned by the image's user
            b.run(c2, "rm /opt/old/a && rm -rf /d/y && echo file > /d/y && rm -rf /d/x && "
                      "mkdir /d/x && echo new > /d/x/new && ln /bin/busybox /bin/bb-hard && "
                      "mkfifo /run/fifo && mkdir -p /data && chown 1000:1000 /data && "
                      "echo odd > /run/odd && chown 1234:5678 /run/odd && chmod 2751 /run/odd")
            b("config", "--cmd", json.dumps(CMD), "--env", "GREETING=hello world",
              "--workingdir", "/home/app", "--user", "app", "--port", "8080/tcp",
              "--volume", "/data", c2)
            b("commit", "-q", c2, "sdt-l2")
            b("push", "sdt-l2", f"oci:{im.layout}:v1")
            # layer 3 (no tool writes these): a hard link to a lower-layer file, a whiteout in
            # a lower directory, an opaque marker placed AFTER an entry of its own layer, and a
            # device node (buildah's chroot isolation may not mknod)
            null = ti("run/null", tarfile.CHRTYPE, mode=0o666)
            null[0].devmajor, null[0].devminor = 1, 3
            l3 = tar_of([ti("etc/", tarfile.DIRTYPE), null,
                         ti("etc/passwd-link", tarfile.LNKTYPE, link="etc/passwd"),
                         ti("opt/old/.wh.b"),
                         ti("var/log/", tarfile.DIRTYPE),
                         ti("var/log/new", data=b"kept: same layer as the opaque marker\n"),
                         ti("var/log/.wh..wh..opq")])
            (work / "l3.tar").write_bytes(l3)
            subprocess.run(["umoci", "raw", "add-layer", "--image", f"{im.layout}:v1", "--tag",
                            "v2", str(work / "l3.tar")], check=True, capture_output=True)
            _skopeo("copy", f"oci:{im.layout}:v2", f"docker-archive:{im.docker_archive}:"
                    "sdt/test:v2")
            _skopeo("copy", f"oci:{im.layout}:v2", f"oci-archive:{im.oci_archive}:v2")
            _skopeo("copy", "--dest-compress-format", "zstd", f"oci:{im.layout}:v2",
                    f"oci:{im.zstd}:v2")
            _skopeo("copy", "--dest-oci-accept-uncompressed-layers", f"oci:{im.layout}:v2",
                    f"oci:{work / 'plain'}:v2")
            _docker25_archive(work / "plain", im.docker25, "sdt/test:v2")
            subprocess.run(["gzip", "-k", "-1", str(im.docker_archive)], check=True)
            _docker_legacy_dirs(im.docker_archive, im.docker_legacy)
            _skopeo("copy", f"oci:{im.layout}:v1", f"docker-archive:{work / 'v1.tar'}:"
                    "sdt/test:v1")
            _merge_docker_archives([im.docker_archive, work / "v1.tar"], im.docker_multi)
            # a multi-platform index: linux/amd64 (sdt-l2) and linux/arm64/v8 (sdt-l1 plus a
            # marker file, its config saying arm64)
            (work / "marker").write_text("arm64\n")
            ca = b("from", "sdt-l1")
            b("copy", ca, str(work / "marker"), "/platform-marker")
            b("config", "--arch", "arm64", "--variant", "v8", ca)
            b("commit", "-q", ca, "sdt-arm")
            b("manifest", "create", "sdt-list")
            b("manifest", "add", "sdt-list", "sdt-l2")
            b("manifest", "add", "sdt-list", "sdt-arm")
            b("manifest", "push", "--all", "sdt-list", f"oci:{im.multi}:v1")
            umoci_unpack(im.layout, "v2", work / "umoci")
            im.umoci_tree = tree(im.umoci_root)
            yield im
        finally:
            b.cleanup()


def _import(state: Path, *args: str) -> dict[str, Any]:
    r = sidusctl("import", *args, "--json", state=state, timeout=300)
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


@pytest.fixture
def state() -> Iterator[Path]:
    with sdt_tempdir("sdt-state-") as d:
        yield d


SOURCES: dict[str, Callable[[Images], tuple[str, ...]]] = {
    "oci-layout-dir": lambda im: (f"oci:{im.layout}:v2",),
    "oci-layout-dir-ref-option": lambda im: (str(im.layout), "--ref", "v2"),
    "oci-archive-tar": lambda im: (str(im.oci_archive),),
    "oci-zstd-layers": lambda im: (str(im.zstd),),
    "docker-archive-legacy": lambda im: (str(im.docker_archive),),
    "docker-archive-docker25": lambda im: (str(im.docker25), "--ref", "sdt/test:v2"),
    "docker-archive-id-dirs": lambda im: (str(im.docker_legacy),),
    "docker-archive-gzipped": lambda im: (str(im.docker_archive) + ".gz",),
    "docker-archive-two-images": lambda im: (str(im.docker_multi), "--ref", "test:v2"),
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_import_matches_umoci(images: Images, state: Path, kind: str) -> None:
    out = _import(state, *SOURCES[kind](images), "sdt-img")
    rootfs = Path(out["rootfs"])
    # no init in this image: the only file added is the sh wrapper lxc.init.cmd needs for an
    # argument with blanks; it is not part of the image's layers
    assert out["files"] == [WRAPPER]
    got = without(tree(rootfs), out["files"], images.umoci_tree)
    assert diff_trees(got, images.umoci_tree) == []
    # and the semantics, spelled out (a shared bug in both unpackers would not pass these)
    r = rootfs
    assert not (r / "opt/old/a").exists() and not (r / "opt/old/b").exists()
    assert (r / "d/y").is_file() and (r / "d/y").read_text() == "file\n"
    assert sorted(os.listdir(r / "d/x")) == ["new"]
    assert sorted(os.listdir(r / "var/log")) == ["new"]
    assert os.stat(r / "etc/passwd-link").st_ino == os.stat(r / "etc/passwd").st_ino
    assert os.stat(r / "bin/bb-hard").st_ino == os.stat(r / "bin/busybox").st_ino
    assert os.stat(r / "bin/suid").st_mode & 0o7777 == 0o4755
    assert os.getxattr(r / "etc/xattr-file", "user.sdt") == b"hello"
    assert (os.stat(r / "data").st_uid, os.stat(r / "data").st_gid) == (1000, 1000)
    st = os.stat(r / "run/odd")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 5678, 0o2751)
    st = os.lstat(r / "run/null")
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(r) for n in ds + fs)
    # the manifest records source, digests and config
    assert out["command"] == CMD and out["uid"] == 1000 and out["gid"] == 1000
    assert out["cwd"] == "/home/app" and "GREETING=hello world" in out["env"]
    assert out["exposed_ports"] == ["8080/tcp"] and out["volumes"] == ["/data"]
    layers = out["digests"]["layers"]
    assert len(layers) == 3 and all(x["diff_id"].startswith("sha256:") for x in layers)


def test_manifest_digests_and_tarball(images: Images, state: Path, tmp_path: Path) -> None:
    tarball = tmp_path / "sdt-img.tar.zst"
    out = _import(state, f"oci:{images.layout}:v2", "sdt-img", "--tar", str(tarball))
    index = json.loads((images.layout / "index.json").read_text())
    v2 = next(m for m in index["manifests"]
              if m["annotations"]["org.opencontainers.image.ref.name"] == "v2")
    assert out["digests"]["manifest"] == v2["digest"]
    man = json.loads((images.layout / "blobs/sha256" / v2["digest"][7:]).read_text())
    assert [x["digest"] for x in out["digests"]["layers"]] == [x["digest"] for x in man["layers"]]
    assert out["digests"]["config"] == man["config"]["digest"]
    m = json.loads((Path(out["manifest"])).read_text())
    assert m["kind"] == "import" and m["source"]["kind"] == "oci-layout"
    assert m["config"]["Cmd"] == CMD
    # the tarball (LXC/Distem style) holds the same tree
    assert tarball.exists()
    ex = tmp_path / "ex"
    ex.mkdir()
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(ex),
                    "-xf", str(tarball)], check=True)
    assert diff_trees(tree(ex), tree(Path(out["rootfs"]))) == []
    # image list knows it
    r = sidusctl("image", "list", "--json", state=state)
    assert [i["name"] for i in json.loads(r.stdout)] == ["sdt-img"]


def test_layout_with_two_images_needs_ref(images: Images, state: Path) -> None:
    r = sidusctl("import", str(images.layout), "sdt-img", state=state)
    assert r.returncode == 2
    assert "holds 2 images" in r.stderr and "v1" in r.stderr and "v2" in r.stderr
    assert not (state / "images" / "sdt-img" / "current").exists()
    r = sidusctl("import", str(images.layout), "sdt-img", "--ref", "v9", state=state)
    assert r.returncode == 2 and "no manifest with ref 'v9'" in r.stderr
    out = _import(state, str(images.layout), "sdt-img", "--ref", "v1")
    assert len(out["digests"]["layers"]) == 2
    assert (Path(out["rootfs"]) / "var/log/owned").exists()  # layer 3 not applied


def test_docker_archive_with_two_images_needs_ref(images: Images, state: Path) -> None:
    r = sidusctl("import", str(images.docker_multi), "sdt-img", state=state)
    assert r.returncode == 2 and "holds 2 images" in r.stderr
    assert "sdt/test:v1" in r.stderr and "sdt/test:v2" in r.stderr
    out = _import(state, f"docker-archive:{images.docker_multi}:sdt/test:v1", "sdt-img")
    assert len(out["digests"]["layers"]) == 2 and out["source"]["kind"] == "docker-archive"


def test_multi_platform_index(images: Images, state: Path) -> None:
    out = _import(state, f"oci:{images.multi}:v1", "sdt-amd")  # default: this host's
    assert out["platform"] == "linux/amd64" and len(out["digests"]["layers"]) == 2
    assert not (Path(out["rootfs"]) / "platform-marker").exists()
    out = _import(state, f"oci:{images.multi}:v1", "sdt-arm", "--platform", "linux/arm64")
    assert out["platform"] == "linux/arm64/v8"
    assert (Path(out["rootfs"]) / "platform-marker").read_text() == "arm64\n"
    r = sidusctl("import", f"oci:{images.multi}:v1", "sdt-s390", "--platform", "linux/s390x",
                 state=state)
    assert r.returncode == 2
    assert "no image for platform linux/s390x" in r.stderr and "linux/arm64/v8" in r.stderr


def test_flat_docker_export(images: Images, state: Path, tmp_path: Path) -> None:
    """A flat filesystem tarball (what ``docker export`` writes), gzip'd as the Distem FAQ
    does: one layer, no config; --cmd supplies the command (shell form -> /bin/sh -c)."""
    flat = tmp_path / "export.tar.gz"
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-czf",
                    str(flat), "-C", str(images.umoci_root), "."], check=True)
    out = _import(state, str(flat), "sdt-flat", "--cmd", "echo hi; sleep 1")
    assert out["source"]["kind"] == "docker-export"
    assert diff_trees(without(tree(Path(out["rootfs"])), out["files"], images.umoci_tree),
                      images.umoci_tree) == []
    assert out["command"] == ["/bin/sh", "-c", "echo hi; sleep 1"]
    assert out["uid"] == 0 and out["init"] == "none"


def test_reimport_keeps_previous_generation(images: Images, state: Path) -> None:
    _import(state, f"oci:{images.layout}:v1", "sdt-img")
    first = os.readlink(state / "images/sdt-img/current")
    _import(state, f"oci:{images.layout}:v2", "sdt-img")
    assert os.readlink(state / "images/sdt-img/previous") == first
    # a failing import (bad ref) leaves current as it was and no .building-* behind
    cur = os.readlink(state / "images/sdt-img/current")
    r = sidusctl("import", str(images.layout), "sdt-img", "--ref", "nope", state=state)
    assert r.returncode == 2
    assert os.readlink(state / "images/sdt-img/current") == cur
    assert not [p for p in os.listdir(state / "images/sdt-img") if p.startswith(".building")]




@pytest.fixture(scope="module")
def registries(images: Images) -> Iterator[dict[str, Any]]:
    """Two local registries with the test image pushed by skopeo: anonymous and Basic auth."""
    from tests.oci_helpers import Registry, TokenServer

    started: list[Any] = []
    try:
        anon = Registry()
        started.append(anon)
        basic = Registry(htpasswd=("sdt", "s3cret pass"))
        started.append(basic)
        tokens = TokenServer(images.work, "tok", "t0ken pass")
        started.append(tokens)
        bearer = Registry(auth_yaml=tokens.registry_auth())
        started.append(bearer)
        for reg, extra in ((anon, []), (basic, ["--dest-creds", "sdt:s3cret pass"]),
                           (bearer, ["--dest-creds", "tok:t0ken pass"])):
            _skopeo("copy", "--dest-tls-verify=false", *extra, f"oci:{images.layout}:v2",
                    f"docker://{reg.host}/sdt/test:v2")
        yield {"anon": anon, "basic": basic, "bearer": bearer, "tokens": tokens}
    finally:
        for s in reversed(started):
            s.stop()


def test_registry_pull_anonymous(images: Images, registries: dict[str, Any],
                                 state: Path) -> None:
    host = registries["anon"].host
    out = _import(state, f"docker://{host}/sdt/test:v2", "sdt-reg", "--insecure")
    assert out["source"]["kind"] == "registry"
    assert diff_trees(without(tree(Path(out["rootfs"])), out["files"], images.umoci_tree),
                      images.umoci_tree) == []
    assert out["command"] == CMD
    # by digest, as printed by the first pull
    dig = out["digests"]["manifest"]
    out2 = _import(state, f"docker://{host}/sdt/test@{dig}", "sdt-reg2", "--insecure")
    assert out2["digests"] == out["digests"]


def test_registry_pull_basic_auth(images: Images, registries: dict[str, Any], state: Path,
                                  tmp_path: Path) -> None:
    host = registries["basic"].host
    ref = f"docker://{host}/sdt/test:v2"
    r = sidusctl("import", ref, "sdt-reg", "--insecure", state=state)
    assert r.returncode == 2 and "wants credentials" in r.stderr
    r = sidusctl("import", ref, "sdt-reg", "--insecure", "--creds", "sdt:wrong", state=state)
    assert r.returncode == 2 and "refused the credentials" in r.stderr
    out = _import(state, ref, "sdt-reg", "--insecure", "--creds", "sdt:s3cret pass")
    assert diff_trees(without(tree(Path(out["rootfs"])), out["files"], images.umoci_tree),
                      images.umoci_tree) == []
    # credentials from a containers auth.json, as skopeo/podman write it
    import base64

    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {host: {
        "auth": base64.b64encode(b"sdt:s3cret pass").decode()}}}))
    out = _import(state, ref, "sdt-reg3", "--insecure", "--authfile", str(auth))
    assert out["digests"]["manifest"].startswith("sha256:")


def test_registry_pull_bearer_token(images: Images, registries: dict[str, Any],
                                    state: Path) -> None:
    """The registry answers 401 with a Bearer challenge; the token comes from the realm (Basic
    credentials, scope repository:sdt/test:pull) and the registry checks its signature."""
    host = registries["bearer"].host
    ref = f"docker://{host}/sdt/test:v2"
    r = sidusctl("import", ref, "sdt-reg", "--insecure", "--creds", "tok:bad", state=state)
    assert r.returncode == 2 and "token server refused" in r.stderr
    before = registries["tokens"].issued
    out = _import(state, ref, "sdt-reg", "--insecure", "--creds", "tok:t0ken pass")
    assert registries["tokens"].issued == before + 1
    assert diff_trees(without(tree(Path(out["rootfs"])), out["files"], images.umoci_tree),
                      images.umoci_tree) == []


def test_registry_errors(registries: dict[str, Any], state: Path) -> None:
    host = registries["anon"].host
    r = sidusctl("import", f"docker://{host}/sdt/nothere:v1", "sdt-reg", "--insecure",
                 state=state)
    assert r.returncode == 2 and "not found" in r.stderr
    r = sidusctl("import", f"docker://{host}/sdt/test:v2", "sdt-reg", state=state)  # https
    assert r.returncode == 2 and "cannot reach the registry" in r.stderr
    r = sidusctl("import", "docker://127.0.0.1:1/Bad Repo", "sdt-reg", state=state)
    assert r.returncode == 2 and "not a valid repository name" in r.stderr


def _proc_status(pid: int) -> dict[str, str]:
    out = {}
    for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = ln.partition(":")
        out[k] = v.strip()
    return out


@pytest.mark.slow  # LXC
def test_lxc_start_runs_cmd_as_user(images: Images, state: Path) -> None:
    """The imported image started as an LXC container (no network) with the generated
    snippet: its CMD runs as PID 1 of the container, as user app (1000:1000), in WorkingDir,
    with Env, the argument with spaces and ';' intact."""
    import time

    out = _import(state, f"oci:{images.layout}:v2", "sdt-lxc")
    gen = Path(out["rootfs"]).parent
    name = f"sdt-imp-{os.getpid()}"
    with sdt_tempdir("sdt-lxcpath-") as lxcpath:
        conf = lxcpath / "config"
        conf.write_text(f"lxc.uts.name = {name}\nlxc.rootfs.path = dir:{gen / 'rootfs'}\n"
                        "lxc.net.0.type = empty\nlxc.autodev = 1\n"
                        "lxc.mount.auto = proc:mixed sys:ro\n"
                        f"lxc.include = {gen / 'lxc.conf'}\n")
        try:
            r = subprocess.run(["lxc-start", "-n", name, "-P", str(lxcpath), "-f", str(conf),
                                "-d", "-o", str(lxcpath / "log"), "-l", "INFO"],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr + (lxcpath / "log").read_text()
            result = gen / "rootfs/data/out"
            for _ in range(200):
                if result.exists() and len(result.read_text().splitlines()) >= 5:
                    break
                time.sleep(0.05)
            assert result.read_text().splitlines() == [
                "one arg; with spaces", "1000", "1000", "/home/app", "hello world"]
            info = subprocess.run(["lxc-info", "-n", name, "-P", str(lxcpath), "-p", "-H"],
                                  capture_output=True, text=True, check=True).stdout
            pid = int(info.split()[-1])
            st = _proc_status(pid)
            assert st["Uid"].split() == ["1000"] * 4 and st["Gid"].split() == ["1000"] * 4
            # PID 1 of the container is the CMD (sh exec'd sleep)
            assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep",
                                                                                  b"600"]
            assert st["NSpid"].split()[-1] == "1"
        finally:
            subprocess.run(["lxc-stop", "-n", name, "-P", str(lxcpath), "-k"],
                           capture_output=True, timeout=60)
