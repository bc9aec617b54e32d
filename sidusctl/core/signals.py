"""Holding SIGINT and SIGTERM pending over a step that must not be cut in two.

The CLI turns SIGINT into KeyboardInterrupt and SIGTERM into
:class:`~sidusctl.core.errors.Interrupted`; either is raised wherever the main thread happens
to be. Where that would leave two things apart (a child forked but not yet known to its
caller: :mod:`sidusctl.core.run`; a chroot's mounts half made: :mod:`sidusctl.subsys.chroot`;
a container started or stopped and not yet recorded, or an undo under way:
:mod:`sidusctl.vnode.platform`), the step runs with both signals blocked in this thread
(``pthread_sigmask(2)``); a signal that came meanwhile is delivered when the mask is
restored, and its exception raised there. Children forked meanwhile inherit the mask and
unblock the signals for themselves (:mod:`sidusctl.core.run`).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

#: the signals sidusctl turns into exceptions (SIGINT: KeyboardInterrupt, SIGTERM:
#: :class:`~sidusctl.core.errors.Interrupted`)
HELD_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})

Mask = set[int | signal.Signals]


def hold() -> Mask:
    """Block :data:`HELD_SIGNALS` in this thread; the mask before, for :func:`release`."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)


def release(mask: Mask) -> None:
    """Restore the mask :func:`hold` returned: a signal held meanwhile is delivered now, and
    its exception (KeyboardInterrupt, Interrupted) raised here."""
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """The block with :data:`HELD_SIGNALS` held (:func:`hold`, then :func:`release`)."""
    mask = hold()
    try:
        yield
    finally:
        release(mask)


class Critical:
    """A step whose holding starts partway: :meth:`hold` (idempotent) blocks the signals,
    :meth:`release` restores the mask this thread had when the object was made (raising the
    exception of a signal held meanwhile); :meth:`held` holds them over a block."""

    def __init__(self) -> None:
        self.before: Mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())

    def hold(self) -> None:
        """Hold SIGINT and SIGTERM pending from now on."""
        hold()

    def release(self) -> None:
        """Restore the mask of :meth:`__init__`; see :func:`release`."""
        release(self.before)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the signals for the block, then :meth:`release`: the exception of a signal
        that came meanwhile is raised then (in place of the block's own, if it raised one)."""
        self.hold()
        try:
            yield
        finally:
            self.release()
