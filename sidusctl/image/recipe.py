"""Image recipes: ``images/<name>/image.toml``, parsed and validated once into a frozen model.

Validated by the typed layer of :mod:`sidusctl.core.config`: every problem (file, line, key, what
was found, what was expected) is reported at once, before anything is downloaded. The keys (all optional except ``suite``)::

    description = "..."
    suite = "bookworm"                 # a Debian suite or codename
    arch = "amd64"                     # a Debian architecture
    components = ["main"]              # main, contrib, non-free, non-free-firmware
    variant = "minbase"                # minbase | buildd | important (debootstrap's default) | standard
    mirror = ""                        # default: the host's apt sources, else debootstrap's
    include = []                       # packages for debootstrap --include (seed's MyInclude)
    exclude = []                       # debootstrap --exclude, and pinned out of later installs
    packages = []                      # installed with apt after the bootstrap
    install_recommends = false
    install_suggests = false           # the seed's --install-suggests for science-*
    upgrade = true                     # apply <suite>-updates and -security at build time
    purge = []                         # fnmatch patterns purged at the end (the seed: matlab-*)
    locales = ["en_US.UTF-8"]          # generated; the first is the default LANG
    timezone = "Etc/UTC"
    root_password = ""                 # set with chpasswd; empty: root login by password locked
    [keyboard]  layout/model/variant/options   (/etc/default/keyboard)
    [[files]]   src, dest, mode = "0644", owner = "root", group = "root", template = false
    postinst = []                      # executable scripts next to the recipe, run in the image
    [vars]      variables for template site files
    [tricks]    remove_hostname, resolv_conf = [lines], loopback_interfaces, limits = [lines]
    [netboot]   enabled, modules = ["overlay"], nic,
                squashfs_exclude = [patterns]   # default: sidusctl.netboot.squash.EXCLUDE
    [export]    compression = "zstd" | "gzip"

``postinst`` (mkosi's post-installation scripts): run in order inside the image (chroot), after
the site files and tricks, before the root password, the netboot hook and the initramfs, with
the recipe's folder copied at ``/run/sidusctl/recipe`` (``$SIDUSCTL_RECIPE_DIR``; gone after
the build) and ``$SIDUSCTL_IMAGE`` set to the image name. They install what apt cannot (a
wheelhouse, a key kept next to the recipe). A recipe with scripts has a digest over every file
of its folder, since its scripts may read any.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator

from sidusctl.core.config import Checker, Frozen, Tup, as_tuple, parse_toml, read_text
from sidusctl.core.errors import NotFoundError
from sidusctl.core.paths import image_search_path
from sidusctl.subsys.imagestore import NAME_RE

DEBIAN_SUITES = (
    "buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid",
    "oldoldstable", "oldstable", "stable", "testing", "unstable",
)
DEBIAN_ARCHES = ("amd64", "arm64", "armel", "armhf", "i386", "mips64el", "ppc64el", "riscv64",
                 "s390x")
COMPONENTS = ("main", "contrib", "non-free", "non-free-firmware")
VARIANTS = ("minbase", "buildd", "important", "standard")
PKG_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
PKG_PATTERN_RE = re.compile(r"^[a-z0-9*?\[\]][a-z0-9+.*?\[\]-]*$")
LOCALE_RE = re.compile(r"^[A-Za-z]{2,3}(_[A-Z]{2})?(\.[A-Za-z0-9-]+)?(@[a-z]+)?$|^C\.UTF-8$")


@dataclass(frozen=True)
class SiteFile:
    """A file copied (or jinja2-rendered) into the root: ``src`` (absolute path on the host),
    ``dest`` (absolute path in the root), ``mode`` (int), ``owner``/``group`` (names looked up in
    the root's own passwd/group, or numbers)."""

    src: Path
    dest: str
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"
    template: bool = False


@dataclass(frozen=True)
class Keyboard:
    """A recipe's ``[keyboard]``: written to the image's ``/etc/default/keyboard`` as
    ``XKBLAYOUT``, ``XKBMODEL``, ``XKBVARIANT`` and ``XKBOPTIONS`` (keyboard(5))."""

    layout: str = "us"
    model: str = "pc105"
    variant: str = ""
    options: str = ""


@dataclass(frozen=True)
class Tricks:
    """The SIDUS seed's tricks: no /etc/hostname (hostname from DHCP), a static resolv.conf,
    a loopback-only /etc/network/interfaces, limits.conf entries."""

    remove_hostname: bool = False
    resolv_conf: tuple[str, ...] = ()
    loopback_interfaces: bool = False
    limits: tuple[str, ...] = ()


@dataclass(frozen=True)
class Netboot:
    """``[netboot]``: the initramfs hook (``enabled``, ``modules``, ``nic``) and
    ``squashfs_exclude``: what the image's squashfs exports leave out (mksquashfs
    ``-wildcards`` patterns relative to the root; None: the default list,
    :data:`sidusctl.netboot.squash.EXCLUDE`; ``()``: nothing). An export parameter, not a
    build input: it is not part of :meth:`Recipe.digest`."""

    enabled: bool = False
    modules: tuple[str, ...] = ("overlay",)
    nic: str = ""
    squashfs_exclude: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Recipe:
    """A validated image recipe. ``path`` is the image.toml it came from; ``name`` its folder."""

    name: str
    path: Path
    suite: str
    description: str = ""
    arch: str = "amd64"
    components: tuple[str, ...] = ("main",)
    variant: str = "minbase"
    mirror: str = ""
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    install_recommends: bool = False
    install_suggests: bool = False
    upgrade: bool = True
    purge: tuple[str, ...] = ()
    locales: tuple[str, ...] = ()
    timezone: str = ""
    root_password: str = ""
    keyboard: Keyboard | None = None
    files: tuple[SiteFile, ...] = ()
    vars: Mapping[str, Any] = field(default_factory=dict)
    tricks: Tricks = field(default_factory=Tricks)
    netboot: Netboot = field(default_factory=Netboot)
    compression: str = "zstd"
    #: post-installation scripts (absolute paths below the recipe's folder), in order
    postinst: tuple[Path, ...] = ()

    def digest(self) -> str:
        """sha256 over the recipe's values and the content of its site files (with
        ``postinst`` scripts: of every file of the recipe's folder, which they may read): two
        builds with the same digest were asked for the same thing."""
        d = asdict(self)
        d.pop("path")
        # what exports leave out changes no build: a new list must not miss the stage cache
        d["netboot"].pop("squashfs_exclude")
        if not self.postinst:
            d.pop("postinst")  # digests of recipes without scripts stay what they were
        else:
            d["postinst"] = [str(p.relative_to(self.path.parent)) for p in self.postinst]
        h = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode())
        for f in self.files:
            h.update(f.dest.encode())
            h.update(f.src.read_bytes())
        if self.postinst:
            base = self.path.parent
            for p in sorted(base.rglob("*")):
                if p.is_file() and not p.is_symlink():
                    h.update(f"{p.relative_to(base)} {p.stat().st_mode & 0o777:o}\n".encode())
                    h.update(p.read_bytes())
        return h.hexdigest()

    def to_json(self) -> dict[str, Any]:
        """The recipe's fields as a dict for JSON output: paths as strings, each site file's
        ``mode`` as octal text (``"0644"``), ``root_password`` shown as ``"***"`` when set."""
        d = asdict(self)
        d["path"] = str(self.path)
        d["files"] = [{**asdict(f), "src": str(f.src), "mode": f"{f.mode:04o}"} for f in self.files]
        d["postinst"] = [str(p) for p in self.postinst]
        d["root_password"] = "***" if self.root_password else ""
        return d


