"""Platforms across many hosts: the frontend that plans and fans out, nothing per host.

A platform file with a ``[pnodes]`` section spans physical nodes (pnodes). Each pnode runs the
same sidusctl with its own state directory, vnode store, LXC, btrfs and tc; the frontend talks
to it only through the CLI a person would type there, with ``--json`` answers, over OpenSSH,
fanned out by ClusterShell (:mod:`sidusctl.subsys.fanout`). There is no daemon of ours: what a
pnode runs is in its own state directory, under ``platforms/<name>.toml``, and the plan (who
runs where, with which addresses) is kept by the frontend in ``<state>/platforms/<name>.json``.

Every operation runs on all pnodes at once and reports per pnode; a pnode that cannot be
reached is reported as such (after the ssh connect timeout), never waited for forever. Each
step is one ssh session per pnode: ``up`` is two (facts with the images each pnode has, then
the pnode's own ``vnode up``), plus the copies of the images a pnode lacks.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import socket
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from sidusctl import __version__
from sidusctl.core.errors import ConfigError, NotFoundError, SidusError
from sidusctl.core.log import get_logger
from sidusctl.core.state import read_json, write_json
from sidusctl.subsys.fanout import Fanout, Host, HostResult, expand, fold_names
from sidusctl.subsys.imagestore import ImageStore
from sidusctl.subsys.tarball import COMPRESSIONS, tar_suffix
from sidusctl.vnode import pnode as pnode_facts
from sidusctl.vnode.cluster_plan import Plan, PnodeInfo, make_plan
from sidusctl.vnode.placement import Capacity
from sidusctl.vnode.platform_file import PlatformSpec

log = get_logger("cluster")

Progress = Callable[[str], None]
#: marks an image tarball a pnode already has, in the answer of :meth:`Cluster.facts_and_images`
PRESENT = "sidusctl-image-present "
#: seconds a pnode has to answer a short command (facts, status): a pnode that is a TCG guest
#: on a loaded host needs 30-50 s just to start Python and import sidusctl
ANSWER_TIMEOUT = 180.0


def parse_facts_answer(text: str) -> tuple[dict[str, Any], set[str]]:
    """What a pnode printed for :meth:`Cluster.facts_and_images`: its facts (a JSON object)
    then one :data:`PRESENT` line per image it has -> ``(facts, image names)``; ValueError if
    it does not start with a JSON object."""
    text = text.lstrip()
    doc, end = json.JSONDecoder().raw_decode(text)
    if not isinstance(doc, dict):
        raise ValueError("pnode facts are not a JSON object")
    return doc, {line[len(PRESENT):] for line in text[end:].splitlines()
                 if line.startswith(PRESENT)}


class PnodeError(SidusError):
    """One or more pnodes failed an operation; :attr:`report` holds every pnode's outcome."""

    def __init__(self, what: str, problems: Mapping[str, str], report: Any = None) -> None:
        self.problems = dict(problems)
        self.report = report
        super().__init__(f"{what} failed on {fold_names(problems)}:\n" +
                         "\n".join(f"  {h}: {p}" for h, p in problems.items()))


