"""The one process runner: argv lists only (never a shell), logged at debug level, typed errors.

Every child starts in its own session (process group) so that an interrupt can end the whole
tree it spawned, and with ``PR_SET_PDEATHSIG`` so that it is told to stop if sidusctl itself is
killed with SIGKILL. The session ids of running children are kept in :data:`ACTIVE` so that
crash-recovery records (see :mod:`sidusctl.core.state`) can name them.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sidusctl.core.errors import CommandError, PrerequisiteError
from sidusctl.core.log import get_logger

log = get_logger("run")

_PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # pragma: no cover - non-glibc host
    _libc = None

#: pids (== session ids, as children are session leaders) of children now running.
ACTIVE: set[int] = set()
_ACTIVE_LOCK = threading.Lock()


def _child_setup() -> None:
    # Runs in the child between fork and exec: ask for SIGTERM if the parent dies.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass(frozen=True)
class Result:
    """What a finished command left: ``argv``, ``returncode``, captured ``stdout`` (text, empty
    unless captured) and ``tail`` (the last lines of its combined stdout/stderr)."""

    argv: list[str]
    returncode: int
    stdout: str
    tail: str


def which(cmd: str, package: str | None = None) -> str:
    """Absolute path of ``cmd`` on PATH, or
    :class:`PrerequisiteError` naming the Debian package that provides it."""
    found = shutil.which(cmd)
    if not found:
        pkg = f" (Debian package '{package}')" if package else ""
        raise PrerequisiteError(
            f"'{cmd}' was not found on this host{pkg}",
            hint=f"apt-get install {package}" if package else None,
        )
    return found


def kill_session(sid: int, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to the process group ``sid`` (children are group and session leaders)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, sig)


def _terminate(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    kill_session(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid, signal.SIGKILL)
        proc.wait()
    # Whatever is left of the group (grandchildren that ignored SIGTERM) gets SIGKILL.
    kill_session(proc.pid, signal.SIGKILL)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    capture: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    input: bytes | None = None,
    timeout: float | None = None,
    on_line: Callable[[str], None] | None = None,
    what: str = "",
    tail_lines: int = 40,
) -> Result:
    """Run ``argv`` to completion.

    - ``capture``: keep stdout (stderr still goes to the tail) and return it in ``Result.stdout``.
    - ``on_line``: called with each output line (stdout and stderr merged unless ``capture``).
    - ``env``: added to (not replacing) the current environment.
    - ``timeout``: seconds; on expiry the process group is ended and CommandError raised (rc -9).
    - Any exception while waiting (KeyboardInterrupt, :class:`Interrupted`) ends the child's whole
      process group (SIGTERM, then SIGKILL after 5 s) before it propagates.

    Raises :class:`CommandError` with the exit code and output tail when ``check`` and rc != 0.
    """
    args = [os.fspath(a) for a in argv]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    log.debug("run: %s", " ".join(args))
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    out_chunks: list[str] = []
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if capture else subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_child_setup,
        )
    except FileNotFoundError as e:
        raise PrerequisiteError(f"'{args[0]}' was not found on this host") from e
    with _ACTIVE_LOCK:
        ACTIVE.add(proc.pid)
    try:
        readers: list[threading.Thread] = []
        if capture:
            assert proc.stderr is not None
            stderr = proc.stderr

            def _drain_err() -> None:
                for raw in stderr:
                    line = raw.decode("utf-8", "replace").rstrip("\n")
                    tail.append(line)
                    log.debug("  %s", line)

            readers.append(threading.Thread(target=_drain_err, daemon=True))
        assert proc.stdout is not None
        stdout = proc.stdout

        def _drain_out() -> None:
            for raw in stdout:
                line = raw.decode("utf-8", "replace")
                if capture:
                    out_chunks.append(line)
                else:
                    line = line.rstrip("\n")
                    tail.append(line)
                    log.debug("  %s", line)
                    if on_line is not None:
                        on_line(line)

        readers.append(threading.Thread(target=_drain_out, daemon=True))
        for t in readers:
            t.start()
        if input is not None:
            assert proc.stdin is not None
            proc.stdin.write(input)
            proc.stdin.close()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _terminate(proc)
            raise CommandError(args, -9, "\n".join(tail) + f"\n(timed out after {timeout} s)",
                               what) from None
        # The process is gone; something it started in the background may still hold the
        # pipes open (a daemon left in a chroot, say). Drain what is there, briefly, and go on:
        # the caller's cleanup (a chroot session's) deals with such strays.
        for t in readers:
            t.join(timeout=2.0)
    except BaseException:
        _terminate(proc)
        raise
    finally:
        with _ACTIVE_LOCK:
            ACTIVE.discard(proc.pid)
    result = Result(args, rc, "".join(out_chunks), "\n".join(tail))
    if check and rc != 0:
        raise CommandError(args, rc, result.tail, what)
    return result


def output(argv: Sequence[str | os.PathLike[str]], **kw: object) -> str:
    """Run ``argv`` and return its stdout (stripped of the final newline). Same errors as run."""
    return run(argv, capture=True, **kw).stdout.rstrip("\n")  # type: ignore[arg-type]
