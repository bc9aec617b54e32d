"""Which Debian mirror to use, without ever hard-coding a host: the recipe's ``mirror``, else the
host's own apt sources (one-line ``sources.list`` and deb822 ``*.sources``, sources.list(5)),
else nothing (debootstrap's and mmdebstrap's own default)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from debian.deb822 import Deb822


@dataclass(frozen=True)
class HostSources:
    """``archive``: URI of the host's main Debian archive, ``security``: of debian-security
    (either may be empty)."""

    archive: str = ""
    security: str = ""


def _entries(etc: Path) -> list[tuple[str, list[str]]]:
    """(uri, suites) of every enabled ``deb`` entry."""
    out: list[tuple[str, list[str]]] = []
    files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for f in files:
        if not f.is_file():
            continue
        for line in f.read_text(errors="replace").splitlines():
            parts = line.split("#", 1)[0].split()
            if len(parts) < 3 or parts[0] != "deb":
                continue
            i = 1
            if parts[i].startswith("["):
                while i < len(parts) and not parts[i].endswith("]"):
                    i += 1
                i += 1
            if i + 1 < len(parts):
                out.append((parts[i], [parts[i + 1]]))
    for f in sorted((etc / "sources.list.d").glob("*.sources")):
        with f.open() as fh:
            for para in Deb822.iter_paragraphs(fh):
                if "deb" not in para.get("Types", "").split():
                    continue
                if para.get("Enabled", "yes").lower() == "no":
                    continue
                for uri in para.get("URIs", "").split():
                    out.append((uri, para.get("Suites", "").split()))
    return out


def host_sources(etc: Path = Path("/etc/apt")) -> HostSources:
    """The host's Debian archive and security URIs, read from its apt configuration."""
    archive = security = ""
    for uri, suites in _entries(etc):
        if any(s.endswith("-security") or s.endswith("/updates") for s in suites):
            security = security or uri.rstrip("/")
        elif "debian" in uri and not archive:
            archive = uri.rstrip("/")
    return HostSources(archive, security)


def sources_list(mirror: str, security: str, suite: str, components: tuple[str, ...]) -> str:
    """The root's /etc/apt/sources.list: the suite, its -updates and (for stable releases with a
    known security URI) -security."""
    comps = " ".join(components)
    lines = [f"deb {mirror} {suite} {comps}"]
    if suite not in ("sid", "unstable", "experimental"):
        lines.append(f"deb {mirror} {suite}-updates {comps}")
        if security and suite not in ("testing",):
            lines.append(f"deb {security} {suite}-security {comps}")
    return "# written by sidusctl build\n" + "\n".join(lines) + "\n"
