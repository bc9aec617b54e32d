"""Placement of vnodes on pnodes: which physical node runs which virtual node.

Distem places vnodes on the pnodes of a reservation by their declared resources; DETER packs
N virtual nodes per physical node. Both are here, as a pure function of the inputs (the same
platform and the same measured capacities always give the same plan):

- a vnode that names its ``host`` goes there (and still counts against its capacity);
- the others, in file order, go to the first pnode that fits (``pack``: fill pn1, then pn2),
  or to the pnode with the fewest vnodes so far, ties to the first (``spread``);
- "fits" means: after adding the vnode, the declared cpus on the pnode stay at most its cores,
  the declared memory at most its memory less a reserve for the pnode itself, and the count
  at most ``max_per_pnode`` when set. Undeclared cpus or memory count as 0 (they share what
  is there, as LXC containers without limits do).

A platform that does not fit raises :class:`PlacementError` listing every vnode that found no
pnode and, per pnode, what was short; nothing is created before placement succeeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from sidusctl.core.errors import SidusError

Policy = Literal["pack", "spread"]
#: memory (MiB) left to the pnode's own system and LXC: never given to vnodes
HOST_RESERVE_MIB = 256


class PlacementError(SidusError):
    """The vnodes do not fit on the pnodes; :attr:`unplaced` maps each vnode that found no
    pnode to the reasons, one per pnode."""

    exit_code = 2

    def __init__(self, unplaced: dict[str, list[str]]) -> None:
        self.unplaced = unplaced
        lines = [f"  {v}: " + "; ".join(why) for v, why in unplaced.items()]
        super().__init__(f"the platform does not fit on its pnodes ({len(unplaced)} vnode(s) "
                         "without a place):\n" + "\n".join(lines),
                         hint="add pnodes, raise max_per_pnode, or lower the vnodes' cpu/mem")


@dataclass(frozen=True)
class Demand:
    """What one vnode asks for: ``cpus`` (cores, may be fractional), ``mem_mib`` (MiB),
    ``host`` (an explicit pnode, or None)."""

    name: str
    cpus: float = 0.0
    mem_mib: int = 0
    host: str | None = None


@dataclass(frozen=True)
class Capacity:
    """What one pnode offers, as measured there: ``cores``, ``mem_mib`` (MemTotal, MiB),
    ``store_free_mib`` (free space of the vnode store, MiB; checked against ``need_store_mib``
    of :func:`place`)."""

    name: str
    cores: int
    mem_mib: int
    store_free_mib: int = 1 << 30


@dataclass
class _Load:
    cap: Capacity
    cpus: float = 0.0
    mem: int = 0
    vnodes: list[str] = field(default_factory=list)

    def short(self, d: Demand, max_per: int | None) -> str | None:
        """None if ``d`` fits here, else what is short."""
        if max_per is not None and len(self.vnodes) + 1 > max_per:
            return f"{self.cap.name} already has max_per_pnode={max_per}"
        if self.cpus + d.cpus > self.cap.cores + 1e-9:
            return (f"{self.cap.name} has {self.cap.cores - self.cpus:g} of {self.cap.cores} "
                    f"cores free, {d.cpus:g} asked")
        avail = self.cap.mem_mib - HOST_RESERVE_MIB
        if self.mem + d.mem_mib > avail:
            return (f"{self.cap.name} has {max(0, avail - self.mem)} MiB of memory free, "
                    f"{d.mem_mib} asked")
        return None

    def add(self, d: Demand) -> None:
        self.cpus += d.cpus
        self.mem += d.mem_mib
        self.vnodes.append(d.name)


def place(demands: Sequence[Demand], pnodes: Sequence[Capacity], *, policy: Policy = "pack",
          max_per_pnode: int | None = None, need_store_mib: int = 0) -> dict[str, str]:
    """``{vnode: pnode}`` for every demand (see the module docstring); :class:`PlacementError`
    with every vnode that does not fit. ``need_store_mib``: store space each pnode needs for
    the platform's images (a pnode with less takes no vnode)."""
    loads = {p.name: _Load(p) for p in pnodes}
    unplaced: dict[str, list[str]] = {}
    small = {p.name for p in pnodes if p.store_free_mib < need_store_mib}
    for d in demands:
        if d.host is not None:
            if d.host not in loads:
                unplaced[d.name] = [f"host {d.host!r} is not one of the pnodes"]
                continue
            why = loads[d.host].short(d, max_per_pnode)
            if d.host in small:
                why = f"{d.host} has too little free store space"
            if why:
                unplaced[d.name] = [why]
            else:
                loads[d.host].add(d)
    for d in demands:
        if d.host is not None:
            continue
        order = list(loads.values())
        if policy == "spread":
            order.sort(key=lambda ld: len(ld.vnodes))  # stable: ties keep the pnode order
        reasons = []
        for ld in order:
            why = (f"{ld.cap.name} has {ld.cap.store_free_mib} MiB free in its store, "
                   f"{need_store_mib} needed for the images") if ld.cap.name in small \
                else ld.short(d, max_per_pnode)
            if why is None:
                ld.add(d)
                break
            reasons.append(why)
        else:
            unplaced[d.name] = reasons or ["there are no pnodes"]
    if unplaced:
        raise PlacementError(unplaced)
    return {v: ld.cap.name for ld in loads.values() for v in ld.vnodes}
