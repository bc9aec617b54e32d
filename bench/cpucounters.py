"""CPU counters around one storm, for bench/bootstorm.py: what the processes of a network
namespace used (``/proc/PID/stat`` fields 14-15, utime and stime in clock ticks; ``VmHWM`` of
``/proc/PID/status``, proc(5)) and what the machine's CPUs spent idle or stolen by the
hypervisor (the ``cpu`` line of ``/proc/stat``)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.netns_util import ip


def ns_usage(ns: str) -> tuple[float, float, float]:
    """``(user, kernel, rss)``: CPU seconds in user space and in the kernel, and the summed
    peak RSS in MiB, of the processes in network namespace ``ns`` (``ip netns pids``). A
    process that ends while it is read is left out; nothing is raised for it."""
    tick = os.sysconf("SC_CLK_TCK")
    user = kernel = rss = 0.0
    for pid in ip("netns", "pids", ns, check=False).stdout.split():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(stat[11]) / tick
            kernel += int(stat[12]) / tick
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    rss += int(line.split()[1]) / 1024
        except (OSError, IndexError, ValueError):
            continue
    return user, kernel, rss


def machine_cpu() -> tuple[float, float]:
    """``(idle, steal)``: seconds the machine's CPUs spent idle and stolen by the hypervisor
    so far (the ``cpu`` line of /proc/stat, proc(5)): a storm's share of steal says how much
    of its time the machine lost to other guests."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(f[4]) / tick, (int(f[8]) if len(f) > 8 else 0) / tick
