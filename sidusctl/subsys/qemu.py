"""qemu guests driven over their serial console: the one place that starts qemu-system-x86_64.

Owns one ``qemu-system-x86_64`` process per :class:`Guest`, run with ``-accel tcg`` (software
emulation: works everywhere, nested KVM does not), ``-nographic`` and the guest's first serial
port (ttyS0) on qemu's stdio, which is a pseudo-terminal this module creates: qemu is started
with :func:`sidusctl.core.run.spawn` (own process group, dies with sidusctl) and the pty's
master side is driven with pexpect (``fdpexpect.fdspawn``), so that a caller can wait for the
boot messages and the ``login:`` prompt, log in and run shell commands as an operator would
on a serial console.

Networking, one NIC (virtio-net-pci, its iPXE option ROM as the PXE client):

- ``tap=IFNAME``: a tap device (created beforehand, e.g. ``ip tuntap add``, and enslaved to a
  bridge) — the guest is on that L2 segment and talks to real DHCP/TFTP/NFS servers there;
- otherwise qemu's user-mode network (slirp): private, 10.0.2.0/24, the host seen as 10.0.2.2;
  ``tftp=DIR`` makes slirp's built-in DHCP hand out ``bootfile`` and serve ``DIR`` by TFTP.

Without ``kernel`` and with ``tap`` or ``tftp``, the machine boots from the network
(``-boot n``); with ``kernel``/``initrd``/``append`` it boots that kernel directly.
``netns=NAME`` runs qemu inside a network namespace (``ip netns exec``; exec'd, so the child
pid is qemu's). The name given to qemu (``-name``) is the guest's name, visible in ``ps``.

Every wait has a timeout and raises :class:`GuestError` with the console tail; :meth:`close`
(and the :func:`guest` context manager) always ends qemu. Sources: qemu-system-x86_64(1),
pexpect documentation.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
import tty
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import pexpect
import pexpect.fdpexpect

from sidusctl.core.errors import PrerequisiteError, SidusError
from sidusctl.core.run import spawn

ROOT_PASSWORD = "sidus"  # the minimal image's lab password (images/minimal/image.toml)
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LOGIN_RE = re.compile(rb"login: ?$", re.M)
PROMPT = "SDT# "
#: OVMF (UEFI for qemu, Debian package ovmf): read-only code and the template of the variables
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
#: OVMF built with Secure Boot (needs SMM: q35 with ``smm=on`` and a secure pflash) and the
#: variable store template with Microsoft's KEK and db enrolled and Secure Boot on, so that
#: shim (signed by Microsoft's UEFI CA) runs and unsigned loaders are refused
OVMF_CODE_SECBOOT = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_VARS_MS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
BOOT_TIMEOUT = 300.0  # seconds; a TCG boot to login takes 1-2 minutes on a loaded 2-core host
# Every console byte is an emulated UART write under TCG: keep the boot chatter down.
QUIET = ("quiet", "systemd.show_status=false")
#: Kernel words for a TCG guest that is there to prove something, not to be timed: no address
#: space randomization (the kernel's ``norandmaps``). qemu's TCG translates guest code per
#: virtual address, so with randomization it translates every program's libraries again, and
#: throwing those translations away when their page is reused costs qemu 7.2 up to quadratic
#: time per page: 15-30 % of a boot to login (docs/performance.md, netboot section). Nodes on
#: hardware keep randomization, and so do the boot benchmarks unless told otherwise.
NORANDMAPS = ("norandmaps",)

Pattern = str | bytes | re.Pattern[bytes] | list[Any]


class GuestError(SidusError):
    """A guest did not show what was awaited in time, died, or a command in it failed.
    The message carries the tail of the serial console."""


def qemu_binary() -> str:
    """Path of qemu-system-x86_64; :class:`PrerequisiteError` if it is not installed."""
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise PrerequisiteError("qemu-system-x86_64 is not installed",
                                hint="apt-get install qemu-system-x86")
    return path


class Guest:
    """A qemu-system-x86_64 guest (TCG) whose ttyS0 is driven with pexpect (``child``).

    ``name``: qemu's ``-name`` (the caller's prefix, e.g. ``sdt-``, is kept as given).
    ``kernel``/``initrd``/``append``: direct kernel boot. ``tap``: an existing tap device for
    the NIC; else slirp, with ``tftp``/``bootfile`` for a slirp PXE boot. ``mac``: the NIC's
    address. ``disks``: raw images attached as virtio disks (vda, vdb, ...). ``memory`` MiB.
    ``smp``: vCPUs (each a host thread: qemu's multi-threaded TCG).
    ``log``: file collecting the whole console transcript (appended). ``netns``: run qemu
    there. ``uefi_vars``: boot UEFI firmware (OVMF, Debian package ovmf) instead of the BIOS,
    with this file as the machine's writable variable store (created from OVMF's template
    when missing). ``nic_rom=False`` gives the NIC no option ROM: no iPXE, so the firmware's
    own PXE client boots (OVMF's, with ``uefi_vars``), as on most real hardware.
    ``secure_boot`` (with ``uefi_vars``): OVMF's Secure Boot build on a q35 machine with SMM
    and a secure flash, a missing ``uefi_vars`` made from the template with Microsoft's keys
    enrolled (:data:`OVMF_VARS_MS`); a ``uefi_vars`` file that exists is used as it is (a store
    prepared by the caller, e.g. with another boot order edited by ``virt-fw-vars``).
    ``monitor``: a Unix socket path where qemu listens for its human monitor
    (:func:`monitor_command`). ``prealloc`` (needs ``monitor``): qemu faults in all of the
    guest's RAM before the guest runs (``-mem-prealloc``) and holds the vCPUs (``-S``) until
    :meth:`cont`, so that a timed boot does not count the host's first touch of guest memory
    (docs/performance.md, "Netboot"). The process starts in the constructor; :meth:`close`
    ends it. Raises :class:`SidusError` for ``secure_boot`` without ``uefi_vars`` or
    ``prealloc`` without ``monitor``."""

    def __init__(self, name: str, *, kernel: Path | None = None, initrd: Path | None = None,
                 append: str = "", disks: Sequence[Path] = (), netns: str | None = None,
                 mac: str = "52:54:00:12:34:56", memory: int = 1024,
                 tftp: Path | None = None, bootfile: str = "pxelinux.0",
                 tap: str | None = None, log: Path | None = None,
                 uefi_vars: Path | None = None, nic_rom: bool = True,
                 secure_boot: bool = False, smp: int = 1, monitor: Path | None = None,
                 prealloc: bool = False, timeout: float = BOOT_TIMEOUT) -> None:
        self.name = name
        self.timeout = timeout
        if tap is not None:
            netdev = f"tap,id=n0,ifname={tap},script=no,downscript=no"
        else:
            netdev = "user,id=n0" + (f",tftp={tftp},bootfile={bootfile}" if tftp else "")
        argv = [qemu_binary(), "-name", name, "-accel", "tcg", "-m", str(memory),
                "-smp", str(smp), "-nographic", "-no-user-config", "-nodefaults",
                "-serial", "stdio", "-netdev", netdev,
                "-device", f"virtio-net-pci,netdev=n0,mac={mac}" + ("" if nic_rom else ",romfile=")]
        if secure_boot and uefi_vars is None:
            raise SidusError("secure_boot needs uefi_vars (the machine's variable store)")
        if prealloc and monitor is None:
            raise SidusError("prealloc needs monitor (its cont starts the vCPUs)")
        self.monitor = monitor
        if prealloc:
            argv[1:1] = ["-S", "-mem-prealloc"]
        if uefi_vars is not None:
            code, template = ((OVMF_CODE_SECBOOT, OVMF_VARS_MS) if secure_boot
                              else (OVMF_CODE, OVMF_VARS))
            for f in (code, template):
                if not f.is_file():
                    raise PrerequisiteError(f"UEFI firmware {f} is missing",
                                            hint="apt-get install ovmf")
            if not uefi_vars.exists():
                shutil.copyfile(template, uefi_vars)
            if secure_boot:
                # the Secure Boot build keeps its variables behind SMM (qemu docs, "OVMF")
                argv += ["-machine", "q35,smm=on",
                         "-global", "driver=cfi.pflash01,property=secure,value=on"]
            argv += ["-drive", f"if=pflash,format=raw,readonly=on,file={code}",
                     "-drive", f"if=pflash,format=raw,file={uefi_vars}"]
        if kernel is None and (tftp is not None or tap is not None):
            # network boot through the NIC's iPXE option ROM
            argv += ["-boot", "n"]
        if kernel is not None:
            argv += ["-kernel", str(kernel)]
        if initrd is not None:
            argv += ["-initrd", str(initrd)]
        if append:
            argv += ["-append", append]
        for d in disks:
            argv += ["-drive", f"file={d},if=virtio,format=raw,cache=unsafe"]
        if monitor is not None:
            argv += ["-monitor", f"unix:{monitor},server=on,wait=off"]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.argv = argv
        self.log_path = log
        self._logf: IO[bytes] | None = open(log, "ab") if log else None  # noqa: SIM115
        self.started = time.monotonic()
        # ttyS0 <-> qemu's stdio <-> a pty slave; we hold the master. Raw from the start, as
        # qemu sets it anyway: no echo of what we send, no newline translation.
        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            self.proc = spawn(argv, stdin=slave, stdout=slave, stderr=slave, what="qemu")
        except BaseException:
            os.close(master)
            if self._logf is not None:
                self._logf.close()
            raise
        finally:
            os.close(slave)
        self.child: Any = pexpect.fdpexpect.fdspawn(master, timeout=timeout, maxread=65536,
                                                    logfile=self._logf)
        self.logged_in = False
        self.at_login_prompt = False  # the last thing awaited was a login prompt
        self.login_prompt_s = 0.0  # seconds from start (or reboot) to the last login prompt

    def cont(self, timeout: float = 300) -> float:
        """Starts the vCPUs of a guest made with ``prealloc`` (the monitor's ``cont``) once qemu
        has set up its machine, RAM faulted in, and restarts the clock (``started``) there.
        Returns the seconds that set-up took. :class:`GuestError` when the monitor does not
        answer within ``timeout`` seconds."""
        if self.monitor is None:
            raise SidusError("cont needs a guest made with monitor= and prealloc=True")
        t0 = time.monotonic()
        deadline = t0 + timeout
        # qemu makes the socket early and answers on it once its main loop runs: after the
        # machine, and its RAM, is set up
        while not self.monitor.exists():
            if time.monotonic() > deadline or not self.alive():
                raise GuestError(f"qemu made no monitor socket {self.monitor}")
            time.sleep(0.05)
        monitor_command(self.monitor, "cont", timeout=max(1.0, deadline - time.monotonic()))
        self.started = time.monotonic()
        return self.started - t0

    # -- console -----------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        """qemu's process id (``ip netns exec`` execs it)."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether qemu still runs."""
        return self.proc.alive()

    def sendline(self, text: str = "") -> None:
        """Type ``text`` and Enter on the serial console."""
        self.child.sendline(text)

    def tail(self, chars: int = 3000) -> str:
        """The last ``chars`` characters of the console transcript (ANSI codes removed)."""
        text = self.transcript()
        if not text:
            before = self.child.before
            text = before.decode("utf-8", "replace") if isinstance(before, bytes) else ""
        return ANSI_RE.sub("", text.replace("\r", ""))[-chars:]

    def expect(self, pattern: Pattern, timeout: float | None = None) -> int:
        """Wait for ``pattern`` (pexpect semantics) on the console; the index matched.
        :class:`GuestError` with the console tail on timeout or if qemu exits."""
        t = self.timeout if timeout is None else timeout
        try:
            return int(self.child.expect(pattern, timeout=t))
        except pexpect.TIMEOUT:
            raise GuestError(f"guest {self.name}: {pattern!r} not seen within {t:.0f} s; "
                             f"console tail:\n{self.tail()}") from None
        except pexpect.EOF:
            raise GuestError(f"guest {self.name}: qemu exited while waiting for {pattern!r}; "
                             f"console tail:\n{self.tail()}") from None

    def poll_login_prompt(self, timeout: float = 0.5) -> bool:
        """Whether the login prompt shows up within ``timeout`` seconds (for watching several
        guests in turn); :class:`GuestError` if qemu has exited."""
        try:
            self.child.expect(LOGIN_RE, timeout=timeout)
        except pexpect.TIMEOUT:
            return False
        except pexpect.EOF:
            raise GuestError(f"guest {self.name}: qemu exited before its login prompt; "
                             f"console tail:\n{self.tail()}") from None
        self.at_login_prompt = True
        self.login_prompt_s = time.monotonic() - self.started
        return True

    def wait_login_prompt(self, timeout: float | None = None) -> float:
        """Wait for ``login:``; seconds since qemu started (or the last reboot)."""
        self.expect(LOGIN_RE, timeout)
        self.at_login_prompt = True
        self.login_prompt_s = time.monotonic() - self.started
        return self.login_prompt_s

    def login(self, timeout: float | None = None, user: str = "root",
              password: str = ROOT_PASSWORD) -> float:
        """Wait for the login prompt (unless :meth:`wait_login_prompt` has just seen it), log
        in and set a plain prompt for :meth:`sh`; returns the seconds from start (or reboot)
        to the login prompt."""
        seconds = self.login_prompt_s if self.at_login_prompt else self.wait_login_prompt(timeout)
        self.at_login_prompt = False
        self.child.sendline(user)
        self.expect(rb"Password:", 60)
        self.child.sendline(password)
        self.expect(rb"[#$] ?$", 90)
        self.child.sendline("stty -echo cols 200; bind 'set enable-bracketed-paste off'; "
                            f"export PS1='{PROMPT}' TERM=dumb")
        self.expect(PROMPT.encode(), 30)
        # consume whatever the terminal echoed before -echo took effect
        self.child.sendline("echo __SDT_SYNC_$((6*7))__")
        self.expect(rb"__SDT_SYNC_42__", 30)
        self.expect(PROMPT.encode(), 30)
        self.logged_in = True
        return seconds

    def _run(self, command: str, timeout: float) -> tuple[int, str]:
        self.child.sendline(f"{command}; echo \"__SDT_R\"\"C=$?__\"")
        self.expect(rb"__SDT_RC=(\d+)__", timeout)
        raw = self.child.before.decode("utf-8", "replace")
        rc = int(self.child.match.group(1))
        self.expect(PROMPT.encode(), 30)
        raw = ANSI_RE.sub("", raw.replace("\r", ""))
        lines = [ln[len(PROMPT):] if ln.startswith(PROMPT) else ln for ln in raw.split("\n")
                 if "__SDT_R" not in ln]
        return rc, "\n".join(lines).strip("\n")

    def sh(self, command: str, timeout: float = 60, check: bool = True) -> str:
        """Run ``command`` in the logged-in shell; its output (stdout and stderr). With
        ``check``, :class:`GuestError` on a non-zero exit status."""
        rc, out = self._run(f"{command} 2>&1", timeout)
        if check and rc != 0:
            raise GuestError(f"guest {self.name}: {command!r} failed (exit {rc}):\n{out}")
        return out

    def rc(self, command: str, timeout: float = 60) -> int:
        """Run ``command`` in the logged-in shell, output discarded; its exit status."""
        return self._run(f"{command} >/dev/null 2>&1", timeout)[0]

    def reboot(self) -> None:
        """A forced reboot (after sync); qemu restarts the machine the same way."""
        # the clean shutdown costs a minute under TCG and proves nothing here
        self.child.sendline("sync; reboot -f")
        self.logged_in = self.at_login_prompt = False
        self.started = time.monotonic()

    def transcript(self) -> str:
        """The whole console transcript so far ("" without ``log``)."""
        if self._logf is not None:
            with contextlib.suppress(ValueError):
                self._logf.flush()
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return ""

    def close(self) -> None:
        """End qemu (SIGTERM, SIGKILL if it is not gone within 3 s) and close the console
        and the transcript. Idempotent."""
        self.proc.stop(grace=3)
        with contextlib.suppress(OSError):
            self.child.close()
        if self._logf is not None:
            self._logf.close()
            self._logf = None


def monitor_command(path: Path, command: str, timeout: float = 10) -> str:
    """Run one command of qemu's human monitor (HMP, e.g. ``info jit``) through the Unix socket
    a guest was started with (``Guest(monitor=path)``); its output, lines joined by ``\n``,
    without the prompt and the echo. :class:`GuestError` when nothing answers within
    ``timeout`` seconds. Source: qemu's "QEMU Monitor" documentation."""
    prompt = b"(qemu) "
    deadline = time.monotonic() + timeout
    buf = b""

    def read_to_prompt(sock: socket.socket, start: int) -> int:
        nonlocal buf
        while (end := buf.find(prompt, start)) < 0:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, OSError) as e:
                raise GuestError(f"qemu monitor {path}: no answer to {command!r}: {e}") from e
            if not chunk:
                raise GuestError(f"qemu monitor {path}: closed before answering {command!r}")
            buf += chunk
        return end

    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
        except OSError as e:
            raise GuestError(f"qemu monitor {path}: {e}") from e
        first = read_to_prompt(sock, 0) + len(prompt)
        sock.sendall(command.encode() + b"\n")
        end = read_to_prompt(sock, first)
    # the echo of the command (redrawn with escape sequences) ends at the first line break
    text = buf[first:end].decode(errors="replace").replace("\r\n", "\n")
    return text.partition("\n")[2].rstrip("\n")


def wait_login_prompts(guests: Sequence[Guest], timeout: float,
                       on_tick: Callable[[Guest], None] | None = None,
                       on_prompt: Callable[[Guest], None] | None = None) -> None:
    """Watch several booting guests at once until each shows its login prompt, reading every
    console in turn (half a second each: a console nobody reads stalls its guest).
    ``on_tick(guest)`` runs before each look at a guest still booting, ``on_prompt(guest)``
    once when its prompt shows (its :attr:`Guest.login_prompt_s` is then set).
    :class:`GuestError` naming the first guest without a prompt after ``timeout`` seconds, or
    a guest whose qemu exited."""
    deadline = time.monotonic() + timeout
    waiting = list(guests)
    while waiting:
        for g in list(waiting):
            if on_tick:
                on_tick(g)
            if time.monotonic() > deadline:
                raise GuestError(f"guest {g.name}: no login prompt within {timeout:.0f} s;"
                                 f" console tail:\n{g.tail()}")
            if g.poll_login_prompt(0.5):
                waiting.remove(g)
                if on_prompt:
                    on_prompt(g)


@contextlib.contextmanager
def guest(name: str, **kw: Any) -> Iterator[Guest]:
    """A :class:`Guest` (same arguments) that is ended when the block exits, however."""
    g = Guest(name, **kw)
    try:
        yield g
    finally:
        g.close()
