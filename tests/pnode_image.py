"""``images/pnode`` for tests/test_pnode_guest.py, built in the background while the session's
other tests run (docs/testing.md: the CI budget).

The build (a copy of the recipe with a wheelhouse of this checkout and the frontend's key, then
``sidusctl build``: 2.5-3.5 minutes on two cores, mostly one core busy) starts as soon as the
session's ``minimal`` is built (:func:`start`, called by ``tests/conftest.py``), whose bootstrap
it reuses from the shared bootstrap cache and whose package cache it shares; builds take turns
only at that cache's lock. It runs in a state directory of its own (``conftest.PNODE_STATE``,
beside the shared one, wiped with it), so that no test of the shared state directory sees its mounts,
its image lock or its generations. The pnode test waits for it (:func:`result`); the session
stops it if that test never came (:func:`stop`). Once the image is built, the same thread runs
what the session gave :func:`start` as ``then``: the pnode guest scenario, so that its guest
boots and works on one core while the session's other tests go on (tests/conftest.py).

The image is reused under ``SIDUSCTL_TEST_REUSE`` (or from a concurrent session, which builds
it under the same flock) when its key (the checkout's sources and the frontend's key) is
unchanged.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from tests import conftest
from tests.conftest import PNODE_STATE, REPO, REUSE, SIDUSCTL, BuiltImage
from tests.proc_util import terminate

#: what a wheel of the checkout is made of
SOURCES = ("sidusctl", "templates", "initramfs", "images", "pyproject.toml", "setup.py",
           "MANIFEST.in")
BUILD_TIMEOUT = 1800.0  # seconds, for the wheelhouse and the build together


class PnodeImage(NamedTuple):
    """The session's ``minimal`` build, the pnode build's state directory (its store holds
    ``pnode``), the frontend's private key (the image authorises its public half) and the
    build's seconds (None when the image was reused)."""

    minimal: BuiltImage
    state: Path
    key: Path
    build_s: float | None


def _source_files() -> list[Path]:
    """What a wheel of the checkout is made of (tracked and untracked, not ignored)."""
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard", *SOURCES], capture_output=True,
                         check=True).stdout
    return sorted(Path(p.decode()) for p in out.split(b"\0")
                  if p and (REPO / p.decode()).is_file())


def _image_key(pub: str) -> str:
    """What decides the pnode image: the checkout's sources (the recipe, the wheel's content)
    and the frontend's key."""
    h = hashlib.sha256(pub.encode())
    for rel in _source_files():
        h.update(str(rel).encode() + b"\0" + (REPO / rel).read_bytes())
    return h.hexdigest()


def _recipe_copy(dest: Path, pub: str) -> Path:
    """``dest/pnode``: images/pnode plus ``wheels/`` (``pip wheel`` of a copy of the checkout:
    sidusctl and every dependency) and ``authorized_keys`` (the frontend's key)."""
    shutil.rmtree(dest, ignore_errors=True)
    src = dest / "src"
    for rel in _source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel, follow_symlinks=False)
    recipe = dest / "pnode"
    shutil.copytree(REPO / "images" / "pnode", recipe, symlinks=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                    "--wheel-dir", str(recipe / "wheels"), str(src)],
                   check=True, capture_output=True, timeout=900, cwd=dest)
    (recipe / "authorized_keys").write_text(pub)
    shutil.rmtree(src)
    return recipe


class Then(NamedTuple):
    """What runs in the build's thread once the image is built (the pnode guest scenario,
    tests/test_pnode_guest.py): ``run`` gets the image and keeps its own outcome; ``abort``
    makes a ``run`` that is under way end soon (the session is stopping)."""

    run: Callable[[PnodeImage], None]
    abort: Callable[[], None]


