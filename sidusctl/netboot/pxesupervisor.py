"""The serve-pxe supervisor: the servers of :mod:`sidusctl.serve.supervisor` plus what each
node did and which generation it runs.

It adds the per-node status (DHCP seen, files fetched, stages reported, booted) to the
supervisor's ``status.json``, which ``sidusctl pxe status`` reads, and keeps the generations
running nodes booted served: ``<state>/serve/holds.json`` across restarts, the image store's
holds (``images/<name>/holds/``) so that no build or prune deletes them, and :meth:`prune` for
what no node holds any more. :class:`~sidusctl.netboot.servepxe.PxeLoader` gives it the
configuration; :func:`sidusctl.netboot.servepxe.serve` runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import Any

from sidusctl.core.errors import SidusError
from sidusctl.core.log import get_logger
from sidusctl.core.state import read_json, write_json
from sidusctl.netboot import pxestatus, squash
from sidusctl.netboot.pxestatus import MAC_FILE_RE, NODE_FACTS
from sidusctl.netboot.servepxe import PxeLoader, nfs_paths, squash_images
from sidusctl.netboot.tree import prune_boot
from sidusctl.serve import http as http_mod
from sidusctl.serve import supervisor
from sidusctl.subsys.imagestore import ImageStore

log = get_logger("serve-pxe")

#: seconds at most between a node's report and the write of the holds it changed
HOLDS_DELAY = 1.0


class PxeSupervisor(supervisor.Supervisor):
    """The supervisor plus what each node did: ``acks`` (times of DHCP ACKs by MAC),
    ``proxied`` (times of proxyDHCP replies by MAC), ``fetched`` (files delivered by TFTP or
    HTTP, by client IP, with the time), ``ip_mac`` (client IP → MAC, learnt from the
    per-MAC files a client asks for: in proxy mode the site's DHCP server gives the
    addresses, so a node's files come from an address the inventory does not know),
    ``reports`` (the stages a node POSTed to ``/sidus/report``: ``root``, ``root-mounted``
    (sent by initrds built before 2026-12-02), ``overlay``, ``booted``, ``failed``, by MAC,
    with time and detail, and the kernel facts of
    :data:`~sidusctl.netboot.pxestatus.NODE_FACTS`), ``holds``: the generation each
    node booted, kept in ``<state>/serve/holds.json`` so that a restart does not forget
    which files running nodes still read, and ``served``: the generations the boot tree
    named, with the last time. :meth:`keep` turns both into what stays served; the image
    store learns it (:meth:`sync_holds`), :meth:`prune` removes the rest."""

    def __init__(self, loader: PxeLoader) -> None:
        self.loader = loader
        self.acks: dict[str, list[float]] = {}
        self.proxied: dict[str, float] = {}
        self.fetched: dict[str, dict[str, float]] = {}
        self.ip_mac: dict[str, str] = {}
        self.reports: dict[str, dict[str, Any]] = {}
        self.http: http_mod.HttpServer | None = None
        self._holds_file = loader.opts.serve_dir / "holds.json"
        self.holds: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(OSError, ValueError, SidusError):
            raw = read_json(self._holds_file)
            if isinstance(raw, dict):
                self.holds = {str(k): v for k, v in raw.items() if isinstance(v, dict)}
        self._last_prune = 0.0
        #: generations the boot tree named, by image: {generation: last time named}
        self.served: dict[str, dict[str, float]] = {}
        #: node_status entries by MAC; the inventory and files they were built from (None:
        #: none built yet); what changed since: MACs and client addresses
        self._entries: dict[str, dict[str, Any]] = {}
        self._entries_of: tuple[object, object] | None = None
        self._stale_macs: set[str] = set()
        self._stale_ips: set[str] = set()
        self._holds_later = supervisor.Later(self._write_holds, HOLDS_DELAY)
        super().__init__(loader)
        loader.stopping = self.stopping

    def _event(self, kind: str, who: str, what: str, at: float | None = None) -> None:
        if kind == "address":  # a report came from address ``who`` for MAC ``what``
            if self.ip_mac.setdefault(who, what) == what:
                self._stale_macs.add(what)
            return
        now = time.time() if at is None else at
        super()._event(kind, who, what, now)
        if kind == "ack":
            self.acks.setdefault(who, []).append(now)
            del self.acks[who][:-20]
            self._stale_macs.add(who)
        elif kind == "proxy":
            self.proxied[who] = now
            self._stale_macs.add(who)
        elif kind in ("sent", "http"):
            name = what.lstrip("/")
            self.fetched.setdefault(who, {})[name] = now
            self._stale_ips.add(who)
            m = MAC_FILE_RE.match(name)
            if m:
                mac = m.group(1).replace("-", ":")
                old = self.ip_mac.get(who)
                if old != mac:
                    self.ip_mac[who] = mac
                    self._stale_macs.update(m for m in (mac, old) if m is not None)
        elif kind == "report":
            self._report(who, what, now)
            self._stale_macs.add(who)

    def _report(self, mac: str, what: str, now: float) -> None:
        stage, _, detail = what.partition(" ")
        r = self.reports.setdefault(mac, {})
        if stage == "root":  # a new boot: what an earlier one reported is over
            r.clear()
        r[stage] = now
        r[f"{stage}_detail"] = detail
        for word in detail.split():  # what the node says of its kernel (any stage)
            k, eq, v = word.partition("=")
            if k in NODE_FACTS and eq:
                r[NODE_FACTS[k]] = v or None  # given empty: none (no module refused)
        inv = self.loader.inventory
        node = inv.by_mac(mac) if inv else None
        gen = next((w for w in detail.split() if w.startswith("gen-")), None)
        if node is not None and stage in ("root-mounted", "overlay", "booted") and gen:
            old = self.holds.get(mac, {})
            self.holds[mac] = {"node": node.name, "image": node.image, "generation": gen,
                               "since": old.get("since", now) if old.get("generation") == gen
                               else now, "seen": now}
            self._holds_dirty = True
            self._holds_new = self._holds_new or old.get("generation") != gen
            self._schedule_holds()
        log.info("report %s (%s): %s %s", mac, node.name if node else "unknown node", stage,
                 detail)

    def on_post(self, ip: str, path: str, form: dict[str, str]) -> int:
        """``POST /sidus/report`` (from the HTTP server's threads): ``mac``, ``stage``,
        ``detail``, and optionally what the node's kernel says (``lockdown``: none,
        integrity, confidentiality; ``secureboot``: on, off, bios; ``modfail``: modules it
        could not load, comma-separated); 204, or 400 for a form without a MAC or stage or
        with a malformed optional field."""
        from sidusctl.core.mac import normalize_mac
        try:
            mac = normalize_mac(form.get("mac", ""))
        except ValueError:
            return 400
        stage = form.get("stage", "")
        if not re.match(r"^[a-z-]{1,20}$", stage):
            return 400
        detail = " ".join(form.get("detail", "").split())[:200]
        for k in NODE_FACTS:
            v = form.get(k)
            if v and not re.match(r"^[a-z0-9_,.-]{1,200}$", v):
                return 400
            if v is not None:
                detail += f" {k}={v}"
        self.inbox.post("address", ip, mac)  # ip_mac is the event loop's: changed there
        self.inbox.post("report", mac, f"{stage} {detail}")
        return 204

    #: the holds changed since ``holds.json`` was written / a node booted a generation the
    #: image store has not been told of; a flush is scheduled
    _holds_dirty = False
    _holds_new = False

    def _schedule_holds(self) -> None:
        """Write the holds within :data:`HOLDS_DELAY` seconds, once for every report that
        arrived meanwhile: in a storm, hundreds of nodes report within seconds, and a write
        (an fsync) per report would hold up the event loop that answers DHCP and TFTP. A
        generation a node just booted is held meanwhile anyway: the boot tree named it, and
        :meth:`keep` holds what the tree named for ``hold_time``. Without a running loop
        (called outside :meth:`serve`) the write happens now."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._holds_later.now()
            return
        self._holds_later.request(loop)

    def _flush_holds(self) -> None:
        """Write ``holds.json`` and tell the image store, if anything changed (a write that
        was due is cancelled)."""
        self._holds_later.now()

    def _write_holds(self) -> None:
        if self._holds_dirty:
            self._holds_dirty = False
            self._save_holds()
        if self._holds_new:
            self._holds_new = False
            self.sync_holds()

    def _save_holds(self) -> None:
        try:
            write_json(self._holds_file, self.holds)
        except OSError as e:
            log.warning("cannot write %s: %s", self._holds_file, e)

    def counters(self) -> list[dict[str, Any]]:
        """The servers' counters and the HTTP server's (files sent, refusals, reports)."""
        return [*super().counters(), self.http.stats.as_dict() if self.http else {}]

    def _write_status(self, force: bool = False) -> None:
        self._flush_holds()  # the status never shows a generation the store does not hold
        super()._write_status(force)
        now = time.time()
        if now - self._last_prune >= 30:
            self._last_prune = now
            if self.prune():
                self.changes += 1  # "held" shrank: the next write shows it

    def apply(self, new: supervisor.ServeConfig) -> None:
        """Swap ``new`` in as :meth:`Supervisor.apply` does, have the HTTP server serve the
        squashfs exports of an image the inventory names now, then tell the image store the
        holds (:meth:`sync_holds`)."""
        super().apply(new)
        inv = self.loader.inventory
        if self.http is not None and inv is not None:
            self.http.add_mounts(self.loader.http_config(inv.network.server).mounts)
        self.sync_holds()

    def held(self, now: float | None = None) -> dict[str, set[str]]:
        """The generations held, by image: booted by a node seen in the last ``hold_time``
        seconds (a DHCP ACK, a file, a report)."""
        now = time.time() if now is None else now
        out: dict[str, set[str]] = {}
        for mac, h in self.holds.items():
            if now - self._seen(mac, float(h.get("seen", 0))) <= self.loader.opts.hold_time:
                out.setdefault(str(h.get("image")), set()).add(str(h.get("generation")))
        return out

    def _seen(self, mac: str, base: float) -> float:
        t = max([base, *self.acks.get(mac, [])[-1:]])
        r = self.reports.get(mac, {})
        return max([t, *(v for k, v in r.items() if isinstance(v, float))])

    def keep(self, now: float | None = None) -> dict[str, dict[str, float]]:
        """What must stay served, by image: ``{generation: until}``: each generation a node
        booted, until ``hold_time`` after that node was last seen, and each generation the
        boot tree names (now or lately), until ``hold_time`` after it stopped naming it (a
        node may have read its kernel command line just before). Records, as it goes, that
        the tree names its generations at ``now`` (``served``): the "lately" of later calls."""
        now = time.time() if now is None else now
        hold = self.loader.opts.hold_time
        for name, f in self.loader.files.items():
            for g in {f.generation, f.squashfs.generation if f.squashfs else None} - {None}:
                self.served.setdefault(name, {})[str(g)] = now
        out: dict[str, dict[str, float]] = {}
        for name, gens in self.served.items():
            for g, t in gens.items():
                if t + hold > now:
                    out.setdefault(name, {})[g] = t + hold
        for mac, h in self.holds.items():
            until = self._seen(mac, float(h.get("seen", 0))) + hold
            name, g = str(h.get("image")), str(h.get("generation"))
            if until > now:
                out.setdefault(name, {})[g] = max(until, out.get(name, {}).get(g, 0.0))
        return out

    def sync_holds(self) -> dict[str, dict[str, float]]:
        """Tell the image store what :meth:`keep` says (``images/<name>/holds/``), so that
        neither a build nor a prune deletes a generation a running node reads; the holds."""
        keep = self.keep()
        inv = self.loader.inventory
        store = ImageStore(self.loader.opts.state, recover=False)
        for name in set(inv.images() if inv else []) | set(keep):
            try:
                store.set_holds(name, self.holder, keep.get(name, {}))
            except (OSError, SidusError) as e:
                log.warning("cannot hold generations of %s: %s", name, e)
        return keep

    @property
    def holder(self) -> str:
        """This serve-pxe's name in the image store's holds."""
        return f"serve-pxe@{self.loader.opts.interface}"

    def prune(self) -> list[str]:
        """Stop serving what no node holds any more: squashfs exports (beyond the retention
        count), NFS exports of generations, the kernels and initrds of the boot tree
        (:func:`~sidusctl.netboot.tree.prune_boot`), and the generation directories themselves
        (:meth:`ImageStore.prune`: never ``current`` or ``previous``); what was removed
        (``image/generation`` for files and directories). The export of each image's
        ``current`` generation is kept, whether or not the boot tree names it yet."""
        inv = self.loader.inventory
        if inv is None:
            return []
        keep = self.sync_holds()  # what the tree names now (the loader's files) included
        out = []
        store = ImageStore(self.loader.opts.state, recover=False)
        # and each image's current generation in the store: a reload exports it and renders
        # the boot tree, and serves them (self.loader.files) only after; a prune in between
        # deleted the fresh export (--retain 0) and the next boots had no root
        current: dict[str, str] = {}
        for name in inv.images():
            with contextlib.suppress(SidusError):
                current[name] = store.get(name).dir.name
        for name in squash_images(inv):
            gens = set(keep.get(name, {})) | ({current[name]} if name in current else set())
            out += [f"{name}/{g}" for g in squash.prune(self.loader.opts.state, name, gens,
                                                        self.loader.opts.retain)]
        nfs = self.loader.nfs
        if nfs is not None and nfs.backend != "off":
            want = nfs_paths(self.loader.opts, inv, self.loader.files, self.loader.roots)
            want.update({k: v for k, v in nfs.exports.items()
                         if k.partition("/")[2] in keep.get(k.partition("/")[0], {})})
            nfs.update(want)
        # the tree's kernels and initrds, by generation, kept as long: a node that read its
        # configuration just before a reload fetches the kernel it names after it
        boot = {name: set(gens) for name, gens in keep.items()}
        for name, g in current.items():
            boot.setdefault(name, set()).add(g)
        out += [f"{g} (kernel, initrd)" for g in prune_boot(self.loader.opts.tftp_root, boot)]
        for name in inv.images():
            out += [f"{name}/{g} (directory)" for g in store.prune(name)]
        return out

    def node_status(self) -> list[dict[str, Any]]:
        """One entry per node of the inventory: :func:`sidusctl.netboot.pxestatus.nodes`,
        built again only for the nodes that had an event since the last call (a DHCP ACK
        or proxyDHCP reply, a file fetched from one of their addresses, a report), and for
        all after a reload (another inventory or boot files). In a 500-node storm the status
        is written every 2 s; building every entry each time was most of a write."""
        inv = self.loader.inventory
        if inv is None:
            return []
        src = (inv, self.loader.files)
        only: set[str] | None = None
        if (self._entries_of is not None and src[0] is self._entries_of[0]
                and src[1] is self._entries_of[1]):
            only = set(self._stale_macs)
            for ip in self._stale_ips:
                if (mac := self.ip_mac.get(ip)) is not None:
                    only.add(mac)
                if (node := inv.by_ip(ip)) is not None:
                    only.add(node.mac)
        self._stale_macs, self._stale_ips = set(), set()
        new = pxestatus.nodes(inv, self.loader.files, acks=self.acks, proxied=self.proxied,
                              fetched=self.fetched, ip_mac=self.ip_mac,
                              reports=self.reports, holds=self.holds, only=only)
        if only is None:
            self._entries = {}
        self._entries.update((e["mac"], e) for e in new)
        self._entries_of = src
        return [self._entries[n.mac] for n in inv.nodes]

    def status(self) -> dict[str, Any]:
        """The supervisor's status plus ``http`` (the HTTP server's counters, None without one; its
        internal errors added to ``internal_errors``) and ``pxe``: the inventory file, interface,
        :meth:`node_status` and ``held`` (what :meth:`keep` keeps: sorted generations by image)."""
        st = super().status()
        inv = self.loader.inventory
        st["http"] = self.http.stats.as_dict() if self.http is not None else None
        if self.http is not None:
            st["internal_errors"] += self.http.stats.internal_errors
        st["pxe"] = {"inventory": inv.file if inv else None,
                     "interface": self.loader.opts.interface, "nodes": self.node_status(),
                     "held": {k: sorted(v) for k, v in self.keep().items()}}
        return st
