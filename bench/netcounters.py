"""The kernel's TCP and neighbour counters around one storm, for bench/bootstorm.py.

A storm's time on two shared cores can hide where it was lost: a segment retransmitted after
a timeout, a SYN dropped by a full accept queue, packets dropped while an ARP entry was
unresolved. These are counted by the kernel per network namespace (``/proc/net/snmp`` and
``/proc/net/netstat``, the counters of nstat(8)) and, for the neighbour table and the CPUs'
input backlogs, machine-wide (``/proc/net/stat/arp_cache`` and ``/proc/net/softnet_stat``,
hexadecimal, one line per CPU). :func:`snapshot` and :func:`machine` read them, :func:`delta`
keeps what a storm changed of the ones worth reading.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.netns_util import nsexec

# (file's prefix, counter): the TCP counters that say where a storm waited (Linux
# include/uapi/linux/snmp.h; MIB-II names from RFC 4022 for the Tcp: line)
TCP = (("Tcp", "RetransSegs"), ("Tcp", "InSegs"), ("Tcp", "OutSegs"),
       ("TcpExt", "TCPTimeouts"), ("TcpExt", "TCPSynRetrans"), ("TcpExt", "TCPLossProbes"),
       ("TcpExt", "ListenOverflows"), ("TcpExt", "ListenDrops"),
       ("TcpExt", "TCPToZeroWindowAdv"), ("TcpExt", "TCPWantZeroWindowAdv"),
       ("TcpExt", "TCPFromZeroWindowAdv"), ("TcpExt", "TCPBacklogDrop"),
       ("TcpExt", "TCPRcvQDrop"), ("TcpExt", "TCPOFOQueue"), ("TcpExt", "DelayedACKs"),
       ("TcpExt", "TCPFastRetrans"), ("TcpExt", "TCPSlowStartRetrans"),
       ("TcpExt", "TCPSACKReorder"), ("TcpExt", "TCPDSACKRecv"), ("TcpExt", "TCPDSACKUndo"),
       ("TcpExt", "TCPSpuriousRtxHostQueues"), ("TcpExt", "TCPSpuriousRTOs"))
# the neighbour table's columns worth a look (the kernel's struct neigh_statistics)
ARP = ("res_failed", "unresolved_discards", "forced_gc_runs", "table_fulls")
# /proc/net/softnet_stat's second and third columns (net/core/net-procfs.c): packets dropped
# because a CPU's input backlog was full (net.core.netdev_max_backlog), and receive passes
# that ran out of budget with work left
SOFTNET = ("softnet_dropped", "softnet_squeezed")


def _tables(text: str) -> dict[str, int]:
    """``{"Prefix.Name": value}`` of the paired header and value lines of /proc/net/snmp or
    /proc/net/netstat."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        prefix, _, names = head.partition(":")
        for k, v in zip(names.split(), vals.partition(":")[2].split(), strict=False):
            out[f"{prefix}.{k}"] = int(v)
    return out


def machine() -> dict[str, int]:
    """The neighbour table's statistics (:data:`ARP`) and the input backlogs' drops
    (:data:`SOFTNET`), summed over the CPUs: ``{column: count}`` (machine-wide: both are
    shared by every namespace; proc(5)). :class:`OSError` if /proc is not mounted."""
    lines = Path("/proc/net/stat/arp_cache").read_text().split("\n")
    names = lines[0].split()
    sums = dict.fromkeys(names, 0)
    for line in lines[1:]:
        for k, v in zip(names, line.split(), strict=False):
            sums[k] += int(v, 16)
    out = {k: sums.get(k, 0) for k in ARP}
    for k in SOFTNET:
        out[k] = 0
    for line in Path("/proc/net/softnet_stat").read_text().splitlines():
        f = line.split()
        out["softnet_dropped"] += int(f[1], 16)
        out["softnet_squeezed"] += int(f[2], 16)
    return out


def snapshot(ns: str) -> dict[str, int]:
    """Every TCP and IP counter of namespace ``ns`` (its /proc/net/snmp and /proc/net/netstat,
    proc(5)): ``{"Prefix.Name": count}``, e.g. ``"TcpExt.ListenOverflows"``. Raises
    ``subprocess.CalledProcessError`` when ``ns`` does not exist."""
    text = subprocess.run(nsexec(ns, "cat", "/proc/net/snmp", "/proc/net/netstat"),
                          capture_output=True, text=True, check=True).stdout
    return _tables(text)


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What changed between two :func:`snapshot` (or :func:`machine`) readings, of the
    counters in :data:`TCP`, :data:`ARP` and :data:`SOFTNET`: ``{"Name": increase}``."""
    keys = [f"{p}.{n}" for p, n in TCP] + list(ARP) + list(SOFTNET)
    return {k.rpartition(".")[2]: after[k] - before[k]
            for k in keys if k in before and k in after}


def start(server_ns: str, nodes_ns: str) -> Callable[[], dict[str, dict[str, int]]]:
    """Read the counters of both sides now; the function returned reads them again and
    gives ``{"server": delta, "nodes": delta, "machine": delta}`` (:func:`delta`)."""
    b = snapshot(server_ns), snapshot(nodes_ns), machine()

    def stop() -> dict[str, dict[str, int]]:
        a = snapshot(server_ns), snapshot(nodes_ns), machine()
        return {"server": delta(b[0], a[0]), "nodes": delta(b[1], a[1]),
                "machine": delta(b[2], a[2])}
    return stop
