"""OCI distribution API client (registry pulls): work in progress."""

from __future__ import annotations

from pathlib import Path

from sidusctl.oci import ImageError
from sidusctl.oci.sources import ResolvedImage


def resolve(ref: str, *, platform: str | None, insecure: bool, creds: str | None,
            authfile: Path | None) -> ResolvedImage:
    raise ImageError(f"{ref}: registry pulls are not implemented yet")
