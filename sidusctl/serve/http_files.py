"""Which file a request names, for :mod:`sidusctl.serve.http`: the served directories
(:class:`ServedTree`: a root and URL-prefix mounts), the file opened and checked to be a
regular file inside its directory, and the one byte range a ``Range`` field asks of it
(:func:`parse_range`, RFC 9110 section 14)."""

from __future__ import annotations

import os
import stat
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

from sidusctl.core.errors import SidusError
from sidusctl.core.paths import proc_link_within


def parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """The one byte range ``(first, last)`` (inclusive) that a ``Range`` header value asks of
    a ``size``-byte file; None when the header is to be ignored (not ``bytes=``, several
    ranges, malformed: the whole file is sent); ``"unsatisfiable"`` when it starts past the
    end (416). RFC 9110 section 14.1.2."""
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    a, sep, b = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if a == "":
            n = int(b)
            if n <= 0:
                return "unsatisfiable" if n == 0 else None
            return (max(0, size - n), size - 1) if size else "unsatisfiable"
        first = int(a)
        last = int(b) if b else size - 1
    except ValueError:
        return None
    if first < 0 or (b and last < first):
        return None
    if first >= size:
        return "unsatisfiable"
    return first, min(last, size - 1)


class ServedTree:
    """The directories an HTTP server serves: ``root`` at ``/`` and ``mounts``, ``(URL
    prefix, directory)`` pairs (the longest prefix wins). :class:`SidusError` if /proc is
    not mounted (:meth:`open_file` reads where a descriptor leads)."""

    def __init__(self, root: Path, mounts: Iterable[tuple[str, Path]] = ()) -> None:
        self.roots = [("/", os.path.realpath(root))] + [
            (p if p.endswith("/") else p + "/", os.path.realpath(d)) for p, d in mounts]
        self.roots.sort(key=lambda x: -len(x[0]))  # longest prefix first
        if not os.path.isdir("/proc/self/fd"):
            raise SidusError("HTTP server: /proc is not mounted (proc(5): /proc/self/fd)")

    def locate(self, url_path: str) -> tuple[str, str] | None:
        """``(path, base)``: the path a URL path names under its root or mount (symlinks not
        followed yet) and that directory's real path; None if it has a ``..`` component.
        Repeated slashes count as one: shim asks for ``//grubx64.efi`` (the directory of its
        own URL, ``/``, joined to the file name with another ``/``)."""
        path = urllib.parse.unquote(url_path.split("?", 1)[0].split("#", 1)[0])
        parts = [c for c in path.split("/") if c]
        if ".." in parts:
            return None
        path = "/" + "/".join(parts) + ("/" if parts and path.endswith("/") else "")
        for prefix, base in self.roots:
            if path.startswith(prefix) or path + "/" == prefix:
                return os.path.join(base, path[len(prefix):]), base
        return None  # pragma: no cover ("/" is always a prefix)

    def open_file(self, url_path: str) -> tuple[int, os.stat_result] | None:
        """A descriptor open for reading on the regular file a URL path names, and its
        ``fstat``; None if the file is outside its root or mount (a ``..`` component, or
        symlinks resolving outside). :class:`FileNotFoundError` (or another
        :class:`OSError`) if there is no such file, :class:`IsADirectoryError` if it is not
        a regular file, :class:`ValueError` if the path has a NUL byte. The caller closes
        the descriptor.

        The file is opened first, then where its descriptor leads is read
        (``/proc/self/fd/N``, proc(5)) and checked, with its type, as nginx does
        (``O_NONBLOCK``: a FIFO does not block the open; nothing is read from what is not a
        regular file). Three system calls, not the ``lstat`` of every component that
        ``os.path.realpath`` makes, each a release of the interpreter lock that hundreds of
        connection threads contend for in a storm; and what is checked is what is read,
        even if the tree changes meanwhile."""
        where = self.locate(url_path)
        if where is None:
            return None
        path, base = where
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            if not proc_link_within(os.readlink(f"/proc/self/fd/{fd}"), base):
                os.close(fd)
                return None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(path)
        except BaseException:
            os.close(fd)
            raise
        return fd, st
