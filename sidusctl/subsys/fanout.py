"""Commands and copies on many hosts at once, over OpenSSH, through ClusterShell.

ClusterShell (https://clustershell.readthedocs.io, the ``clush`` engine HPC sites run) does
the fan-out: one event loop, up to ``fanout`` ssh clients at a time, per-host output and exit
codes, per-command timeouts. This module adds only what sidusctl needs around it:

- per-host addresses, ports, users and ssh options, written as an ``ssh_config(5)`` file that
  every ssh and scp it starts reads (``-F``): a pnode is named ``pn1`` in files and reports,
  and reached at whatever address the platform file says;
- a different command per host in one run (:meth:`Fanout.run_each`), results as typed
  :class:`HostResult` values, never raised: a host that cannot be reached (ssh exits 255, the
  connection times out, or the command does) is a result with ``reachable`` False or
  ``timed_out`` True, so one dead host never hangs or aborts a command over the others;
- :func:`fold`: identical outputs gathered under one node set, as ``clush -b`` prints them.

Host keys: by default trust on first use into a known_hosts file of the caller's choosing
(``StrictHostKeyChecking=accept-new``), which is what testbed users do with freshly deployed
pnodes; ``ssh_options`` can override any of it.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ClusterShell.Event import EventHandler
from ClusterShell.NodeSet import NodeSet, NodeSetParseError

from sidusctl.core.errors import ConfigError
from sidusctl.core.log import get_logger

log = get_logger("fanout")

SSH_UNREACHABLE = 255  # ssh(1): "exits with 255 if an error occurred" (its own, not the command's)


#: the most names a node set may expand to: ClusterShell expands ranges into sets of ints, about
#: 1 s per million names, so a slip such as ``x[1-100000000]`` would hang for minutes
MAX_NODES = 100_000

_RANGE = re.compile(r"\s*(\d+)(?:-(\d+))?(?:/(\d+))?\s*")


def _size_bound(text: str) -> int:
    """An upper bound of the names ``text`` (one node set) expands to, from its bracket ranges
    alone (``a-b/step``), without expanding them: operators (``!``, ``&``, ``^``) and
    duplicates only remove names. A range it cannot read counts 1 (ClusterShell reports it)."""
    total, depth = 0, 0
    elem: list[str] = []
    for ch in text + ",":
        depth += (ch == "[") - (ch == "]")
        if depth == 0 and ch in ",!&^ \t":
            n = 1
            for group in re.findall(r"\[([^\[\]]*)\]", "".join(elem)):
                count = 0
                for r in group.split(","):
                    m = _RANGE.fullmatch(r)
                    a, b, step = ((int(m[1]), int(m[2] or m[1]), int(m[3] or 1)) if m
                                  else (0, 0, 1))
                    count += max(0, b - a) // max(step, 1) + 1
                n *= count
            total += n if elem else 0
            elem = []
        else:
            elem.append(ch)
    return total


def expand(nodeset: str | Sequence[str], *, file: str = "command line",
           key: str = "NODES") -> list[str]:
    """``pn[1-3],fe`` or a list of such → host names in ClusterShell's order (sorted by
    name and index, duplicates dropped); ConfigError naming ``file`` and ``key`` (by default
    the command line's NODES argument) for a bad node set."""
    items = [nodeset] if isinstance(nodeset, str) else list(nodeset)
    shown = nodeset if isinstance(nodeset, str) else ",".join(map(str, items))
    bound = sum(_size_bound(str(it)) for it in items)
    if bound > MAX_NODES:
        raise ConfigError(file, key, f"node set {shown!r} names up to {bound} hosts",
                          expected=f"at most {MAX_NODES}")
    ns = NodeSet()
    try:
        for it in items:
            ns.update(NodeSet(str(it)))
    except NodeSetParseError as e:
        raise ConfigError(file, key, f"invalid node set {shown!r}: {e}",
                          expected="a ClusterShell node set such as pn[1-3]") from e
    return list(ns)


def fold_names(names: Iterable[str]) -> str:
    """The shortest node set naming ``names`` (``['n1','n2','n3']`` → ``n[1-3]``)."""
    return str(NodeSet.fromlist(list(names)))


@dataclass(frozen=True)
class Host:
    """How to reach one host: ``name`` (as in node sets), ``address`` (default: the name),
    ``port`` (TCP), ``user``."""

    name: str
    address: str | None = None
    port: int = 22
    user: str = "root"


@dataclass
class HostResult:
    """What one host answered: ``rc`` (None if it never exited: timeout or unreachable),
    ``stdout`` and ``stderr`` (text, newline-joined lines), ``reachable`` (False when ssh
    itself failed: exit 255 with nothing from the command), ``timed_out``, ``elapsed``
    (seconds from the start of the fan-out until this host's command ended; None if it
    never did)."""

    host: str
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    reachable: bool = True
    timed_out: bool = False
    elapsed: float | None = None

    @property
    def ok(self) -> bool:
        """True if the command exited 0 (False after a timeout or when ssh failed)."""
        return self.rc == 0

    def problem(self) -> str | None:
        """One line saying what went wrong, or None if the command exited 0."""
        if self.timed_out:
            return "timed out (no answer)"
        if not self.reachable:
            last = self.stderr.strip().splitlines()[-1:] or ["ssh failed"]
            return f"unreachable: {last[0]}"
        if self.rc != 0:
            last = (self.stderr.strip() or self.stdout.strip()).splitlines()[-3:]
            return f"exit {self.rc}" + (f": {' / '.join(last)}" if last else "")
        return None


@dataclass
class _Collect(EventHandler):  # type: ignore[misc]  # ClusterShell has no type hints
    results: dict[str, HostResult] = field(default_factory=dict)
    out: dict[str, list[bytes]] = field(default_factory=dict)
    err: dict[str, list[bytes]] = field(default_factory=dict)
    t0: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        EventHandler.__init__(self)

    def ev_read(self, worker: Any, node: str, sname: str, msg: bytes) -> None:
        (self.err if sname == "stderr" else self.out).setdefault(node, []).append(msg)

    def ev_hup(self, worker: Any, node: str, rc: int) -> None:
        self.results[node] = HostResult(node, rc, elapsed=time.monotonic() - self.t0)

    def ev_close(self, worker: Any, timedout: bool) -> None:
        if timedout:
            for node in worker.iter_keys_timeout():
                self.results[node] = HostResult(node, None, timed_out=True)


class Fanout:
    """Runs commands on ``hosts`` (name → :class:`Host`) in parallel through ClusterShell.

    ``connect_timeout`` and command timeouts are in seconds; ``fanout`` is the most ssh
    clients at once; ``known_hosts`` the file host keys are kept in (None: ssh's default);
    ``ssh_options`` extra ``ssh``/``scp`` options (argv words). Use from one thread at a
    time (ClusterShell tasks are bound to their thread); :meth:`close` removes the
    generated ssh_config."""

    def __init__(self, hosts: Iterable[Host], *, connect_timeout: float = 5, fanout: int = 64,
                 known_hosts: Path | None = None, ssh_options: Sequence[str] = ()) -> None:
        self.hosts = {h.name: h for h in hosts}
        self.connect_timeout = connect_timeout
        self.fanout = fanout
        self._lock = threading.Lock()
        fd, cfg = tempfile.mkstemp(prefix="sidusctl-ssh-", suffix=".conf")
        self.ssh_config = Path(cfg)
        with os.fdopen(fd, "w") as f:
            f.write(self._config_text(known_hosts))
        self.ssh_options = ["-F", str(self.ssh_config), *ssh_options]

    def _config_text(self, known_hosts: Path | None) -> str:
        out = []
        for h in self.hosts.values():
            out += [f"Host {h.name}", f"  HostName {h.address or h.name}", f"  Port {h.port}",
                    f"  User {h.user}"]
        out += ["Host *", "  StrictHostKeyChecking accept-new", "  LogLevel ERROR",
                "  ServerAliveInterval 5", "  ServerAliveCountMax 3"]
        if known_hosts is not None:
            known_hosts.parent.mkdir(parents=True, exist_ok=True)
            out.append(f"  UserKnownHostsFile {known_hosts}")
        return "\n".join(out) + "\n"

    def close(self) -> None:
        """Delete the generated ssh_config file; idempotent."""
        self.ssh_config.unlink(missing_ok=True)

    def __enter__(self) -> Fanout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _task(self) -> Any:
        # imported here: a platform file's node sets need only NodeSet, and a pnode that is
        # a TCG guest pays seconds for every module imported at start
        from ClusterShell.Task import task_self

        task = task_self()
        task.set_info("ssh_options", shlex.join(self.ssh_options))
        task.set_info("scp_options", shlex.join(self.ssh_options))
        task.set_info("connect_timeout", max(1, int(self.connect_timeout)))
        task.set_info("fanout", self.fanout)
        task.set_default("stdout_msgtree", False)
        task.set_default("stderr_msgtree", False)
        return task

    def _check(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        unknown = [n for n in names if n not in self.hosts]
        if unknown:
            raise ConfigError("pnodes", None, f"unknown host(s) {fold_names(unknown)}",
                              expected="one of " + fold_names(self.hosts))
        return names

    def run_each(self, commands: Mapping[str, Sequence[str]], *,
                 timeout: float | None = None,
                 stdin: bytes | Mapping[str, bytes] | None = None) -> dict[str, HostResult]:
        """Run ``commands[host]`` (an argv, quoted here for the remote shell) on every host
        of ``commands`` at once; wait at most ``timeout`` seconds for each. ``stdin``: bytes
        given to every command, or per host. One :class:`HostResult` per host, in the order
        given; never raises for a host's failure."""
        self._check(commands)
        handler = _Collect()
        with self._lock:
            task = self._task()
            for host, argv in commands.items():
                w = task.shell(shlex.join(argv), nodes=host, handler=handler, stderr=True,
                               timeout=timeout)
                data = stdin.get(host) if isinstance(stdin, Mapping) else stdin
                if data is not None:
                    w.write(data)
                    w.set_write_eof()
            log.debug("fan-out to %s: %s", fold_names(commands),
                      "; ".join(f"{h}: {shlex.join(a)}" for h, a in commands.items()))
            task.run()
        return self._results(commands, handler)

    def run(self, argv: Sequence[str], hosts: Iterable[str] | None = None, *,
            timeout: float | None = None) -> dict[str, HostResult]:
        """The same ``argv`` on ``hosts`` (default: all); see :meth:`run_each`."""
        names = list(self.hosts) if hosts is None else self._check(hosts)
        return self.run_each({h: argv for h in names}, timeout=timeout)

    def copy(self, src: Path, dest: str, hosts: Iterable[str], *,
             timeout: float | None = None) -> dict[str, HostResult]:
        """scp the file ``src`` to ``dest`` (a path) on every host of ``hosts`` at once."""
        names = self._check(hosts)
        handler = _Collect()
        with self._lock:
            task = self._task()
            task.copy(str(src), dest, nodes=",".join(names), handler=handler, timeout=timeout,
                      stderr=True)
            task.run()
        return self._results({n: () for n in names}, handler)

    def rcopy(self, src: str, dest_dir: Path, host: str, *,
              timeout: float | None = None) -> tuple[HostResult, Path]:
        """scp the file ``src`` of ``host`` into the local directory ``dest_dir``; the result
        and the local path (ClusterShell names it ``<basename>.<host>``)."""
        self._check([host])
        handler = _Collect()
        with self._lock:
            task = self._task()
            task.rcopy(src, str(dest_dir), nodes=host, handler=handler, timeout=timeout,
                       stderr=True)
            task.run()
        return self._results([host], handler)[host], dest_dir / f"{Path(src).name}.{host}"

    @staticmethod
    def _results(order: Iterable[str], h: _Collect) -> dict[str, HostResult]:
        out: dict[str, HostResult] = {}
        for host in order:
            r = h.results.get(host) or HostResult(host, None, reachable=False)
            r.stdout = b"\n".join(h.out.get(host, [])).decode(errors="replace")
            r.stderr = b"\n".join(h.err.get(host, [])).decode(errors="replace")
            if r.rc == SSH_UNREACHABLE and not r.stdout:
                r.reachable = False
            out[host] = r
        return out


def fold(outputs: Mapping[str, str]) -> list[tuple[str, str]]:
    """``{name: output}`` → ``[(node set, output)]``, identical outputs gathered as ``clush -b``
    does, in the order each output was first seen."""
    groups: dict[str, list[str]] = {}
    for name, text in outputs.items():
        groups.setdefault(text, []).append(name)
    return [(fold_names(names), text) for text, names in groups.items()]


__all__ = ["Fanout", "Host", "HostResult", "expand", "fold", "fold_names"]
