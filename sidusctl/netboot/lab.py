"""A throw-away PXE lab: ``sidusctl serve-pxe`` and diskless qemu guests on a private network.

Owns, for the time of a ``with`` block (:class:`PxeLab`) or of :func:`pxe_boot_demo`:

- a network namespace ``<prefix>`` with a bridge ``<prefix>-br`` carrying the server address
  (nothing is bound to this machine's own interfaces: the servers and the guests only ever
  see that bridge);
- a private state directory under the work directory, whose ``images/<name>`` entries are
  symlinks to the real image store (so the lab's leases and status never touch those of a
  production serve-pxe using the same state directory);
- serve-pxe run in the namespace as a child process (its DHCP, TFTP, DNS, NFS through
  nfs-ganesha, HTTP), started with the command the caller gives (``serve_command``: this
  module does not know the CLI; ``sidusctl demo`` passes ``python -m sidusctl serve-pxe``),
  its log in ``<workdir>/serve-pxe.log``, its status read in-process from the lab's state
  (:func:`sidusctl.serve.supervisor.read_status`, the reader ``pxe status`` uses);
- tap devices ``<prefix>-tN`` on the bridge and qemu guests (:mod:`sidusctl.subsys.qemu`,
  ``-boot n``, no disk) on them, their serial consoles in ``<workdir>/<guest>.console.log``.

Everything is removed on exit, on error, Ctrl-C and SIGTERM included (SIGTERM reaches us as
:class:`~sidusctl.core.errors.Interrupted`): guests ended, serve-pxe stopped (SIGTERM, then
SIGKILL), every process left in the namespace killed, the namespace deleted (its bridge and taps
go with it). serve-pxe is started with :func:`sidusctl.core.run.spawn`, so its NFS servers die
with it even when it is SIGKILLed. A lab SIGKILLed itself cleans nothing: the next lab with its
prefix reclaims what it left (:mod:`sidusctl.netboot.labclaim`). :func:`pxe_boot_demo` is the
README's demo: one node, boot, log in, check, report.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Any

from sidusctl.core.errors import SidusError, StateError
from sidusctl.core.log import get_logger
from sidusctl.core.run import STDOUT, Child, run, spawn
from sidusctl.core.state import FileLock
from sidusctl.netboot.labclaim import claim, kill_netns_processes
from sidusctl.serve.supervisor import read_status
from sidusctl.subsys import qemu
from sidusctl.subsys.imagestore import ImageStore
from sidusctl.subsys.net import links

log = get_logger("lab")

SUBNET = IPv4Network("10.77.0.0/24")  # private: only ever inside the lab's namespace
SERVER = IPv4Address("10.77.0.1")
DOMAIN = "lab.test"


@dataclass(frozen=True)
class LabNode:
    """One diskless node: ``name`` (host name and DNS name), ``mac``, reserved ``ip``."""

    name: str
    mac: str
    ip: IPv4Address
    root: str = "nfs"


#: A node's kernel words as a benchmark boots it: serial console, reboot on panic, little
#: console chatter, address space randomization as on hardware.
KERNEL_ARGS_RANDOMIZED = ("console=ttyS0", "panic=-1", *qemu.QUIET)
#: The lab's nodes' kernel words (tests, the demo): those and no address space randomization
#: (:data:`sidusctl.subsys.qemu.NORANDMAPS`: the lab's guests are emulated by TCG).
KERNEL_ARGS = (*KERNEL_ARGS_RANDOMIZED, *qemu.NORANDMAPS)


def inventory_text(nodes: Sequence[LabNode], image: str, *, subnet: IPv4Network = SUBNET,
                   server: IPv4Address = SERVER, domain: str = DOMAIN,
                   kernel_args: Sequence[str] = KERNEL_ARGS) -> str:
    """A ``nodes.toml`` (see :mod:`sidusctl.netboot.inventory`) booting ``nodes`` from
    ``image`` with a tmpfs overlay (each node's lower layer from its ``root``), every node with
    ``kernel_args`` (default :data:`KERNEL_ARGS`)."""
    args = ", ".join(json.dumps(a) for a in kernel_args)
    out = [f'[network]\nsubnet = "{subnet}"\nserver = "{server}"\ndomain = "{domain}"\n',
           f'[defaults]\nimage = "{image}"\noverlay = "tmpfs"\nkernel_args = [{args}]\n']
    for n in nodes:
        root = f'root = "{n.root}"\n' if n.root != "nfs" else ""
        out.append(f'[[nodes]]\nname = "{n.name}"\nmac = "{n.mac}"\nip = "{n.ip}"\n{root}')
    return "\n".join(out)


def private_state(state_dir: Path, images: Sequence[str], dest: Path) -> Path:
    """``dest`` made a state directory whose ``images/<name>`` link to ``state_dir``'s images
    (which must exist: :class:`~sidusctl.core.errors.NotFoundError` otherwise). An
    ``images/<name>`` already in ``dest`` (a caller's private generations) is left alone."""
    store = ImageStore(state_dir, recover=False)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for name in images:
        store.get(name)  # NotFoundError naming the built images
        link = dest / "images" / name
        if not link.is_symlink() and not link.exists():
            link.symlink_to(store.image_dir(name).resolve(), target_is_directory=True)
    return dest


class PxeLab:
    """The namespace, bridge, serve-pxe and guests of one lab (see the module docstring).

    ``prefix``: names of the namespace (``prefix``), bridge (``prefix-br``) and taps
    (``prefix-tN``); at most 10 characters so that they fit in IFNAMSIZ. ``state_dir``: where
    the images are built. ``nodes``: the inventory's nodes (booting ``image``); ``workdir``:
    logs, the inventory, the private state and the TFTP root. ``serve_command``: the argv
    that runs serve-pxe (e.g. ``[sys.executable, "-m", "sidusctl", "serve-pxe"]``); the lab
    appends ``--nodes FILE --interface BRIDGE --tftp-root DIR`` and :meth:`start_serve`'s
    arguments, and names its private state directory in ``$SIDUSCTL_STATE``
    (:func:`sidusctl.core.paths.state_dir`), so the command must not give ``--state-dir``.
    ``kernel_args``: every node's kernel words (default :data:`KERNEL_ARGS`)."""

    def __init__(self, prefix: str, state_dir: Path, image: str, nodes: Sequence[LabNode],
                 workdir: Path, *, serve_command: Sequence[str],
                 subnet: IPv4Network = SUBNET, server: IPv4Address = SERVER,
                 domain: str = DOMAIN, kernel_args: Sequence[str] = KERNEL_ARGS) -> None:
        if len(prefix) > links.IFNAMSIZ - 3:
            raise SidusError(f"lab prefix {prefix!r} is too long (at most "
                             f"{links.IFNAMSIZ - 3} characters: interface names)")
        if not serve_command:
            raise SidusError("PxeLab needs the command that starts serve-pxe")
        self.prefix = prefix
        self.serve_command = list(serve_command)
        self.netns = prefix
        self.bridge = f"{prefix}-br"
        self.image = image
        self.nodes = list(nodes)
        self.subnet, self.server, self.domain = subnet, server, domain
        self.kernel_args = tuple(kernel_args)
        self.workdir = workdir
        self.source_state = state_dir
        self.state = workdir / "state"
        self.tftp_root = workdir / "tftp"
        self.nodes_file = workdir / "nodes.toml"
        self.serve_log = workdir / "serve-pxe.log"
        self.serve_proc: Child | None = None
        self.guests: list[qemu.Guest] = []
        self._taps = 0
        self._up = False
        self._claim: FileLock | None = None

    # -- set up and tear down ---------------------------------------------------------------
    def __enter__(self) -> PxeLab:
        # the prefix's lock first: a lab killed earlier (SIGKILL) is reclaimed here, before
        # this one writes anything (labclaim)
        self._claim = claim(self.prefix, self.netns, self.workdir.absolute())
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            private_state(self.source_state, [self.image], self.state)
            self.nodes_file.write_text(inventory_text(self.nodes, self.image,
                                                      subnet=self.subnet, server=self.server,
                                                      domain=self.domain,
                                                      kernel_args=self.kernel_args))
            links.ensure_netns(self.netns)
            self._up = True
            run(["ip", "-n", self.netns, "link", "set", "lo", "up"], what="ip link")
            links.ensure_bridge(self.bridge, f"{self.server}/{self.subnet.prefixlen}",
                                netns=self.netns)
            # no STP or forwarding delay: a guest's first DHCP DISCOVER must get through
            run(["ip", "-n", self.netns, "link", "set", self.bridge, "type", "bridge",
                 "stp_state", "0", "forward_delay", "0"], what="ip link")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Undo everything (idempotent): guests, serve-pxe, processes in the namespace, the
        namespace with its bridge and taps."""
        for g in self.guests:
            g.close()
        self.guests.clear()
        self.stop_serve()
        if self._up:
            kill_netns_processes(self.netns)
            with contextlib.suppress(SidusError, OSError):
                links.remove_netns(self.netns)
            self._up = False
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    # -- serve-pxe -------------------------------------------------------------------------
    def start_serve(self, *args: str, ready_timeout: float = 90) -> Child:
        """Start ``SERVE_COMMAND --nodes ... --interface <bridge> ARGS`` in the namespace (from
        the calling thread: it must outlive serve-pxe, see :func:`~sidusctl.core.run.spawn`)
        and wait up to ``ready_timeout`` seconds for its ``ready:`` log line; the running
        child. :class:`SidusError` with the log tail otherwise."""
        if self.serve_proc is not None and self.serve_proc.alive():
            raise SidusError("serve-pxe is already running in this lab")
        argv = ["ip", "netns", "exec", self.netns,
                # a private /run: rpcbind (started for nfs-ganesha) refuses to start while
                # another rpcbind, in any namespace, holds /run/rpcbind.lock. `ip netns exec`
                # already runs in its own mount namespace; this one ends with the process.
                # Every step of this chain execs in place: the spawned pid ends up as
                # serve-pxe itself, with the spawner's PR_SET_PDEATHSIG.
                "unshare", "-m", "sh", "-c", 'mount -t tmpfs sdt-run /run && exec "$@"', "sh",
                *self.serve_command,
                "--nodes", str(self.nodes_file), "--interface", self.bridge,
                "--tftp-root", str(self.tftp_root), *args]
        start = self.serve_log.stat().st_size if self.serve_log.exists() else 0
        self.serve_log.touch()
        self.serve_proc = spawn(argv, stdout=self.serve_log, stderr=STDOUT,
                                env={"SIDUSCTL_STATE": str(self.state)}, what="serve-pxe")
        deadline = time.monotonic() + ready_timeout
        while "sidusctl: INFO: ready:" not in self.serve_text()[start:]:
            if not self.serve_proc.alive() or time.monotonic() > deadline:
                self.stop_serve()
                raise SidusError("serve-pxe did not become ready:\n"
                                 + self.serve_text()[start:][-3000:])
            time.sleep(0.1)
        return self.serve_proc

    def stop_serve(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        """Stop serve-pxe with ``sig`` to its process group (SIGKILL: as a crash would), SIGKILL
        after ``timeout`` seconds; its exit code (negative: the signal), None if none ran."""
        p = self.serve_proc
        if p is None:
            return None
        self.serve_proc = None
        return p.stop(grace=timeout, sig=sig)

    def serve_text(self) -> str:
        """serve-pxe's log so far."""
        try:
            return self.serve_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def status(self) -> dict[str, dict[str, Any]]:
        """The nodes of the status serve-pxe last wrote in the lab's state (what ``pxe status
        --json`` lists under ``nodes``), by name. :class:`StateError` if there is none."""
        path, st = read_status(self.state, "serve-pxe")
        pxe = st.get("pxe")
        if not isinstance(pxe, dict):
            raise StateError(f"{path} was not written by serve-pxe")
        return {n["name"]: n for n in pxe.get("nodes", [])}

    # -- guests ----------------------------------------------------------------------------
    def add_tap(self) -> str:
        """A new tap device on the bridge (up); its name."""
        name = f"{self.prefix}-t{self._taps}"
        self._taps += 1
        run(["ip", "-n", self.netns, "tuntap", "add", "dev", name, "mode", "tap"],
            what="ip tuntap")
        run(["ip", "-n", self.netns, "link", "set", name, "master", self.bridge, "up"],
            what="ip link")
        return name

    def boot(self, node: LabNode, *, name: str | None = None, memory: int = 1024,
             uefi: bool = False, nic_rom: bool = True, secure_boot: bool = False,
             uefi_vars: Path | None = None,
             timeout: float = qemu.BOOT_TIMEOUT) -> qemu.Guest:
        """Start a diskless guest with ``node``'s MAC on a new tap: it boots from the network
        through the NIC's iPXE option ROM (BIOS, or with ``uefi`` its EFI driver under OVMF);
        with ``nic_rom=False`` through the firmware's own PXE client instead (OVMF's, for
        ``uefi``), as real machines without iPXE do. ``secure_boot`` (implies ``uefi``): OVMF's
        Secure Boot build with Microsoft's keys; ``uefi_vars``: a variable store prepared by
        the caller (default ``<workdir>/<name>.vars.fd``, made from OVMF's template). Its
        console goes to ``<workdir>/<name>.console.log``."""
        gname = name or f"{self.prefix}-{node.name}"
        tap = self.add_tap()
        g = qemu.Guest(gname, netns=self.netns, tap=tap, mac=node.mac, memory=memory,
                       log=self.workdir / f"{gname}.console.log", timeout=timeout,
                       uefi_vars=uefi_vars or (self.workdir / f"{gname}.vars.fd"
                                               if uefi or secure_boot else None),
                       secure_boot=secure_boot,
                       nic_rom=nic_rom)
        self.guests.append(g)
        return g

    def ack_seen(self, mac: str) -> bool:
        """Whether serve-pxe has logged a DHCP ACK (full mode) or proxy reply for ``mac``."""
        return re.search(rf"DHCP {re.escape(mac)}: (REQUEST \(.*\) -> ACK|proxy )",
                         self.serve_text()) is not None


def wait_logins(lab: PxeLab, guests: Sequence[tuple[qemu.Guest, LabNode]], timeout: float,
                on_step: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """Watch several booting guests at once until each shows its login prompt
    (:func:`qemu.wait_login_prompts`); per guest name: ``ack`` (seconds from start to
    serve-pxe's DHCP ACK/proxy reply for its MAC) and ``login`` (seconds to the prompt).
    :class:`~sidusctl.subsys.qemu.GuestError` on timeout."""
    nodes = {g.name: node for g, node in guests}
    facts: dict[str, dict[str, float]] = {g.name: {} for g, _ in guests}

    def ack(g: qemu.Guest, at: float | None = None) -> None:
        f, node = facts[g.name], nodes[g.name]
        if "ack" not in f and lab.ack_seen(node.mac):
            f["ack"] = time.monotonic() - g.started if at is None else at
            if on_step and at is None:
                on_step(f"{node.name}: DHCP ACK for {node.ip} after {f['ack']:.1f} s")

    def prompt(g: qemu.Guest) -> None:
        facts[g.name]["login"] = g.login_prompt_s
        ack(g, at=g.login_prompt_s)
        if on_step:
            on_step(f"{nodes[g.name].name}: login prompt after {g.login_prompt_s:.1f} s")

    qemu.wait_login_prompts([g for g, _ in guests], timeout, on_tick=ack, on_prompt=prompt)
    return facts


def pxe_boot_demo(state_dir: Path, image: str, workdir: Path, *, serve_command: Sequence[str],
                  prefix: str = "sidus-demo", on_step: Callable[[str], None] | None = None,
                  timeout: float = 600) -> dict[str, Any]:
    """PXE-boot one throw-away diskless qemu guest from ``image`` through serve-pxe (started
    with ``serve_command``, see :class:`PxeLab`) and report what happened.

    Creates the namespace ``prefix`` and bridge ``prefix-br`` (10.77.0.1/24), a one-node
    inventory (``demo1``, 10.77.0.10) in ``workdir``, starts serve-pxe there (full DHCP, TFTP,
    DNS, NFS through nfs-ganesha), boots a qemu guest (TCG, no disk, ``-boot n``: iPXE ROM →
    pxelinux.0 → kernel + initrd → NFS root + tmpfs overlay) to its login prompt, logs in as
    root (the minimal image's password, ``sidus``), checks the host name and the root
    filesystem, then removes everything — also on error and Ctrl-C.

    ``on_step(text)`` is called with each step's description. ``timeout``: seconds for the
    boot to reach the login prompt. Returns ``{"image", "node", "mac", "address" (the
    guest's IPv4 address as the guest sees it), "hostname", "root_fstype" ("overlay"),
    "root_lower" (the NFS source of the lower layer), "dns_answer" (the address the guest's
    resolver got for its own name from serve-pxe's DNS, "" if none), "dhcp_ack_s",
    "login_prompt_s"
    (seconds from qemu's start), "total_s", "workdir"}``. Raises
    :class:`~sidusctl.core.errors.NotFoundError` if ``image`` is not built in ``state_dir``,
    :class:`~sidusctl.subsys.qemu.GuestError` (console tail included) if the guest does not
    boot, :class:`SidusError` if serve-pxe does not start (its log tail included).
    """
    def step(text: str) -> None:
        if on_step:
            log.debug("%s", text)
            on_step(text)
        else:
            log.info("%s", text)

    t_start = time.monotonic()
    workdir = workdir.absolute()
    node = LabNode("demo1", "52:54:00:5d:00:01", IPv4Address("10.77.0.10"))
    with PxeLab(prefix, state_dir, image, [node], workdir, serve_command=serve_command) as lab:
        step(f"network namespace {lab.netns}, bridge {lab.bridge} {SERVER}/{SUBNET.prefixlen}")
        lab.start_serve()
        step(f"serve-pxe running on {lab.bridge} (log {lab.serve_log})")
        g = lab.boot(node, timeout=timeout)
        step(f"qemu guest {g.name} ({node.mac}) booting from the network (TCG, no disk)")
        facts = wait_logins(lab, [(g, node)], timeout, on_step=step)[g.name]
        g.login(timeout=120)
        hostname = g.sh("hostname")
        fstype, source = g.sh("findmnt -n -o FSTYPE,SOURCE /").split(None, 1)
        lower = g.sh("findmnt -n -o SOURCE /run/sidus/ro", check=False)
        addr = g.sh("ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -n1")
        # our DNS, as the node's resolver (resolv.conf written from the DHCP lease at boot)
        answer = g.sh(f"getent hosts {node.name}.{DOMAIN}", check=False).split()
        dns = answer[0] if answer and answer[0] == str(node.ip) else ""
        step(f"logged in: hostname {hostname}, address {addr}, / is {fstype} ({source}) "
             f"over {lower}; DNS {node.name}.{DOMAIN} -> {dns or 'no answer'}")
        if hostname != node.name:
            raise SidusError(f"the guest's host name is {hostname!r}, not {node.name!r}")
        if fstype != "overlay":
            raise SidusError(f"the guest's root is {fstype}, not an overlay")
        return {"image": image, "node": node.name, "mac": node.mac, "address": addr,
                "hostname": hostname, "root_fstype": fstype, "root_lower": lower,
                "dns_answer": dns,
                "dhcp_ack_s": round(facts.get("ack", float("nan")), 1),
                "login_prompt_s": round(facts["login"], 1),
                "total_s": round(time.monotonic() - t_start, 1), "workdir": str(workdir)}

