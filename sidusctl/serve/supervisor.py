"""Run the DHCP, TFTP and DNS servers in one process and one asyncio event loop.

``run(load)`` calls ``load()`` for a :class:`ServeConfig`, starts the servers it enables, and
serves until SIGTERM or SIGINT (clean shutdown: sockets closed, lease store closed and
unlocked, final status written). SIGHUP calls ``load()`` again and applies the result to the
running servers (reservations, pool, boot policy, TFTP root, DNS records); a bad new
configuration is logged and the old one stays in force. ``load()`` runs in a worker thread
while the servers keep answering with the old configuration (serve-pxe packs squashfs images
there, which takes seconds); only the swap happens on the event loop. A stop does not wait
for a reload: :attr:`Supervisor.stopping` is set (loaders check it before each change they
make), and the worker is a daemon thread, its children signalled as the process exits
(:mod:`sidusctl.core.run`'s ``PR_SET_PDEATHSIG``). The status (counters,
per-client events) is written atomically to ``status_file`` as compact JSON, every
:data:`STATUS_INTERVAL` seconds when something changed and every :data:`STATUS_HEARTBEAT`
seconds when nothing did: the write is on the event loop that answers DHCP and TFTP, and a
quiet server (or the NFS phase of a storm, which others serve) need not rewrite it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidusctl.core.errors import Interrupted, SidusError, StateError
from sidusctl.core.log import background, get_logger
from sidusctl.core.state import damaged, read_json, write_json
from sidusctl.serve.dhcp import DhcpServer
from sidusctl.serve.dhcp_config import DhcpConfig
from sidusctl.serve.dns import DnsConfig, DnsServer
from sidusctl.serve.tftp import TftpConfig, TftpServer

log = get_logger("serve")

#: seconds between status writes while clients come and go
STATUS_INTERVAL = 2.0
#: seconds at most between status writes when nothing changed (``updated`` shows it alive)
STATUS_HEARTBEAT = 30.0


#: seconds the calls posted to an :class:`Inbox` gather before the loop runs them
INBOX_DELAY = 0.1


class Later:
    """``fn`` run once on an event loop, ``delay`` seconds after the first :meth:`request`
    (the requests made meanwhile are served by that run), or at once by :meth:`now`: the
    work of many events done once per batch."""

    def __init__(self, fn: Callable[[], None], delay: float) -> None:
        self.fn = fn
        self.delay = delay
        self._timer: asyncio.TimerHandle | None = None

    def request(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run ``fn`` on ``loop`` after the delay, unless a run is already due (call on the
        loop's thread)."""
        if self._timer is None:
            self._timer = loop.call_later(self.delay, self.now)

    def now(self) -> None:
        """Run ``fn`` now; a run that was due is cancelled."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.fn()


class Inbox:
    """Calls of ``handler(kind, who, what, at)`` posted by other threads (the HTTP server's
    workers: a file sent, a node's report; ``at``: the time of the post, seconds since the
    epoch) and run on the event loop :attr:`loop`, in the order posted, in batches: the
    first call posted wakes the loop, which runs it and every call posted meanwhile
    ``delay`` seconds later (:data:`INBOX_DELAY` by default). In a storm, hundreds of
    downloads end within seconds, and ``call_soon_threadsafe`` for each would write the
    loop's wake-up pipe, and wake it, each time (so would a batch per loop iteration:
    2,000 wake-ups for 3,600 calls in a 500-node storm). What the calls feed (the status,
    written every 2 s, and the holds) can wait that long. A call posted while :attr:`loop`
    is None or closed (before the servers start, once they stop) is dropped; :meth:`flush`
    runs what is queued at once."""

    def __init__(self, handler: Callable[[str, str, str, float], None],
                 delay: float = INBOX_DELAY) -> None:
        self.handler = handler
        self.loop: asyncio.AbstractEventLoop | None = None
        self._queued: list[tuple[str, str, str, float]] = []
        self._lock = threading.Lock()
        self._woken = False
        self._later = Later(self._run, delay)
        #: wake-ups of the loop so far (a batch of calls each)
        self.wakeups = 0

    def post(self, kind: str, who: str, what: str) -> None:
        """Queue one call (from any thread); wake the loop unless a batch is pending."""
        loop = self.loop
        if loop is None:
            return
        with self._lock:
            # the event's own time, not the batch's: the order of a node's events (its
            # kernel fetched, then a DHCP ACK) tells whether it booted
            self._queued.append((kind, who, what, time.time()))
            if self._woken:
                return
            self._woken = True
            self.wakeups += 1
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (stopping)
            loop.call_soon_threadsafe(self._arm)

    def _arm(self) -> None:
        loop = self.loop
        if loop is not None:  # else detached meanwhile: flush() runs what is queued
            self._later.request(loop)

    def flush(self) -> None:
        """Run every call queued so far, now (on the loop's thread)."""
        self._later.now()

    def _run(self) -> None:
        with self._lock:
            calls, self._queued = self._queued, []
            self._woken = False
        for kind, who, what, at in calls:
            self.handler(kind, who, what, at)


@dataclass(frozen=True)
class ServeConfig:
    """Which servers to run and how; None disables one. ``status_file``: JSON counters."""

    dhcp: DhcpConfig | None = None
    tftp: TftpConfig | None = None
    dns: DnsConfig | None = None
    status_file: Path | None = None


class Supervisor:
    """The running servers; :meth:`serve` is the main coroutine."""

    def __init__(self, load: Callable[[], ServeConfig]) -> None:
        self.load = load
        self.cfg = load()
        self.dhcp: DhcpServer | None = None
        self.tftp: TftpServer | None = None
        self.dns: DnsServer | None = None
        self.events: dict[str, dict[str, Any]] = {}
        self._stop: asyncio.Event | None = None
        self.started = time.time()
        self.reloading = False
        self._reload_again = False
        self._reload_task: asyncio.Task[None] | None = None
        #: the last reload's outcome, in the status: ``{"at": time, "ok": bool, "error":
        #: message or None}``, None before the first one (a refused inventory edit is seen
        #: in ``pxe status``, not only in the log)
        self.last_reload: dict[str, Any] | None = None
        #: set as the servers stop (SIGTERM, SIGINT): a reload's worker still running checks
        #: it before each change it makes (a tree, exports) and gives up
        self.stopping = threading.Event()
        #: events and reloads so far, and what the last status write saw (see _write_status)
        self.changes = 0
        self._written: tuple[int, list[dict[str, Any]]] | None = None
        self._written_at = 0.0
        #: events from other threads (an HTTP server's workers), handled on the event loop
        #: while :meth:`serve` runs
        self.inbox = Inbox(self._event)

    def _event(self, kind: str, who: str, what: str, at: float | None = None) -> None:
        """One event of a server: ``kind`` (``ack``, ``sent``, ``http``, ``report``...) by
        client ``who``; ``at``: when (seconds since the epoch; None: now)."""
        self.changes += 1
        e = self.events.setdefault(who, {})
        e[kind] = what
        e["at"] = time.time() if at is None else at

    def status(self) -> dict[str, Any]:
        """The JSON status: pid, times, each server's counters, per-client events, and
        ``internal_errors``: the sum of the servers' internal error counters (bugs; 0 when
        healthy)."""
        servers = [x for x in (self.dhcp, self.tftp, self.dns) if x is not None]
        return {
            "internal_errors": sum(x.stats.internal_errors for x in servers),
            "pid": os.getpid(),
            "started": self.started,
            "updated": time.time(),
            "dhcp": self.dhcp.stats.as_dict() if self.dhcp else None,
            "tftp": self.tftp.stats.as_dict() if self.tftp else None,
            "dns": self.dns.stats.as_dict() if self.dns else None,
            "clients": self.events,
            "reload": self.last_reload,
        }

    def counters(self) -> list[dict[str, Any]]:
        """Every server's counters, to tell whether anything changed since the last write."""
        return [x.stats.as_dict() for x in (self.dhcp, self.tftp, self.dns) if x is not None]

    def _write_status(self, force: bool = False) -> None:
        """Write the status unless nothing changed (no event, no reload, the same counters)
        since the last write, made less than :data:`STATUS_HEARTBEAT` seconds ago; ``force``:
        write anyway (at the end)."""
        if self.cfg.status_file is None:
            return
        seen = (self.changes, self.counters())
        now = time.monotonic()
        if not force and seen == self._written and now - self._written_at < STATUS_HEARTBEAT:
            return
        try:
            # not durable: the next write replaces it within seconds, and after a power cut
            # no server runs to be described; an fsync here would stall the event loop
            write_json(self.cfg.status_file, self.status(), compact=True, durable=False)
        except OSError as e:
            log.warning("cannot write %s: %s", self.cfg.status_file, e)
            return
        self._written, self._written_at = seen, now

    def reload(self) -> None:
        """SIGHUP (on the event loop): start a reload unless one runs; one that arrives
        during a reload runs once more after it (the file may have changed again)."""
        if self.reloading:
            self._reload_again = True
            return
        self.reloading = True
        self._reload_task = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        try:
            while True:
                self._reload_again = False
                try:
                    # the slow part (reading, rendering, packing) off the loop: the old
                    # configuration keeps answering meanwhile
                    new = await _in_daemon_thread(self.load)
                    if self.stopping.is_set():
                        return
                    self.apply(new)
                    self._reloaded(None)
                    log.info("reloaded the configuration (SIGHUP)")
                except Interrupted:  # the loader saw the servers stopping
                    return
                except SidusError as e:
                    self._reloaded(str(e))
                    log.error("reload refused, the previous configuration stays in force: %s",
                              e)
                except Exception as e:  # a bug: logged with its traceback, the old config stays
                    self._reloaded(f"internal error: {e!r}")
                    log.exception("reload failed, the previous configuration stays in force")
                if not self._reload_again:
                    break
        finally:
            self.reloading = False

    def _reloaded(self, error: str | None) -> None:
        self.last_reload = {"at": time.time(), "ok": error is None, "error": error}
        self.changes += 1

    def apply(self, new: ServeConfig) -> None:
        """Swap ``new`` in (on the event loop): reservations, pool, boot policy, TFTP root,
        DNS zone."""
        if self.dhcp and new.dhcp:
            self.dhcp.reload(new.dhcp)
        if self.tftp and new.tftp:
            self.tftp.set_root(new.tftp.root)
        if self.dns and new.dns:
            self.dns.set_zone(new.dns.zone)
        self.cfg = new
        self.changes += 1

    async def serve(self) -> None:
        """Start the configured DHCP, TFTP and DNS servers and serve until SIGTERM or SIGINT
        (SIGHUP: :meth:`reload`), writing the status every 2 s if anything changed (else every
        30 s); at the end close the servers and write it a last time. A start-up error (a
        :class:`SidusError`: port in use, store busy) is raised once started servers are closed."""
        loop = asyncio.get_running_loop()
        self.inbox.loop = loop
        self._stop = asyncio.Event()
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        before = {sig: signal.getsignal(sig) for sig in handled}
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            if self.cfg.dhcp:
                self.dhcp = DhcpServer(self.cfg.dhcp, on_event=self._event)
                await self.dhcp.start()
            if self.cfg.tftp:
                self.tftp = TftpServer(self.cfg.tftp, on_event=self._event)
                await self.tftp.start()
            if self.cfg.dns:
                self.dns = DnsServer(self.cfg.dns)
                await self.dns.start()
            log.info("ready: %s (pid %d)", ", ".join(
                n for n, s in (("DHCP", self.dhcp), ("TFTP", self.tftp), ("DNS", self.dns)) if s),
                os.getpid())
            while not self._stop.is_set():
                self._write_status()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), STATUS_INTERVAL)
            log.info("stopping on signal")
        finally:
            self.stopping.set()
            if self._reload_task is not None and not self._reload_task.done():
                # its worker gives up at its next change, or ends with the process
                self._reload_task.cancel()
            for s in (self.dns, self.tftp, self.dhcp):
                if s is not None:
                    s.close()
            self.inbox.loop = None  # what the HTTP threads post from now on is dropped
            self.inbox.flush()  # what they posted before is in the last status
            self._write_status(force=True)
            for sig in handled:
                loop.remove_signal_handler(sig)
                # asyncio leaves the default action (SIGTERM: die at once, exit 143); the
                # handler before turns a second SIGTERM during the clean-up into Interrupted
                handler = before[sig]
                if handler is not None:
                    signal.signal(sig, handler)


