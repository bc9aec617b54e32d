"""The AppArmor policy cache, compiled at build time for the image's kernel.

At each boot ``apparmor.service`` runs ``apparmor_parser --write-cache --replace`` on
``/etc/apparmor.d``. The parser loads a profile's compiled form from its cache
(``/var/cache/apparmor/<hash>.0/``, the hash being that of the running kernel's AppArmor
features, read from securityfs) when the cache is there and no older than the profile's sources;
otherwise it compiles the profile and writes the cache. A machine on a local disk compiles once
and keeps the cache. A diskless node's writable layer is new at each boot (tmpfs), so it
compiled every profile at every boot: 2.7 s of CPU under qemu's TCG for ``minimal``'s three
profiles, and the first thing on the boot's critical chain (docs/performance.md, "Netboot").

The build host's kernel is not the node's, so its features cannot name the cache. The features
of the kernels sidusctl knows are shipped in ``apparmor-features/<major>.<minor>.features``
(captured from a booted node: the ``.features`` file the parser writes beside its cache, the
same flattened form as ``--kernel-features`` reads). For each kernel of the image whose series
has such a file, the build runs the image's own parser in the chroot with ``--kernel-features``
and ``--skip-kernel-load``: the cache it writes is byte for byte the one the node would write,
in the directory the node's parser looks in. A kernel of another series gets no cache, and its
nodes compile at boot as before; a cache made for features that are not the booted kernel's is
not used (its directory has another name), never wrong. Sources: apparmor_parser(8)
(``--kernel-features``, ``--skip-kernel-load``, ``--write-cache``, ``--print-cache-dir``),
AppArmor 3.0's policy cache layout.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sidusctl.core.errors import CommandError
from sidusctl.subsys.chroot import ChrootSession

#: the shipped kernel features, one file per kernel series (``6.1.features``)
FEATURES_DIR = Path(__file__).with_name("apparmor-features")
#: where the features file is copied inside the root for the parser (removed after)
FEATURES_IN_ROOT = "/run/sidusctl-apparmor.features"
PARSER = "sbin/apparmor_parser"
PROFILES = "etc/apparmor.d"
_SERIES = re.compile(r"^(\d+)\.(\d+)[.-]")


@dataclass(frozen=True)
class CachePlan:
    """What the build does for the image at ``root``: ``features`` (kernel release: shipped
    features file) for each kernel whose series is known, empty with ``why_not`` (a sentence)
    when nothing is to be compiled."""

    features: dict[str, Path]
    why_not: str = ""


def kernel_releases(root: Path) -> list[str]:
    """The releases of the kernels in ``root``'s ``/boot`` (``vmlinuz-RELEASE``), sorted."""
    return sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))


def features_for(release: str, features_dir: Path = FEATURES_DIR) -> Path | None:
    """The shipped features file of ``release``'s series (``6.1.0-57-amd64`` -> ``6.1``), or
    None when sidusctl has none."""
    m = _SERIES.match(release)
    if m is None:
        return None
    f = features_dir / f"{m.group(1)}.{m.group(2)}.features"
    return f if f.is_file() else None


def plan(root: Path, features_dir: Path = FEATURES_DIR) -> CachePlan:
    """The :class:`CachePlan` for the root at ``root`` (read only, nothing run)."""
    if not (root / PARSER).exists():
        return CachePlan({}, "the image has no AppArmor parser (package apparmor)")
    profiles = root / PROFILES
    if not profiles.is_dir() or not any(p.is_file() for p in profiles.iterdir()):
        return CachePlan({}, f"the image has no profiles in /{PROFILES}")
    releases = kernel_releases(root)
    if not releases:
        return CachePlan({}, "the image has no kernel (its nodes' kernel is not known)")
    known = {r: f for r in releases if (f := features_for(r, features_dir)) is not None}
    if not known:
        series = sorted(p.stem for p in features_dir.glob("*.features"))
        return CachePlan({}, f"no AppArmor features known for kernel {', '.join(releases)} "
                             f"(known series: {', '.join(series) or 'none'}): its nodes "
                             "compile their profiles at boot")
    return CachePlan(known)


def compile_cache(s: ChrootSession, p: CachePlan) -> tuple[list[str], list[str]]:
    """Compiles every profile of ``/etc/apparmor.d`` into the image's policy cache with the
    image's own ``apparmor_parser``, once per distinct features file of ``p``, in the
    location the parser's configuration names (``/var/cache/apparmor`` on Debian). Returns
    (the cache directories written, relative to the root; the parser's failures, one text
    each). A profile the parser cannot compile is not cached, and the node's
    ``apparmor.service`` meets the same error at boot (it then loads the profiles one by
    one): a warning, not a failed build. The other profiles' caches stand (one file each)."""
    copy = s.root / FEATURES_IN_ROOT.lstrip("/")
    made: list[str] = []
    failed: list[str] = []
    try:
        for features in sorted(set(p.features.values())):
            shutil.copyfile(features, copy)
            args = ["/" + PARSER, "--kernel-features", FEATURES_IN_ROOT]
            try:
                s.run([*args, "--skip-kernel-load", "--write-cache", "--quiet", "--",
                       "/" + PROFILES], what="apparmor_parser --write-cache")
            except CommandError as e:
                failed.append(f"{features.name}: exit {e.returncode}: "
                              f"{e.output_tail.strip()}")
            out = s.run([*args, "--print-cache-dir"], capture=True,
                        what="apparmor_parser --print-cache-dir")
            made.append(out.stdout.strip().lstrip("/"))
    finally:
        copy.unlink(missing_ok=True)
    return made, failed
