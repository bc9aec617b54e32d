"""Running pieces of the shipped boot scripts (initramfs/) outside a boot."""

from __future__ import annotations

from pathlib import Path


def shell_function(script: Path, name: str) -> str:
    """The text of shell function ``name`` in ``script``: from its ``name()`` line to the
    first line that is ``}`` alone (the style of the shipped scripts). ``ValueError`` when
    the script has no such function."""
    lines = script.read_text().splitlines()
    start = lines.index(f"{name}()")
    end = lines.index("}", start)
    return "\n".join(lines[start:end + 1]) + "\n"