async def _in_daemon_thread(fn: Callable[[], ServeConfig]) -> ServeConfig:
    """``fn()`` run in a daemon thread of its own, awaited. Unlike ``asyncio.to_thread``,
    whose executor the process joins as it exits, a stop does not wait for it (a reload
    packing a squashfs takes minutes on a big image)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[ServeConfig] = loop.create_future()

    def settle(result: ServeConfig | None, error: BaseException | None) -> None:
        if done.done():  # cancelled: the servers stopped
            return
        if error is not None:
            done.set_exception(error)
        else:
            assert result is not None
            done.set_result(result)

    def work() -> None:
        result: ServeConfig | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as e:  # handed to the awaiting coroutine
            error = e
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody awaits it
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name="sidusctl-reload", daemon=True).start()
    return await done


def run(load: Callable[[], ServeConfig]) -> None:
    """Serve until SIGTERM/SIGINT. Errors at start-up (bad configuration, port in use,
    missing interface) raise :class:`SidusError` before anything is left running."""
    with background():
        sup = Supervisor(load)
        asyncio.run(sup.serve())


def read_status(state_dir: Path, command: str) -> tuple[Path, dict[str, Any]]:
    """The status a running (or the last) server wrote: ``(path, decoded JSON object)`` from
    ``<state_dir>/serve/status.json``. StateError naming ``command`` (the CLI that writes it)
    if there is none or it is not a JSON object."""
    path = state_dir / "serve" / "status.json"
    try:
        st = read_json(path)
    except FileNotFoundError:
        raise StateError(f"{path}: no status (has 'sidusctl {command}' been started with this "
                         "state directory?)") from None
    if not isinstance(st, dict):
        raise StateError(f"{path}: not a status object")
    check_status(path, st)
    return path, st


#: the highest process id plus one Linux can give: PID_MAX_LIMIT, the ceiling of
#: /proc/sys/kernel/pid_max (2**22 on 64-bit kernels)
PID_LIMIT = 2**22
#: a time in a status file is a Unix time from 0 to this (the year 2286): the servers write
#: ``time.time()`` values
TIME_LIMIT = 1e10


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def is_time(v: object) -> bool:
    """``v`` is a Unix time as the servers write them: a number (not a bool) from 0 to
    :data:`TIME_LIMIT` (so neither NaN, infinite nor too large for a float)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= TIME_LIMIT


