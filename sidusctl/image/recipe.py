"""Image recipes: ``images/<name>/image.toml``, parsed and validated once into a frozen model.

Every problem names the file, the key and what was expected, and is found before anything is
downloaded. The keys (all optional except ``suite``)::

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
    [vars]      variables for template site files
    [tricks]    remove_hostname, resolv_conf = [lines], loopback_interfaces, limits = [lines]
    [netboot]   enabled, modules = ["overlay"], nic
    [export]    compression = "zstd" | "gzip"
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sidusctl.core.errors import ConfigError, NotFoundError
from sidusctl.core.paths import image_search_path

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
    enabled: bool = False
    modules: tuple[str, ...] = ("overlay",)
    nic: str = ""


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

    def digest(self) -> str:
        """sha256 over the recipe's values and the content of its site files: two builds with
        the same digest were asked for the same thing."""
        d = asdict(self)
        d.pop("path")
        h = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode())
        for f in self.files:
            h.update(f.dest.encode())
            h.update(f.src.read_bytes())
        return h.hexdigest()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["files"] = [{**asdict(f), "src": str(f.src), "mode": f"{f.mode:04o}"} for f in self.files]
        d["root_password"] = "***" if self.root_password else ""
        return d


# -- the validator ----------------------------------------------------------------------------

class _V:
    """Reads one table of a recipe, naming ``file`` and the dotted key in every error."""

    def __init__(self, file: str, table: Mapping[str, Any], prefix: str = "") -> None:
        self.file = file
        self.table = table
        self.prefix = prefix
        self.used: set[str] = set()

    def _key(self, k: str) -> str:
        return f"{self.prefix}{k}"

    def err(self, k: str, problem: str, expected: str | None = None) -> ConfigError:
        return ConfigError(self.file, self._key(k), problem, expected=expected)

    def get(self, k: str, typ: type, default: Any, expected: str) -> Any:
        self.used.add(k)
        if k not in self.table:
            return default
        v = self.table[k]
        if typ is bool and not isinstance(v, bool):
            raise self.err(k, f"wrong type {type(v).__name__} ({v!r})", expected)
        if typ is not bool and (not isinstance(v, typ) or isinstance(v, bool)):
            raise self.err(k, f"wrong type {type(v).__name__} ({v!r})", expected)
        return v

    def str_(self, k: str, default: str = "", choices: tuple[str, ...] | None = None,
             check: Callable[[str], bool] | None = None, expected: str = "a string") -> str:
        v: str = self.get(k, str, default, expected)
        if choices is not None and k in self.table and v not in choices:
            raise self.err(k, f"unknown value {v!r}", "one of " + ", ".join(choices))
        if check is not None and k in self.table and not check(v):
            raise self.err(k, f"invalid value {v!r}", expected)
        return v

    def list_(self, k: str, check: Callable[[str], bool] | None = None,
              expected: str = "a list of strings", choices: tuple[str, ...] | None = None
              ) -> tuple[str, ...]:
        v = self.get(k, list, [], expected)
        for i, item in enumerate(v):
            if not isinstance(item, str):
                raise self.err(f"{k}[{i}]", f"wrong type {type(item).__name__} ({item!r})",
                               "a string")
            if choices is not None and item not in choices:
                raise self.err(f"{k}[{i}]", f"unknown value {item!r}",
                               "one of " + ", ".join(choices))
            if check is not None and not check(item):
                raise self.err(f"{k}[{i}]", f"invalid value {item!r}", expected)
        return tuple(v)

    def bool_(self, k: str, default: bool = False) -> bool:
        v: bool = self.get(k, bool, default, "true or false")
        return v

    def table_(self, k: str) -> Mapping[str, Any] | None:
        v: Mapping[str, Any] | None = self.get(k, dict, None, "a table")
        return v

    def finish(self, allowed_hint: tuple[str, ...] | None = None) -> None:
        unknown = [k for k in self.table if k not in self.used]
        if unknown:
            allowed = sorted(allowed_hint or self.used)
            raise ConfigError(self.file, self._key(unknown[0]), "unknown key",
                              expected="one of " + ", ".join(allowed))


def _known_suites() -> tuple[str, ...]:
    scripts = Path("/usr/share/debootstrap/scripts")
    extra = tuple(sorted(p.name for p in scripts.iterdir())) if scripts.is_dir() else ()
    return DEBIAN_SUITES + tuple(s for s in extra if s not in DEBIAN_SUITES)


def _valid_tz(tz: str) -> bool:
    return bool(re.match(r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$", tz)) and ".." not in tz


def _mode(v: Any, vv: _V, k: str) -> int:
    if isinstance(v, str) and re.fullmatch(r"0?[0-7]{3,4}", v):
        return int(v, 8)
    raise vv.err(k, f"invalid mode {v!r}", "an octal string such as \"0644\"")


def load(path: Path, name: str | None = None) -> Recipe:
    """Parse and validate ``path`` (an image.toml). Raises :class:`ConfigError` for the first
    problem found (file, key, expectation) — before any download."""
    file = str(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(file, None, "no such recipe file") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, None, f"not valid TOML: {e}") from e
    v = _V(file, raw)
    name = name or path.parent.name
    suites = _known_suites()
    suite = v.str_("suite", "", expected="a Debian suite such as bookworm, trixie or sid")
    if "suite" not in raw:
        raise v.err("suite", "missing", "a Debian suite such as bookworm, trixie or sid")
    if suite not in suites:
        raise v.err("suite", f"unknown suite {suite!r}",
                    "a Debian suite: " + ", ".join(DEBIAN_SUITES)
                    + " (or a codename debootstrap knows, in /usr/share/debootstrap/scripts)")
    pkg_ok = PKG_RE.match
    r: dict[str, Any] = {
        "description": v.str_("description"),
        "suite": suite,
        "arch": v.str_("arch", "amd64", choices=DEBIAN_ARCHES),
        "components": v.list_("components", choices=COMPONENTS) or ("main",),
        "variant": v.str_("variant", "minbase", choices=VARIANTS),
        "mirror": v.str_("mirror", "", check=lambda s: bool(re.match(r"^(https?|file)://\S+$", s)),
                         expected="an http://, https:// or file:// URL"),
        "include": v.list_("include", lambda s: bool(pkg_ok(s)), "a list of Debian package names"),
        "exclude": v.list_("exclude", lambda s: bool(pkg_ok(s)), "a list of Debian package names"),
        "packages": v.list_("packages", lambda s: bool(pkg_ok(s)),
                            "a list of Debian package names"),
        "install_recommends": v.bool_("install_recommends"),
        "install_suggests": v.bool_("install_suggests"),
        "upgrade": v.bool_("upgrade", True),
        "purge": v.list_("purge", lambda s: bool(PKG_PATTERN_RE.match(s)),
                         "a list of package names or fnmatch patterns such as 'matlab-*'"),
        "locales": v.list_("locales", lambda s: bool(LOCALE_RE.match(s)),
                           "locale names such as en_US.UTF-8 or fr_FR.UTF-8"),
        "timezone": v.str_("timezone", "", check=_valid_tz,
                           expected="a tz database name such as Europe/Paris"),
        "root_password": v.str_("root_password"),
        "compression": "zstd",
    }
    kb = v.table_("keyboard")
    if kb is not None:
        kv = _V(file, kb, "keyboard.")
        r["keyboard"] = Keyboard(kv.str_("layout", "us"), kv.str_("model", "pc105"),
                                 kv.str_("variant"), kv.str_("options"))
        kv.finish(("layout", "model", "variant", "options"))
    files = v.get("files", list, [], "an array of tables [[files]]")
    sitefiles = []
    for i, f in enumerate(files):
        if not isinstance(f, dict):
            raise v.err(f"files[{i}]", "not a table", "[[files]] tables with src and dest")
        fv = _V(file, f, f"files[{i}].")
        src = fv.str_("src")
        dest = fv.str_("dest")
        if not src:
            raise fv.err("src", "missing", "a path relative to the recipe's folder")
        if not dest or not dest.startswith("/") or ".." in dest.split("/"):
            raise fv.err("dest", f"invalid destination {dest!r}",
                         "an absolute path inside the root, without '..'")
        srcp = (path.parent / src).resolve()
        if not srcp.is_file():
            raise fv.err("src", f"no such file {srcp}", "a file next to the recipe")
        fv.used.add("mode")
        mode = _mode(f["mode"], fv, "mode") if "mode" in f else 0o644
        sitefiles.append(SiteFile(srcp, dest, mode, fv.str_("owner", "root"),
                                  fv.str_("group", "root"), fv.bool_("template")))
        fv.finish(("src", "dest", "mode", "owner", "group", "template"))
    r["files"] = tuple(sitefiles)
    r["vars"] = dict(v.table_("vars") or {})
    tr = v.table_("tricks")
    if tr is not None:
        tv = _V(file, tr, "tricks.")
        r["tricks"] = Tricks(tv.bool_("remove_hostname"), tv.list_("resolv_conf"),
                             tv.bool_("loopback_interfaces"), tv.list_("limits"))
        tv.finish()
    nb = v.table_("netboot")
    if nb is not None:
        nv = _V(file, nb, "netboot.")
        r["netboot"] = Netboot(nv.bool_("enabled"),
                               nv.list_("modules", lambda s: bool(re.match(r"^[a-z0-9_-]+$", s)),
                                        "kernel module names") or ("overlay",),
                               nv.str_("nic"))
        nv.finish()
    ex = v.table_("export")
    if ex is not None:
        ev = _V(file, ex, "export.")
        r["compression"] = ev.str_("compression", "zstd", choices=("zstd", "gzip"))
        ev.finish()
    v.finish()
    if set(r["include"]) & set(r["exclude"]):
        both = sorted(set(r["include"]) & set(r["exclude"]))
        raise ConfigError(file, "exclude", f"{', '.join(both)} is both included and excluded",
                          expected="disjoint include and exclude lists")
    return Recipe(name=name, path=path.resolve(), **r)


def find(name_or_path: str) -> Recipe:
    """``minimal`` → images/minimal/image.toml (search path: $SIDUSCTL_IMAGES, then the shipped
    images/); a path to a folder or to an image.toml is used as is."""
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.is_file():
        return load(p)
    if p.is_dir() and (p / "image.toml").is_file():
        return load(p / "image.toml")
    if "/" not in name_or_path:
        for base in image_search_path():
            cand = base / name_or_path / "image.toml"
            if cand.is_file():
                return load(cand)
    known = sorted({d.name for base in image_search_path() if base.is_dir()
                    for d in base.iterdir() if (d / "image.toml").is_file()})
    raise NotFoundError(f"no image recipe {name_or_path!r} (looked in "
                        + ", ".join(os.fspath(b) for b in image_search_path())
                        + f"; recipes there: {', '.join(known) or 'none'})")