class Cluster:
    """The pnodes of platform ``spec`` (which must have ``[pnodes]``), driven from this host
    whose state directory is ``state_dir`` (images are taken from its image store)."""

    def __init__(self, spec: PlatformSpec, state_dir: Path) -> None:
        if spec.pnodes is None:
            raise ConfigError(spec.file, "pnodes", "missing", expected="a [pnodes] section")
        self.spec = spec
        self.pn = spec.pnodes
        self.state_dir = state_dir
        self.name = Path(spec.file).stem
        self.hosts: dict[str, Host] = {}
        self.state_dirs: dict[str, str] = {}
        self.root_ifaces: dict[str, str | None] = {}
        for h in spec.pnode_names:
            o = self.pn.host.get(h)
            self.hosts[h] = Host(h, (o.address if o else None) or h,
                                 (o.ssh_port if o else None) or self.pn.ssh_port, self.pn.user)
            self.state_dirs[h] = (o.state_dir if o else None) or self.pn.state_dir
            self.root_ifaces[h] = (o.root_interface if o else None) or self.pn.root_interface
        self.fo = Fanout(self.hosts.values(), connect_timeout=self.pn.connect_timeout,
                         fanout=self.pn.fanout,
                         known_hosts=state_dir / "platforms" / "known_hosts",
                         ssh_options=self.pn.ssh_options)

    def close(self) -> None:
        """Delete the fan-out's generated ssh_config (:meth:`Fanout.close`); idempotent."""
        self.fo.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- talking to pnodes -----------------------------------------------------------------
    def cli(self, host: str, *args: str) -> list[str]:
        """The argv that runs ``sidusctl ARGS`` on pnode ``host`` with its state directory."""
        return [*shlex.split(self.pn.sidusctl), "--state-dir", self.state_dirs[host], *args]

    def remote_dir(self, host: str) -> str:
        """Where pnode ``host`` keeps platform files: ``<its state directory>/platforms``."""
        return f"{self.state_dirs[host]}/platforms"

    def remote_file(self, host: str) -> str:
        """This platform's file on pnode ``host``: ``<remote_dir>/<name>.toml``."""
        return f"{self.remote_dir(host)}/{self.name}.toml"

    def _json_each(self, commands: Mapping[str, Sequence[str]], *, timeout: float | None = None,
                   stdin: Mapping[str, bytes] | None = None
                   ) -> tuple[dict[str, Any], dict[str, str], dict[str, HostResult]]:
        """Run ``commands`` and parse each stdout as JSON: (answers, problems, raw results).
        A pnode that exits non-zero but printed JSON has both an answer and a problem."""
        res = self.fo.run_each(commands, timeout=timeout, stdin=stdin)
        answers: dict[str, Any] = {}
        problems: dict[str, str] = {}
        for h, r in res.items():
            if r.reachable and not r.timed_out and r.stdout.strip():
                try:
                    answers[h] = json.loads(r.stdout)
                except ValueError:
                    problems[h] = f"not JSON on stdout: {r.stdout.strip()[:200]!r}"
            why = r.problem()
            if why:
                problems[h] = why
        return answers, problems, res

    # -- facts, check, init ----------------------------------------------------------------
    def facts(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Every reachable pnode's :func:`sidusctl.vnode.pnode.facts`, and the problems of the
        others (one line each)."""
        facts, _have, problems = self.facts_and_images({})
        return facts, problems

    def facts_and_images(self, images: Mapping[str, str]
                         ) -> tuple[dict[str, dict[str, Any]], dict[str, set[str]],
                                    dict[str, str]]:
        """:meth:`facts`, and in the same SSH round trip which of ``images`` (name relative
        to the pnode's platforms directory, as :meth:`image_paths` gives them) each pnode
        already has: ``(facts, {pnode: names present}, {pnode: problem})``."""
        cmds = {}
        for h in self.hosts:
            probes = "".join(f"test -f {shlex.quote(f'{self.remote_dir(h)}/{rel}')} && "
                             f"echo {shlex.quote(PRESENT + rel)}; " for rel in images.values())
            cmds[h] = ["sh", "-c", f'"$@" || exit $?; {probes}exit 0', "sh",
                       *self.cli(h, "pnode", "facts", "--json")]
        res = self.fo.run_each(cmds, timeout=ANSWER_TIMEOUT)
        facts: dict[str, dict[str, Any]] = {}
        have: dict[str, set[str]] = {}
        problems: dict[str, str] = {}
        for h, r in res.items():
            if (why := r.problem()):
                problems[h] = why
                continue
            try:
                facts[h], have[h] = parse_facts_answer(r.stdout)
            except ValueError:
                problems[h] = f"not JSON on stdout: {r.stdout.strip()[:200]!r}"
        return facts, have, problems

    def needs(self) -> dict[str, Any]:
        """What the file asks of every pnode (the arguments of :func:`pnode.shortfalls`)."""
        qdiscs: set[str] = set()
        ctrls: set[tuple[int, str]] = set()
        cow = False
        for v in self.spec.vnodes:
            c = v.create
            cow = cow or c.get("fs") == "cow"
            if c.get("bandwidth"):
                qdiscs.add("tbf")
            if c.get("latency"):
                qdiscs.add("netem")
            if c.get("cpus") or c.get("cpuset"):
                ctrls.add((1, "cpu") if not c.get("cpuset") else (1, "cpuset"))
            if c.get("mem"):
                ctrls.add((int(c["mem"].get("hierarchy", 1)), "memory"))
            if c.get("io"):
                h = int(c.get("io_hierarchy") or 1)
                ctrls.add((h, "blkio" if h == 1 else "io"))
        return {"version": __version__, "need_cow": cow, "need_qdiscs": qdiscs,
                "need_controllers": ctrls}

    def check(self) -> dict[str, list[str]]:
        """Per pnode, what it lacks for this platform (empty list: ready); an unreachable
        pnode has one entry saying so."""
        facts, problems = self.facts()
        needs = self.needs()
        out: dict[str, list[str]] = {}
        for h in self.hosts:
            if h in facts:
                out[h] = pnode_facts.shortfalls(facts[h], **needs)
            else:
                out[h] = [problems.get(h, "no answer")]
        return out

    def init(self, *, btrfs_image: int | None = None) -> dict[str, str]:
        """Prepare every pnode's vnode store (a ``btrfs_image``-byte btrfs loop file when given
        and the store is not btrfs yet, else the plain directory), ship the platform's images
        and unpack them into each pnode's vnode image cache (:meth:`cache_images`). Returns per
        pnode what was done; PnodeError for those that failed."""
        facts, problems = self.facts()
        cmds = {}
        for h, f in facts.items():
            store = f.get("store", {})
            if store.get("ready") and (store.get("fs") == "btrfs" or not btrfs_image):
                continue
            args = ["vnode", "init"] + (["--btrfs-image", str(btrfs_image)] if btrfs_image else [])
            cmds[h] = self.cli(h, *args)
        done = {h: "store already ready" for h in facts if h not in cmds}
        if cmds:
            res = self.fo.run_each(cmds, timeout=300)
            for h, r in res.items():
                why = r.problem()
                if why:
                    problems[h] = why
                else:
                    done[h] = "store initialised"
        if problems:
            raise PnodeError("pnode init", problems, done)
        shipped = self.ship_images(list(facts))
        self.cache_images(list(facts))
        for h in done:
            done[h] += f"; {shipped[h]}; image cache ready"
        return done

    # -- images ----------------------------------------------------------------------------
    def local_image(self, image: str) -> Path:
        """The tarball of ``image`` on this host: a path, or a name in the image store."""
        if "/" in image or any(image.endswith(s) for s in COMPRESSIONS):
            p = Path(image).expanduser()
            if not p.is_file():
                raise NotFoundError(f"image tarball {image} does not exist")
            return p.resolve()
        img = ImageStore(self.state_dir, recover=False).get(image)
        if img.tarball is None:
            raise NotFoundError(f"image {image!r} has no rootfs tarball to send to the pnodes",
                                hint=f"sidusctl build {image} --tar")
        return img.tarball

    def _sha256(self, path: Path) -> str:
        """sha256 of ``path``, remembered in ``STATE/platforms/digests.json`` by path, size
        and mtime (an image tarball is hashed once, not at every ``up``)."""
        cache_file = self.state_dir / "platforms" / "digests.json"
        try:
            cache: dict[str, str] = read_json(cache_file)
        except (FileNotFoundError, SidusError):
            cache = {}
        st = path.stat()
        stamp = f"{path}:{st.st_size}:{st.st_mtime_ns}"
        if stamp not in cache:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(4 << 20):
                    h.update(chunk)
            cache[stamp] = h.hexdigest()
            write_json(cache_file, cache)
        return cache[stamp]

    def image_paths(self) -> dict[str, tuple[Path, str, str]]:
        """image as written -> (local tarball, sha256, name on every pnode)."""
        out = {}
        for image in dict.fromkeys(v.image for v in self.spec.vnodes):
            local = self.local_image(image)
            digest = self._sha256(local)
            out[image] = (local, digest, f"images/{digest}{tar_suffix(local)}")
        return out

    def ship_images(self, hosts: Iterable[str], have: Mapping[str, set[str]] | None = None
                    ) -> dict[str, str]:
        """Send each image tarball to the pnodes that lack it: copied through ClusterShell to a
        temporary name, its sha256 checked there, then renamed to a name made of that digest.
        A pnode that has the name has the content (nothing else ever writes it), so each
        pnode receives an image once. ``have``: what each pnode is known to have (from
        :meth:`facts_and_images`; None: ask them). Returns per pnode what was sent;
        PnodeError on failure."""
        hosts = list(hosts)
        sent: dict[str, list[str]] = {h: [] for h in hosts}
        problems: dict[str, str] = {}
        for _image, (local, digest, rel) in self.image_paths().items():
            if have is not None:
                need = [h for h in hosts if rel not in have.get(h, set())]
            else:
                probe = {h: ["sh", "-c", 'test -f "$1" && echo present || true', "sh",
                             f"{self.remote_dir(h)}/{rel}"] for h in hosts}
                res = self.fo.run_each(probe, timeout=60)
                need = [h for h, r in res.items() if r.ok and r.stdout.strip() != "present"]
                problems.update({h: r.problem() or "" for h, r in res.items() if not r.ok})
            by_dir: dict[str, list[str]] = {}
            for h in need:
                by_dir.setdefault(self.remote_dir(h), []).append(h)
            for rdir, hs in by_dir.items():
                self.fo.run(["mkdir", "-p", f"{rdir}/images"], hs, timeout=60)
                tmp = f"{rdir}/{rel}.part"
                for h, r in self.fo.copy(local, tmp, hs, timeout=3600).items():
                    if not r.ok:
                        problems[h] = f"copying {local.name}: {r.problem()}"
                ok = [h for h in hs if h not in problems]
                verify = self.fo.run(["sh", "-c", 'echo "$1  $2" | sha256sum -c --quiet - && '
                                      'mv -f "$2" "$3"', "sh", digest, tmp, f"{rdir}/{rel}"],
                                     ok, timeout=600)
                for h, r in verify.items():
                    if r.ok:
                        sent[h].append(local.name)
                    else:
                        problems[h] = f"{local.name} arrived damaged: {r.problem()}"
        if problems:
            raise PnodeError("sending images", problems)
        return {h: (f"sent {', '.join(s)}" if s else "images already there")
                for h, s in sent.items()}

    def cache_images(self, hosts: Iterable[str]) -> None:
        """Have each pnode unpack the platform's images into its vnode image cache now (as the
        first ``vnode create`` of an image would), so that ``up`` does not pay for it: one
        ``sidusctl vnode cache-image`` per pnode for all the images (a pnode that is a TCG
        guest pays seconds for each Python start). PnodeError on failure."""
        images = self.image_paths()
        cmds = {h: self.cli(h, "-q", "vnode", "cache-image",
                            *(f"{self.remote_dir(h)}/{rel}" for _, _, rel in images.values()))
                for h in hosts}
        res = self.fo.run_each(cmds, timeout=3600)
        problems = {h: p for h, r in res.items() if (p := r.problem())}
        if problems:
            raise PnodeError("unpacking images into the vnode cache", problems)

    # -- plan ------------------------------------------------------------------------------
    def pnode_infos(self, facts: Mapping[str, dict[str, Any]]) -> list[PnodeInfo]:
        """One :class:`PnodeInfo` per pnode, in the file's order: its address resolved to IPv4
        (:class:`ConfigError` if it cannot be), its root interface as configured or else the one
        holding that address in ``facts`` (None if none), and that interface's MTU (or 1500)."""
        out = []
        for h, host in self.hosts.items():
            f = facts.get(h, {})
            addr = host.address or h
            try:
                addr = socket.gethostbyname(addr)
            except OSError as e:
                raise ConfigError(self.spec.file, f"pnodes.host.{h}.address",
                                  f"cannot resolve {addr!r}: {e}") from e
            root = self.root_ifaces[h]
            ifaces = f.get("interfaces", {})
            if root is None:
                root = next((n for n, d in ifaces.items() if addr in d.get("addresses", [])),
                            None)
            mtu = int(ifaces.get(root, {}).get("mtu", 1500)) if root else 1500
            out.append(PnodeInfo(h, addr, root, mtu))
        return out

    def plan(self, facts: Mapping[str, dict[str, Any]]) -> Plan:
        """The plan of the platform on pnodes whose facts are ``facts`` (see
        :func:`~sidusctl.vnode.cluster_plan.make_plan`)."""
        caps = [Capacity(h, int(facts[h]["cores"]), int(facts[h]["mem_mib"]),
                         int(facts[h]["store"]["free_mib"])) for h in self.hosts if h in facts]
        images = self.image_paths()
        need = sum(p.stat().st_size for p, _, _ in images.values()) * 4 // (1 << 20)
        plan = make_plan(self.spec, self.pnode_infos(facts), caps,
                         {i: rel for i, (_, _, rel) in images.items()}, need_store_mib=need)
        for h, doc in plan.files.items():  # image paths are relative to the pnode's dir
            for v in doc["vnodes"]:
                v["image"] = f"{self.remote_dir(h)}/{v['image']}"
        return plan

    def record_path(self) -> Path:
        """Where this host keeps the platform's record of the last ``up``:
        ``<state>/platforms/<name>.json``."""
        return self.state_dir / "platforms" / f"{self.name}.json"

    def record(self) -> dict[str, Any]:
        """The plan saved by the last ``up`` (NotFoundError if none)."""
        try:
            d: dict[str, Any] = read_json(self.record_path())
        except FileNotFoundError:
            raise NotFoundError(f"platform {self.name!r} was never brought up from this host",
                                hint=f"sidusctl vnode up {self.spec.file}") from None
        return d

    @staticmethod
    def _tar(files: Mapping[str, bytes]) -> bytes:
        """An uncompressed tar of ``files`` (relative name -> content, mode 0600)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for rel, data in files.items():
                ti = tarfile.TarInfo(rel)
                ti.size, ti.mode, ti.mtime = len(data), 0o600, int(time.time())
                tf.addfile(ti, io.BytesIO(data))
        return buf.getvalue()

    def _bundle(self, host: str, doc: dict[str, Any]) -> bytes:
        """A tar of the pnode's platform file and the key files it names."""
        files: dict[str, bytes] = {}
        for v in doc["vnodes"]:
            for k in ("ssh_pubkey", "ssh_privkey"):
                if k in v:
                    data = Path(v[k]).expanduser().read_bytes()
                    rel = f"keys/{v['name']}.{k}"
                    files[rel] = data
                    v[k] = f"{self.remote_dir(host)}/{rel}"
        files[f"{self.name}.toml"] = tomli_w.dumps(doc).encode()
        return self._tar(files)

    # -- lifecycle -------------------------------------------------------------------------
    def up(self, *, dry_run: bool = False, wait_ssh: bool = True, timeout: float = 180,
           progress: Progress | None = None) -> dict[str, Any]:
        """Bring the platform up on every pnode at once (see the module docstring). With
        ``dry_run``, only the plan. Returns ``{"plan": ..., "pnodes": {host: answer},
        "images": {host: what was sent}, "timings": {phase: seconds}}`` (phases ``facts``,
        ``plan``, ``images``, ``pnodes_up`` and ``pnode_up``: per pnode, its own ``vnode
        up``); PnodeError (with that report) if a pnode failed or could not be reached."""
        timings: dict[str, Any] = {}
        t0 = time.monotonic()

        def say(msg: str) -> None:
            log.info("%s", msg)
            if progress:
                progress(msg)

        def phase(name: str) -> None:
            nonlocal t0
            now = time.monotonic()
            timings[name] = round(now - t0, 3)
            t0 = now

        facts, have, problems = self.facts_and_images(
            {i: rel for i, (_, _, rel) in self.image_paths().items()})
        if problems:
            raise PnodeError("reaching the pnodes", problems)
        phase("facts")
        plan = self.plan(facts)
        phase("plan")
        report: dict[str, Any] = {"plan": plan.to_json(), "pnodes": {}, "timings": timings}
        if dry_run:
            report["files"] = plan.files
            return report
        say(f"plan: {len(plan.placement)} vnodes on {len(self.hosts)} pnodes")
        report["images"] = self.ship_images(self.hosts, have)
        phase("images")
        say("images on every pnode")
        write_json(self.record_path(), {"file": str(Path(self.spec.file).resolve()),
                                        **plan.to_json()})
        cmds, stdin = {}, {}
        for h in self.hosts:
            stdin[h] = self._bundle(h, plan.files[h])
            up = self.cli(h, "vnode", "up", self.remote_file(h), "--json", "--timeout",
                          str(timeout), "--wait" if wait_ssh else "--no-wait")
            cmds[h] = ["sh", "-c", 'mkdir -p "$1" && tar -x -C "$1" && shift && exec "$@"',
                       "sh", self.remote_dir(h), *up]
        answers, problems, res = self._json_each(cmds, stdin=stdin, timeout=timeout + 600)
        phase("pnodes_up")
        timings["pnode_up"] = {h: None if r.elapsed is None else round(r.elapsed, 3)
                               for h, r in res.items()}
        report["pnodes"] = answers
        if problems:
            raise PnodeError("vnode up", problems, report)
        say("every pnode is up")
        return report

    def down(self) -> dict[str, str]:
        """Destroy the platform's vnodes and vnetworks on every reachable pnode (whatever a
        half-done ``up`` left); per pnode what happened. PnodeError lists the pnodes that
        could not be cleaned (run ``down`` again once they answer)."""
        cmds = {h: ["sh", "-c", 'f=$1; shift; [ ! -e "$f" ] || { "$@" && rm -f "$f"; }', "sh",
                    self.remote_file(h), *self.cli(h, "vnode", "down", self.remote_file(h))]
                for h in self.hosts}
        res = self.fo.run_each(cmds, timeout=600)
        problems = {h: p for h, r in res.items() if (p := r.problem())}
        if problems:
            raise PnodeError("vnode down", problems, {h: "down" for h in res if h not in problems})
        self.record_path().unlink(missing_ok=True)
        return {h: "down" for h in res}

    def status(self) -> dict[str, Any]:
        """DETER's shape, per pnode then per vnode: ``{"hosts": {pnode: {vnode: {state,
        boot, exit_code, addresses}}}, "unreachable": {pnode: why}}``, only this
        platform's vnodes."""
        mine = {v.name for v in self.spec.vnodes}
        answers, problems, _ = self._json_each(
            {h: self.cli(h, "vnode", "status", "--json") for h in self.hosts}, timeout=ANSWER_TIMEOUT)
        hosts: dict[str, Any] = {}
        for h in self.hosts:
            if h in answers:
                merged: dict[str, Any] = {}
                for vnodes in answers[h].get("hosts", {}).values():
                    merged.update({n: d for n, d in vnodes.items() if n in mine})
                hosts[h] = dict(sorted(merged.items()))
        return {"hosts": hosts, "unreachable": {h: p for h, p in problems.items()
                                                if h not in answers}}

    def _by_pnode(self, names: Sequence[str]) -> dict[str, list[str]]:
        placement: dict[str, str] = self.record()["placement"]
        unknown = [n for n in names if n not in placement]
        if unknown:
            raise NotFoundError(f"no vnode {fold_names(unknown)} in platform {self.name!r}")
        out: dict[str, list[str]] = {}
        for n in names:
            out.setdefault(placement[n], []).append(n)
        return out

    def exec(self, nodeset: str, argv: Sequence[str], *, timeout: float = 600
             ) -> dict[str, dict[str, Any]]:
        """Run ``argv`` in every vnode of ``nodeset`` (a node set of vnode names), on all
        pnodes at once: ``{vnode: {"rc", "stdout", "stderr"}}``; a vnode whose pnode failed
        has ``rc`` None and the pnode's problem in ``stderr``."""
        names = expand(nodeset, key="vnodes")
        groups = self._by_pnode(names)
        cmds = {h: self.cli(h, "vnode", "exec", "--json", fold_names(ns), "--", *argv)
                for h, ns in groups.items()}
        answers, problems, _ = self._json_each(cmds, timeout=timeout)
        out: dict[str, dict[str, Any]] = {}
        for h, ns in groups.items():
            got = answers.get(h, {})
            for n in ns:
                out[n] = got.get(n) or {"rc": None, "stdout": "",
                                        "stderr": problems.get(h, "no answer")}
        return out

    def wait(self, *, timeout: float = 120) -> dict[str, float | None]:
        """Wait on every pnode at once until its vnodes answer SSH: seconds per vnode (None:
        no answer in time or its pnode failed)."""
        groups = self._by_pnode([v.name for v in self.spec.vnodes])
        cmds = {h: self.cli(h, "vnode", "wait", "--json", "--timeout", str(timeout), *ns)
                for h, ns in groups.items()}
        answers, _problems, _ = self._json_each(cmds, timeout=timeout + 120)
        out: dict[str, float | None] = {}
        for h, ns in groups.items():
            for n in ns:
                out[n] = answers.get(h, {}).get(n)
        return out

    def latency_matrix(self, names: Sequence[str], matrix: Sequence[Sequence[float]]
                       ) -> list[str]:
        """Distem's latency matrix over the platform: each pnode shapes its own vnodes' first
        viface towards every other vnode's address (netem per destination), all pnodes at
        once. The pnodes that applied it; PnodeError for the others (one lacking netem says
        so), its report ``{pnode: "applied"}`` for those that did."""
        groups = self._by_pnode(list(names))
        addrs: dict[str, dict[str, str]] = self.record()["addresses"]
        first = {n: next(iter(addrs[n].values())) for n in names}
        text = " ".join(names) + "\n" + "".join(
            " ".join(f"{x:g}" for x in row) + "\n" for row in matrix)
        cmds, stdin = {}, {}
        for h, mine in groups.items():
            remote = {n: a for n, a in first.items() if n not in mine}
            stdin[h] = self._tar({"latency.matrix": text.encode(),
                                  "latency.remote.json": json.dumps(remote).encode()})
            d = self.remote_dir(h)
            lm = self.cli(h, "vnode", "latency-matrix", f"{d}/latency.matrix",
                          "--remote-addresses", f"{d}/latency.remote.json")
            cmds[h] = ["sh", "-c", 'mkdir -p "$1" && tar -x -C "$1" && shift && exec "$@"',
                       "sh", d, *lm]
        res = self.fo.run_each(cmds, stdin=stdin, timeout=300)
        problems = {h: p for h, r in res.items() if (p := r.problem())}
        if problems:
            raise PnodeError("latency matrix", problems,
                             {h: "applied" for h in res if h not in problems})
        return list(res)

    def get_image(self, name: str, dest: Path) -> int:
        """Dump vnode ``name``'s root on its pnode (see :meth:`Platform.get_image`) and bring
        the tarball to ``dest`` here; its size in bytes."""
        (host, _), = self._by_pnode([name]).items()
        remote = f"{self.remote_dir(host)}/get-image/{name}{tar_suffix(dest)}"
        res = self.fo.run_each({host: ["sh", "-c", 'mkdir -p "${1%/*}" && shift && exec "$@"',
                                       "sh", remote, *self.cli(host, "vnode", "get-image", name,
                                                               remote)]}, timeout=3600)
        if (why := res[host].problem()):
            raise PnodeError("get-image", {host: why})
        dest = dest.absolute()
        dest.parent.mkdir(parents=True, exist_ok=True)
        r, got = self.fo.rcopy(remote, dest.parent, host, timeout=3600)
        self.fo.run(["rm", "-f", remote], [host], timeout=60)
        if (why := r.problem()) or not got.is_file():
            got.unlink(missing_ok=True)
            raise PnodeError("get-image", {host: why or "the tarball did not arrive"})
        got.replace(dest)
        return dest.stat().st_size
