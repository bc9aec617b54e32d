"""Links (rtnetlink via pyroute2): an idempotent ensure/remove pair per kind of link.

- bridge: ``ensure_bridge(name, address=None)`` — a Linux bridge, up, with an optional
  ``a.b.c.d/len`` address (the vnetwork's gateway on this host).
- VXLAN (RFC 7348): ``ensure_vxlan(name, vni, port, bridge, group=|remote=, dev=)`` — a VXLAN
  link enslaved to ``bridge``; multicast ``group`` or unicast ``remote`` peers.
- network namespaces: ``ensure_netns``/``remove_netns`` (named, under /run/netns).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from sidusctl.core.errors import ConfigError, PrerequisiteError, SidusError
from sidusctl.core.log import get_logger

if TYPE_CHECKING:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

log = get_logger("net")


# pyroute2 is imported on first use: its package imports some 160 modules (0.1-0.2 s here,
# seconds on a pnode that is a TCG guest), which `vnode status`, `exec` or `wait` never need
def netlink_error() -> type[NetlinkError]:
    """pyroute2's ``NetlinkError`` (its ``code`` is the errno), for ``except`` clauses."""
    from pyroute2.netlink.exceptions import NetlinkError
    return cast("type[NetlinkError]", NetlinkError)


def _pr_netns() -> ModuleType:
    """pyroute2's ``netns`` module (setns, listnetns, create, remove)."""
    from pyroute2 import netns
    return cast(ModuleType, netns)

IFNAMSIZ = 15  # usable characters in a Linux interface name


def check_ifname(name: str, where: str = "interface name") -> str:
    """Linux interface names: 1-15 characters, no '/', ':' or whitespace."""
    if not name or len(name) > IFNAMSIZ or any(c in name for c in "/: \t\n"):
        raise ConfigError(where, None, f"invalid interface name {name!r}",
                          expected="1-15 characters without '/', ':' or spaces")
    return name


@contextlib.contextmanager
def ipr(netns: str | None = None) -> Iterator[IPRoute]:
    """An rtnetlink socket in the host's namespace or in ``netns`` (a name under /run/netns or
    a path such as /proc/PID/ns/net).

    The socket is opened after ``setns(2)`` of this thread only, then the thread goes back:
    a netlink socket stays bound to the namespace it was created in. (pyroute2's own
    ``netns=`` forks a helper process, which misbehaves in threaded or forking callers.)"""
    from pyroute2 import IPRoute

    if not netns:
        sock = IPRoute()
    else:
        path = netns if netns.startswith("/") else f"/run/netns/{netns}"
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SidusError(f"cannot open network namespace {netns!r}: {e.strerror}") from e
        saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _pr_netns().setns(target)
            try:
                sock = IPRoute()
            finally:
                _pr_netns().setns(saved)
        finally:
            os.close(target)
            os.close(saved)
    try:
        yield sock
    finally:
        sock.close()


def link_index(name: str, netns: str | None = None) -> int | None:
    """The ifindex of link ``name``, or None."""
    with ipr(netns) as ip:
        idx = ip.link_lookup(ifname=name)
    return int(idx[0]) if idx else None


def link_kind(name: str, netns: str | None = None) -> str | None:
    """The rtnetlink kind of ``name`` (``bridge``, ``vxlan``, ``veth``...), or None if absent."""
    with ipr(netns) as ip:
        idx = ip.link_lookup(ifname=name)
        if not idx:
            return None
        link = ip.get_links(idx[0])[0]
    info = link.get_attr("IFLA_LINKINFO")
    return str(info.get_attr("IFLA_INFO_KIND")) if info is not None else "device"


def address_holder(address: str, netns: str | None = None) -> str | None:
    """The name of the link of this host (or of ``netns``) that has the IPv4 ``address``
    (dotted quad), ``#<ifindex>`` if the link vanished meanwhile, or None (RTM_GETADDR,
    rtnetlink(7))."""
    with ipr(netns) as ip:
        for a in ip.get_addr(family=socket.AF_INET):
            if a.get_attr("IFA_ADDRESS") == address:
                idx = a["index"]
                found = ip.get_links(idx)
                return str(found[0].get_attr("IFLA_IFNAME")) if found else f"#{idx}"
    return None


def _nl(what: str, e: NetlinkError) -> SidusError:
    return SidusError(f"{what}: netlink error {e.code} ({e.args[1] if len(e.args) > 1 else e})")


def ensure_bridge(name: str, address: str | None = None, netns: str | None = None) -> None:
    """Create bridge ``name`` unless it exists, bring it up, and add ``address``
    (``a.b.c.d/len``) if given and missing. Refuses a non-bridge link of that name."""
    check_ifname(name, "bridge name")
    kind = link_kind(name, netns)
    if kind not in (None, "bridge"):
        raise SidusError(f"a {kind} link named {name!r} already exists and is not a bridge")
    with ipr(netns) as ip:
        try:
            if kind is None:
                ip.link("add", ifname=name, kind="bridge")
            idx = ip.link_lookup(ifname=name)[0]
            ip.link("set", index=idx, state="up")
            if address:
                iface = ipaddress.ip_interface(address)
                have = {a.get_attr("IFA_ADDRESS") for a in ip.get_addr(index=idx)}
                if str(iface.ip) not in have:
                    ip.addr("add", index=idx, address=str(iface.ip),
                            prefixlen=iface.network.prefixlen)
        except netlink_error() as e:
            raise _nl(f"creating bridge {name}", e) from e


