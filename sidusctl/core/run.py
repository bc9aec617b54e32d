"""The one way to start a child process: argv lists only (never a shell), logged at debug
level, typed errors.

- :func:`run` runs a command to completion (output captured or streamed to the log);
- :func:`spawn` starts a long-running child (a daemon, qemu, a background compressor) and
  returns a :class:`Child`; :func:`stop` (also :meth:`Child.stop`) is the one way to end
  either: SIGTERM to the child's whole process group, a grace time, SIGKILL, reap.

Every child starts in its own session (process group) so that an interrupt can end the whole
tree it spawned, and with ``PR_SET_PDEATHSIG`` so that it is signalled if sidusctl itself is
killed with SIGKILL. The session ids of running children are kept in :data:`ACTIVE` so that
crash-recovery records (see :mod:`sidusctl.core.state`) can name them.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from sidusctl.core import signals
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

# SIGINT and SIGTERM are held pending while a child is forked (sidusctl.core.signals).
# Why: with a ``preexec_fn``, CPython runs the ``os.register_at_fork`` hooks around the
# fork, and ``logging`` registers one that runs in the parent right after it. A signal that
# arrives during the fork has its exception raised in that hook, where the interpreter
# prints "Exception ignored" and drops it: the interrupt is lost (a test suite's SIGINT
# during ``sidusctl update`` was). Held pending instead, it is delivered by ``release``, at a
# point where the caller ends the child like for any interrupt.


def _popen(args: list[str], pdeathsig: int,
           **kw: Any) -> tuple[subprocess.Popen[bytes], set[int | signal.Signals]]:
    """Start ``args`` in a session of its own with ``pdeathsig`` (:func:`_child_setup`), with
    SIGINT and SIGTERM held across the fork (:func:`sidusctl.core.signals.hold`); ``kw`` as for
    :class:`subprocess.Popen`. Returns the process and the mask to :func:`sidusctl.core.signals.release` once the
    caller is ready to end the child on an interrupt; if Popen raises (OSError: a missing
    program...), the mask is restored first."""
    mask = signals.hold()
    try:
        return subprocess.Popen(args, start_new_session=True, preexec_fn=_preexec(pdeathsig),
                                **kw), mask
    except BaseException:
        signals.release(mask)
        raise


def _child_setup(sig: int, parent: int) -> None:
    # Runs in the child between fork and exec (after setsid): ask for ``sig`` when the parent
    # dies. The kernel keeps this setting across execve (not for set-uid/-gid or
    # file-capability binaries), so it holds in whatever program the child ends up as, also
    # through `ip netns exec` / `unshare` / `sh -c 'exec ...'` chains, which exec in place.
    # "The parent" is the *thread* that forked: the setting fires when that thread exits, so
    # children are started from the main thread or from a thread that lives as long as they.
    # The forking thread held SIGINT and SIGTERM (signals.hold); the mask is inherited across
    # execve, so the child unblocks them before it becomes the program.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.HELD_SIGNALS)
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl: nobody will signal us
        os.kill(os.getpid(), sig)


def _preexec(sig: int) -> Callable[[], None]:
    return functools.partial(_child_setup, sig, os.getpid())


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


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a member we may not signal still runs
        return True
    return True


def stop(proc: subprocess.Popen[Any], grace: float = 5.0, sig: int = signal.SIGTERM) -> int:
    """End the child ``proc`` (started by :func:`run` or :func:`spawn`, so the leader of its
    own process group) and everything in its group: ``sig`` (SIGTERM) to the group, wait up to
    ``grace`` seconds for the leader and then for the rest of the group, SIGKILL to the group
    (whatever ignored ``sig``), reap the leader. Returns its exit code (negative: the signal
    that ended it, as :attr:`subprocess.Popen.returncode`). Idempotent; never raises for a
    child that is already gone."""
    deadline = time.monotonic() + grace
    if proc.poll() is None:
        kill_session(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        # the leader is gone (or out of time): give its group what is left of the grace time
        while proc.returncode is not None and _group_alive(proc.pid) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
    # Whatever is left of the group (grandchildren that ignored ``sig``) gets SIGKILL.
    kill_session(proc.pid, signal.SIGKILL)
    rc = proc.wait()
    with _ACTIVE_LOCK:
        ACTIVE.discard(proc.pid)
    return rc


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
        proc, mask = _popen(
            args,
            # SIGTERM: a short command told its parent is gone may clean up (unmount, remove
            # its temporary files); stop() escalates to SIGKILL when sidusctl is still there.
            signal.SIGTERM,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if capture else subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
        )
    except FileNotFoundError as e:
        raise PrerequisiteError(f"'{args[0]}' was not found on this host") from e
    with _ACTIVE_LOCK:
        ACTIVE.add(proc.pid)
    try:
        signals.release(mask)  # an interrupt that came during the fork is raised here: child ended
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
            stop(proc)
            raise CommandError(args, -9, "\n".join(tail) + f"\n(timed out after {timeout} s)",
                               what) from None
        # The process is gone; something it started in the background may still hold the
        # pipes open (a daemon left in a chroot, say). Drain what is there, briefly, and go on:
        # the caller's cleanup (a chroot session's) deals with such strays.
        for t in readers:
            t.join(timeout=2.0)
    except BaseException:
        stop(proc)
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


#: Redirections for :func:`spawn`: these constants, an open file object, a file descriptor
#: (>= 0), a :class:`~pathlib.Path` (stdin: opened for reading; stdout/stderr: for appending)
#: or None (inherited from sidusctl).
DEVNULL = subprocess.DEVNULL
PIPE = subprocess.PIPE
STDOUT = subprocess.STDOUT  # stderr only: to wherever stdout goes
Redirect = int | IO[Any] | Path | None


class Child:
    """A long-running child started by :func:`spawn`.

    ``argv``; ``pid`` (also its process group and session id); ``what`` (its name in
    messages); ``popen`` (the :class:`subprocess.Popen`, for ``communicate`` on pipes);
    ``stdin``/``stdout``/``stderr`` (binary file objects for PIPE redirections, else None).
    A context manager: the block's end :meth:`stop` s it."""

    def __init__(self, popen: subprocess.Popen[bytes], argv: list[str], what: str) -> None:
        self.popen = popen
        self.argv = argv
        self.what = what or Path(argv[0]).name

    @property
    def pid(self) -> int:
        """The child's pid, also its process group and session id."""
        return self.popen.pid

    @property
    def stdin(self) -> IO[bytes] | None:
        """The child's stdin as a binary file object when it was redirected to PIPE, else None."""
        return self.popen.stdin

    @property
    def stdout(self) -> IO[bytes] | None:
        """The child's stdout as a binary file object when it was redirected to PIPE, else None."""
        return self.popen.stdout

    @property
    def stderr(self) -> IO[bytes] | None:
        """The child's stderr as a binary file object when it was redirected to PIPE, else None."""
        return self.popen.stderr

    @property
    def returncode(self) -> int | None:
        """The exit code once reaped (negative: killed by that signal), else None."""
        return self.popen.returncode

    def poll(self) -> int | None:
        """The exit code if the child has exited (and reap it), else None."""
        return self.popen.poll()

    def alive(self) -> bool:
        """True while the child has not exited (this polls it, so an exited child is reaped)."""
        return self.popen.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds (None: as long as it takes) for the child to exit;
        its exit code, or None if it still runs."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child's whole process group (nothing if it is gone)."""
        if self.popen.returncode is None:
            kill_session(self.pid, sig)

    def stop(self, grace: float = 5.0, sig: int = signal.SIGTERM) -> int:
        """:func:`stop` this child (``sig`` to its group, ``grace`` seconds, SIGKILL, reap) and
        close the pipes sidusctl holds to it; its exit code."""
        rc = stop(self.popen, grace, sig)
        for f in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        return rc

    def __enter__(self) -> Child:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _open_redirect(r: Redirect, mode: str, opened: list[IO[Any]]) -> int | IO[Any] | None:
    if isinstance(r, Path):
        f = open(r, mode)  # noqa: SIM115 - closed by spawn once the child holds its copy
        opened.append(f)
        return f
    return r


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdin: Redirect = DEVNULL,
    stdout: Redirect = DEVNULL,
    stderr: Redirect = DEVNULL,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    what: str = "",
    settle: float = 0.0,
    pdeathsig: int = signal.SIGKILL,
) -> Child:
    """Start ``argv`` as a long-running child and return at once (see :class:`Child`).

    The child runs in a new session (its own process group, so :func:`stop` ends whatever it
    starts too) and gets ``pdeathsig`` when the thread that spawned it exits: call this from
    the main thread or from a thread that outlives the child. ``stdin``/``stdout``/``stderr``:
    see :data:`Redirect` (default DEVNULL). ``env`` is added to the current environment.
    ``settle``: if > 0, watch the child for that many seconds and raise :class:`CommandError`
    (exit code, tail of ``stderr`` when it is a file path) if it exits meanwhile, whatever the
    code: for daemons that fail at once on a bad argument or a busy port.

    Raises :class:`PrerequisiteError` if the program does not exist or is not executable.
    """
    # SIGKILL by default: a daemon must not outlive sidusctl, and once sidusctl is gone
    # nobody is left to escalate if it ignores, or is slow at, a SIGTERM.
    args = [os.fspath(a) for a in argv]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    log.debug("spawn: %s", " ".join(args))
    opened: list[IO[Any]] = []
    try:
        proc, mask = _popen(
            args,
            pdeathsig,
            stdin=_open_redirect(stdin, "rb", opened),
            stdout=_open_redirect(stdout, "ab", opened),
            stderr=_open_redirect(stderr, "ab", opened),
            env=full_env,
            cwd=cwd,
        )
    except (FileNotFoundError, PermissionError) as e:
        raise PrerequisiteError(f"'{args[0]}' was not found on this host or is not "
                                f"executable ({e.strerror})") from e
    finally:
        for f in opened:
            f.close()
    with _ACTIVE_LOCK:
        ACTIVE.add(proc.pid)
    child = Child(proc, args, what)
    try:
        signals.release(mask)  # an interrupt that came during the fork: the child is ended first
    except BaseException:
        child.stop(0)
        raise
    log.debug("spawn: %s is pid %d", child.what, proc.pid)
    if settle > 0:
        rc = child.wait(settle)
        if rc is not None:
            child.stop(0)
            tail = _tail(stderr) if isinstance(stderr, Path) else ""
            raise CommandError(args, rc, tail + "\n(exited at start-up)", what)
    return child
