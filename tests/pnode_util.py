"""Several "physical nodes" on this one machine, for the multi-host tests.

Each pnode is a network namespace ``sdt-pn<k>`` with its own real OpenSSH server, its own
state directory and (once ``sidusctl vnode init`` ran there) its own btrfs store; they are
joined by a bridge ``sdt-pnlan`` in the root namespace that plays the testbed LAN
(192.168.250.0/24: the bridge has .254, pnode k has .k). The frontend (the test itself)
reaches them over that bridge with a key made for the run. ``prefix`` and ``lan_net`` of
:func:`pnodes` change those names and that network (bench/vnode_platform.py uses ``sdt-bppn`` and
192.168.251, so it never collides with a test run).

LXC in a namespace made by ``ip netns exec`` cannot see the cgroup tree (that command
remounts /sys), so each pnode has a holder process (``sleep``) in a private mount namespace
made inside its network namespace, where a copy of ``/sys/fs/cgroup`` taken before entering is
bound back over it. sshd is started (and restarted) inside the holder's network AND mount
namespaces with nsenter, so every session it forks (every sidusctl the frontend runs there)
sees the pnode's own /sys/class/net, the cgroups, and the mounts made by earlier sessions
(the btrfs vnode store), even across an sshd restart.

Everything goes away on exit, on error too: sshd (and whatever runs in the namespaces), the
namespaces, the bridge, the cgroup copy, the keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PREFIX = "sdt-pn"
LAN_NET = "192.168.250"


@dataclass(frozen=True)
class Pnode:
    name: str      # host name in node sets: pn1, pn2...
    netns: str     # sdt-pn1...
    address: str   # 192.168.250.1...
    state: Path    # its sidusctl state directory
    pidfile: Path  # its sshd's
    holder: Path   # pid file of the process holding its mount namespace


@dataclass(frozen=True)
class Lab:
    pnodes: list[Pnode]
    key: Path          # the frontend's private key
    known_hosts: Path
    work: Path

    def ssh_options(self) -> list[str]:
        return ["-i", str(self.key), "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=no"]

    def sshd_pid(self, p: Pnode) -> int:
        return int(p.pidfile.read_text().split()[0])


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True)


def _kill_netns(ns: str) -> None:
    r = _run("ip", "netns", "pids", ns, check=False)
    for pid in r.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _holder_pid(p: Pnode) -> int:
    return int(p.holder.read_text())


def start_sshd(lab: Lab, p: Pnode) -> None:
    """(Re)start pnode ``p``'s sshd in its namespaces; returns once it listens."""
    cfg = lab.work / p.name / "sshd_config"
    _run("nsenter", "-t", str(_holder_pid(p)), "-n", "-m", "/usr/sbin/sshd", "-f", str(cfg))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = _run("ip", "netns", "exec", p.netns, "ss", "-Hltn", "sport = :22", check=False)
        if p.address in r.stdout:
            return
        time.sleep(0.1)
    raise RuntimeError(f"sshd of {p.name} did not listen")