def ensure_vxlan(name: str, vni: int, bridge: str, *, port: int = 4789, group: str | None = None,
                 remote: str | None = None, dev: str | None = None, local: str | None = None,
                 peers: Sequence[str] = (), mtu: int | None = None,
                 netns: str | None = None) -> None:
    """Create VXLAN link ``name`` (VNI ``vni``, UDP ``port``; RFC 7348) unless it exists,
    enslave it to ``bridge`` and bring it up. Flooded traffic goes to ``group`` (multicast,
    needs ``dev``), to ``remote`` (one unicast peer), or to every address of ``peers`` (one
    all-zeros forwarding entry each: head-end replication, no multicast needed). ``mtu``
    (bytes) is set on the link and the bridge: leave 50 bytes of the underlay's MTU for the
    outer Ethernet, IPv4, UDP and VXLAN headers."""
    check_ifname(name, "vxlan link name")
    kind = link_kind(name, netns)
    if kind not in (None, "vxlan"):
        raise SidusError(f"a {kind} link named {name!r} already exists and is not a vxlan link")
    with ipr(netns) as ip:
        try:
            if kind is None:
                kw: dict[str, Any] = {"ifname": name, "kind": "vxlan", "vxlan_id": vni,
                                      "vxlan_port": port, "vxlan_learning": 1}
                if dev:
                    didx = ip.link_lookup(ifname=dev)
                    if not didx:
                        raise ConfigError("vnetwork", "root_interface",
                                          f"no interface named {dev!r} on this host")
                    kw["vxlan_link"] = didx[0]
                if group:
                    kw["vxlan_group"] = group
                elif remote:
                    kw["vxlan_group"] = remote  # unicast remote: same attribute (IFLA_VXLAN_GROUP)
                if local:
                    kw["vxlan_local"] = local
                if mtu:
                    kw["mtu"] = mtu
                ip.link("add", **kw)
            idx = ip.link_lookup(ifname=name)[0]
            bidx = ip.link_lookup(ifname=bridge)[0]
            if mtu:
                ip.link("set", index=bidx, mtu=mtu)
            ip.link("set", index=idx, master=bidx)
            ip.link("set", index=idx, state="up")
            for peer in peers:
                try:
                    ip.fdb("append", ifindex=idx, lladdr="00:00:00:00:00:00", dst=peer)
                except netlink_error() as e:
                    if e.code != errno.EEXIST:
                        raise
        except netlink_error() as e:
            raise _nl(f"creating vxlan link {name}", e) from e


def vxlan_peers(name: str, netns: str | None = None) -> list[str]:
    """The unicast peers of VXLAN link ``name``: destinations of its all-zeros forwarding
    entries (empty if the link is missing)."""
    with ipr(netns) as ip:
        idx = ip.link_lookup(ifname=name)
        if not idx:
            return []
        out = []
        for e in ip.fdb("dump", ifindex=idx[0]):
            if e.get_attr("NDA_LLADDR") == "00:00:00:00:00:00" and e.get_attr("NDA_DST"):
                out.append(str(e.get_attr("NDA_DST")))
        return out


def remove_link(name: str, netns: str | None = None) -> bool:
    """Delete link ``name`` if it exists; returns whether it existed."""
    with ipr(netns) as ip:
        idx = ip.link_lookup(ifname=name)
        if not idx:
            return False
        try:
            ip.link("del", index=idx[0])
        except netlink_error() as e:
            if e.code != 19:  # ENODEV: gone meanwhile
                raise _nl(f"deleting link {name}", e) from e
    return True


def ensure_netns(name: str) -> None:
    """Create the named network namespace (``/run/netns/NAME``) unless it exists."""
    if name not in _pr_netns().listnetns():
        _pr_netns().create(name)


def remove_netns(name: str) -> None:
    """Remove the named network namespace if it exists."""
    if name in _pr_netns().listnetns():
        _pr_netns().remove(name)


def netns_exists(name: str) -> bool:
    """Whether network namespace ``name`` exists: a path (``/proc/PID/ns/net``, a bind
    mount) if it starts with ``/``, else a name under ``/run/netns`` as ``ip netns``
    makes them."""
    if name.startswith("/"):
        return os.path.exists(name)
    return name in _pr_netns().listnetns()


def require_kind(kind: str) -> None:
    """:class:`PrerequisiteError` unless the kernel can create links of ``kind``: checked by
    creating and deleting a throw-away link."""
    probe = f"sdt-probe{abs(hash(kind)) % 1000}"
    with ipr() as ip:
        try:
            kw: dict[str, Any] = {"ifname": probe, "kind": kind}
            if kind == "vxlan":
                kw.update(vxlan_id=1, vxlan_port=4789)
            ip.link("add", **kw)
        except netlink_error() as e:
            raise PrerequisiteError(f"this kernel cannot create {kind} links ({e})") from e
        finally:
            for idx in ip.link_lookup(ifname=probe):
                ip.link("del", index=idx)
