"""Test helpers for netboot: a private network namespace, and a qemu guest (TCG) driven over its
serial console with pexpect.

Everything the guest talks to (nfs-ganesha, rpcbind, tgtd) runs inside a network namespace
``sdt-nb-<pid>`` that only has loopback, and qemu runs there too: its user-mode network (slirp)
shows the namespace's 127.0.0.1 to the guest as 10.0.2.2. Nothing listens on the host's own
interfaces. qemu's ``-name`` carries the ``sdt-`` prefix so the leak check can see it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pexpect

HOST = "10.0.2.2"  # the host (here: the namespace) as slirp shows it to the guest
ROOT_PASSWORD = "sidus"
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LOGIN_RE = re.compile(rb"login: ?$", re.M)
BOOT_TIMEOUT = 300
# Every console byte is an emulated UART write under TCG: keep the boot chatter down (the sidus
# script's own messages are printed regardless).
QUIET = ("quiet", "systemd.show_status=false")


def have_kvm_free_qemu() -> bool:
    return shutil.which("qemu-system-x86_64") is not None


@contextlib.contextmanager
def netns(tag: str = "nb") -> Iterator[str]:
    """A network namespace ``sdt-<tag>-<pid>`` with loopback up; deleted on exit."""
    name = f"sdt-{tag}-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        # anything still running in it (a test that failed half-way) is ended first
        r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                           check=False)
        for pid in r.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", name], check=False)


class Guest:
    """A qemu-system-x86_64 guest (``-accel tcg``) whose ttyS0 is our pexpect child.

    ``kernel``/``initrd``/``append`` boot a kernel directly; without a kernel, ``tftp`` (a TFTP
    root) boots the machine over PXE: qemu's user network answers DHCP with ``bootfile`` and
    serves that directory by TFTP, nothing on the host. ``disks`` are raw images attached as
    virtio disks (vda, vdb, ...). ``log`` collects the whole console transcript."""

    def __init__(self, name: str, *, kernel: Path | None = None, initrd: Path | None = None,
                 append: str = "", disks: Sequence[Path] = (), netns: str | None = None,
                 mac: str = "52:54:00:12:34:56", memory: int = 1024,
                 tftp: Path | None = None, bootfile: str = "pxelinux.0",
                 log: Path | None = None) -> None:
        self.name = name if name.startswith("sdt-") else f"sdt-{name}"
        argv = ["qemu-system-x86_64", "-name", self.name, "-accel", "tcg", "-m", str(memory),
                "-smp", "1", "-nographic", "-no-user-config", "-nodefaults", "-serial", "stdio",
                "-netdev", "user,id=n0" + (f",tftp={tftp},bootfile={bootfile}" if tftp else ""),
                "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]
        if tftp is not None and kernel is None:
            # network boot through the NIC's iPXE option ROM, from slirp's own DHCP and TFTP
            argv += ["-boot", "n"]
        if kernel is not None:
            argv += ["-kernel", str(kernel)]
        if initrd is not None:
            argv += ["-initrd", str(initrd)]
        if append:
            argv += ["-append", append]
        for d in disks:
            argv += ["-drive", f"file={d},if=virtio,format=raw,cache=unsafe"]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.argv = argv
        self.log_path = log
        self._logf = open(log, "ab") if log else None  # noqa: SIM115
        self.started = time.monotonic()
        self.child = pexpect.spawn(argv[0], argv[1:], timeout=BOOT_TIMEOUT, maxread=65536,
                                   logfile=self._logf, dimensions=(50, 200))
        self.logged_in = False

    # -- console -----------------------------------------------------------------------------
    def expect(self, pattern: str | bytes | re.Pattern[bytes] | list[object],
               timeout: float = BOOT_TIMEOUT) -> int:
        return int(self.child.expect(pattern, timeout=timeout))

    def wait_login_prompt(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait for ``login:``; returns seconds since qemu started (or the last reboot)."""
        self.child.expect(LOGIN_RE, timeout=timeout)
        return time.monotonic() - self.started

    def login(self, timeout: float = BOOT_TIMEOUT) -> None:
        self.wait_login_prompt(timeout)
        self.child.sendline("root")
        self.child.expect(rb"Password:", timeout=60)
        self.child.sendline(ROOT_PASSWORD)
        self.child.expect(rb"[#$] ?$", timeout=90)
        self.child.sendline("stty -echo cols 200; bind 'set enable-bracketed-paste off'; "
                            "export PS1='SDT# ' TERM=dumb")
        self.child.expect(rb"SDT# ", timeout=30)
        # consume whatever the terminal echoed before -echo took effect
        self.child.sendline("echo __SDT_SYNC_$((6*7))__")
        self.child.expect(rb"__SDT_SYNC_42__", timeout=30)
        self.child.expect(rb"SDT# ", timeout=30)
        self.logged_in = True

    def sh(self, command: str, timeout: float = 60, check: bool = True) -> str:
        """Run ``command`` in the guest's shell; its output (stdout+stderr). AssertionError on a
        non-zero exit when ``check``."""
        self.child.sendline(f"{command} 2>&1; echo \"__SDT_R\"\"C=$?__\"")
        self.child.expect(rb"__SDT_RC=(\d+)__", timeout=timeout)
        raw = self.child.before.decode("utf-8", "replace")
        rc = int(self.child.match.group(1))
        self.child.expect(rb"SDT# ", timeout=30)
        raw = ANSI_RE.sub("", raw.replace("\r", ""))
        lines = [ln[5:] if ln.startswith("SDT# ") else ln for ln in raw.split("\n")
                 if "__SDT_R" not in ln]
        out = "\n".join(lines).strip("\n")
        if check and rc != 0:
            raise AssertionError(f"guest command {command!r} failed (rc {rc}):\n{out}")
        return out

    def rc(self, command: str, timeout: float = 60) -> int:
        self.child.sendline(f"{command} >/dev/null 2>&1; echo \"__SDT_R\"\"C=$?__\"")
        self.child.expect(rb"__SDT_RC=(\d+)__", timeout=timeout)
        code = int(self.child.match.group(1))
        self.child.expect(rb"SDT# ", timeout=30)
        return code

    def reboot(self) -> None:
        """``reboot`` in the guest; qemu restarts it with the same kernel and command line."""
        # a forced reboot (after sync): the clean shutdown costs a minute under TCG and proves
        # nothing here
        self.child.sendline("sync; reboot -f")
        self.logged_in = False
        self.started = time.monotonic()

    def transcript(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return ""

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)
        with contextlib.suppress(Exception):
            self.child.close(force=True)
        if self._logf:
            self._logf.close()


@contextlib.contextmanager
def guest(name: str, **kw: object) -> Iterator[Guest]:
    g = Guest(name, **kw)  # type: ignore[arg-type]
    try:
        yield g
    finally:
        g.close()  # `ip netns exec` execs qemu: the child's pid is qemu's


def nfs_append(export: Path, *extra: str, console: str = "ttyS0") -> str:
    """Kernel command line for an NFS root served at ``HOST:export``."""
    parts = [f"console={console}", "root=/dev/nfs",
             f"nfsroot={HOST}:{export},rsize=8192,wsize=8192,tcp", "ip=dhcp",
             "panic=-1", *QUIET, *extra]
    return " ".join(parts)


def mkdisk(path: Path, size_mb: int, label: str | None = None) -> Path:
    """A raw disk image; with ``label``, one ext4 filesystem over the whole disk."""
    with open(path, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    if label:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, str(path)], check=True)
    return path
