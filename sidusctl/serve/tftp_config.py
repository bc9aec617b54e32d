"""The TFTP server's settings (:class:`TftpConfig`), counters (:class:`TftpStats`) and
retransmission schedule (:func:`retransmit_wait`), apart from the server itself
(:mod:`sidusctl.serve.tftp`), which re-exports them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from sidusctl.serve import tftp_codec as tc

#: seconds: the longest wait between two retransmissions of a block (or of its OACK)
MAX_BACKOFF = 8.0


def retransmit_wait(timeout: float, tries: int) -> float:
    """Seconds without an ACK before retransmission number ``tries + 1`` (``tries`` >= 0:
    retransmissions already made since the last progress): ``timeout`` (seconds) doubled for
    each, at most :data:`MAX_BACKOFF`, but never below ``timeout``, which a client may have
    set higher (RFC 2349). The adaptive timeout of RFC 1123 section 4.2.3.2, as TCP's
    exponential backoff (RFC 6298 section 5.5). Pure; raises nothing."""
    return min(timeout * (1 << min(tries, 16)), max(timeout, MAX_BACKOFF))


@dataclass(frozen=True)
class TftpConfig:
    """``root``: the directory served (read-only). ``interface``: bind to this device only
    (SO_BINDTODEVICE); None only for loopback tests and benchmarks. ``address``/``port``: where
    requests are received. ``max_blksize`` (bytes), ``max_window`` (blocks), ``timeout``
    (seconds, default retransmission interval), ``retries`` (retransmissions before giving
    up), ``max_transfers`` (concurrent; more get error 0 "busy") and ``max_per_client``
    (concurrent from one client address, 0: no limit; more get error 0 "busy" too): both
    refusals are counted in ``refused`` and logged."""

    root: Path
    interface: str | None = None
    address: str = "0.0.0.0"
    port: int = 69
    max_blksize: int = tc.BLKSIZE_MAX
    max_window: int = 64
    timeout: float = 1.0
    retries: int = 5
    max_transfers: int = 2000
    max_per_client: int = 0


@dataclass
class TftpStats:
    """Counters since start: requests, ``completed``/``failed``/``aborted`` transfers (aborted:
    the client sent an ERROR, e.g. after a tsize probe, or asked for another file from the
    transfer's port), ``malformed`` datagrams dropped, ``access_denied`` (error 2),
    ``not_found`` (error 1), ``wrq_refused``, ``options_refused``, ``retransmits``,
    ``repeated`` (an RRQ sent again by the client of a running transfer, served by that
    transfer), ``bytes_sent`` (payload), ``active`` transfers, ``internal_errors`` (bugs:
    exceptions other than a codec decode error, logged with a traceback; 0 in a healthy
    server)."""

    requests: int = 0
    completed: int = 0
    failed: int = 0
    aborted: int = 0
    malformed: int = 0
    access_denied: int = 0
    not_found: int = 0
    wrq_refused: int = 0
    refused: int = 0
    options_refused: int = 0
    retransmits: int = 0
    repeated: int = 0
    bytes_sent: int = 0
    active: int = 0
    internal_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        """Every counter by its field name."""
        return asdict(self)
