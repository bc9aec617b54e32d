"""Shared fixtures: the real ``minimal`` image, built once per test run with the real CLI (in the
background from the session's start, while the fast tests, sorted first, run), and a leak check
that fails the run if any test left a mount, netns, container, loop device or qemu process
named ``sdt-`` behind.

Tiers (docs/testing.md): ``-m "not slow"`` is the fast tier and must never run debootstrap, qemu,
LXC or nfs-ganesha, nor build an image. The fixtures that do (``minimal_image``, and any a test
module lists in ``HEAVY_FIXTURES``) refuse, with a clear failure, to serve a test that is not
marked ``slow``, whether it names them as arguments or reaches them through
``request.getfixturevalue``; so an unmarked test cannot quietly make the fast tier slow.

Environment knobs (for developers; CI sets none of them):
- ``SIDUSCTL_TEST_STATE``: state directory of the shared image (default /var/tmp/sdt-test-state,
  wiped at the start and the end of the run); the pnode image's (tests/pnode_image.py) is
  beside it, named with ``-pnode`` added, and wiped with it.
- ``SIDUSCTL_TEST_REUSE=1``: keep the state directory between runs and reuse the built image if
  its recipe digest is unchanged (saves the 2-3 minute build while iterating).
- ``SIDUSCTL_CACHE``: the shared .deb cache (default /var/cache/sidusctl-test/apt, kept: a
  package cache, so a rebuild downloads nothing again).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from sidusctl.subsys.imagestore import Image

if TYPE_CHECKING:
    from tests.pnode_image import Then

REPO = Path(__file__).resolve().parent.parent
# A suite started in the background by a non-interactive shell (`cmd &`, nohup, some CI
# runners) inherits SIGINT ignored, and so would every sidusctl it starts: the Ctrl-C tests
# would then send a signal nobody hears. Python's own handler here means children start with
# the default disposition again (a handler, unlike "ignore", is not inherited across exec).
signal.signal(signal.SIGINT, signal.default_int_handler)
SIDUSCTL = [sys.executable, "-m", "sidusctl"]
TEST_STATE = Path(os.environ.get("SIDUSCTL_TEST_STATE", "/var/tmp/sdt-test-state"))
CACHE = Path(os.environ.get("SIDUSCTL_CACHE", "/var/cache/sidusctl-test/apt"))
REUSE = os.environ.get("SIDUSCTL_TEST_REUSE") == "1"
#: the pnode image's own state directory, beside the shared one and wiped with it
#: (tests/pnode_image.py builds it in the background)
PNODE_STATE = TEST_STATE.with_name(f"{TEST_STATE.name}-pnode")
os.environ["SIDUSCTL_CACHE"] = str(CACHE)


# fixtures that build an image or start debootstrap, qemu, LXC or nfs-ganesha
HEAVY_FIXTURES = {"minimal_image"}


def require_slow(request: pytest.FixtureRequest, what: str) -> None:
    """Fail the requesting test unless it is marked ``slow`` (``@pytest.mark.slow`` or a
    module-level ``pytestmark``): ``what`` names the heavy thing it asked for."""
    item = getattr(request, "_pyfuncitem", None) or request.node
    if item.get_closest_marker("slow") is None:
        pytest.fail(f"{item.nodeid} needs {what} but is not marked slow: add @pytest.mark.slow "
                    "(or a module-level pytestmark) so that -m 'not slow' stays fast "
                    "(docs/testing.md)", pytrace=False)


def pytest_runtest_setup(item: pytest.Item) -> None:
    # before any fixture of the test is set up: a session fixture already built for an earlier
    # (slow) test would otherwise be handed out without its own check running again
    heavy = HEAVY_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if heavy and item.get_closest_marker("slow") is None:
        pytest.fail(f"{item.nodeid} uses {', '.join(sorted(heavy))} but is not marked slow: add "
                    "@pytest.mark.slow (or a module-level pytestmark) so that -m 'not slow' stays "
                    "fast (docs/testing.md)", pytrace=False)


def sidusctl(*args: str, state: Path | None = None, check: bool = False, timeout: float = 1800,
             env: dict[str, str] | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (``python -m sidusctl``) with ``--state-dir``; returns the completed
    process with text stdout/stderr."""
    argv = [*SIDUSCTL]
    if state is not None:
        argv += ["--state-dir", str(state)]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    res: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
        [*argv, *args], capture_output=True, text=True, timeout=timeout, check=check,
        env=full_env, cwd=REPO, **kw)
    return res


