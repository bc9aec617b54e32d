"""Progress display for long work: a rich progress bar on a terminal, plain lines otherwise
(logs, CI, pexpect)."""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from sidusctl.cli.common import console


class StageProgress:
    """Implements the services' ``Reporter`` protocol: ``stage(name, i, n)`` and ``line(text)``."""

    def __init__(self, title: str, enabled: bool = True) -> None:
        self.title = title
        self.tty = console.is_terminal and enabled
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._t0 = time.monotonic()
        self._stage = ""

    def __enter__(self) -> StageProgress:
        if self.tty:
            self._progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"),
                                      BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                      TimeElapsedColumn(), TextColumn("{task.fields[detail]}"),
                                      console=console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=None, detail="")
        return self

    def stage(self, name: str, index: int, total: int) -> None:
        """Show that stage ``name`` (``index`` of ``total``, counting from 1) starts: on the bar on
        a terminal, else as a line on stderr with the seconds since this object was made; nothing
        when disabled."""
        self._stage = name
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=f"{self.title}: {name}",
                                  completed=max(index - 1, 0), total=total, detail="")
        elif self.enabled:
            sys.stderr.write(f"[{time.monotonic() - self._t0:6.1f}s] {self.title}: stage {index}/{total}: {name}\n")
            sys.stderr.flush()

    def line(self, text: str) -> None:
        """Show the first 60 characters of ``text`` as the bar's detail; dropped when there is no
        bar (not a terminal, disabled, or outside the ``with`` block)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, detail=text[:60])

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None and self._task is not None:
            if et is None:
                total = self._progress.tasks[0].total or 1
                self._progress.update(self._task, completed=total, detail="done")
            self._progress.stop()
