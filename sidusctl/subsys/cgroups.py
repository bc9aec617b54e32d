"""Control-group settings of a vnode: what its limits become as cgroup files, for the v1
hierarchy (``memory``, ``blkio``, ``cpu``, ``cpuset`` controllers: kernel
Documentation/admin-guide/cgroup-v1/) and the v2 one (``memory.high``/``memory.max``/
``memory.swap.max``, ``io.max``, ``cpu.max``, ``cpuset.cpus``: Documentation/admin-guide/
cgroup-v2.rst). LXC applies them at start (``lxc.cgroup.KEY`` / ``lxc.cgroup2.KEY``) and
``lxc-cgroup`` changes them on a running container.

A setting is ``(version, file, value)`` with version ``1`` or ``2``. Memory in MiB, IO in
bytes per second; ``"max"`` cancels a limit (as in Distem's ``vmem_update``).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from sidusctl.core.errors import ConfigError, PrerequisiteError

V1_ROOT = Path("/sys/fs/cgroup")
V2_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))

MiB = 1024 * 1024
Setting = tuple[int, str, str]


def v2_root() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (hybrid hosts: /sys/fs/cgroup/unified)."""
    for p in V2_ROOTS:
        if (p / "cgroup.controllers").exists():
            return p
    return None


def v1_has(controller: str) -> bool:
    """Whether cgroup v1's ``controller`` hierarchy is mounted under ``/sys/fs/cgroup``."""
    return (V1_ROOT / controller / "cgroup.procs").exists()


def v2_has(controller: str) -> bool:
    """Whether the cgroup v2 tree (:func:`v2_root`) offers ``controller`` (listed in its
    ``cgroup.controllers``, kernel Documentation/admin-guide/cgroup-v2.rst); False without
    a v2 tree."""
    root = v2_root()
    if root is None:
        return False
    return controller in (root / "cgroup.controllers").read_text().split()


def require(version: int, controller: str, what: str) -> None:
    """:class:`PrerequisiteError` unless ``controller`` is usable on hierarchy ``version``."""
    if version == 1 and not v1_has(controller):
        raise PrerequisiteError(
            f"{what} needs the cgroup v1 '{controller}' controller, which is not mounted on "
            f"this host (no {V1_ROOT / controller})", hint="use hierarchy v2")
    if version == 2 and not v2_has(controller):
        root = v2_root()
        raise PrerequisiteError(
            f"{what} needs the cgroup v2 '{controller}' controller, which is not enabled on "
            f"this host ({root or 'no cgroup2 mount'}: controllers "
            f"{(root / 'cgroup.controllers').read_text().split() if root else []})",
            hint=f"boot with cgroup_no_v1={controller} (see Distem's note), or use hierarchy v1")


def _mib(v: int | str | None) -> str | None:
    if v is None:
        return None
    if v == "max":
        return "max"
    return str(int(v) * MiB)


@dataclass(frozen=True)
class MemLimits:
    """Memory of a vnode. v1: ``mem`` (hard, OOM kill) and ``swap`` MiB. v2: ``soft`` (memory.high,
    throttled, never killed), ``hard`` (memory.max) and ``swap`` MiB. ``"max"`` = unlimited."""

    hierarchy: int = 1
    mem: int | str | None = None
    swap: int | str | None = None
    soft: int | str | None = None
    hard: int | str | None = None

    def settings(self) -> list[Setting]:
        """The ``(version, file, value)`` settings of these limits, values in bytes (``-1`` or
        ``max``: unlimited): v1 memory.limit_in_bytes and memory.memsw.limit_in_bytes (mem + swap),
        v2 memory.high, memory.max and memory.swap.max. :class:`ConfigError` for a key of the other
        hierarchy, or for a value that is not MiB (an integer, 0 or more) or ``max``."""
        for key in ("mem", "swap", "soft", "hard"):
            v = getattr(self, key)
            if v is None or v == "max":
                continue
            if isinstance(v, bool) or not ((isinstance(v, int) and v >= 0)
                                           or (isinstance(v, str) and v.isdigit())):
                raise ConfigError("vnode", key, f"found {v!r}", expected="MiB (0 or more) or 'max'")
        if self.hierarchy not in (1, 2):
            raise ConfigError("vnode", "hierarchy", f"found {self.hierarchy!r}", expected="1 or 2")
        out: list[Setting] = []
        if self.hierarchy == 1:
            if self.soft is not None or self.hard is not None:
                raise ConfigError("vnode", "mem", "soft/hard limits need hierarchy v2",
                                  expected="mem and swap with hierarchy v1")
            mem = _mib(self.mem)
            if mem is not None:
                out.append((1, "memory.limit_in_bytes", "-1" if mem == "max" else mem))
            if self.swap is not None:
                if self.mem in (None, "max") and self.swap != "max":
                    raise ConfigError("vnode", "swap", f"a swap limit of {self.swap} MiB without "
                                      "a memory limit: v1 limits memory + swap together "
                                      "(memory.memsw.limit_in_bytes)",
                                      expected="mem with swap, or hierarchy v2")
                if self.swap == "max":
                    out.append((1, "memory.memsw.limit_in_bytes", "-1"))
                else:
                    assert self.mem is not None
                    out.append((1, "memory.memsw.limit_in_bytes",
                                str((int(self.mem) + int(self.swap)) * MiB)))
        else:
            if self.mem is not None:
                raise ConfigError("vnode", "mem", "'mem' is the v1 key",
                                  expected="soft/hard (soft_limit/hard_limit) with hierarchy v2")
            for key, v in (("memory.high", self.soft), ("memory.max", self.hard),
                           ("memory.swap.max", self.swap)):
                val = _mib(v)
                if val is not None:
                    out.append((2, key, val))
        return out

    def check_host(self) -> None:
        """:class:`PrerequisiteError` unless this host can apply the limits (the memory controller
        on their hierarchy; for a v1 swap limit, swap accounting); :class:`ConfigError` as
        :meth:`settings`. Nothing is checked when there are no limits."""
        if not self.settings():
            return
        require(self.hierarchy, "memory", "a memory limit")
        if self.hierarchy == 1 and self.swap is not None and not (
                V1_ROOT / "memory" / "memory.memsw.limit_in_bytes").exists():
            raise PrerequisiteError("a swap limit needs swap accounting (boot with swapaccount=1)")


