"""Host and domain names (RFC 1123 section 2.1, RFC 1035 sections 2.3.1 and 2.3.4): the one
definition the DNS server, the DHCP server's domain option and the inventory check against."""

from __future__ import annotations

import re

#: one label of a host or domain name: letters, digits and inner hyphens, 1-63 characters
#: (RFC 1123 section 2.1, RFC 1035 section 2.3.1)
LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")

#: a domain name's length at most, without a trailing dot (RFC 1035 section 2.3.4: 255 octets
#: in the wire form, which adds a length octet per label and the root's zero)
DOMAIN_MAX = 253


def is_domain(name: str) -> bool:
    """True if ``name`` is a DNS domain name as configured: labels (:data:`LABEL_RE`) joined
    by single dots, at most :data:`DOMAIN_MAX` characters, no leading or trailing dot. Any
    case (DNS compares names without case, RFC 4343)."""
    return (0 < len(name) <= DOMAIN_MAX
            and all(LABEL_RE.match(label) for label in name.split(".")))
