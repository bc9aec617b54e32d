"""The vnetworks of a vnode platform: each a bridge on this host (with the gateway address)
and, in vxlan mode, a VXLAN link enslaved to it. A mixin of
:class:`sidusctl.vnode.platform.Platform`, which provides ``store``.

A vnetwork is recorded in ``state.json`` before its links are made, so that a command killed
meanwhile (SIGKILL) leaves a vnetwork that ``net delete`` removes and ``start`` completes (it
makes the links of its vifaces' vnetworks again), never links nobody knows of.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sidusctl.core.errors import ConfigError, NotFoundError, StateError
from sidusctl.core.signals import Critical
from sidusctl.subsys.net import links
from sidusctl.vnode.model import VNetwork

if TYPE_CHECKING:
    from sidusctl.vnode.store import State, Store


class VNetworks:
    """Creation, deletion and listing of vnetworks (see the module docstring)."""

    store: Store

    def net_create(self, name: str, cidr: str, *, mode: str = "classical",
                   root_interface: str | None = None, vxlan_id: int | None = None,
                   vxlan_port: int = 4789, vxlan_group: str | None = None,
                   vxlan_remote: str | None = None, gateway: str | None = None,
                   netns: str | None = None, vxlan_remotes: Sequence[str] = (),
                   vxlan_local: str | None = None, mtu: int | None = None) -> VNetwork:
        """Create vnetwork ``name`` on ``cidr``: its bridge (with the gateway address) and, in
        vxlan mode, its VXLAN link, now. ConfigError for bad values, a CIDR overlapping
        another vnetwork's, a missing ``netns`` or a gateway address some link of the host
        has already; StateError when the name is taken (by a vnetwork, or by a link of the
        host: the hint names it); SidusError when a link cannot be made. On an error or an
        interrupt nothing is left behind; a SIGKILL leaves the vnetwork recorded (``net
        delete`` removes it)."""
        net = VNetwork(name=name, cidr=cidr, mode=mode, root_interface=root_interface,
                       vxlan_id=vxlan_id, vxlan_port=vxlan_port, vxlan_group=vxlan_group,
                       vxlan_remote=vxlan_remote, gateway=gateway, netns=netns,
                       vxlan_remotes=list(vxlan_remotes), vxlan_local=vxlan_local,
                       mtu=mtu).validate()
        with self.store.transaction() as st:
            if name in st.vnetworks:
                raise StateError(f"a vnetwork named {name!r} already exists")
            for other in st.vnetworks.values():
                if other.network.overlaps(net.network) and other.netns == net.netns:
                    raise ConfigError(f"vnetwork {name}", "cidr",
                                      f"{cidr} overlaps vnetwork {other.name} ({other.cidr})")
            if netns and not links.netns_exists(netns):
                raise ConfigError(f"vnetwork {name}", "netns", f"no network namespace {netns!r}")
            for link in (net.bridge, net.vxlan_link) if mode == "vxlan" else (net.bridge,):
                kind = links.link_kind(link, netns)
                if kind is not None:
                    raise StateError(
                        f"a {kind} link named {link!r} already exists on this host, and no "
                        "vnetwork of this store has it",
                        hint=f"choose another vnetwork name, or, if it is left over (by an "
                             f"older sidusctl killed while it made it), remove it: ip "
                             f"{'-n ' + netns + ' ' if netns else ''}link delete {link}")
            holder = links.address_holder(str(net.gateway), netns)
            if holder is not None:
                raise ConfigError(f"vnetwork {name}", "gateway",
                                  f"address {net.gateway} is already on link {holder} of "
                                  "this host", expected="a CIDR no link of the host uses")
            st.vnetworks[name] = net
            self.store.save(st)  # before the links: a SIGKILL leaves no unrecorded link
            crit = Critical()
            try:
                self._net_setup(net)
            except BaseException:
                with crit.held():
                    self._net_teardown(net)
                    del st.vnetworks[name]
                    self.store.save(st)
                raise
        return net

    def _net_setup(self, net: VNetwork) -> None:
        prefix = net.network.prefixlen
        links.ensure_bridge(net.bridge, f"{net.gateway}/{prefix}", netns=net.netns)
        if net.mode == "vxlan":
            assert net.vxlan_id is not None
            links.ensure_vxlan(net.vxlan_link, net.vxlan_id, net.bridge, port=net.vxlan_port,
                               group=net.vxlan_group, peers=net.peers(),
                               local=net.vxlan_local, mtu=net.mtu,
                               dev=net.root_interface, netns=net.netns)

    def _net_teardown(self, net: VNetwork) -> None:
        if net.netns and not links.netns_exists(net.netns):
            return
        links.remove_link(net.vxlan_link, net.netns)
        links.remove_link(net.bridge, net.netns)

    def net_delete(self, name: str) -> None:
        """Delete vnetwork ``name``: NotFoundError if there is none, StateError while a vnode
        has a viface on it, SidusError when a link cannot be deleted (then it stays
        recorded)."""
        with self.store.transaction() as st:
            net = self._net(st, name)
            users = [v.name for v in st.vnodes.values() if any(i.vnetwork == name for i in v.ifaces)]
            if users:
                raise StateError(f"vnetwork {name!r} is used by vnode(s) {', '.join(users)}")
            with Critical().held():  # links deleted and the record with them, or neither
                self._net_teardown(net)
                del st.vnetworks[name]
                self.store.save(st)

    def net_list(self) -> list[VNetwork]:
        """Every vnetwork as state.json records it, in name order."""
        return list(self.store.read().vnetworks.values())

    def _net(self, st: State, name: str) -> VNetwork:
        if name not in st.vnetworks:
            known = ", ".join(st.vnetworks) or "none"
            raise NotFoundError(f"no vnetwork named {name!r} (vnetworks: {known})")
        return st.vnetworks[name]
