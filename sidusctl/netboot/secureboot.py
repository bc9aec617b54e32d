"""Secure Boot for netbooted UEFI machines: Debian's signed boot chain in the TFTP/HTTP tree,
and UEFI HTTP Boot answers.

Owns where the signed chain comes from and how it is laid out (``--efi-loader shim``)::

    shimx64.efi                  shim, signed by Microsoft's UEFI CA (package shim-signed):
                                 the boot file of x86-64 UEFI clients
    mmx64.efi                    MokManager (shim-helpers-amd64-signed): shim starts it when
                                 a verification fails and keys must be enrolled by hand
    grubx64.efi                  Debian's signed netboot GRUB (grub-efi-amd64-signed,
                                 grubnetx64.efi.signed): shim loads ``grubx64.efi`` from the
                                 directory it was itself loaded from (shim README, "netboot")
    grub/x86_64-efi/grub.cfg     what that GRUB reads: its prefix ``/grub`` is built into the
    grub/grub.cfg                signed image, whose embedded config sources
                                 ``$prefix/x86_64-efi/grub.cfg`` if ``test -e`` finds it, else
                                 ``$prefix/grub.cfg`` (the one read over TFTP); the image
                                 cannot be rebuilt, so this file sends each machine to its
                                 own ``grub/grub.cfg-01-<mac>`` by ``$net_default_mac`` (the
                                 grub-mkimage GRUB finds its per-MAC file first and never
                                 reads it)

The kernel and initrd are the image's own: Debian's ``linux-image-amd64`` kernels are signed
by Debian, which shim trusts through its built-in Debian CA; GRUB checks them through shim's
protocol before it starts them. Under Secure Boot the kernel turns on lockdown
(``integrity``): only signed modules load (Debian's are), which the sidus initramfs needs
(overlay, loop, squashfs, iscsi_tcp are all Debian's own modules).

UEFI HTTP Boot (UEFI specification 2.10, section 24.7 "HTTP Boot"): a client whose DHCP
vendor class (RFC 2132 option 60) starts with ``HTTPClient`` gets option 60 ``HTTPClient``
back and an ``http://`` URL as its boot file; its architecture (RFC 4578 option 93, IANA
"Processor Architecture Types") is 16 for x64 UEFI HTTP. :func:`http_boot_file` gives that
URL for the chosen loader.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath

from sidusctl.core.errors import ConfigError, PrerequisiteError
from sidusctl.netboot.inventory import Inventory
from sidusctl.subsys.templates import render

#: names under the TFTP root
SHIM_NAME = "shimx64.efi"
MOKMANAGER_NAME = "mmx64.efi"
SIGNED_GRUB_NAME = "grubx64.efi"
#: where the signed GRUB reads its configuration: ``$prefix/x86_64-efi/grub.cfg`` if GRUB's
#: ``test -e`` finds it, else ``$prefix/grub.cfg``. Over TFTP ``test -e`` never finds a file
#: (GRUB's tftp has no directory listing; seen on this machine: only ``/grub/grub.cfg`` is
#: asked for), so both are written with the same text.
SIGNED_GRUB_CONFIGS = ("grub/x86_64-efi/grub.cfg", "grub/grub.cfg")


@dataclass(frozen=True)
class ChainFile:
    """One file of the signed chain: ``name`` in the tree, ``source`` on this host, the Debian
    ``package`` that ships it."""

    name: str
    source: Path
    package: str


#: the signed chain as Debian 12 ships it (shim-signed 1.4x, grub-efi-amd64-signed 2.06)
CHAIN: tuple[ChainFile, ...] = (
    ChainFile(SHIM_NAME, Path("/usr/lib/shim/shimx64.efi.signed"), "shim-signed"),
    ChainFile(MOKMANAGER_NAME, Path("/usr/lib/shim/mmx64.efi.signed"),
              "shim-helpers-amd64-signed"),
    ChainFile(SIGNED_GRUB_NAME, Path("/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"),
              "grub-efi-amd64-signed"),
)

#: bytes of a signed GRUB that configures its network from the firmware's IPv4 configuration
#: and boot device path (Debian's GRUB 2.12 patches, ``grub-core/net/efi``): what it needs to
#: find its configuration after a UEFI HTTP Boot. Debian 12's 2.06 lacks them.
HTTP_BOOT_MARK = b"efi_net_ip4_config"


def chain(signed_grub: Path | None = None) -> tuple[ChainFile, ...]:
    """:data:`CHAIN`, with ``signed_grub`` (a Debian-signed ``grubnetx64.efi.signed`` from
    elsewhere, such as Debian 13's: ``scripts/fetch-signed-grub``) as ``grubx64.efi``."""
    if signed_grub is None:
        return CHAIN
    return tuple(ChainFile(f.name, signed_grub, "grub-efi-amd64-signed (--signed-grub)")
                 if f.name == SIGNED_GRUB_NAME else f for f in CHAIN)


def check_signed_grub(grub: Path, what: str = "--signed-grub") -> Path:
    """``grub`` if it is a readable PE/COFF binary (an EFI application starts with the DOS
    stub's ``MZ``); :class:`ConfigError` naming ``what`` and the path otherwise (an empty or
    wrong file would be served as ``grubx64.efi`` and fail only at the node's boot)."""
    try:
        with open(grub, "rb") as f:
            head = f.read(2)
    except OSError as e:
        raise ConfigError(what, None, f"cannot read {grub}: {e.strerror}") from None
    if head != b"MZ":
        raise ConfigError(what, None, f"{grub} is not an EFI binary (no PE/COFF 'MZ' header)",
                          expected="a signed GRUB such as grubnetx64.efi.signed")
    return grub


def grub_boots_over_http(grub: Path) -> bool:
    """Whether the signed GRUB ``grub`` finds its configuration after a UEFI HTTP Boot (it
    carries :data:`HTTP_BOOT_MARK`). Raises OSError if it cannot be read."""
    with open(grub, "rb") as f:
        return HTTP_BOOT_MARK in f.read()


#: what x86-64 UEFI clients are given, by ``--efi-loader``
EFI_LOADER_FILES = {"grub": "grubnetx64.efi", "ipxe": "ipxe.efi", "shim": SHIM_NAME}
#: the vendor class (option 60) of UEFI HTTP Boot clients, and what the server sends back
HTTP_CLIENT = "HTTPClient"


def missing_packages(chain: tuple[ChainFile, ...] = CHAIN) -> list[str]:
    """The Debian packages whose chain file is not on this host (empty: all there)."""
    return sorted({f.package for f in chain if not f.source.is_file()})


def chain_files(*, required: bool, chain: tuple[ChainFile, ...] = CHAIN) -> dict[str, Path]:
    """The signed chain as ``{name under the TFTP root: source path}``. A missing file: with
    ``required``, :class:`PrerequisiteError` naming the package(s) to install; without, ``{}``
    (the tree is then written without it, as for a host without ipxe)."""
    missing = missing_packages(chain)
    if missing:
        if required:
            files = ", ".join(str(f.source) for f in chain if not f.source.is_file())
            raise PrerequisiteError(
                f"--efi-loader shim: the signed boot chain is incomplete ({files} missing; "
                f"Debian package(s) {', '.join(missing)})",
                hint=f"apt-get install {' '.join(missing)}")
        return {}
    return {f.name: f.source for f in chain}


def signed_grub_config(inv: Inventory) -> str:
    """The text of the signed GRUB's ``grub.cfg``: one test of ``$net_default_mac`` per node
    (GRUB prints MACs lower-case, colon-separated, as the inventory normalizes them), each
    going on to the node's ``grub.cfg-01-<mac>``; a machine not in the inventory is told so
    on its console."""
    return render("grub/shim.cfg.j2", source=PurePath(inv.file).name, nodes=inv.nodes)


def tree_files(inv: Inventory) -> Mapping[str, str]:
    """The configuration files the signed chain adds to the tree, by path relative to the
    TFTP root."""
    text = signed_grub_config(inv)
    return {rel: text for rel in SIGNED_GRUB_CONFIGS}


def efi_boot_file(loader: str) -> str:
    """The boot file of x86-64 UEFI clients for ``--efi-loader`` ``loader`` (``grub``,
    ``ipxe``, ``shim``); :class:`KeyError` for another."""
    return EFI_LOADER_FILES[loader]


def http_boot_file(base: str, loader: str) -> str:
    """The boot file URL for UEFI HTTP Boot clients: ``base`` (``http://SERVER[:PORT]``, the
    HTTP server serving the TFTP root) and the loader's file. Shim fetched over HTTP loads
    ``grubx64.efi`` from the same URL directory (shim's httpboot.c), iPXE asks again with user
    class ``iPXE`` and gets its script."""
    return f"{base.rstrip('/')}/{efi_boot_file(loader)}"
