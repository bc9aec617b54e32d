"""The DHCP lease store: one SQLite database (WAL journal), one row per bound address.

Why SQLite: every lease is committed before the ACK leaves (one transaction per change), so a
server killed with SIGKILL loses nothing (the WAL is in the kernel's page cache the moment the
commit returns); ``durable=True`` adds an fsync per commit for power loss too. The schema makes
double allocation impossible, not just unlikely: ``ip`` is the primary key and ``mac`` is unique,
so one address is never bound to two machines and one machine holds at most one address.

One server owns a store at a time (an ``flock`` on ``<db>.lock``, :class:`BusyError` otherwise);
readers such as ``sidusctl serve leases`` open it read-only with :func:`read_leases`.
"""

from __future__ import annotations

import math
import sqlite3
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from sidusctl.core.errors import StateError
from sidusctl.core.state import FileLock

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    ip       TEXT PRIMARY KEY,           -- dotted quad
    mac      TEXT UNIQUE,                -- lowercase aa:bb:..; NULL for a declined address
    hostname TEXT,
    expires  REAL NOT NULL,              -- Unix time, seconds
    state    TEXT NOT NULL CHECK (state IN ('bound', 'declined')),
    updated  REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Lease:
    """One row: ``ip``, ``mac`` (None for a declined address), ``hostname``, ``expires``
    (Unix time, seconds), ``state`` (``bound`` or ``declined``)."""

    ip: IPv4Address
    mac: str | None
    hostname: str | None
    expires: float
    state: str

    def active(self, now: float | None = None) -> bool:
        """True if the lease has not expired at ``now`` (Unix time, seconds; default: the current
        time)."""
        return self.expires > (time.time() if now is None else now)

    def as_dict(self) -> dict[str, object]:
        """The row for JSON: ``ip`` (dotted quad), ``mac``, ``hostname``, ``expires`` (Unix time,
        seconds), ``state``."""
        return {"ip": str(self.ip), "mac": self.mac, "hostname": self.hostname,
                "expires": self.expires, "state": self.state}


class LeaseWriteError(StateError):
    """A change could not be committed to the lease store (its file system is full or
    read-only, or the disk failed): nothing of it was applied, on disk or in memory."""


#: SQLite's primary result codes for a store that cannot be written: SQLITE_READONLY,
#: SQLITE_IOERR, SQLITE_CANTOPEN, SQLITE_FULL (https://sqlite.org/rescode.html)
_NO_WRITE = {8: "read-only", 10: "I/O error", 13: "full", 14: "cannot be opened"}


def _no_write(e: sqlite3.Error) -> str | None:
    """What ``e`` says of a store that cannot be written ("full", "read-only"...), or None
    when it is another error."""
    code = getattr(e, "sqlite_errorcode", None)
    return _NO_WRITE.get(code & 0xFF) if isinstance(code, int) else None


def _row(r: tuple[str, str | None, str | None, float, str]) -> Lease:
    return Lease(IPv4Address(r[0]), r[1], r[2], float(r[3]), r[4])