@dataclass(frozen=True)
class IoLimit:
    """Throttle of one block device: ``device`` path, ``read_bps``/``write_bps`` in bytes per
    second (None: unchanged; ``"max"``: unlimited). Whole devices only (not partitions)."""

    device: str
    read_bps: int | str | None = None
    write_bps: int | str | None = None

    def majmin(self) -> str:
        """The device's ``MAJOR:MINOR`` numbers, as cgroup files name it. :class:`ConfigError` if
        ``device`` cannot be stat'ed or is not a block device."""
        try:
            st = os.stat(self.device)
        except OSError as e:
            raise ConfigError("vnode", "io", f"cannot stat device {self.device}: {e.strerror}",
                              expected="a block device path such as /dev/sda or /dev/loop3") from e
        if not stat.S_ISBLK(st.st_mode):
            raise ConfigError("vnode", "io", f"{self.device} is not a block device")
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def io_settings(limits: list[IoLimit], hierarchy: int) -> list[Setting]:
    """v1: blkio.throttle.{read,write}_bps_device lines (0 = unlimited); v2: io.max lines.
    :class:`ConfigError` for a rate that is not bytes per second or ``max``, or a device that
    is no block device (:meth:`IoLimit.majmin`)."""
    out: list[Setting] = []
    for lim in limits:
        for key, v in (("read_bps", lim.read_bps), ("write_bps", lim.write_bps)):
            if v is not None and v != "max" and (
                    isinstance(v, bool) or not ((isinstance(v, int) and v >= 0)
                                                or (isinstance(v, str) and v.isdigit()))):
                raise ConfigError("vnode", f"io.{key}", f"found {v!r}",
                                  expected="bytes per second (0 or more) or 'max'")
        mm = lim.majmin()
        if hierarchy == 1:
            for key, v in (("blkio.throttle.read_bps_device", lim.read_bps),
                           ("blkio.throttle.write_bps_device", lim.write_bps)):
                if v is not None:
                    out.append((1, key, f"{mm} {0 if v == 'max' else int(v)}"))
        else:
            parts = [f"{k}={v}" for k, v in (("rbps", lim.read_bps), ("wbps", lim.write_bps))
                     if v is not None]
            if parts:
                out.append((2, "io.max", f"{mm} {' '.join(parts)}"))
    return out


def cpu_settings(cpus: float | None, cpuset: str | None, hierarchy: int = 1) -> list[Setting]:
    """``cpus``: CPU time as a number of CPUs (CFS bandwidth: quota = cpus x 100 ms per 100 ms);
    ``cpuset``: the CPUs the vnode may run on (``0-1,3``)."""
    out: list[Setting] = []
    if cpus is not None:
        if hierarchy == 1:
            out.append((1, "cpu.cfs_period_us", "100000"))
            out.append((1, "cpu.cfs_quota_us", "-1" if cpus <= 0 else str(int(cpus * 100000))))
        else:
            out.append((2, "cpu.max", "max 100000" if cpus <= 0 else f"{int(cpus * 100000)} 100000"))
    if cpuset is not None:
        out.append((hierarchy, "cpuset.cpus", cpuset))
    return out


def host_cpus() -> set[int]:
    """CPUs this host may schedule on."""
    return set(os.sched_getaffinity(0))


def parse_cpuset(text: str) -> set[int]:
    """``0-2,5`` -> {0, 1, 2, 5}; ConfigError on anything else, a reversed range such as
    ``3-1`` included."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            lo, hi = int(a), int(b or a)
            if hi < lo:
                raise ConfigError("vnode", "cpuset", f"invalid cpuset {text!r}: range "
                                  f"{part.strip()!r} is reversed", expected=f"{hi}-{lo}")
            out.update(range(lo, hi + 1))
    except ValueError as e:
        raise ConfigError("vnode", "cpuset", f"invalid cpuset {text!r}",
                          expected="a list such as 0-1,3") from e
    return out
