"""What the build's modules share: the progress protocol, the options, host checks, how a
tool's failure is explained, and small helpers on a root (its package list, its size, its
mirror, the .debs a bootstrap left in it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sidusctl.core.config import Checker
from sidusctl.core.errors import (
    BuildError,
    BusyError,
    CommandError,
    ConfigError,
    PrerequisiteError,
    SidusError,
    StateError,
)
from sidusctl.core.log import get_logger
from sidusctl.core.report import Reporter as Reporter
from sidusctl.core.run import run, which
from sidusctl.core.state import FileLock, ensure_dir
from sidusctl.image.recipe import Recipe
from sidusctl.subsys.imagestore import ImageStore
from sidusctl.subsys.manifest import Package

log = get_logger("build")

BACKENDS = ("debootstrap", "mmdebstrap")
APT = ["apt-get", "-y", "-q", "-o", "Dpkg::Options::=--force-confdef",
       "-o", "Dpkg::Options::=--force-confold"]


class Quiet:
    """A :class:`Reporter` for non-interactive builds: stages go to the log at info level,
    the commands' output lines are dropped (the build log keeps them)."""

    def stage(self, name: str, index: int, total: int) -> None:
        """Log ``stage INDEX/TOTAL: NAME`` at info level."""
        log.info("stage %d/%d: %s", index, total, name)

    def line(self, text: str) -> None:
        """Drop ``text`` (the build log keeps the commands' output)."""
        pass


@dataclass
class BuildOptions:
    """``backend``: debootstrap | mmdebstrap; ``tar``: also write a rootfs tarball; ``out``: a
    directory to copy kernel, initrd and tarball to; ``cache``: the shared .deb cache;
    ``bootstrap_cache``: reuse a cached bootstrap when nothing that decides it has changed
    (same recipe bootstrap keys, same archive InRelease); ``stage_cache``: restore the root as it
    stands after the package stage from the stage cache when its key matches (False:
    ``--no-cache``, a clean build, which still refreshes the cache); ``cache_max_bytes``: the
    stage cache's size limit (least recently used entries are evicted beyond it)."""

    backend: str = "debootstrap"
    tar: bool = False
    out: Path | None = None
    cache: Path | None = None
    bootstrap_cache: bool = True
    stage_cache: bool = True
    cache_max_bytes: int | None = None
    timings: dict[str, float] = field(default_factory=dict)


def dpkg_arch() -> str:
    """This machine's Debian architecture name (``dpkg --print-architecture``'s answer) from
    the kernel's machine name: ``x86_64`` -> ``amd64``, ``aarch64`` -> ``arm64``...; an
    unknown machine name is returned as it is."""
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "i686": "i386", "armv7l": "armhf",
            "ppc64le": "ppc64el", "riscv64": "riscv64", "s390x": "s390x"}.get(m, m)


def check_variant(recipe: Recipe, backend: str) -> None:
    """Whether ``backend`` can bootstrap ``recipe``'s variant: debootstrap(8) knows only
    ``minbase``, ``buildd`` and its default (Priority: important); ``standard`` is
    mmdebstrap's. Raises :class:`ConfigError` (file, line, key, found, expected)."""
    if backend == "debootstrap" and recipe.variant == "standard":
        text = recipe.path.read_text(encoding="utf-8", errors="replace")
        raise ConfigError(str(recipe.path), "variant",
                          "'standard' is not a variant debootstrap has (it would build "
                          "'important')", line=Checker(str(recipe.path), text).line(["variant"]),
                          expected="minbase, buildd or important, or --backend mmdebstrap")


def preflight(recipe: Recipe, opts: BuildOptions) -> None:
    """Host checks before anything is written: the recipe's variant against the backend, root,
    the backend's command, a runnable arch. Raises :class:`ConfigError`,
    :class:`PrerequisiteError`."""
    check_variant(recipe, opts.backend)
    if os.geteuid() != 0:
        raise PrerequisiteError(
            f"building an image needs root (debootstrap, mounts, chroot); running as uid {os.geteuid()}",
            hint="run it with sudo")
    if opts.backend not in BACKENDS:
        raise PrerequisiteError(f"unknown backend {opts.backend!r} (expected one of {', '.join(BACKENDS)})")
    which(opts.backend, opts.backend)
    which("chroot", "coreutils")
    if recipe.arch != dpkg_arch():
        try:
            run(["arch-test", recipe.arch], capture=True)
        except (CommandError, PrerequisiteError) as e:
            raise PrerequisiteError(
                f"{recipe.path}: arch {recipe.arch} cannot run on this {dpkg_arch()} host",
                hint="install qemu-user-static and binfmt-support, or build on a matching host",
            ) from e


# -- error interpretation -------------------------------------------------------------------------

def _free(path: Path) -> int:
    probe = path if path.exists() else path.parent
    return shutil.disk_usage(probe).free if probe.exists() else 1 << 62


