"""The node inventory as configuration files for the production daemons: dnsmasq, ISC
dhcpd, Kea (kea-dhcp4), tftpd-hpa and the kernel NFS server's ``/etc/exports``.

Pure text generation from a validated :class:`~sidusctl.netboot.inventory.Inventory`, one jinja2
template per format under ``templates/{dnsmasq,isc-dhcp,kea,tftpd-hpa}/`` (the exports line
comes from :mod:`sidusctl.netboot.nfs`). Every DHCP format carries the same policy as the
built-in server: one static reservation per node (MAC, address, host name), next-server the
inventory's server, and the boot file by client (RFC 4578 option 93: BIOS ``pxelinux.0``,
x86-64 UEFI 7/9 the GRUB binary, or shim for Secure Boot; iPXE, option 77 user class
``iPXE``, its script) and, with ``http_boot_url``, the UEFI HTTP Boot answer (option 60
``HTTPClient`` and the URL: :mod:`sidusctl.netboot.secureboot`).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidusctl.core.errors import ConfigError
from sidusctl.netboot import nfs as nfs_exports
from sidusctl.netboot.inventory import Inventory
from sidusctl.subsys.templates import render

FORMATS = ("dnsmasq", "isc-dhcp", "kea", "tftpd-hpa", "exports")
_TEMPLATES = {"dnsmasq": "dnsmasq/dnsmasq.conf.j2", "isc-dhcp": "isc-dhcp/dhcpd.conf.j2",
              "kea": "kea/kea-dhcp4.conf.j2", "tftpd-hpa": "tftpd-hpa/tftpd-hpa.j2"}
# Characters that would end a quoted string or a line in any of the daemons' syntaxes.
_UNSAFE = set('"\'\\\n\r,;{}#') | {" "}


@dataclass(frozen=True)
class ExportOptions:
    """What the inventory does not say. ``tftp_root``: directory the TFTP daemon serves;
    ``interface``: the one to serve (dnsmasq ``interface=``, Kea ``interfaces``; None: dnsmasq
    line left out, Kea ``*``); ``lease_time`` in seconds; boot files by client type;
    ``proxy``: dnsmasq as proxyDHCP next to the site's server (dnsmasq format only);
    ``http_boot_url``: the ``http://`` URL UEFI HTTP Boot clients (option 60 ``HTTPClient``)
    get with option 60 ``HTTPClient`` (None: they get no answer of their own)."""

    tftp_root: str = "/srv/tftp"
    interface: str | None = None
    lease_time: int = 3600
    boot_bios: str = "pxelinux.0"
    boot_efi64: str = "grubnetx64.efi"
    ipxe_script: str = "boot.ipxe"
    proxy: bool = False
    http_boot_url: str | None = None


def _check(opts: ExportOptions) -> None:
    for key, value in (("--tftp-root", opts.tftp_root), ("--boot-bios", opts.boot_bios),
                       ("--boot-efi64", opts.boot_efi64), ("--ipxe-script", opts.ipxe_script),
                       ("--interface", opts.interface or "x"),
                       ("--http-base", opts.http_boot_url or "x")):
        if not value or _UNSAFE & set(value):
            raise ConfigError(key, None, f"{value!r} cannot be written into a daemon's config",
                              expected="no spaces, quotes, commas, semicolons, braces or '#'")
    if not opts.tftp_root.startswith("/"):
        raise ConfigError("--tftp-root", None, f"{opts.tftp_root!r} is not absolute",
                          expected="an absolute path such as /srv/tftp")
    if opts.http_boot_url is not None:
        try:  # urlsplit's port raises ValueError for a port not a number in 0-65535
            url = urllib.parse.urlsplit(opts.http_boot_url)
            bad = not url.hostname or url.port == 0
        except ValueError:
            bad = True
        if bad or not opts.http_boot_url.startswith("http://"):
            raise ConfigError("--http-base", None, f"{opts.http_boot_url!r} is not an http:// "
                              "URL with a host and a port in 1-65535",
                              expected="http://SERVER[:PORT]")
    if not 60 <= opts.lease_time <= 2**31 - 1:
        raise ConfigError("--lease-time", None, f"{opts.lease_time} s",
                          expected="60 s or more")


def _context(inv: Inventory, opts: ExportOptions) -> dict[str, Any]:
    net = inv.network
    return {
        "source": Path(inv.file).name,
        "subnet": net.subnet,
        "server": str(net.server),
        "domain": net.domain,
        "nodes": [{"name": n.hostname or n.name, "mac": n.mac, "ip": str(n.ip)}
                  for n in inv.nodes],
        "tftp_root": opts.tftp_root,
        "interface": opts.interface,
        "interfaces": json.dumps(opts.interface or "*"),
        "lease_time": opts.lease_time,
        "boot_bios": opts.boot_bios,
        "boot_efi64": opts.boot_efi64,
        # dnsmasq's pxe-service adds the ".0" of a BIOS boot file itself (dnsmasq(8))
        "boot_bios_base": opts.boot_bios.removesuffix(".0"),
        "boot_efi64_base": opts.boot_efi64,
        "ipxe_script": opts.ipxe_script,
        "proxy": opts.proxy,
        "http_boot_url": opts.http_boot_url,
    }


def render_export(inv: Inventory, fmt: str, opts: ExportOptions = ExportOptions(),
                  nfs_paths: Mapping[str, str] | None = None) -> str:
    """The configuration text of format ``fmt`` (one of :data:`FORMATS`) for ``inv``.

    ``nfs_paths``: image name → exported server path, needed by ``exports`` (one line per image
    the inventory uses, read-only to the inventory's subnet with the SIDUS seed's options).
    Raises :class:`ConfigError` for an unknown format or an option value the daemon's syntax
    cannot carry."""
    if fmt not in FORMATS:
        raise ConfigError("--format", None, f"unknown format {fmt!r}",
                          expected=" | ".join(FORMATS))
    _check(opts)
    if opts.proxy and fmt != "dnsmasq":
        raise ConfigError("--proxy", None, f"proxyDHCP export is not offered for {fmt}",
                          expected="--format dnsmasq with --proxy")
    if fmt == "exports":
        paths = nfs_paths or {}
        missing = [i for i in inv.images() if i not in paths]
        if missing:
            raise ConfigError(inv.file, "network.nfs_root",
                              f"no exported path known for image(s) {', '.join(missing)}",
                              expected="nfs_root = \"/srv/nfsroot/{image}\" in [network], or "
                                       "the images built on this host")
        lines = [f"# /etc/exports written by sidusctl from {Path(inv.file).name}: exports(5), "
                 "read-only roots with the SIDUS seed's options"]
        for image in inv.images():
            text = nfs_exports.exports_line(paths[image], [str(inv.network.subnet)])
            lines += [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        return "\n".join(lines) + "\n"
    return render(_TEMPLATES[fmt], **_context(inv, opts))
