"""``vnode up`` and ``vnode down`` of a platform file (:mod:`sidusctl.vnode.platform_file`) on
this host, and the checks ``up`` makes before it creates anything. Other commands may run at
the same time (they wait for the store's lock, step by step): ``up`` and ``down`` take what
they made or removed meanwhile as done rather than fail."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from sidusctl.core.errors import ConfigError, NotFoundError, SidusError, StateError

if TYPE_CHECKING:
    from sidusctl.vnode.platform import Platform
    from sidusctl.vnode.platform_file import PlatformSpec
    from sidusctl.vnode.store import Store

Reporter = Callable[[str, str, int], None]


def check_images(store: Store, spec: PlatformSpec, skip: Collection[str] = ()) -> None:
    """NotFoundError listing each image of ``spec``'s vnodes (but those named in ``skip``, which
    exist already) that ``store`` cannot find (:meth:`Store.find_image`: a built or imported
    image, or a tarball path). Reads only: ``up --dry-run`` calls it too."""
    missing: dict[str, str] = {}
    for v in spec.vnodes:
        if v.name not in skip and v.image not in missing:
            try:
                store.find_image(v.image)
            except NotFoundError as e:
                missing[v.image] = f"{spec.file}: vnode {v.name}: key 'image': {e.message}"
    if missing:
        raise NotFoundError("\n".join(missing.values()),
                            hint="import or build the image(s) first (sidusctl image list)")


def _check_before_up(p: Platform, spec: PlatformSpec, existing: dict[str, Any],
                     have: dict[str, Any]) -> None:
    """What :func:`up` checks against this host before it creates anything: a vnetwork that
    exists with another CIDR (ConfigError), images of the vnodes to create that do not exist
    (NotFoundError listing each, :func:`check_images`)."""
    for n in spec.vnetworks:
        if n.name in existing and existing[n.name].cidr != n.cidr:
            raise ConfigError(spec.file, f"vnetworks.{n.name}.cidr",
                              f"vnetwork {n.name} exists with CIDR {existing[n.name].cidr}")
    check_images(p.store, spec, have)


def up(p: Platform, spec: PlatformSpec, *, wait_ssh: bool = True,
       timeout: float = 180.0, progress: Reporter | None = None) -> dict[str, Any]:
    """Create the vnetworks (those that exist with the same CIDR are kept), create the vnodes
    (existing ones kept), start every READY one, then wait for SSH on all in parallel.
    Returns ``{"started": [...], "failed": {name: message}, "ssh": {name: seconds|None}}``.
    What another command makes meanwhile counts as made (a vnetwork of the same CIDR, a vnode
    of the same image, a vnode started); a vnode destroyed meanwhile is failed. Raises the
    ConfigError/NotFoundError of :func:`_check_before_up`, and the error of a vnetwork or
    vnode it cannot create; an interrupt goes through at once."""
    def tick(stage: str, name: str, total: int) -> None:
        if progress:
            progress(stage, name, total)

    existing = {n.name: n for n in p.net_list()}
    have = {r["name"]: r for r in p.list()}
    _check_before_up(p, spec, existing, have)
    for n in spec.vnetworks:
        name = n.name
        if name in existing:
            continue
        try:
            p.net_create(name, n.cidr, **n.options())
        except StateError:
            made = {x.name: x for x in p.net_list()}
            if name not in made or made[name].cidr != n.cidr:
                raise
            # another command made it meanwhile, as the file says: kept
        tick("vnetworks", name, len(spec.vnetworks))
    for v in spec.vnodes:
        if v.name not in have:
            try:
                p.create(v.name, v.image, **v.create)
            except StateError:
                if not _made_meanwhile(p, v.name, v.image):
                    raise
        tick("create", v.name, len(spec.vnodes))
    have = {r["name"]: r for r in p.list()}
    failed: dict[str, str] = {v.name: f"vnode {v.name!r} was destroyed while 'up' ran"
                              for v in spec.vnodes if v.name not in have}
    todo = [v.name for v in spec.vnodes if v.name in have and have[v.name]["state"] == "READY"]
    started: list[str] = [v.name for v in spec.vnodes
                          if v.name in have and v.name not in todo]
    # Starts run one after the other in this thread: each holds the store lock while it
    # snapshots and calls lxc-start -d (a fraction of a second), and pyroute2's namespace
    # switching is not thread-safe. The containers then boot concurrently, and the SSH wait
    # below probes them all in parallel.
    for vname in todo:
        try:
            p.start(vname)
            started.append(vname)
        except SidusError as e:
            if _running(p, vname):  # started by another command meanwhile
                started.append(vname)
            else:
                failed[vname] = str(e)
        tick("start", vname, len(todo))
    res: dict[str, Any] = {"started": sorted(started), "failed": failed}
    if wait_ssh and started:
        res["ssh"] = p.wait(started, timeout=timeout,
                            progress=lambda n: tick("ssh", n, len(started)))
    return res


def _made_meanwhile(p: Platform, name: str, image: str) -> bool:
    """Whether vnode ``name`` exists now, made from ``image`` (by another command)."""
    try:
        return p.get(name).image == image
    except NotFoundError:
        return False


def _running(p: Platform, name: str) -> bool:
    """Whether vnode ``name`` runs now (RUNNING or FROZEN, as LXC says)."""
    return any(r["name"] == name and r["state"] in ("RUNNING", "FROZEN") for r in p.list())


def down(p: Platform, spec: PlatformSpec) -> dict[str, list[str]]:
    """Destroy the file's vnodes (stopping them) and delete its vnetworks; missing ones are
    skipped, so ``down`` after a half-done ``up`` cleans what there is, and one removed by
    another command while ``down`` runs (a second ``down``, a ``destroy``) counts as gone.
    What this call removed: ``{"vnodes": [name, ...], "vnetworks": [name, ...]}``, in the
    file's order. Raises the error of a vnode or vnetwork it cannot remove (StateError,
    SidusError)."""
    removed: dict[str, list[str]] = {"vnodes": [], "vnetworks": []}
    have = {r["name"] for r in p.list()}
    for v in spec.vnodes:
        if v.name in have:
            with contextlib.suppress(NotFoundError):  # destroyed by another command meanwhile
                p.destroy(v.name)
                removed["vnodes"].append(v.name)
    nets = {n.name for n in p.net_list()}
    for n in spec.vnetworks:
        if n.name in nets:
            with contextlib.suppress(NotFoundError):
                p.net_delete(n.name)
                removed["vnetworks"].append(n.name)
    return removed
