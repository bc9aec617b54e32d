"""Docker/OCI image import: sources (``docker save`` archives, OCI layouts, flat ``docker
export`` tarballs, registries), layer application into a rootfs, and the image config turned
into a systemd unit / init script / LXC config snippet. No container engine involved.

Modules: :mod:`.layers` (applying layer tars safely), :mod:`.sources` (finding manifest, config
and layer blobs in each kind of source), :mod:`.registry` (the OCI distribution API client),
:mod:`.config` (image config -> runtime files), :mod:`.importer` (the service the CLI calls).
"""

from __future__ import annotations

from sidusctl.core.errors import SidusError


class ImageError(SidusError):
    """The image is unusable: malformed metadata, a missing blob, a digest mismatch, a
    truncated layer, or an entry that would write or resolve outside the rootfs (unsafe)."""

    exit_code = 2


class UnsafeImageError(ImageError):
    """A layer entry would escape the target root (``..``, absolute name, symlinked parent,
    hard link out of the root, whiteout of ``..``). The image is refused as a whole."""
