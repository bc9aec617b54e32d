"""Sizes as people write them on a command line: ``20G``, ``512M``, ``1.5GiB``, ``4096``."""

from __future__ import annotations

import math
import re

from sidusctl.core.errors import ConfigError

#: a number, then an optional binary unit (K, M, G, T: powers of 1024) and ``B`` or ``iB``
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][0-9]+)?)\s*([KMGT]?)(?:I?B)?\s*",
                      re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
#: sizes are file offsets and lengths: below 2**63 (a signed 64-bit off_t)
LIMIT = 2**63


def parse_size(text: str, where: str, *, minimum: int = 1) -> int:
    """``text`` in bytes, an int in ``[minimum, 2**63)``: a number (``4096``, ``1.5``) with an
    optional binary unit (``K``, ``M``, ``G``, ``T``, any case, each 1024 times the one
    before) and an optional ``B`` or ``iB`` (``512M``, ``512MiB``, ``512mb`` are the same).
    A fraction of a byte is rounded down.

    Raises :class:`ConfigError` naming ``where`` (the option or file the size came from) for
    anything else: no number, a sign, another unit, infinity or NaN, below ``minimum``, or
    at least 2**63."""
    m = _SIZE_RE.fullmatch(text)
    # (float() of a number too large is inf, refused below with the rest)
    x = float(m[1]) * _UNITS[m[2].upper()] if m else math.nan
    if not (math.isfinite(x) and minimum <= x < LIMIT):
        least = "0" if minimum <= 0 else f"{minimum} byte{'s' * (minimum != 1)}"
        raise ConfigError(where, None, f"invalid size {text!r}",
                          expected=f"a size from {least} up to below 8 EiB, such as 20G or "
                                   "512M (binary units: K, M, G, T)")
    return int(x)
