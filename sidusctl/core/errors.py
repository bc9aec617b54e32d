"""The error hierarchy. Library code raises only :class:`SidusError` subclasses; the CLI maps
them to a one-paragraph message and an exit code (tracebacks only with ``--debug``).
"""

from __future__ import annotations


class SidusError(Exception):
    """Base of every error sidusctl raises on purpose.

    ``exit_code`` is what the CLI exits with; ``hint`` is an optional second sentence telling
    the user what to do about it.
    """

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(SidusError):
    """A user file (recipe, inventory, platform) is invalid: names file, key and expectation."""

    exit_code = 2

    def __init__(
        self,
        file: str,
        key: str | None,
        problem: str,
        *,
        expected: str | None = None,
        line: int | None = None,
    ) -> None:
        where = file if line is None else f"{file}:{line}"
        if key:
            where = f"{where}: key '{key}'"
        msg = f"{where}: {problem}"
        if expected:
            msg += f" (expected {expected})"
        super().__init__(msg)
        self.file = file
        self.key = key
        self.problem = problem
        self.expected = expected
        self.line = line


class ConfigErrors(SidusError):
    """Several :class:`ConfigError` found in one pass, reported all at once."""

    exit_code = 2

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(e.message for e in errors))


class PrerequisiteError(SidusError):
    """The host lacks something: root privileges, a command, a kernel feature."""

    exit_code = 3


class CommandError(SidusError):
    """An external command failed. Carries argv, exit code and the tail of its output."""

    def __init__(self, argv: list[str], returncode: int, output_tail: str, what: str = "") -> None:
        self.argv = argv
        self.returncode = returncode
        self.output_tail = output_tail
        name = what or argv[0]
        tail = output_tail.strip()
        msg = f"{name} failed with exit code {returncode}"
        if tail:
            msg += ":\n" + "\n".join("    " + ln for ln in tail.splitlines()[-15:])
        super().__init__(msg)


class BuildError(SidusError):
    """A build step failed for a reason we could name (missing package, full disk, mirror...)."""


class StateError(SidusError):
    """The state store is not as the command needs it (unknown image, busy lock, ...)."""


class WriteError(StateError, OSError):
    """A file or directory sidusctl writes could not be written: a full or read-only file
    system, a quota, no permission. The message names the path and what was not written
    (and that what was there is unchanged). Also an :class:`OSError` carrying the failed
    call's ``errno``, ``strerror`` and ``filename``, so code that copes with an OSError (a
    server that logs a status file it could not write and goes on) copes with this too."""

    def __init__(self, message: str, cause: OSError | None = None) -> None:
        super().__init__(message)
        if cause is not None:
            self.errno, self.strerror = cause.errno, cause.strerror
            self.filename, self.filename2 = cause.filename, cause.filename2


class NotFoundError(StateError):
    """A named object (image, node, vnode) does not exist."""

    exit_code = 4


class BusyError(StateError):
    """Another sidusctl process holds the lock on this object."""

    exit_code = 5


class Interrupted(BaseException):
    """SIGTERM arrived (the CLI's handler raises it; SIGINT is KeyboardInterrupt); raised so
    every context manager unwinds and cleans up. A :class:`BaseException`, as
    KeyboardInterrupt is, not a :class:`SidusError`: the handlers that report an error and go
    on (a command over several vnodes, a platform's ``up``) must not take a SIGTERM for one
    vnode's failure and go on with the next (they did, where SIGINT stopped them). ``message``,
    ``hint`` and ``exit_code`` (130) as a SidusError's."""

    exit_code = 130
    hint: str | None = None

    def __init__(self, signame: str = "SIGINT") -> None:
        self.message = f"interrupted by {signame}; cleaned up"
        super().__init__(self.message)
        self.signame = signame
