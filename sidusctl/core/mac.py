"""The one MAC address normaliser: every file, option and command line that names a machine's
Ethernet address goes through :func:`normalize_mac` (IEEE 802 48-bit addresses, as DHCP's
``chaddr`` carries them for htype 1, RFC 2131 section 2)."""

from __future__ import annotations

import re

_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}$")


def normalize_mac(mac: object) -> str:
    """``52-54-00-AB-CD-EF`` or ``52:54:00:ab:cd:ef`` → ``52:54:00:ab:cd:ef`` (six two-digit
    hex groups, one separator kind, surrounding blanks ignored); :class:`ValueError` for
    anything else, including a non-string."""
    if not isinstance(mac, str) or not _MAC_RE.match(mac.strip()):
        raise ValueError(f"not a MAC address: {mac!r} (expected six hex pairs such as "
                         "52:54:00:12:34:56)")
    return mac.strip().lower().replace("-", ":")


def mac_bytes(mac: str) -> bytes:
    """The 6 bytes of ``mac`` (any form :func:`normalize_mac` takes); ValueError otherwise."""
    return bytes.fromhex(normalize_mac(mac).replace(":", ""))


def pxelinux_name(mac: str) -> str:
    """``52:54:00:ab:cd:ef`` → ``01-52-54-00-ab-cd-ef``: the ARP hardware type (1, Ethernet)
    and the address in dashes, as pxelinux names a machine's ``pxelinux.cfg`` file and as
    its ``IPAPPEND 2`` passes ``BOOTIF=`` to the kernel (GRUB's per-MAC ``grub.cfg-`` files
    use the same form). ``mac`` in any form :func:`normalize_mac` takes; ValueError otherwise."""
    return "01-" + normalize_mac(mac).replace(":", "-")