def check_status(path: Path, st: dict[str, Any]) -> None:
    """Check that ``st`` (decoded from ``path``) has the shape :meth:`Supervisor.status`
    writes, as far as readers use it: ``pid`` null or a process id (1 to :data:`PID_LIMIT` -
    1), ``internal_errors`` an integer; ``started``, ``updated`` times (:func:`is_time`);
    ``dhcp``, ``tftp``, ``dns``, ``http`` null or objects of numbers; ``clients`` an object of objects; ``reload`` null or the last reload's outcome
    (:attr:`Supervisor.last_reload`). Keys may be missing. :class:`StateError` naming
    ``path`` and the first bad key otherwise (a damaged file: the server rewrites it)."""

    def bad(key: str, value: object, expected: str) -> StateError:
        return damaged(path, key, value, expected)

    for key in ("pid", "internal_errors"):
        if key in st and st[key] is not None and (
                not isinstance(st[key], int) or isinstance(st[key], bool)):
            raise bad(key, st[key], "an integer")
    pid = st.get("pid")
    if pid is not None and not 1 <= pid < PID_LIMIT:
        raise bad("pid", pid, f"null or a process id (1 to {PID_LIMIT - 1})")
    for key in ("started", "updated"):
        if key in st and not is_time(st[key]):
            raise bad(key, st[key], f"a Unix time (a number from 0 to {TIME_LIMIT:.0f})")
    for key in ("dhcp", "tftp", "dns", "http"):
        counters = st.get(key)
        if counters is None:
            continue
        if not isinstance(counters, dict):
            raise bad(key, counters, "null or an object of counters")
        for k, v in counters.items():
            if not _is_number(v):
                raise bad(f"{key}.{k}", v, "a number")
    reload = st.get("reload")
    if reload is not None and not (
            isinstance(reload, dict) and is_time(reload.get("at"))
            and isinstance(reload.get("ok"), bool)
            and (reload.get("error") is None or isinstance(reload.get("error"), str))):
        raise bad("reload", reload, "null or an object: at (a Unix time), ok (a boolean), "
                                    "error (a string or null)")
    clients = st.get("clients", {})
    if not isinstance(clients, dict):
        raise bad("clients", clients, "an object of clients")
    for who, ev in clients.items():
        if not isinstance(ev, dict):
            raise bad(f"clients.{who}", ev, "an object of events")