class FreeSpaceWatch:
    """Samples the free space of ``path``'s filesystem every 0.05 s in a thread; ``min_free``
    is the least seen (bytes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.min_free = _free(path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(OSError):
                self.min_free = min(self.min_free, _free(self.path))

    def __enter__(self) -> FreeSpaceWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def explain(e: CommandError, recipe: Recipe, mirror: str, target: Path, stage: str,
             min_free: int | None = None) -> SidusError:
    """Turn a tool's failure into one clear sentence where we recognise it. ``min_free``: the
    least free space (bytes) seen on the target's filesystem while the tool ran."""
    t = e.output_tail
    free = _free(target)
    # Tools word a full disk in many ways (debootstrap: "Couldn't download ..." and then it
    # deletes the partial file); the free space seen while it ran does not lie.
    if ("No space left on device" in t or "You don't have enough free space" in t
            or min(free, min_free if min_free is not None else free) < 8 * 2**20):
        return BuildError(f"the disk holding {target} is full ({free // 2**20} MiB free) during "
                          f"{stage} of image '{recipe.name}'", hint="free some space or use --state-dir")
    m = re.search(r"Couldn't find these debs: (.*)", t)
    if m:
        return BuildError(f"{recipe.path}: key 'include': package(s) not found in {recipe.suite} "
                          f"({' '.join(recipe.components)}): {m.group(1).strip()}")
    m = re.search(r"Unable to locate package (\S+)", t)
    if m:
        return BuildError(f"{recipe.path}: package {m.group(1)} not found in {recipe.suite} "
                          f"({' '.join(recipe.components)})")
    if re.search(r"Failed getting release file|Failure trying to run|Could not resolve|"
                 r"Connection refused|Failed to fetch|Couldn't download|Temporary failure resolving|"
                 r"Release file .* is not valid|unable to connect|Unable to connect", t):
        where = mirror or "the default Debian mirror"
        return BuildError(f"the mirror {where} did not answer for suite {recipe.suite} during {stage}",
                          hint="check the recipe's 'mirror' key and the network")
    return BuildError(f"{stage} of image '{recipe.name}' failed: {e}")


def release_digest(mirror: str, suite: str) -> str | None:
    """sha256 (hex) of ``<mirror>/dists/<suite>/InRelease``, fetched now; None if it cannot be
    fetched (no network, no such suite): the caches keyed by it are then not used."""
    url = f"{mirror}/dists/{suite}/InRelease"
    try:
        with urllib.request.urlopen(url, timeout=15) as resp:
            return hashlib.sha256(resp.read()).hexdigest()
    except (OSError, ValueError) as e:
        log.debug("no InRelease for the cache keys: %s: %s", url, e)
        return None


def default_cache(store: ImageStore) -> Path:
    """The shared .deb cache: ``$SIDUSCTL_CACHE`` or ``<state>/cache/apt``."""
    env = os.environ.get("SIDUSCTL_CACHE")
    return Path(env).absolute() if env else store.state_dir / "cache" / "apt"


def make_cache(cache: Path) -> Path:
    """Create the .deb cache directory ``cache`` (and its parents) if missing; returns it.
    :class:`ConfigError` naming it when it cannot be one (a regular file there or above it,
    no permission...): it comes from ``--cache-dir`` or ``$SIDUSCTL_CACHE``."""
    try:
        return ensure_dir(cache)
    except StateError as e:
        reason = e.__cause__.strerror if isinstance(e.__cause__, OSError) else e
        raise ConfigError(str(cache), None, f"cannot be the .deb cache: {reason}",
                          expected="a directory (--cache-dir or $SIDUSCTL_CACHE)") from None


def package_list(root: Path) -> dict[str, Package]:
    """Installed packages from the root's dpkg database: name → version, arch, installed size."""
    res = run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f",
               "${Package}\t${Version}\t${Architecture}\t${Installed-Size}\t${db:Status-Abbrev}\n"],
              capture=True, what="dpkg-query")
    out: dict[str, Package] = {}
    for line in res.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 5 and parts[4].startswith("i"):
            out[parts[0]] = Package(version=parts[1], arch=parts[2], installed_kib=parts[3])
    return out


def clean_root_debs(root: Path, cache: Path) -> None:
    """Move the .debs debootstrap left in the root into the shared cache (or drop them)."""
    archives = root / "var/cache/apt/archives"
    for deb in archives.glob("*.deb"):
        dest = cache / deb.name
        if dest.exists():
            deb.unlink()
        else:
            shutil.move(str(deb), dest)



def mirror_from(root: Path) -> str | None:
    """The mirror URL of the first ``deb`` line of ``root``'s ``/etc/apt/sources.list``
    (one-line format, sources.list(5)); None without such a line or file."""
    sl = root / "etc/apt/sources.list"
    if sl.exists():
        for line in sl.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb":
                return parts[1]
    return None



def du(path: Path) -> int:
    """Disk usage of the tree at ``path`` in bytes, as ``du -s -B1`` counts it less
    ``path``'s own blocks: the allocated 512-byte blocks (``st_blocks``, stat(2)) of every
    entry below it, each inode once (hard links), symbolic links not followed; entries that
    vanish meanwhile are skipped."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for n in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total




@contextlib.contextmanager
def shared_cache_turn(cache: Path | None, rep: Reporter) -> Iterator[None]:
    """Holds the shared .deb cache's lock (``cache/.sidusctl-apt.lock``, a flock) for the
    block. apt locks ``var/cache/apt/archives/lock``, and a chroot session binds the host's
    shared cache there: builds and updates that share it take turns here instead of failing
    on apt's lock. A wait is said (the progress line, and the log at INFO: ``--debug``) with
    the holder's pid. ``cache`` None: nothing to share, no lock."""
    if cache is None:
        yield
        return
    lock = FileLock(cache / ".sidusctl-apt.lock", f"the package cache {cache}")
    try:
        lock.acquire()
    except BusyError as e:
        rep.line("waiting for the shared package cache")
        log.info("waiting for the shared package cache: %s", e)
        lock.acquire(wait=True)
    try:
        yield
    finally:
        lock.release()