# -- the file's shape -------------------------------------------------------------------------

def _known_suites() -> tuple[str, ...]:
    scripts = Path("/usr/share/debootstrap/scripts")
    extra = tuple(sorted(p.name for p in scripts.iterdir())) if scripts.is_dir() else ()
    return DEBIAN_SUITES + tuple(s for s in extra if s not in DEBIAN_SUITES)


def _check(pattern: re.Pattern[str] | Callable[[str], bool], expected: str) -> AfterValidator:
    def f(v: str) -> str:
        ok = pattern.match(v) if isinstance(pattern, re.Pattern) else pattern(v)
        if not ok:
            raise ValueError(expected)
        return v
    return AfterValidator(f)


def _suite(v: str) -> str:
    if v not in _known_suites():
        raise ValueError("a Debian suite: " + ", ".join(DEBIAN_SUITES)
                         + " (or a codename debootstrap knows, in /usr/share/debootstrap/scripts)")
    return v


def _valid_tz(tz: str) -> bool:
    return bool(re.match(r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$", tz)) and ".." not in tz


def _mode(v: object) -> int:
    if isinstance(v, str) and re.fullmatch(r"0?[0-7]{3,4}", v):
        return int(v, 8)
    raise ValueError("an octal string such as \"0644\" (invalid mode)")


def _dest(v: str) -> str:
    if not v.startswith("/") or ".." in v.split("/"):
        raise ValueError("an absolute path inside the root, without '..' (invalid destination)")
    return v


_PKGS = "a Debian package name (lower-case letters, digits, '+', '.', '-')"
Pkg = Annotated[str, _check(PKG_RE, _PKGS)]
PkgPattern = Annotated[str, _check(PKG_PATTERN_RE, "a package name or fnmatch pattern such as "
                                                    "'matlab-*'")]
Locale = Annotated[str, _check(LOCALE_RE, "a locale name such as en_US.UTF-8 or fr_FR.UTF-8")]
Module = Annotated[str, _check(re.compile(r"^[a-z0-9_-]+$"), "a kernel module name")]


def _squash_pattern(v: str) -> bool:
    # the rule squashfs.build applies (imported here only: most recipes never set the key)
    from sidusctl.subsys.squashfs import valid_exclude
    return valid_exclude(v)


SquashPattern = Annotated[str, _check(
    _squash_pattern,
    "a path pattern relative to the root, such as 'var/lib/apt/lists/*' (no leading '/', "
    "no '..')")]


def _tup(item: Any) -> Any:
    return Annotated[tuple[item, ...], BeforeValidator(as_tuple)]


class _Keyboard(Frozen):
    layout: str = "us"
    model: str = "pc105"
    variant: str = ""
    options: str = ""


class _Tricks(Frozen):
    remove_hostname: bool = False
    resolv_conf: Tup = ()
    loopback_interfaces: bool = False
    limits: Tup = ()


class _Netboot(Frozen):
    enabled: bool = False
    modules: _tup(Module) = ()  # type: ignore[valid-type]
    nic: str = ""
    squashfs_exclude: _tup(SquashPattern) | None = None  # type: ignore[valid-type]


class _Export(Frozen):
    compression: Literal["zstd", "gzip"] = "zstd"


class _File(Frozen):
    src: str
    dest: Annotated[str, AfterValidator(_dest)]
    mode: Annotated[Any, AfterValidator(_mode)] = 0o644
    owner: str = "root"
    group: str = "root"
    template: bool = False

    @field_validator("src")
    @classmethod
    def _src_exists(cls, v: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("dir")
        if base is not None and not (Path(base) / v).resolve().is_file():
            raise ValueError(f"a file next to the recipe (no such file {Path(base) / v})")
        return v


def _script(v: str, info: ValidationInfo) -> str:
    base = (info.context or {}).get("dir")
    if base is None:
        return v
    p = (Path(base) / v).resolve()
    if Path(v).is_absolute() or ".." in Path(v).parts:
        raise ValueError("a path relative to the recipe's folder, without '..'")
    if not p.is_file():
        raise ValueError(f"an executable file next to the recipe (no such file {p})")
    if not os.access(p, os.X_OK):
        raise ValueError(f"an executable file next to the recipe ({p} is not executable: "
                         "chmod +x)")
    return v


Script = Annotated[str, AfterValidator(_script)]


class RecipeFile(Frozen):
    """The keys of an image.toml, as written (see the module doc)."""

    suite: Annotated[str, AfterValidator(_suite)]
    description: str = ""
    arch: Literal[DEBIAN_ARCHES] = "amd64"  # type: ignore[valid-type]
    components: _tup(Literal[COMPONENTS]) = ()  # type: ignore[valid-type]
    variant: Literal[VARIANTS] = "minbase"  # type: ignore[valid-type]
    mirror: Annotated[str, _check(re.compile(r"^((https?|file)://\S+)?$"),
                                  "an http://, https:// or file:// URL")] = ""
    include: _tup(Pkg) = ()  # type: ignore[valid-type]
    exclude: _tup(Pkg) = ()  # type: ignore[valid-type]
    packages: _tup(Pkg) = ()  # type: ignore[valid-type]
    install_recommends: bool = False
    install_suggests: bool = False
    upgrade: bool = True
    purge: _tup(PkgPattern) = ()  # type: ignore[valid-type]
    locales: _tup(Locale) = ()  # type: ignore[valid-type]
    timezone: Annotated[str, _check(lambda s: not s or _valid_tz(s),
                                    "a tz database name such as Europe/Paris")] = ""
    root_password: str = ""
    keyboard: _Keyboard | None = None
    files: Annotated[tuple[_File, ...], BeforeValidator(as_tuple)] = ()
    postinst: _tup(Script) = ()  # type: ignore[valid-type]
    vars: dict[str, Any] = Field(default_factory=dict)
    tricks: _Tricks = _Tricks()
    netboot: _Netboot = _Netboot()
    export: _Export = _Export()


def load(path: Path, name: str | None = None) -> Recipe:
    """Parse and validate ``path`` (an image.toml) -- before any download. The image is named
    ``name``, or else after the recipe's folder; that name must be a valid image name
    (:data:`~sidusctl.subsys.imagestore.NAME_RE`). Raises :class:`ConfigErrors` listing every
    problem (file, line, key, found, expected)."""
    file = str(path)
    text = read_text(path, "recipe file")
    raw = parse_toml(text, file)
    c = Checker(file, text)
    rf = c.validate(RecipeFile, raw, context={"dir": path.parent})
    inc, exc = raw.get("include"), raw.get("exclude")
    if isinstance(inc, list) and isinstance(exc, list):
        both = sorted({x for x in inc if isinstance(x, str)} & {x for x in exc if isinstance(x, str)})
        if both:
            c.error(("exclude",), f"{', '.join(both)} is both included and excluded",
                    "disjoint include and exclude lists")
    name = name or path.parent.name
    if not NAME_RE.match(name):
        c.error(None, f"the image name {name!r} (the recipe's folder name) is not a valid "
                "image name", "lower-case letters, digits, '.', '_' or '-', 1-63 characters; "
                "rename the folder")
    c.done()
    assert rf is not None
    kb = rf.keyboard
    return Recipe(
        name=name, path=path.resolve(), suite=rf.suite,
        description=rf.description, arch=rf.arch, components=rf.components or ("main",),
        variant=rf.variant, mirror=rf.mirror, include=rf.include, exclude=rf.exclude,
        packages=rf.packages, install_recommends=rf.install_recommends,
        install_suggests=rf.install_suggests, upgrade=rf.upgrade, purge=rf.purge,
        locales=rf.locales, timezone=rf.timezone, root_password=rf.root_password,
        keyboard=Keyboard(kb.layout, kb.model, kb.variant, kb.options) if kb else None,
        files=tuple(SiteFile((path.parent / f.src).resolve(), f.dest, f.mode, f.owner, f.group,
                             f.template) for f in rf.files),
        vars=dict(rf.vars),
        tricks=Tricks(rf.tricks.remove_hostname, rf.tricks.resolv_conf,
                      rf.tricks.loopback_interfaces, rf.tricks.limits),
        netboot=Netboot(rf.netboot.enabled, rf.netboot.modules or ("overlay",), rf.netboot.nic,
                        rf.netboot.squashfs_exclude),
        compression=rf.export.compression,
        postinst=tuple(path.resolve().parent / p for p in rf.postinst))


def _is_file(p: Path) -> bool:
    """``p.is_file()``, False where the path cannot even be looked up (a component longer than
    NAME_MAX: ENAMETOOLONG, or ELOOP...), as for a path that does not exist."""
    try:
        return p.is_file()
    except OSError:
        return False


def find(name_or_path: str) -> Recipe:
    """``minimal`` → images/minimal/image.toml (search path: $SIDUSCTL_IMAGES, then the shipped
    images/); a path to a folder or to an image.toml is used as is."""
    p = Path(name_or_path)
    if p.suffix == ".toml" and _is_file(p):
        return load(p)
    if _is_file(p / "image.toml"):
        return load(p / "image.toml")
    if "/" not in name_or_path:
        for base in image_search_path():
            cand = base / name_or_path / "image.toml"
            if _is_file(cand):
                return load(cand)
    known = sorted({d.name for base in image_search_path() if base.is_dir()
                    for d in base.iterdir() if (d / "image.toml").is_file()})
    raise NotFoundError(f"no image recipe {name_or_path!r} (looked in "
                        + ", ".join(os.fspath(b) for b in image_search_path())
                        + f"; recipes there: {', '.join(known) or 'none'})")