def _start_holder(p: Pnode, cg_copy: Path) -> None:
    subprocess.Popen(
        ["ip", "netns", "exec", p.netns, "unshare", "-m", "--propagation", "private", "sh",
         "-c", f'mount --rbind {cg_copy} /sys/fs/cgroup && echo $$ > "$1" && exec sleep 86400',
         "sh", str(p.holder)], stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while not (p.holder.exists() and p.holder.read_text().strip()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the namespace holder of {p.name} did not start")
        time.sleep(0.05)


def stop_sshd(lab: Lab, p: Pnode) -> None:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
        os.kill(lab.sshd_pid(p), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while p.pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def on_pnode(p: Pnode, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside pnode ``p`` (its network and mount namespaces), not over SSH."""
    return subprocess.run(["nsenter", "-t", str(_holder_pid(p)), "-n", "-m", *argv],
                          capture_output=True, text=True, timeout=timeout, check=False)


def clean_pnode(p: Pnode) -> None:
    """Destroy whatever vnodes pnode ``p`` still has and deinit its store (best effort: this
    runs when a test failed half-way)."""
    if not p.holder.exists() or not p.state.exists():
        return
    cli = [sys.executable, "-m", "sidusctl", "--state-dir", str(p.state), "vnode"]
    r = on_pnode(p, *cli, "list", "--json")
    try:
        names = [v["name"] for v in json.loads(r.stdout)]
    except ValueError:
        names = []
    if names:
        on_pnode(p, *cli, "destroy", *names)
    on_pnode(p, *cli, "deinit")


def _claim(prefix: str, count: int, cg_copy: Path) -> None:
    """Take ``prefix``'s names for this run: RuntimeError (nothing touched) when another run
    holds them. The cgroup copy's directory is the claim (mkdir is atomic); one left empty
    by a killed run, with no namespace or bridge of that prefix, is taken over."""
    try:
        cg_copy.mkdir(parents=True)
        return
    except FileExistsError:
        pass
    ns = _run("ip", "netns", "list").stdout.split()
    busy = [n for n in (f"{prefix}{k}" for k in range(1, count + 1)) if n in ns]
    if os.path.ismount(cg_copy) or busy or \
            _run("ip", "link", "show", f"{prefix}lan", check=False).returncode == 0:
        raise RuntimeError(f"pnodes {prefix}*: in use by another run ({cg_copy} mounted, "
                           f"namespaces {busy or 'none'}); wait for it or remove them")


@contextlib.contextmanager
def pnodes(work: Path, count: int = 3, *, prefix: str = PREFIX,
           lan_net: str = LAN_NET) -> Iterator[Lab]:
    """``count`` pnodes ready for SSH as root (see the module docstring): host names
    ``pn1``.., namespaces ``<prefix>1``.., LAN bridge ``<prefix>lan`` with ``<lan_net>.254``,
    pnode k at ``<lan_net>.k``; the copy of the cgroup tree at ``/run/<prefix>-cgroup``.
    RuntimeError if another run uses ``prefix``; on exit only what this run made is
    removed."""
    work.mkdir(parents=True, exist_ok=True)
    names = [f"pn{k}" for k in range(1, count + 1)]
    lan = f"{prefix}lan"
    cg_copy = Path(f"/run/{prefix}-cgroup")
    _claim(prefix, count, cg_copy)
    made: list[Pnode] = []
    namespaces: list[str] = []
    mounted = lan_made = False
    try:
        _run("mount", "--rbind", "/sys/fs/cgroup", str(cg_copy))
        mounted = True
        _run("mount", "--make-rprivate", str(cg_copy))
        _run("ip", "link", "add", lan, "type", "bridge")
        lan_made = True
        _run("ip", "addr", "add", f"{lan_net}.254/24", "dev", lan)
        _run("ip", "link", "set", lan, "up")
        key = work / "id_ed25519"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        lab = Lab([], key, work / "known_hosts", work)
        for k, name in enumerate(names, 1):
            ns = f"{prefix}{k}"
            d = work / name
            d.mkdir()
            p = Pnode(name, ns, f"{lan_net}.{k}", d / "state", d / "sshd.pid", d / "holder.pid")
            _run("ip", "netns", "add", ns)
            namespaces.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "link", "add", f"{ns}h", "type", "veth", "peer", "name", "eth0",
                 "netns", ns)
            _run("ip", "link", "set", f"{ns}h", "master", lan, "up")
            _run("ip", "-n", ns, "addr", "add", f"{p.address}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key"))
            shutil.copy(f"{key}.pub", d / "authorized_keys")
            (d / "sshd_config").write_text(
                f"ListenAddress {p.address}\nPort 22\nHostKey {d / 'host_key'}\n"
                f"PidFile {p.pidfile}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\n"
                "StrictModes no\nMaxStartups 100:30:200\nMaxSessions 100\n"
                "AcceptEnv LANG\nLogLevel ERROR\n"
                "Subsystem sftp /usr/lib/openssh/sftp-server\n")
            lab.pnodes.append(p)
            made.append(p)
            _start_holder(p, cg_copy)
            start_sshd(lab, p)
        yield lab
    finally:
        for p in made:
            clean_pnode(p)
        for ns in namespaces:
            _kill_netns(ns)
        time.sleep(0.2)
        for ns in namespaces:
            _run("ip", "netns", "del", ns, check=False)
            _run("ip", "link", "del", f"{ns}h", check=False)
        if lan_made:
            _run("ip", "link", "del", lan, check=False)
        if mounted:
            _run("umount", "-R", "-l", str(cg_copy), check=False)
        with contextlib.suppress(OSError):
            cg_copy.rmdir()
