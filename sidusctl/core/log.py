"""Logging setup: one ``sidusctl`` logger tree; the CLI chooses the level and the handler."""

from __future__ import annotations

import logging


def get_logger(name: str) -> logging.Logger:
    """The logger ``sidusctl.<name>``."""
    return logging.getLogger(f"sidusctl.{name}")


def setup(debug: bool = False, quiet: bool = False) -> None:
    """Log to stderr: debug with ``--debug``, warnings only with ``quiet``, else info."""
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    root = logging.getLogger("sidusctl")
    root.setLevel(level)
    if not root.handlers:
        sh = logging.StreamHandler()
        sh.setFormatter(logging.Formatter("sidusctl: %(levelname)s: %(message)s"))
        root.addHandler(sh)
    for h in root.handlers:
        h.setLevel(level)
