"""The progress callbacks long jobs (an image build, an OCI import) call, and the CLI's
progress display implements: one protocol shared by :mod:`sidusctl.image` and
:mod:`sidusctl.oci`."""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    """Progress callbacks: ``stage(name, index, total)`` when a stage starts (``index``
    counting from 1 up to ``total``), ``line(text)`` for a line of tool output worth showing
    (debootstrap's ``I: Retrieving ...``)."""

    def stage(self, name: str, index: int, total: int) -> None:
        """Stage ``name`` starts: number ``index`` (from 1) of ``total``."""
        ...

    def line(self, text: str) -> None:
        """One line of tool output or a short note worth showing next to the current stage."""
        ...
