"""Where things are: the state directory and the data folders shipped with sidusctl.

- State (built images, caches, leases, vnode state): ``--state-dir``, else ``$SIDUSCTL_STATE``,
  else ``/var/lib/sidusctl``.
- Data (``templates/``, ``initramfs/``, ``images/``): the top level of a source checkout, or
  ``sidusctl/_data/`` inside an installed wheel. This module is the one place that knows.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/sidusctl")

_PKG = Path(__file__).resolve().parent.parent


def state_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The state directory (not created here)."""
    if override:
        return Path(override).absolute()
    env = os.environ.get("SIDUSCTL_STATE")
    return Path(env).absolute() if env else DEFAULT_STATE_DIR


def data_dir(name: str) -> Path:
    """The shipped data folder ``name`` (``templates``, ``initramfs`` or ``images``)."""
    for base in (_PKG.parent, _PKG / "_data"):
        p = base / name
        if p.is_dir():
            return p
    return _PKG.parent / name


def templates_dir() -> Path:
    return data_dir("templates")


def initramfs_dir() -> Path:
    return data_dir("initramfs")


def images_dir() -> Path:
    """Where ``sidusctl build NAME`` looks for ``NAME/image.toml`` when NAME is not a path.
    ``$SIDUSCTL_IMAGES`` overrides (a colon-separated search path, first match wins)."""
    return data_dir("images")


def image_search_path() -> list[Path]:
    env = os.environ.get("SIDUSCTL_IMAGES")
    extra = [Path(p) for p in env.split(":") if p] if env else []
    return [*extra, images_dir()]
