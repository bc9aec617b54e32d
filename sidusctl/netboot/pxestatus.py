"""What ``pxe status`` says of each node: its boot stages, the generation it runs and the next
one, what its kernel reported (lockdown, Secure Boot, refused modules), from what serve-pxe's
servers saw (DHCP ACKs, files fetched) and what the node reported over HTTP. Pure: fed plain
mappings by :class:`sidusctl.netboot.pxesupervisor.PxeSupervisor`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from sidusctl.core.errors import StateError
from sidusctl.core.state import damaged
from sidusctl.netboot.inventory import Inventory
from sidusctl.netboot.tree import ImageFiles
from sidusctl.serve.supervisor import TIME_LIMIT, is_time

#: the boot stages a node goes through, in order (``pxe status``)
STAGES = ("dhcp", "boot-files", "kernel", "root", "booted")
#: what a node's report may say of its kernel (form field → ``pxe status`` key): the lockdown
#: mode (/sys/kernel/security/lockdown), Secure Boot (``on``/``off``, ``bios`` without UEFI)
#: and the modules it failed to load (unsigned ones are refused under lockdown)
NODE_FACTS = {"lockdown": "lockdown", "secureboot": "secure_boot", "modfail": "modules_failed"}
#: a per-MAC file names its client: pxelinux.cfg/01-<mac>, ipxe/<mac>.ipxe,
#: grub/grub.cfg-01-<mac>
MAC_FILE_RE = re.compile(r"^(?:pxelinux\.cfg/01-|ipxe/|grub/grub\.cfg-01-)"
                         r"((?:[0-9a-f]{2}-){5}[0-9a-f]{2})(?:\.ipxe)?$")


def reports_since(rep: Mapping[str, Any], t: float) -> dict[str, Any]:
    """A node's reports made at ``t`` or later (stages with their details; the facts of its
    kernel if any stage is left)."""
    stages = {k for k, v in rep.items() if isinstance(v, float) and v >= t}
    if not stages:
        return {}
    return {k: v for k, v in rep.items() if k in stages or k.removesuffix("_detail") in stages
            or (not isinstance(v, float) and not k.endswith("_detail"))}


def nodes(inv: Inventory, files: Mapping[str, ImageFiles], *,
          acks: Mapping[str, list[float]], proxied: Mapping[str, float],
          fetched: Mapping[str, Mapping[str, float]], ip_mac: Mapping[str, str],
          reports: Mapping[str, Mapping[str, Any]],
          holds: Mapping[str, Mapping[str, Any]],
          only: Collection[str] | None = None) -> list[dict[str, Any]]:
    """One entry per node: ``dhcp`` (address acknowledged, or None), ``proxy_dhcp`` (time
    of the last proxyDHCP reply, or None), ``files`` fetched (from its reserved address,
    or from any address that asked for its per-MAC files), ``root`` (its root source),
    ``generation`` (the one it booted, as it reported it; None before), ``next``
    (the generation its next boot gets), ``stage`` (the last of :data:`STAGES` reached)
    with ``stages`` (time of each), ``booted`` (reported by the node itself; without
    reports, as before: kernel and initrd fetched and then a DHCP ACK again),
    ``failed`` (what it reported, if its root could not be fetched) and what its kernel
    reported (:data:`NODE_FACTS`: ``lockdown``, ``secure_boot``, ``modules_failed``; None
    before a report). Reports older than the node's last kernel fetch belong to an earlier
    boot and are left out. ``only``: the MACs of the nodes wanted (in inventory order;
    None: all). Time: linear in the nodes wanted, their files fetched and ``ip_mac``
    entries (it runs for every status write, every 2 s of a storm: the caller asks only
    for the nodes whose inputs changed)."""
    mac_ips: dict[str, set[str]] = {}
    for ip, mac in ip_mac.items():
        mac_ips.setdefault(mac, set()).add(ip)
    out = []
    for n in inv.nodes:
        if only is not None and n.mac not in only:
            continue
        node_acks = acks.get(n.mac, [])
        got: dict[str, float] = {}
        ips = {str(n.ip)} | mac_ips.get(n.mac, set())
        for ip in sorted(ips):
            for f, t in fetched.get(ip, {}).items():
                got[f] = max(t, got.get(f, 0.0))
        # by file name: vmlinuz-<image> at the root of the tree, or a generation's under
        # boot/<image>/<generation>/ (tree.ImageFiles.kernel_rel), fetched over TFTP or HTTP
        kernel_t = initrd_t = None
        for f, t in got.items():
            base = f.rpartition("/")[2]
            if base == f"vmlinuz-{n.image}":
                kernel_t = max(t, kernel_t or 0.0)
            elif base == f"initrd.img-{n.image}":
                initrd_t = max(t, initrd_t or 0.0)
        loaded = max(kernel_t, initrd_t) if kernel_t is not None and initrd_t is not None \
            else None
        rep = reports.get(n.mac, {})
        if loaded is not None:
            # its kernel fetched again since: what an earlier boot reported is over
            rep = reports_since(rep, loaded)
        guessed = loaded is not None and any(t > loaded for t in node_acks)
        booted = "booted" in rep or (not rep and guessed)
        boot_files = [t for f, t in got.items() if f.startswith(
            ("pxelinux", "ipxe/", "boot.ipxe", "grub", "ldlinux", "menu.c32", "libutil"))]
        stages: dict[str, float | None] = {
            "dhcp": node_acks[0] if node_acks else proxied.get(n.mac),
            "boot-files": min(boot_files) if boot_files else None,
            "kernel": loaded,
            "root": rep.get("root") or next(
                (t for f, t in got.items() if f.startswith(f"squashfs/{n.image}/")), None),
            "booted": rep.get("booted") or (node_acks[-1] if booted and not rep else None)}
        stage = next((s for s in reversed(STAGES) if stages[s] is not None), None)
        hold = holds.get(n.mac, {})
        ref = files.get(n.image)
        nxt = (ref.squashfs.generation if ref.squashfs and n.root != "nfs"
               else ref.generation) if ref else None
        out.append({"name": n.name, "mac": n.mac, "ip": str(n.ip), "image": n.image,
                    "root": n.root,
                    "generation": hold.get("generation") if hold.get("image") == n.image
                    else None,
                    "next": nxt, "stage": stage, "stages": stages,
                    "failed": rep.get("failed_detail") if "failed" in rep else None,
                    "dhcp": str(n.ip) if node_acks else None,
                    "dhcp_last": node_acks[-1] if node_acks else None,
                    "proxy_dhcp": proxied.get(n.mac),
                    "addresses": sorted(ips - {str(n.ip)}),
                    "files": sorted(got, key=lambda f: got[f]), "booted": booted,
                    "booted_reported": "booted" in rep,
                    **{k: rep.get(k) for k in NODE_FACTS.values()}})
    return out


def check_status(path: Path, pxe: Mapping[str, Any]) -> None:
    """Check that ``pxe`` (the ``pxe`` object of the status file ``path``) has the shape
    :meth:`sidusctl.netboot.pxesupervisor.PxeSupervisor.status` writes, as far as ``pxe
    status`` uses it: ``inventory``, ``interface`` strings or null; ``held`` an object;
    ``nodes`` a list of objects (:func:`nodes`), each with ``name``, ``mac``, ``ip``
    strings, ``stage`` null or one of :data:`STAGES`, ``stages`` an object of times
    (:func:`sidusctl.serve.supervisor.is_time`) or nulls, ``files`` and ``addresses`` lists
    of strings, ``dhcp`` a string or null (keys other than ``name``, ``mac``, ``ip`` may be
    missing). :class:`StateError` naming ``path``, the first bad key, its value and what was
    expected otherwise (a damaged file: serve-pxe rewrites it). The rest of the status file
    is :func:`sidusctl.serve.supervisor.check_status`'s."""

    def bad(key: str, value: object, expected: str) -> StateError:
        return damaged(path, f"pxe.{key}", value, expected)

    for key in ("inventory", "interface"):
        if pxe.get(key) is not None and not isinstance(pxe[key], str):
            raise bad(key, pxe[key], "a string or null")
    if not isinstance(pxe.get("held", {}), dict):
        raise bad("held", pxe["held"], "an object")
    nodes_ = pxe.get("nodes", [])
    if not isinstance(nodes_, list):
        raise bad("nodes", nodes_, "a list of nodes")
    for i, n in enumerate(nodes_):
        where = f"nodes[{i}]"
        if not isinstance(n, dict):
            raise bad(where, n, "an object")
        for key in ("name", "mac", "ip"):
            if not isinstance(n.get(key), str):
                raise bad(f"{where}.{key}", n.get(key), "a string")
        if n.get("stage") is not None and n["stage"] not in STAGES:
            raise bad(f"{where}.stage", n["stage"], f"null or one of {', '.join(STAGES)}")
        stages = n.get("stages")
        if stages is not None and not isinstance(stages, dict):
            raise bad(f"{where}.stages", stages, "an object")
        for stage, t in (stages or {}).items():
            if t is not None and not is_time(t):
                raise bad(f"{where}.stages.{stage}", t,
                          f"null or a Unix time (a number from 0 to {TIME_LIMIT:.0f})")
        for key in ("files", "addresses"):
            v = n.get(key)
            if v is not None and not (isinstance(v, list)
                                      and all(isinstance(f, str) for f in v)):
                raise bad(f"{where}.{key}", v, "a list of strings")
        if n.get("dhcp") is not None and not isinstance(n["dhcp"], str):
            raise bad(f"{where}.dhcp", n["dhcp"], "a string or null")
