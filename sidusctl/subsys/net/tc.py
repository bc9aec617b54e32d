"""Traffic control (rtnetlink via pyroute2): shape a link's egress with a token bucket (tbf,
``tc-tbf(8)``) and delay it with netem (``tc-netem(8)``).

A vnode's viface is a veth pair: egress of the host end is the vnode's input, egress of the
vnode end (inside the vnode's network namespace) is its output, so shaping both ends limits
both directions without an ifb device. Rates follow tc's units: ``bit``/``kbit``/``mbit``/
``gbit`` are bits per second, ``bps``/``kbps``/``mbps``/``gbps`` BYTES per second (tc(8),
"RATES"); a bare number is bits per second.
"""

from __future__ import annotations

import re

from sidusctl.core.errors import ConfigError, PrerequisiteError, SidusError
from sidusctl.subsys.net.links import ipr, netlink_error

_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
          "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9,
          "kibit": 2**10, "mibit": 2**20, "gibit": 2**30}


def parse_rate(text: str | int, where: str = "rate") -> int:
    """A tc rate (``100mbit``, ``12.5mbps``, ``1000000``) in bits per second."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or (unit and unit not in _UNITS):
        raise ConfigError(where, None, f"invalid rate {text!r}",
                          expected="a number with a tc unit: bit, kbit, mbit, gbit (bits/s) or "
                                   "bps, kbps, mbps, gbps (bytes/s)")
    bits = int(float(m.group(1)) * _UNITS[unit or "bit"])
    if bits <= 0 or bits // 8 >= 2**32:
        raise ConfigError(where, None, f"rate {text!r} out of range",
                          expected="between 8 bit/s and 34 Gbit/s (tbf's 32-bit byte rate)")
    return bits


def _index(ip: object, ifname: str, netns: str | None) -> int:
    idx = ip.link_lookup(ifname=ifname)  # type: ignore[attr-defined]
    if not idx:
        where = f" in {netns}" if netns else ""
        raise SidusError(f"no interface {ifname!r}{where} to shape")
    return int(idx[0])


def clear(ifname: str, netns: str | None = None) -> None:
    """Remove the root qdisc of ``ifname`` (back to the default)."""
    with ipr(netns) as ip:
        idx = _index(ip, ifname, netns)
        try:
            ip.tc("del", index=idx, handle=0, parent=0xFFFFFFFF)
        except netlink_error() as e:
            if e.code not in (2, 22):  # ENOENT/EINVAL: there was no root qdisc of ours
                raise SidusError(f"tc: removing the root qdisc of {ifname}: {e}") from e


def shape(ifname: str, rate_bits: int | None, delay_ms: float | None,
          netns: str | None = None) -> None:
    """Set the egress of ``ifname``: a tbf at ``rate_bits`` bit/s and/or a netem delay of
    ``delay_ms`` milliseconds (netem at the root, tbf below it). ``None`` for both clears.

    Raises :class:`PrerequisiteError` naming the qdisc the kernel lacks (``netem`` on hosts
    without ``CONFIG_NET_SCH_NETEM``/``sch_netem``)."""
    clear(ifname, netns)
    if rate_bits is None and delay_ms is None:
        return
    with ipr(netns) as ip:
        idx = _index(ip, ifname, netns)
        parent = 0xFFFFFFFF
        if delay_ms is not None:
            try:
                ip.tc("add", "netem", index=idx, handle=0x10000, delay=int(delay_ms * 1000))
            except netlink_error() as e:
                if e.code in (2, 95):  # ENOENT / EOPNOTSUPP: no such qdisc in this kernel
                    raise PrerequisiteError(
                        f"latency on {ifname} needs the 'netem' qdisc, which this kernel lacks "
                        "(CONFIG_NET_SCH_NETEM / module sch_netem)") from e
                raise SidusError(f"tc netem on {ifname}: {e}") from e
            parent = 0x10001
        if rate_bits is not None:
            rate_bytes = rate_bits / 8
            # burst: at least one 250 Hz tick's worth of bytes and a few MTUs (tc-tbf(8)).
            burst = max(int(rate_bytes / 250), 16 * 1514)
            try:
                ip.tc("add", "tbf", index=idx, handle=0x20000, parent=parent,
                      rate=f"{rate_bits}bit", burst=burst, latency="50ms")
            except netlink_error() as e:
                if e.code in (2, 95):
                    raise PrerequisiteError(
                        f"bandwidth on {ifname} needs the 'tbf' qdisc, which this kernel lacks "
                        "(CONFIG_NET_SCH_TBF)") from e
                raise SidusError(f"tc tbf on {ifname}: {e}") from e


def show(ifname: str, netns: str | None = None) -> list[str]:
    """Kinds of the qdiscs on ``ifname`` (``tbf``, ``netem``, ``noqueue``...)."""
    with ipr(netns) as ip:
        idx = _index(ip, ifname, netns)
        return [str(q.get_attr("TCA_KIND")) for q in ip.get_qdiscs(index=idx)]


def require_qdisc(kind: str) -> None:
    """:class:`PrerequisiteError` naming ``kind`` unless this kernel has that qdisc: probed on a
    throw-away bridge created (and deleted) for a moment."""
    import os

    from sidusctl.subsys.net.links import remove_link

    probe = f"sdqp{os.getpid() % 100000}"
    with ipr() as ip:
        try:
            ip.link("add", ifname=probe, kind="bridge")
        except netlink_error() as e:
            raise SidusError(f"cannot create a link to probe the {kind} qdisc: {e}") from e
    try:
        with ipr() as ip:
            idx = ip.link_lookup(ifname=probe)[0]
            kw: dict[str, object] = {"delay": 1000} if kind == "netem" else \
                {"rate": "1mbit", "burst": 16000, "latency": "50ms"}
            try:
                ip.tc("add", kind, index=idx, handle=0x10000, **kw)
            except netlink_error() as e:
                if e.code in (2, 95):
                    raise PrerequisiteError(
                        f"this kernel lacks the '{kind}' qdisc (CONFIG_NET_SCH_{kind.upper()} / "
                        f"module sch_{kind})") from e
                raise SidusError(f"probing the {kind} qdisc: {e}") from e
    finally:
        remove_link(probe)


def shape_by_destination(ifname: str, delays_ms: dict[str, float],
                         netns: str | None = None) -> None:
    """Delay the egress of ``ifname`` per destination IPv4 address (the latency matrix):
    an htb root with one class per destination, a netem below each, u32 filters on the
    destination address; other traffic goes undelayed through the default class."""
    import ipaddress

    clear(ifname, netns)
    if not delays_ms:
        return
    with ipr(netns) as ip:
        idx = _index(ip, ifname, netns)
        try:
            ip.tc("add", "htb", index=idx, handle=0x10000, default=0x1)
            ip.tc("add-class", "htb", index=idx, handle=0x10001, parent=0x10000,
                  rate="10gbit", ceil="10gbit")
            for n, (dst, ms) in enumerate(sorted(delays_ms.items()), start=0x10):
                cls = 0x10000 | n
                ip.tc("add-class", "htb", index=idx, handle=cls, parent=0x10000,
                      rate="10gbit", ceil="10gbit")
                try:
                    ip.tc("add", "netem", index=idx, parent=cls, handle=(n << 16),
                          delay=int(ms * 1000))
                except netlink_error() as e:
                    if e.code in (2, 95):
                        raise PrerequisiteError(
                            "the latency matrix needs the 'netem' qdisc, which this kernel lacks "
                            "(CONFIG_NET_SCH_NETEM / module sch_netem)") from e
                    raise
                hexip = int(ipaddress.IPv4Address(dst))
                ip.tc("add-filter", "u32", index=idx, parent=0x10000, prio=1, protocol=0x0800,
                      target=cls, keys=[f"0x{hexip:08x}/0xffffffff+16"])
        except netlink_error() as e:
            raise SidusError(f"tc on {ifname}: {e}") from e
