"""NFS export text for an image's root: the ``/etc/exports`` line for nfs-kernel-server
(exports(5)) and an nfs-ganesha configuration (ganesha-export-config(8)).

The kernel server gets the SIDUS seed's options, read-only by network:
``/srv/nfsroot/sidus 10.13.20.0/24(ro,no_subtree_check,async,no_root_squash)``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path

from sidusctl.core.errors import ConfigError
from sidusctl.subsys.ganesha import Export, GaneshaConfig, render_config
from sidusctl.subsys.templates import render

SEED_OPTIONS = "ro,no_subtree_check,async,no_root_squash"


def check_clients(clients: Sequence[str], where: str = "--network") -> list[str]:
    """Validate client specs: IPv4 networks (``10.13.20.0/24``), addresses or ``*``.
    Returns them normalised; :class:`ConfigError` names the bad one."""
    out = []
    for c in clients:
        if c == "*":
            out.append(c)
            continue
        try:
            out.append(str(ipaddress.IPv4Network(c, strict=False)) if "/" in c
                       else str(ipaddress.IPv4Address(c)))
        except ValueError as e:
            raise ConfigError(where, None, f"invalid client {c!r}: {e}",
                              expected="an IPv4 network such as 10.13.20.0/24, an address or *") from e
    return out


def exports_line(path: Path | str, clients: Sequence[str], options: str = SEED_OPTIONS) -> str:
    """The exports(5) entry exporting ``path`` to ``clients`` (template exports/exports.j2)."""
    return render("exports/exports.j2",
                  exports=[{"path": str(path), "clients": check_clients(clients),
                            "options": options}])


def ganesha_config(path: Path | str, clients: Sequence[str], *, export_id: int = 1,
                   pseudo: str | None = None, bind_addr: str | None = None,
                   nfs_port: int = 2049, mnt_port: int = 20048) -> str:
    """A complete ganesha.conf exporting ``path`` read-only to ``clients`` (VFS FSAL)."""
    exp = Export(Path(path), export_id=export_id, pseudo=pseudo or str(path), access="RO",
                 clients=tuple(check_clients(clients)))
    return render_config(GaneshaConfig((exp,), bind_addr=bind_addr, nfs_port=nfs_port,
                                       mnt_port=mnt_port))
