"""Where things are: the state directory and the data folders shipped with sidusctl.

- State (built images, caches, leases, vnode state): ``--state-dir``, else ``$SIDUSCTL_STATE``,
  else ``/var/lib/sidusctl`` (:func:`state_dir`; an empty ``--state-dir`` or one that names
  a file is refused).
- Data (``templates/``, ``initramfs/``, ``images/``): the top level of a source checkout, or
  ``sidusctl/_data/`` inside an installed wheel (copied there at build time by setup.py; see
  docs/install.md). This module is the one place that knows.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sidusctl.core.errors import ConfigError

DEFAULT_STATE_DIR = Path("/var/lib/sidusctl")

_PKG = Path(__file__).resolve().parent.parent


def state_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The state directory, absolute (not created here): ``override`` (``--state-dir``) unless
    None, else ``$SIDUSCTL_STATE`` if set and not empty, else :data:`DEFAULT_STATE_DIR`.
    :class:`ConfigError` naming the option or variable for an empty ``override`` or for a
    path that exists and is not a directory (a regular file: the commands would otherwise
    report an empty store in it)."""
    if override is not None:
        where, raw = "--state-dir", os.fspath(override)
        if not raw:
            raise ConfigError(where, None, "empty path", expected="a directory")
    else:
        where, raw = "$SIDUSCTL_STATE", os.environ.get("SIDUSCTL_STATE") or ""
        if not raw:
            return DEFAULT_STATE_DIR
    path = Path(raw).absolute()
    try:
        st = path.stat()
    except OSError:  # missing (made later), or behind a directory this user may not search:
        # the command itself then says what it needs (root...)
        return path
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(where, None, f"{path} exists and is not a directory",
                          expected="a directory (or a path where one can be made)")
    return path


def _in_checkout() -> bool:
    """True when the package runs from a source checkout (or an editable install of one): the
    folder above it holds the project's pyproject.toml. An installed package's parent is
    ``site-packages``, whose ``templates/`` (if another distribution put one there) is not ours.
    """
    return (_PKG.parent / "pyproject.toml").is_file()


def data_dir(name: str) -> Path:
    """The shipped data folder ``name`` (``templates``, ``initramfs`` or ``images``): the
    checkout's top-level folder, else ``sidusctl/_data/<name>`` of the installed package.
    Returns the path even if it does not exist (callers report a missing file by its path)."""
    bases = (_PKG.parent, _PKG / "_data") if _in_checkout() else (_PKG / "_data",)
    for base in bases:
        p = base / name
        if p.is_dir():
            return p
    return bases[0] / name


def templates_dir() -> Path:
    """The shipped Jinja2 templates (:func:`data_dir`)."""
    return data_dir("templates")


def initramfs_dir() -> Path:
    """The shipped initramfs-tools hooks and scripts (:func:`data_dir`)."""
    return data_dir("initramfs")


def images_dir() -> Path:
    """Where ``sidusctl build NAME`` looks for ``NAME/image.toml`` when NAME is not a path.
    ``$SIDUSCTL_IMAGES`` overrides (a colon-separated search path, first match wins)."""
    return data_dir("images")


def image_search_path() -> list[Path]:
    """Where image recipes are looked up, first match wins: each directory of
    ``$SIDUSCTL_IMAGES`` (colon-separated, empty entries skipped), then :func:`images_dir`."""
    env = os.environ.get("SIDUSCTL_IMAGES")
    extra = [Path(p) for p in env.split(":") if p] if env else []
    return [*extra, images_dir()]


def proc_link_within(link: str, directory: str) -> bool:
    """Whether ``link``, a path the kernel gave for a ``/proc`` link (``readlink`` of
    ``/proc/PID/root``, ``cwd``, ``exe`` or ``/proc/self/fd/N``, proc(5)), is ``directory``
    (an absolute real path, with or without its trailing ``/``) or lies below it. The
    `` (deleted)`` the kernel appends to the path of an unlinked file is ignored: a file
    replaced since it was opened is still where it was."""
    link = link.removesuffix(" (deleted)")
    base = directory.rstrip("/")
    return link == base or link.startswith(base + "/") or base == ""