class _Build:
    """One background build of the pnode image (a thread; the build a child process that
    :meth:`stop` can interrupt), and what the session runs with it then (:class:`Then`)."""

    def __init__(self, minimal: BuiltImage, then: Then | None) -> None:
        self.minimal = minimal
        self.then = then
        self.key = PNODE_STATE / "frontend-key"
        self.error: BaseException | None = None
        self.seconds: float | None = None  # the build's, None when the image was reused
        self._proc: subprocess.Popen[str] | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._built = threading.Event()  # set when the build ended, whatever its outcome
        self._thread = threading.Thread(target=self._run, name="sdt-pnode-build", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._build()
        except BaseException as e:  # kept for the test that waits (it raises it there)
            self.error = e
        finally:
            self._built.set()
        with self._lock:
            if self.error is not None or self._stopping or self.then is None:
                return
        self.then.run(self._image())

    def _image(self) -> PnodeImage:
        return PnodeImage(self.minimal, PNODE_STATE, self.key, self.seconds)

    def _build(self) -> None:
        # another session building it at the same time: wait for it, then reuse its image
        fd = conftest._flock(PNODE_STATE / ".build-lock", fcntl.LOCK_EX)
        try:
            self._build_locked()
        finally:
            if fd is not None:
                os.close(fd)

    def _build_locked(self) -> None:
        if not self.key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sdt-frontend",
                            "-f", str(self.key)], check=True)
        pub = Path(f"{self.key}.pub").read_text()
        digest = _image_key(pub)
        keyfile = PNODE_STATE / "build-pnode.key"
        from sidusctl.subsys.imagestore import ImageStore
        if ((REUSE or not conftest._alone_at_start) and ImageStore(PNODE_STATE).exists("pnode")
                and keyfile.exists()
                and keyfile.read_text() == digest):
            return
        keyfile.unlink(missing_ok=True)
        work = PNODE_STATE / "recipe"
        recipe = _recipe_copy(work, pub)
        t0 = time.monotonic()
        log = PNODE_STATE / "build-pnode.log"
        with open(log, "w") as out, self._lock:
            if self._stopping:
                raise RuntimeError("the pnode build was stopped before it started")
            self._proc = subprocess.Popen(
                [*SIDUSCTL, "--state-dir", str(PNODE_STATE), "--debug", "build", str(recipe)],
                stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        try:
            rc = self._proc.wait(timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._interrupt()
            raise
        shutil.rmtree(work, ignore_errors=True)
        if rc != 0:
            raise AssertionError(f"building the pnode image failed (rc {rc}):\n"
                                 f"{log.read_text()[-4000:]}")
        self.seconds = time.monotonic() - t0
        keyfile.write_text(digest)

    def _interrupt(self) -> None:
        """SIGTERM (a build cleans up after it: tests/test_build_faults.py), then SIGKILL."""
        if self._proc is not None:
            terminate(self._proc, timeout=300)

    def result(self) -> PnodeImage:
        if not self._built.wait(BUILD_TIMEOUT + 120):
            raise AssertionError(f"the pnode build still runs after {BUILD_TIMEOUT:.0f} s")
        if self.error is not None:
            raise self.error
        return self._image()

    def join(self) -> None:
        self._thread.join()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            then_runs = self._built.is_set() and self.error is None and self.then is not None
        self._interrupt()
        if then_runs and self._thread.is_alive():
            assert self.then is not None
            self.then.abort()
        self._thread.join(BUILD_TIMEOUT + 120)


_build: _Build | None = None


def start(minimal: BuiltImage, then: Then | None = None) -> None:
    """Starts the pnode build in the background (once per session; ``minimal`` must be built:
    the pnode build reuses its bootstrap), and ``then`` in the same thread once the image is
    built (not when the build failed)."""
    global _build
    if _build is None:
        _build = _Build(minimal, then)


def result(minimal: BuiltImage) -> PnodeImage:
    """Waits for the build :func:`start` began (starts it first if none did) and returns the
    image; raises the build's failure. Does not wait for the ``then`` of :func:`start`."""
    start(minimal)
    assert _build is not None
    return _build.result()


def has_then() -> bool:
    """Whether :func:`start` was given a ``then`` (it runs once the image is built)."""
    return _build is not None and _build.then is not None


def join_then() -> None:
    """Waits until the build and what :func:`start` was given as ``then`` have ended (that
    ends by its own timeouts)."""
    if _build is not None:
        _build.join()


def stop() -> None:
    """Interrupts a build still running (the pnode test never came: deselected, or the session
    was stopped), aborts its ``then`` if that runs, and waits for both; called before the
    state directories are wiped."""
    if _build is not None:
        _build.stop()