def _mounts_under(path: Path) -> list[str]:
    p = os.path.realpath(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            t = line.split()[4]
            if t == p or t.startswith(p + "/"):
                out.append(t)
    return out


def _wipe(path: Path) -> None:
    if not path.exists():
        return
    if _mounts_under(path):
        # a previous run died: let sidusctl's own recovery undo its mounts first
        sidusctl("image", "list", state=path)
    for t in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", t], check=False)
    shutil.rmtree(path, ignore_errors=True)


def _flock(path: Path, mode: int, block: bool = True) -> int | None:
    """Open ``path`` and flock it; None if ``block`` is false and it is held elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@pytest.fixture
def host_sysctls() -> Iterator[dict[str, str]]:
    """The host sysctls a vnode store raises, as they were before the test; put back
    afterwards if the test (or a regression) changed them."""
    from sidusctl.subsys import lxc
    from tests.refusals import host_sysctl_values

    before = host_sysctl_values()
    yield before
    for k, v in before.items():
        if (lxc.PROC_SYS / k).read_text() != v:
            (lxc.PROC_SYS / k).write_text(v)


_SESSION_LOCK = TEST_STATE.parent / f".{TEST_STATE.name}.sessions"
_alone_at_start = False


@pytest.fixture(scope="session")
def test_state() -> Iterator[Path]:
    """The state directory holding the shared image. Several pytest sessions may run at once
    (developers running parts of the suite in parallel): each holds a shared lock for its whole
    run; the directory is wiped only by a session that finds itself alone."""
    global _alone_at_start
    fd = _flock(_SESSION_LOCK, fcntl.LOCK_EX, block=False)
    _alone_at_start = fd is not None
    if fd is None:
        fd = _flock(_SESSION_LOCK, fcntl.LOCK_SH)
    else:
        if not REUSE:
            _wipe(TEST_STATE)
            _wipe(PNODE_STATE)
        fcntl.flock(fd, fcntl.LOCK_SH)
    assert fd is not None
    TEST_STATE.mkdir(parents=True, exist_ok=True)
    try:
        yield TEST_STATE
    finally:
        if "tests.pnode_image" in sys.modules:  # a background build still running stops first
            sys.modules["tests.pnode_image"].stop()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            last = True
        except BlockingIOError:
            last = False
        if last and not REUSE:
            _wipe(TEST_STATE)
            _wipe(PNODE_STATE)
        os.close(fd)


@dataclass(frozen=True)
class BuiltImage(Image):
    """The shared image: its generation as an :class:`~sidusctl.subsys.imagestore.Image`
    (``name``, ``dir``, and ``rootfs``, ``manifest``, ``kernel``... from them), plus
    ``state`` (its state dir) and ``log`` (the build's --debug output, for evidence such as
    policy-rc.d's refusals)."""

    state: Path
    log: str


def _needs_minimal(item: pytest.Item) -> bool:
    """Whether ``item`` is a slow test that asks for the shared image: as an argument (or a
    fixture's), or through a module fixture's ``request.getfixturevalue`` (such a module says
    ``USES_MINIMAL_IMAGE = True``)."""
    return item.get_closest_marker("slow") is not None and (
        "minimal_image" in getattr(item, "fixturenames", ())
        or getattr(getattr(item, "module", None), "USES_MINIMAL_IMAGE", False))


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    # In this order, each group in collection order (docs/testing.md: the CI budget):
    # 0. the modules without a slow test: the shared image builds in the background meanwhile
    #    (_background_builds), on the core the fast tests leave idle;
    # 1. the other modules without a qemu guest: tests/test_pnode_guest.py's guest runs in the
    #    background meanwhile, once its image is built (tests/pnode_image.py), on the core
    #    these tests (builds, LXC, servers) mostly leave idle;
    # 2. the modules that boot guests (they say BOOTS_GUESTS), two at a time where they can;
    # 3. tests/test_pnode_guest.py (it says AHEAD_OF), whose guest should be done by then;
    # 4. the modules whose scenarios tests/test_pnode_guest.py may run ahead (AHEAD_KEY).
    slow = {i.module.__name__ for i in items
            if i.get_closest_marker("slow") is not None and hasattr(i, "module")}

    def group(item: pytest.Item) -> int:
        module = getattr(item, "module", None)
        if getattr(module, "AHEAD_KEY", None) is not None:
            return 4
        if getattr(module, "AHEAD_OF", None) is not None:
            return 3
        if getattr(module, "BOOTS_GUESTS", False):
            return 2
        return int(getattr(module, "__name__", "") in slow)

    items.sort(key=group)


class _MinimalBuild:
    """The shared image's build, in a thread: started before the first test when a slow test
    of the session needs it (:func:`_background_builds`), waited for by :func:`minimal_image`.
    When it is done and tests/test_pnode_guest.py is in the session (``pnode``, what that
    module's ``in_background`` gives), the pnode image's build starts behind it
    (tests/pnode_image.py), and its guest scenario behind that."""

    def __init__(self, test_state: Path, pnode: Then | None) -> None:
        self.test_state = test_state
        self.pnode = pnode
        self.built: BuiltImage | None = None
        self.failure: str | None = None
        self.thread = threading.Thread(target=self._run, name="sdt-minimal-build", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.built = _build_minimal(self.test_state)
        except BaseException as e:  # reported by the test that waits for it
            self.failure = f"building images/minimal failed: {e}"
            return
        if self.pnode is not None:
            # the pnode test's image, from now on (its bootstrap is the one this build saved)
            from tests import pnode_image
            pnode_image.start(self.built, then=self.pnode)

    def result(self) -> BuiltImage:
        self.thread.join()
        if self.built is None:
            pytest.fail(self.failure or "building images/minimal failed", pytrace=False)
        return self.built


_minimal_build: _MinimalBuild | None = None


def _start_minimal_build(request: pytest.FixtureRequest) -> _MinimalBuild:
    """The session's build of the shared image, started now if it was not (setting the
    ``test_state`` fixture up first: it may wipe the state directories), with the pnode
    image's and its guest scenario behind it when tests/test_pnode_guest.py is in the
    session."""
    global _minimal_build
    if _minimal_build is None:
        test_state: Path = request.getfixturevalue("test_state")
        pnode = next((i.module.in_background(request.getfixturevalue("tmp_path_factory"))
                      for i in request.session.items
                      if Path(str(i.path)).name == "test_pnode_guest.py"
                      and isinstance(i, pytest.Function)), None)
        _minimal_build = _MinimalBuild(test_state, pnode)
    return _minimal_build


@pytest.fixture(scope="session", autouse=True)
def _background_builds(request: pytest.FixtureRequest) -> Iterator[None]:
    """Starts the shared image's build before the session's first test, when a slow test of
    the session needs it (the fast tests, sorted first, run meanwhile); at the end, stops the
    pnode image's build if it still runs (before the state directories are wiped)."""
    if any(_needs_minimal(i) for i in request.session.items):
        _start_minimal_build(request)
    yield
    if _minimal_build is not None:
        _minimal_build.thread.join()
    if "tests.pnode_image" in sys.modules:
        sys.modules["tests.pnode_image"].stop()


@pytest.fixture(scope="session")
def minimal_image(request: pytest.FixtureRequest) -> BuiltImage:
    """``images/minimal`` built once per run by ``sidusctl build minimal --tar`` (real
    debootstrap against the Debian archive), in the background from the session's start
    (:func:`_background_builds`). Attributes as imagestore.Image: rootfs, tarball, kernel,
    initrd, manifest, dir, name; plus ``state`` and ``log``. A session that is not alone
    waits for a concurrent session's build and reuses it.

    Fails unless the test that first asks for it (as an argument, or through a module fixture's
    ``request.getfixturevalue``) is marked ``slow``; the failure is cached for the session, so
    in the fast tier every later request fails too. Tests naming it as an argument are also
    checked one by one in :func:`pytest_runtest_setup`."""
    require_slow(request, "the built minimal image (debootstrap)")
    # started already, unless no test of the session was known to need it
    return _start_minimal_build(request).result()


def _build_minimal(test_state: Path) -> BuiltImage:
    """The shared image: reused when this session may and its key (the recipe and the netboot
    scripts that go into its initrd) is unchanged, else built; under the state directory's
    build lock (a concurrent session waits for it). Raises RuntimeError with the build's
    error output when it fails."""
    from sidusctl.image import recipe
    from sidusctl.subsys.imagestore import ImageStore

    h = hashlib.sha256(recipe.find("minimal").digest().encode())
    for f in sorted((REPO / "initramfs").rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(REPO)).encode() + f.read_bytes())
    digest = h.hexdigest()
    logfile = test_state / "build-minimal.log"
    keyfile = test_state / "build-minimal.key"
    fd = _flock(test_state / ".build-lock", fcntl.LOCK_EX)
    try:
        store = ImageStore(test_state)
        if (REUSE or not _alone_at_start) and store.exists("minimal") and logfile.exists():
            img = store.get("minimal")
            if keyfile.exists() and keyfile.read_text() == digest and img.tarball:
                return BuiltImage(img.name, img.dir, test_state, logfile.read_text())
        keyfile.unlink(missing_ok=True)
        res = sidusctl("--debug", "build", "minimal", "--tar", state=test_state, timeout=1800)
        logfile.write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            raise RuntimeError(f"rc {res.returncode}:\n{res.stderr[-4000:]}")
        keyfile.write_text(digest)
        img = store.get("minimal")
        return BuiltImage(img.name, img.dir, test_state, res.stdout + res.stderr)
    finally:
        if fd is not None:
            os.close(fd)


# -- leak check ----------------------------------------------------------------------------------

def _leaks() -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {ln.split()[4]}" for ln in f if "sdt-" in ln.split()[4]]
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    found += [f"netns {ln.split()[0]}" for ln in r.stdout.splitlines() if ln.startswith("sdt-")]
    r = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=False)
    found += [f"link {ln.split(':')[1].strip().split('@')[0]}" for ln in r.stdout.splitlines()
              if ln.split(":")[1].strip().startswith("sdt-")]
    if shutil.which("lxc-ls"):
        r = subprocess.run(["lxc-ls", "-1"], capture_output=True, text=True, check=False)
        found += [f"container {c}" for c in r.stdout.split() if c.startswith("sdt-")]
    r = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False)
    found += [f"loop {ln.split(':')[0]}" for ln in r.stdout.splitlines() if "sdt-" in ln]
    r = subprocess.run(["pgrep", "-a", "-f", "qemu-system.*sdt-"], capture_output=True, text=True,
                       check=False)
    found += [f"qemu {ln}" for ln in r.stdout.splitlines()]
    return found


_before: set[str] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    # what was there before this run (another developer's session, a killed earlier run) is not
    # this run's leak; it is reported once as a warning so it gets cleaned
    _before.update(_leaks())
    if _before:
        sys.stderr.write("\nnote: sdt- resources present before this run (not counted):\n  "
                         + "\n  ".join(sorted(_before)) + "\n")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # trylast: after pytest's own, which tears the session's fixtures down when the session
    # was interrupted (Ctrl-C) in a test: what they remove is not a leak
    leaks = [x for x in _leaks() if x not in _before]
    if leaks:
        sys.stderr.write("\nLEAKED TEST RESOURCES (a cleanup bug):\n  " + "\n  ".join(leaks) + "\n")
        session.exitstatus = 1
