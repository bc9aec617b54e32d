"""Steps of the vnode service that an interrupt must not cut in two.

The CLI turns SIGINT into KeyboardInterrupt and SIGTERM into
:class:`~sidusctl.core.errors.Interrupted`; either is raised wherever the main thread happens
to be. Where a command has changed the host (a container started or stopped) and has still to
record it, or undoes what it did after an error, an exception there would leave the record and
the host apart. :class:`Critical` holds both signals pending over such a step (the same
``pthread_sigmask`` as :func:`sidusctl.core.run._hold`): the step completes, then the
held signal is delivered and its exception raised, with the record and the host agreeing.
Children started meanwhile (lxc-stop...) unblock the signals for themselves, as every child of
:func:`sidusctl.core.run.run` does.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from sidusctl.core.run import HELD_SIGNALS as HELD


class Critical:
    """The signal mask of this thread when made; :meth:`hold` blocks :data:`HELD`,
    :meth:`release` goes back to that mask (a signal held meanwhile is delivered then: its
    exception is raised by :meth:`release`)."""

    def __init__(self) -> None:
        self.before = signal.pthread_sigmask(signal.SIG_BLOCK, ())

    def hold(self) -> None:
        """Hold SIGINT and SIGTERM pending from now on (idempotent)."""
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD)

    def release(self) -> None:
        """Restore the mask of :meth:`__init__`. Raises KeyboardInterrupt or
        :class:`~sidusctl.core.errors.Interrupted` when such a signal was held meanwhile."""
        signal.pthread_sigmask(signal.SIG_SETMASK, self.before)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the signals for the block, then :meth:`release`: the exception of a signal
        that came meanwhile is raised then (in place of the block's own, if it raised one)."""
        self.hold()
        try:
            yield
        finally:
            self.release()