class LeaseStore:
    """Open (creating) the store at ``path`` and lock it for this process. Lookups are served
    from memory; every change is one committed transaction first, then applied in memory.

    :class:`BusyError` if another server holds the store; :class:`StateError` if the file is
    not a lease database or cannot be written (a full or read-only file system).
    A change that cannot be committed raises :class:`LeaseWriteError` and changes nothing."""

    def __init__(self, path: Path, *, durable: bool = False) -> None:
        self.path = path
        self._lock = FileLock(path.with_name(path.name + ".lock"), f"lease store {path}")
        self._lock.acquire()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
            rows = self._db.execute(
                "SELECT ip, mac, hostname, expires, state FROM leases").fetchall()
        except (sqlite3.DatabaseError, OSError) as e:
            self._lock.release()
            why = _no_write(e) if isinstance(e, sqlite3.Error) else "cannot be made"
            if why is not None:
                raise StateError(f"{path}: cannot write the lease database ({why}: {e})") from e
            raise StateError(f"{path}: not a usable lease database ({e})") from e
        self.by_ip: dict[IPv4Address, Lease] = {}
        self.by_mac: dict[str, Lease] = {}
        for r in rows:
            lease = _row(r)
            self.by_ip[lease.ip] = lease
            if lease.mac:
                self.by_mac[lease.mac] = lease

    def close(self) -> None:
        """Close the database and release the lock, so that another server may open the store;
        idempotent."""
        self._db.close()
        self._lock.release()

    def _commit(self, *statements: tuple[str, tuple[object, ...]]) -> None:
        """Run ``statements`` as one transaction; :class:`LeaseWriteError` naming the file if
        it cannot be committed because the file cannot be written (rolled back: the store is
        as it was); other :class:`sqlite3.Error` as raised."""
        try:
            with self._db:  # one transaction, rolled back on an exception
                self._db.execute("BEGIN IMMEDIATE")
                for sql, args in statements:
                    self._db.execute(sql, args)
        except sqlite3.Error as e:
            why = _no_write(e)
            if why is None:
                raise  # not the store's disk: a bug, counted as one by the server
            raise LeaseWriteError(f"{self.path}: cannot commit a lease change ({why}: {e})") from e

    def holder(self, ip: IPv4Address, now: float) -> str | None:
        """The MAC that holds ``ip`` now, ``"declined"`` for a declined address, or None."""
        lease = self.by_ip.get(ip)
        if lease is None or not lease.active(now):
            return None
        return lease.mac or "declined"

    def bind(self, mac: str, ip: IPv4Address, hostname: str | None, expires: float) -> Lease:
        """Bind ``ip`` to ``mac`` until ``expires``; drops the MAC's other lease. Committed
        before it returns. :class:`StateError` if another machine holds ``ip`` and its lease
        has not expired (the caller NAKs); :class:`LeaseWriteError` if the change cannot be
        committed (nothing changed: the caller must not ACK)."""
        now = time.time()
        other = self.holder(ip, now)
        if other is not None and other != mac:
            raise StateError(f"{ip} is held by {other} until "
                             f"{time.strftime('%H:%M:%S', time.localtime(self.by_ip[ip].expires))}")
        lease = Lease(ip, mac, hostname, expires, "bound")
        self._commit(("DELETE FROM leases WHERE mac = ? OR ip = ?", (mac, str(ip))),
                     ("INSERT INTO leases (ip, mac, hostname, expires, state, updated) "
                      "VALUES (?, ?, ?, ?, 'bound', ?)", (str(ip), mac, hostname, expires, now)))
        old = self.by_mac.pop(mac, None)
        if old is not None:
            self.by_ip.pop(old.ip, None)
        stale = self.by_ip.pop(ip, None)
        if stale is not None and stale.mac:
            self.by_mac.pop(stale.mac, None)
        self.by_ip[ip] = lease
        self.by_mac[mac] = lease
        return lease

    def release(self, mac: str, ip: IPv4Address) -> bool:
        """End ``mac``'s lease on ``ip`` (DHCPRELEASE); False if it held none.
        :class:`LeaseWriteError` if the change cannot be committed (the lease stays)."""
        lease = self.by_mac.get(mac)
        if lease is None or lease.ip != ip:
            return False
        self._commit(("DELETE FROM leases WHERE mac = ?", (mac,)))
        del self.by_mac[mac]
        self.by_ip.pop(ip, None)
        return True

    def decline(self, ip: IPv4Address, until: float) -> None:
        """Mark ``ip`` unusable until ``until`` (DHCPDECLINE: someone else answers ARP for it).
        :class:`LeaseWriteError` if the change cannot be committed (nothing changed)."""
        self._commit(("DELETE FROM leases WHERE ip = ?", (str(ip),)),
                     ("INSERT INTO leases (ip, mac, hostname, expires, state, updated) "
                      "VALUES (?, NULL, NULL, ?, 'declined', ?)", (str(ip), until, time.time())))
        old = self.by_ip.pop(ip, None)
        if old is not None and old.mac:
            self.by_mac.pop(old.mac, None)
        self.by_ip[ip] = Lease(ip, None, None, until, "declined")


def read_leases(path: Path) -> list[Lease]:
    """All rows of the store at ``path``, by address, read-only (works while a server runs).
    :class:`StateError` if the file is missing or not a lease database, or naming the row
    if one does not hold a lease (an address that is no IPv4 address, an expiry that is no
    finite number, a MAC, host name or state that is no string)."""
    if not path.exists():
        raise StateError(f"{path}: no lease database here (has the DHCP server run?)")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT ip, mac, hostname, expires, state FROM leases").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise StateError(f"{path}: not a usable lease database ({e})") from e
    out = []
    for r in rows:
        try:
            lease = _row(r)
        except (ValueError, TypeError, OverflowError) as e:
            raise StateError(f"{path}: bad lease row {r!r} ({e})") from e
        if (not math.isfinite(lease.expires) or not isinstance(lease.state, str)
                or not all(v is None or isinstance(v, str) for v in (lease.mac, lease.hostname))):
            raise StateError(f"{path}: bad lease row {r!r} (expected ip, mac, hostname, "
                             "expires: a finite Unix time, state)")
        out.append(lease)
    return sorted(out, key=lambda lease: int(lease.ip))
