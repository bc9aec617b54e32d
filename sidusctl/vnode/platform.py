"""The vnode service: vnetworks and vnodes of one state directory, their lifecycle (Distem's
READY -> RUNNING -> READY, with FROZEN), limits and status. :class:`Platform` is what the CLI
and the public Python API (:mod:`sidusctl.vnode`) call; every change happens in a transaction
of the store (flock + atomic JSON), so two commands never corrupt the state and a crashed one
leaves it true (the real container state is read back from LXC: see :meth:`Platform.status`).
"""

from __future__ import annotations

import builtins
import contextlib
import ipaddress
import os
import shlex
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sidusctl.core.errors import (
    ConfigError,
    Interrupted,
    NotFoundError,
    PrerequisiteError,
    SidusError,
    StateError,
)
from sidusctl.core.log import get_logger
from sidusctl.core.run import Result, which
from sidusctl.core.signals import Critical
from sidusctl.subsys import btrfs, lxc
from sidusctl.subsys.net import links, tc
from sidusctl.subsys.tarball import write_rootfs_tar
from sidusctl.vnode import ssh
from sidusctl.vnode.limits import cgroup_settings, check_matrix, set_limits
from sidusctl.vnode.model import (
    FROZEN,
    LOCALHOST,
    READY,
    RUNNING,
    IfaceSpec,
    VIface,
    VNode,
    check_vnode_name,
    hwaddr,
    veth_name,
)
from sidusctl.vnode.observe import Observe
from sidusctl.vnode.store import State, Store, check_init_args
from sidusctl.vnode.vnetworks import VNetworks

log = get_logger("vnode")

Progress = Callable[[str], None]


