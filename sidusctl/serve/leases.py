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


def _row(r: tuple[str, str | None, str | None, float, str]) -> Lease:
    return Lease(IPv4Address(r[0]), r[1], r[2], float(r[3]), r[4])


class LeaseStore:
    """Open (creating) the store at ``path`` and lock it for this process. Lookups are served
    from memory; every change is one committed transaction first, then applied in memory.

    :class:`BusyError` if another server holds the store; :class:`StateError` if the file is
    not a lease database."""

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
        except sqlite3.DatabaseError as e:
            self._lock.release()
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

    def holder(self, ip: IPv4Address, now: float) -> str | None:
        """The MAC that holds ``ip`` now, ``"declined"`` for a declined address, or None."""
        lease = self.by_ip.get(ip)
        if lease is None or not lease.active(now):
            return None
        return lease.mac or "declined"

    def bind(self, mac: str, ip: IPv4Address, hostname: str | None, expires: float) -> Lease:
        """Bind ``ip`` to ``mac`` until ``expires``; drops the MAC's other lease. Committed
        before it returns. :class:`StateError` if another machine holds ``ip`` and its lease
        has not expired (the caller NAKs)."""
        now = time.time()
        other = self.holder(ip, now)
        if other is not None and other != mac:
            raise StateError(f"{ip} is held by {other} until "
                             f"{time.strftime('%H:%M:%S', time.localtime(self.by_ip[ip].expires))}")
        lease = Lease(ip, mac, hostname, expires, "bound")
        with self._db:  # one transaction
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM leases WHERE mac = ? OR ip = ?", (mac, str(ip)))
            self._db.execute(
                "INSERT INTO leases (ip, mac, hostname, expires, state, updated) "
                "VALUES (?, ?, ?, ?, 'bound', ?)", (str(ip), mac, hostname, expires, now))
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
        """End ``mac``'s lease on ``ip`` (DHCPRELEASE); False if it held none."""
        lease = self.by_mac.get(mac)
        if lease is None or lease.ip != ip:
            return False
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM leases WHERE mac = ?", (mac,))
        del self.by_mac[mac]
        self.by_ip.pop(ip, None)
        return True

    def decline(self, ip: IPv4Address, until: float) -> None:
        """Mark ``ip`` unusable until ``until`` (DHCPDECLINE: someone else answers ARP for it)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM leases WHERE ip = ?", (str(ip),))
            self._db.execute(
                "INSERT INTO leases (ip, mac, hostname, expires, state, updated) "
                "VALUES (?, NULL, NULL, ?, 'declined', ?)", (str(ip), until, time.time()))
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