class Platform(VNetworks, Observe):
    """The vnodes and vnetworks of state directory ``state_dir`` on this host."""

    def __init__(self, state_dir: Path) -> None:
        self.store = Store(state_dir)
        #: seconds spent by the last start of each vnode: ``root`` (snapshot or copy) and
        #: ``container`` (config, lxc-start, tc), for benchmarks and ``--debug``.
        self.timings: dict[str, dict[str, float]] = {}

    # -- store -----------------------------------------------------------------------------
    def init(self, btrfs_device: str | None = None, btrfs_image: int | None = None) -> str:
        """Prepare the store (see :meth:`Store.init`); returns ``btrfs`` or ``plain``."""
        check_init_args(btrfs_device, btrfs_image)  # before the store directory is made
        with self.store.transaction() as st:
            return self.store.init(st, btrfs_device=btrfs_device, btrfs_image=btrfs_image)

    def deinit(self) -> None:
        """Unmount and delete the store (after every vnode is destroyed) and its vnetworks."""
        with self.store.transaction() as st:
            for net in list(st.vnetworks.values()):
                self._net_teardown(net)
            st.vnetworks.clear()
            self.store.deinit(st)

    def store_info(self) -> dict[str, Any]:
        """The store's recorded settings (state.json's ``store``: empty before :meth:`init`) plus
        ``root`` (its path), ``used_bytes`` (bytes allocated on its btrfs; None on a plain
        filesystem or before init) and, on btrfs, ``subvolumes`` (paths from the filesystem top)."""
        st = self.store.read()
        info = dict(st.store)
        info["root"] = str(self.store.root)
        info["used_bytes"] = self.store.disk_used() if st.store else None
        if st.store and btrfs.is_btrfs(self.store.root):
            info["subvolumes"] = btrfs.subvolume_list(self.store.root)
        return info

    # -- vnetworks: see sidusctl.vnode.vnetworks (VNetworks) ----------------------------

    # -- vnodes: creation ------------------------------------------------------------------
    def create(self, name: str, image: str, *, fs: str = "auto",
               ifaces: Sequence[IfaceSpec | str] = (), ssh_pubkey: str | None = None,
               ssh_privkey: str | None = None, copy_host_keys: bool = False,
               mem: dict[str, Any] | None = None, cpus: float | None = None,
               cpuset: str | None = None, io: Sequence[dict[str, Any]] = (),
               io_hierarchy: int = 1, bandwidth: dict[str, str | int] | None = None,
               latency: dict[str, float] | None = None,
               start_command: str | None = None, persistent_journal: bool = False) -> VNode:
        """Create vnode ``name`` (state READY) from ``image`` (image-store name or tarball
        path), unpacking the image into the cache if needed. ``fs``: ``auto`` (cow on btrfs,
        else distinct), ``cow`` (error without btrfs), ``distinct`` or ``shared``. Everything is
        validated before anything changes: on error the state is as before."""
        check_vnode_name(name)
        specs = [IfaceSpec.parse(i) if isinstance(i, str) else i for i in ifaces]
        with self.store.transaction() as st:
            if name in st.vnodes:
                raise StateError(f"a vnode named {name!r} already exists "
                                 f"(state {st.vnodes[name].state})")
            if fs not in ("auto", "cow", "distinct", "shared"):
                raise ConfigError(f"vnode {name}", "fs", f"unknown fs mode {fs!r}",
                                  expected="auto, cow, distinct or shared")
            # what the user gave is checked before the store is made (it raises host sysctls)
            key, source, kind = self.store.resolve_image(st, image)
            vn = VNode(name=name, image=image, fs=fs, image_key=key, ssh_pubkey=ssh_pubkey,
                       ssh_privkey=ssh_privkey, copy_host_keys=copy_host_keys,
                       io_hierarchy=io_hierarchy, start_command=start_command,
                       persistent_journal=persistent_journal, created=time.time(),
                       host=LOCALHOST)
            vn.ifaces = self._plan_ifaces(st, vn, specs)
            set_limits(vn, mem=mem, cpus=cpus, cpuset=cpuset, io=io,
                       bandwidth=bandwidth, latency=latency)
            self.store.ready(st)
            is_btrfs = self.store.is_btrfs(st)
            if fs == "auto":
                vn.fs = fs = "cow" if is_btrfs else "distinct"
                if not is_btrfs:
                    log.info("vnode store %s is not on btrfs: fs 'auto' means distinct copies",
                             self.store.root)
            if fs == "cow" and not is_btrfs:
                raise PrerequisiteError(
                    f"vnode {name}: fs mode 'cow' needs the vnode store on btrfs, and "
                    f"{self.store.root} is on {btrfs.fstype_of(self.store.root) or 'unknown'}",
                    hint="sidusctl vnode init --btrfs-image 20G (or --btrfs-device DEV), "
                         "or --fs distinct")
            self.store.unpack(st, key, source, kind)
            st.vnodes[name] = vn
            return vn

    def cache_image(self, image: str) -> Path:
        """Unpack ``image`` (image-store name or tarball path) into the store's image cache
        now, as the first :meth:`create` from it would, and return its directory there (a
        btrfs subvolume on btrfs). Nothing is done for an image already cached.
        NotFoundError for an unknown image, StateError when the store is not initialised,
        SidusError when the unpack fails (nothing half-unpacked is left)."""
        with self.store.transaction() as st:
            key, source, kind = self.store.resolve_image(st, image)  # before ready: see create
            self.store.ready(st)
            return self.store.unpack(st, key, source, kind)

    def _plan_ifaces(self, st: State, vn: VNode, specs: Sequence[IfaceSpec]) -> list[VIface]:
        used: set[tuple[str, str]] = {(i.vnetwork, i.address) for v in st.vnodes.values()
                                      for i in v.ifaces if i.address}
        out: list[VIface] = []
        names: set[str] = set()
        for s in specs:
            links.check_ifname(s.name, f"vnode {vn.name}: viface")
            if s.name in names:
                raise ConfigError(f"vnode {vn.name}", "iface", f"viface {s.name} given twice")
            names.add(s.name)
            net = self._net(st, s.vnetwork)
            if net.netns:
                raise ConfigError(f"vnode {vn.name}", f"iface {s.name}",
                                  f"vnetwork {net.name} is built in network namespace "
                                  f"{net.netns} (an emulated host): this host's vnodes cannot "
                                  "join it", expected="a vnetwork made without --netns")
            netw = net.network
            if s.address:
                try:
                    addr = ipaddress.IPv4Address(s.address)
                except ValueError as e:
                    raise ConfigError(f"vnode {vn.name}", f"iface {s.name}",
                                      f"invalid address {s.address!r}", expected="an IPv4 address") from e
                if addr not in netw or addr in (netw.network_address, netw.broadcast_address):
                    raise ConfigError(f"vnode {vn.name}", f"iface {s.name}",
                                      f"address {addr} is outside vnetwork {net.name} ({net.cidr})",
                                      expected=f"a host address of {net.cidr}")
                if str(addr) == net.gateway or (net.name, str(addr)) in used:
                    raise ConfigError(f"vnode {vn.name}", f"iface {s.name}",
                                      f"address {addr} is already taken on {net.name}")
                chosen = str(addr)
            else:
                chosen = ""
                for h in netw.hosts():
                    if str(h) != net.gateway and (net.name, str(h)) not in used:
                        chosen = str(h)
                        break
                if not chosen:
                    raise StateError(f"vnetwork {net.name} ({net.cidr}) has no free address left")
            used.add((net.name, chosen))
            out.append(VIface(name=s.name, vnetwork=net.name, address=chosen))
        return out

    # -- vnodes: lifecycle -----------------------------------------------------------------
    def _container(self, name: str) -> lxc.Container:
        return lxc.Container(name, self.store.lxcpath)

    def _vnode(self, st: State, name: str) -> VNode:
        if name not in st.vnodes:
            known = ", ".join(sorted(st.vnodes)) or "none"
            raise NotFoundError(f"no vnode named {name!r} (vnodes: {known})")
        return st.vnodes[name]

    def _reconcile(self, st: State, vn: VNode) -> str:
        """The true state from LXC; fixes the record (a crash may have left it stale)."""
        real = self._container(vn.name).state()
        if real == "RUNNING" and vn.state != RUNNING:
            vn.state = RUNNING
        elif real == "FROZEN":
            vn.state = FROZEN
        return real

    def start(self, name: str) -> VNode:
        """READY -> RUNNING: snapshot or copy the root (per fs mode), put the SSH keys, write
        the LXC config (vifaces, cgroup limits), start the container, shape its vifaces.
        A vnode recorded RUNNING whose container is gone (crash, reboot) is started again.
        StateError when it runs already; NotFoundError for an unknown vnode; SidusError when
        a step fails. On an error or an interrupt (KeyboardInterrupt, Interrupted) before the
        start is recorded, the start is undone (container stopped, root deleted, READY
        recorded) with the signals held, then the exception raised: the vnode is either
        RUNNING and recorded so, or READY without a root."""
        with self.store.transaction() as st:
            vn = self._vnode(st, name)
            real = self._reconcile(st, vn)
            if real in ("RUNNING", "FROZEN", "STARTING"):
                raise StateError(f"vnode {name!r} is already {real}",
                                 hint=f"sidusctl vnode stop {name}")
            if vn.state != READY:
                log.warning("vnode %s was recorded %s but its container is %s: recovering",
                            name, vn.state, real)
            self.store.ready(st)
            for i in vn.ifaces:
                net = self._net(st, i.vnetwork)
                self._net_setup(net)  # idempotent: bridges vanish at reboot
            c = self._container(name)
            crit = Critical()
            try:
                t0 = time.monotonic()
                rootfs = self.store.make_root(st, vn)
                t1 = time.monotonic()
                self._prepare_root(st, vn, rootfs)
                c.write_config(rootfs, self._lxc_ifaces(st, vn), cgroup_settings(vn),
                               self._devices(vn))
                c.start()
                self._apply_tc(vn)
                self.timings[name] = {"root": t1 - t0, "container": time.monotonic() - t1}
                log.debug("vnode %s: root in %.3f s, container in %.3f s", name, t1 - t0,
                          time.monotonic() - t1)
                if vn.start_command:
                    try:
                        self._launch_start_command(c, vn.start_command)
                    except SidusError as e:
                        log.warning("vnode %s: its start command could not be launched: %s",
                                    name, e)
                crit.hold()  # from here an interrupt waits until the start is recorded
            except BaseException:
                with crit.held():  # the undo is not cut short by a second interrupt
                    c.stop(timeout=2)
                    vn.state = READY
                    self.store.remove_root(st, vn)
                    self.store.save(st)
                raise
            with crit.held():
                vn.state = RUNNING
                vn.started = time.time()
                vn.exit_code = None
                self.store.save(st)  # recorded before an interrupt held meanwhile is raised
        return vn

    START_LOG = "var/log/sidusctl"

    def _launch_start_command(self, c: lxc.Container, cmd: str) -> None:
        # DETER-style: run once the vnode's init is up, detached inside the vnode; output and
        # exit code go to /var/log/sidusctl/start_command.{out,err,exit} in the vnode.
        d = "/" + self.START_LOG
        script = (
            f"mkdir -p {d}; rm -f {d}/start_command.exit; ("
            "if command -v systemctl >/dev/null; then for i in $(seq 120); do "
            "case $(systemctl is-system-running 2>/dev/null) in "
            "running|degraded|maintenance|stopping) break;; esac; sleep 1; done; fi; "
            f"/bin/sh -c {shlex.quote(cmd)} >{d}/start_command.out 2>{d}/start_command.err "
            f"</dev/null; echo $? >{d}/start_command.exit) >/dev/null 2>&1 </dev/null &")
        c.attach(["/bin/sh", "-c", script], timeout=30)

    def _start_command_exit(self, vn: VNode) -> int | None:
        f = self.store.rootfs_of(vn) / self.START_LOG / "start_command.exit"
        try:
            return int(f.read_text().strip())
        except (OSError, ValueError):
            return None

    def _lxc_ifaces(self, st: State, vn: VNode) -> list[dict[str, Any]]:
        out = []
        gw_done = False
        for i in vn.ifaces:
            net = self._net(st, i.vnetwork)
            out.append({"name": i.name, "bridge": net.bridge, "veth": veth_name(vn.name, i.name),
                        "hwaddr": hwaddr(vn.name, i.name),
                        "address": f"{i.address}/{net.network.prefixlen}",
                        "gateway": None if gw_done else net.gateway, "mtu": net.mtu})
            gw_done = True
        return out

    def _devices(self, vn: VNode) -> list[dict[str, str]]:
        return [{"path": lim.device, "majmin": lim.majmin()} for lim in vn.io_limits()]

    def _prepare_root(self, st: State, vn: VNode, rootfs: Path) -> None:
        ssh.inject(rootfs, pubkey=vn.ssh_pubkey, privkey=vn.ssh_privkey,
                   copy_host_keys=vn.copy_host_keys)
        if vn.fs == "shared":
            return  # one root for many vnodes: LXC sets the host name (lxc.uts.name)
        etc = rootfs / "etc"
        if etc.is_dir() and not etc.is_symlink():
            for f in ("hostname", "hosts"):
                if (etc / f).is_symlink():
                    (etc / f).unlink()
            (etc / "hostname").write_text(vn.name + "\n")
            hosts = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{vn.name}",
                     "::1\tlocalhost ip6-localhost ip6-loopback"]
            for other in sorted(st.vnodes.values(), key=lambda v: v.name):
                for i in other.ifaces[:1]:
                    if i.address:
                        hosts.append(f"{i.address}\t{other.name}")
            (etc / "hosts").write_text("\n".join(hosts) + "\n")
            if not vn.persistent_journal and (etc / "systemd").is_dir():
                # The root is deleted at stop: an on-disk journal (8 MiB preallocated) would
                # be the biggest cost of a cow vnode for nothing.
                d = etc / "systemd" / "journald.conf.d"
                if not d.is_symlink():
                    d.mkdir(exist_ok=True)
                    (d / "90-sidusctl-vnode.conf").write_text(
                        "# written by sidusctl vnode (--persistent-journal to keep logs on disk)\n"
                        "[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n")

    def _netns_of(self, name: str) -> str:
        pid = self._container(name).pid()
        if pid is None:
            raise StateError(f"vnode {name!r} is not running")
        return f"/proc/{pid}/ns/net"

    def _apply_tc(self, vn: VNode) -> None:
        if not any(i.bandwidth or i.latency_ms for i in vn.ifaces):
            return
        inner = self._netns_of(vn.name)
        for i in vn.ifaces:
            # host end: traffic to the vnode; vnode end (in its netns): traffic from it.
            tc.shape(veth_name(vn.name, i.name), i.bandwidth, i.latency_ms)
            tc.shape(i.name, i.bandwidth, i.latency_ms, netns=inner)

    def stop(self, name: str) -> VNode:
        """RUNNING/FROZEN -> READY: stop the container and delete the vnode's data from the
        host (its snapshot or copy), as Distem does. StateError if already READY,
        NotFoundError for an unknown vnode, SidusError when a step fails. An interrupt
        while the container shuts down cleanly kills it instead; the stop is then recorded
        (READY, root deleted) before the interrupt's exception is raised."""
        with self.store.transaction() as st:
            vn = self._vnode(st, name)
            real = self._reconcile(st, vn)
            if vn.state == READY and real in ("STOPPED", "ABSENT"):
                raise StateError(f"vnode {name!r} is not running (state READY)")
            self.store.ensure_mounted(st)  # after a reboot: to delete the root for real
            with self._stopping(name):
                c = self._container(name)
                vn.exit_code = c.exit_status()
                vn.state = READY
                vn.started = None
                self.store.remove_root(st, vn)
                self.store.save(st)
            return vn

    @contextlib.contextmanager
    def _stopping(self, name: str, timeout: int = 10) -> Iterator[None]:
        """Stop vnode ``name``'s container (a clean shutdown for ``timeout`` s, then a kill),
        then run the block, which records the stop, with SIGINT and SIGTERM held. An
        interrupt during the clean shutdown ends it with a kill (signals held) and the block
        still runs before the interrupt's exception goes on: the container is never left
        stopped and recorded running. Other errors of the stop go through, the block not
        run."""
        c = self._container(name)
        crit = Critical()
        try:
            c.stop(timeout=timeout)
            crit.hold()
        except (KeyboardInterrupt, Interrupted):
            with crit.held():
                c.stop(timeout=1)  # lxc-stop -t 0 would not wait for the end
                yield
            raise
        except BaseException:
            crit.release()
            raise
        try:
            yield
        finally:
            crit.release()

    def freeze(self, name: str) -> VNode:
        """RUNNING -> FROZEN (cgroup freezer: every process of the vnode stops)."""
        with self.store.transaction() as st:
            vn = self._vnode(st, name)
            real = self._reconcile(st, vn)
            if real != "RUNNING":
                raise StateError(f"vnode {name!r} is {real}, not RUNNING: cannot freeze it")
            self._container(name).freeze()
            vn.state = FROZEN
            return vn

    def unfreeze(self, name: str) -> VNode:
        """FROZEN -> RUNNING."""
        with self.store.transaction() as st:
            vn = self._vnode(st, name)
            real = self._reconcile(st, vn)
            if real != "FROZEN":
                raise StateError(f"vnode {name!r} is {real}, not FROZEN: cannot unfreeze it")
            self._container(name).unfreeze()
            vn.state = RUNNING
            return vn

    def destroy(self, name: str) -> None:
        """Forget vnode ``name`` (stopping it first if it runs). NotFoundError for an unknown
        vnode; StateError or SidusError when its container cannot be stopped or its root
        deleted (then it stays recorded). An interrupt while it stops: stopped as
        :meth:`stop` does (recorded READY, not forgotten), then the exception raised."""
        with self.store.transaction() as st:
            vn = self._vnode(st, name)
            self.store.ensure_mounted(st)
            with self._stopping(name, timeout=5):
                vn.state = READY
                vn.started = None
                self.store.remove_root(st, vn)
                self.store.save(st)
            with Critical().held():
                self._container(name).remove()
                del st.vnodes[name]
                self.store.save(st)

    # -- running vnodes --------------------------------------------------------------------
    def exec(self, name: str, argv: Sequence[str], *, check: bool = False,
             timeout: float | None = None, input: bytes | None = None) -> Result:
        """Run ``argv`` in vnode ``name`` (lxc-attach); returns the Result (stdout captured)."""
        st = self.store.read()
        self._vnode(st, name)
        c = self._container(name)
        if c.state() != "RUNNING":
            raise StateError(f"vnode {name!r} is not RUNNING")
        return c.attach(argv, check=check, capture=True, timeout=timeout, input=input)

    def console_argv(self, name: str) -> list[str]:
        """The lxc-console command line attaching to vnode ``name``'s console."""
        self._vnode(self.store.read(), name)
        return [which("lxc-console", "lxc"), "-P", str(self.store.lxcpath), "-n", name, "-t", "0"]

    def console_log(self, name: str) -> Path:
        """The path of vnode ``name``'s console log. A log left by a vnode since destroyed is
        still found; :class:`NotFoundError` if there is neither such a vnode nor its log."""
        path = self._container(name).console_log
        if not path.exists():
            self._vnode(self.store.read(), name)
        return path

    def rootfs(self, name: str) -> Path:
        """Where vnode ``name``'s root is on the host (exists only while it runs)."""
        st = self.store.read()
        return self.store.rootfs_of(self._vnode(st, name))

    def list(self) -> list[dict[str, Any]]:
        """Every vnode with its true state (from LXC) and addresses."""
        st = self.store.read()
        running = set(lxc.list_running(self.store.lxcpath))
        out = []
        for vn in sorted(st.vnodes.values(), key=lambda v: v.name):
            real = vn.state
            note = None
            if vn.name in running:
                if vn.state == READY:
                    real = RUNNING
            elif vn.state in (RUNNING, FROZEN):
                real, note = READY, "dead: container stopped outside sidusctl (start recovers)"
            out.append({"name": vn.name, "state": real, "recorded_state": vn.state,
                        "host": vn.host, "fs": vn.fs, "image": vn.image, "note": note,
                        "ifaces": [i.to_dict() for i in vn.ifaces]})
        return out

    def get(self, name: str) -> VNode:
        """The vnode ``name`` as state.json records it (its state not checked against LXC);
        :class:`NotFoundError` if there is none."""
        return self._vnode(self.store.read(), name)

    def get_image(self, name: str, dest: Path) -> int:
        """Dump vnode ``name``'s root (it must be RUNNING or FROZEN: its root exists only then)
        to the tarball ``dest`` (.tar.zst/.tar.gz/...), usable as ``--image`` again. cow roots
        are dumped from a read-only snapshot (consistent, no pause), ``.export-<pid>`` in the
        vnode's directory: ``stop`` deletes it with the root, also when this command was killed.
        Returns its size in bytes. StateError when the vnode is not running, or was stopped
        while dumped (``dest`` is then not written); NotFoundError for an unknown vnode;
        CommandError when tar fails."""
        with self.store.transaction() as st:
            vn = self._vnode(st, name)
            real = self._reconcile(st, vn)
            if real not in ("RUNNING", "FROZEN"):
                raise StateError(f"vnode {name!r} is not running: its root exists only while "
                                 "it runs (stop deletes it)", hint=f"sidusctl vnode start {name}")
            rootfs = self.store.rootfs_of(vn)
            snap = self.store.vnode_dir(name) / f".export-{os.getpid()}"
            if vn.fs == "cow":
                for old in self.store.vnode_dir(name).glob(".export*"):
                    pid = old.name.rpartition("-")[2]
                    if not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
                        btrfs.subvolume_delete(old)  # left by a killed get-image
                btrfs.snapshot(rootfs, snap, readonly=True)
        if vn.fs != "cow":
            return write_rootfs_tar(rootfs, dest)
        try:
            size = write_rootfs_tar(snap, dest)
            if not snap.exists():  # stop deleted it while tar read it: dest may lack files
                dest.unlink(missing_ok=True)
                raise StateError(f"vnode {name!r} was stopped while its root was dumped: "
                                 f"{dest} not written")
            return size
        finally:
            with self.store.locked():  # not while a stop deletes the vnode's directory
                btrfs.subvolume_delete(snap)

    def update(self, name: str, *, mem: dict[str, Any] | None = None, cpus: float | None = None,
               cpuset: str | None = None, io: Sequence[dict[str, Any]] | None = None,
               bandwidth: dict[str, str | int] | None = None,
               latency: dict[str, float] | None = None) -> VNode:
        """Change limits; on a RUNNING vnode they take effect at once (lxc-cgroup, tc)."""
        with self.store.transaction() as st:
            vn = self._vnode(st, name)
            real = self._reconcile(st, vn)
            before = VNode.from_dict(vn.to_dict())
            set_limits(vn, mem=mem, cpus=cpus, cpuset=cpuset, io=io,
                             bandwidth=bandwidth, latency=latency)
            if real in ("RUNNING", "FROZEN"):
                c = self._container(name)
                try:
                    for _version, key, value in cgroup_settings(vn):
                        c.cgroup_set(key, value)
                    if bandwidth or latency:
                        inner = self._netns_of(name)
                        for i in vn.ifaces:
                            tc.shape(veth_name(name, i.name), i.bandwidth, i.latency_ms)
                            tc.shape(i.name, i.bandwidth, i.latency_ms, netns=inner)
                except BaseException:
                    st.vnodes[name] = before
                    raise
            return vn

    def latency_matrix(self, names: Sequence[str], matrix: Sequence[Sequence[float]], *,
                       remote: Mapping[str, str] | None = None) -> builtins.list[str]:
        """Distem's latency matrix: ``matrix[i][j]`` ms on the way from ``names[i]`` to
        ``names[j]`` (each vnode's first viface, netem per destination). All must run.
        ``remote``: vnodes of ``names`` that run on other hosts (name -> address): they are
        destinations only, their rows are applied by their own host. Returns the vnodes this
        host shaped, in ``names`` order. ConfigErrors: a bad matrix (see check_matrix)."""
        n = len(names)
        remote = check_matrix(names, matrix, remote)  # ConfigErrors: shape, values, addresses
        st = self.store.read()
        local = {x: self._vnode(st, x) for x in names if x not in remote}
        for vn in local.values():
            if not vn.ifaces:
                raise ConfigError(f"vnode {vn.name}", "ifaces", "no viface to shape",
                                  expected="a vnode with a viface (the matrix shapes the first)")
            if self._container(vn.name).state() != "RUNNING":
                raise StateError(f"vnode {vn.name!r} is not RUNNING: start all vnodes first")
            if vn.ifaces and (vn.ifaces[0].bandwidth or vn.ifaces[0].latency_ms):
                raise StateError(f"vnode {vn.name!r} has a latency or bandwidth on "
                                 f"{vn.ifaces[0].name}: the matrix replaces them (not compatible)")
        addr = {x: remote[x] if x in remote else str(local[x].ifaces[0].address) for x in names}
        tc.require_qdisc("netem")
        for i, x in enumerate(names):
            if x not in local:
                continue
            delays = {addr[names[j]]: float(matrix[i][j])
                      for j in range(n) if j != i and float(matrix[i][j]) > 0}
            tc.shape_by_destination(local[x].ifaces[0].name, delays, netns=self._netns_of(x))
        return [x for x in names if x in local]


def host_has_root() -> None:
    """:class:`PrerequisiteError` unless this process runs as root (LXC, btrfs and netlink
    need it)."""
    if os.geteuid() != 0:
        raise PrerequisiteError("vnodes need root privileges (LXC, btrfs, netlink)")


__all__ = ["IfaceSpec", "Platform", "SidusError"]
