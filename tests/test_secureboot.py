"""Secure Boot proven with a real firmware: OVMF's Secure Boot build with Microsoft's keys
enrolled (``OVMF_CODE_4M.secboot.fd``, ``OVMF_VARS_4M.ms.fd``, q35 with SMM), the NIC without
an iPXE ROM (OVMF's own PXE client), serve-pxe with ``--efi-loader shim``.

One guest, two boots (the CI budget allows one full boot to login and a short refused one;
another lab's guest, tests/test_pxe_boot.py's iPXE crash, boots at the same time):

1. shim (signed by Microsoft's UEFI CA) → Debian's signed ``grubx64.efi`` →
   ``grub/grub.cfg`` → the node's ``grub.cfg-01-<mac>`` → the image's signed kernel
   and initrd, NFS root, tmpfs overlay, login; inside, the firmware's ``SecureBoot`` variable
   reads 1 and the kernel is in lockdown; the node reported both itself, and ``pxe status
   --json`` shows Secure Boot on, the lockdown mode, no module refused and the generation
   it runs (the initramfs hook's report and the booted unit's, over serve-pxe's HTTP);
2. the same machine rebooted (same firmware, same keys) with the ``grub-mkimage`` GRUB put
   where shim looks for ``grubx64.efi``: it is unsigned and shim refuses it ("Verification
   failed: (0x1A) Security Violation" on the console).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from sidusctl.netboot import secureboot
from sidusctl.netboot.lab import LabNode, PxeLab
from sidusctl.subsys import qemu
from tests.at_once import run_or_replay_each
from tests.conftest import SIDUSCTL, BuiltImage
from tests.netns_util import uniq
from tests.test_pxe_boot import (
    BOOT_TIMEOUT,
    check_node,
    evidence,
    ipxe_over_http_survives_a_serve_pxe_crash,
    rootfs,
)

#: why the module's test cannot run here (None: it can)
SKIP_REASON = ("needs root (netns, qemu, NFS)" if os.geteuid() != 0 else
               "needs the ovmf package's Secure Boot firmware"
               if not qemu.OVMF_CODE_SECBOOT.is_file() or not qemu.OVMF_VARS_MS.is_file() else
               "needs shim-signed, shim-helpers-amd64-signed, grub-efi-amd64-signed"
               if secureboot.missing_packages() else None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]
#: the prefix of the test's scenarios' keys for :func:`tests.at_once.run_ahead`
#: (tests/test_pnode_guest.py runs them on its second core when this test is in the session)
AHEAD_KEY = "test_secureboot"
TEST_NAME = "test_secure_boot_through_shim_and_refused_unsigned_grub"

NODE = LabNode("sb1", "52:54:00:5b:00:01", IPv4Address("10.77.0.150"))
SERVE = [*SIDUSCTL, "serve-pxe"]
SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


def test_secure_boot_through_shim_and_refused_unsigned_grub(minimal_image: BuiltImage,
                                                            tmp_path: Path) -> None:
    """The two boots above, and tests/test_pxe_boot.py's iPXE machine that sees serve-pxe
    killed mid-boot (:func:`ipxe_over_http_survives_a_serve_pxe_crash`, its own lab). When
    tests/test_pnode_guest.py is in the session, it runs them ahead beside its pnode guest, one
    after the other, while that guest is busy; this test reports the outcome of those and runs
    the others (all of them when run alone) at once (each guest keeps one core busy)."""
    ahead = run_or_replay_each(scenarios(minimal_image, tmp_path))
    if ahead:
        print(f"run ahead by tests/test_pnode_guest.py: {', '.join(ahead)}")


def scenarios(minimal_image: BuiltImage, tmp_path: Path) -> dict[str, Callable[[], None]]:
    """The module's scenarios by their key for :func:`tests.at_once.run_ahead`, each in a
    directory of its own under ``tmp_path``."""
    (tmp_path / "sb").mkdir()
    (tmp_path / "ipxe").mkdir()
    return {f"{AHEAD_KEY}:shim": lambda: secure_boot_and_refused_unsigned_grub(
                minimal_image, tmp_path / "sb"),
            f"{AHEAD_KEY}:ipxe-crash": lambda: ipxe_over_http_survives_a_serve_pxe_crash(
                minimal_image, tmp_path / "ipxe")}


def secure_boot_and_refused_unsigned_grub(minimal_image: BuiltImage, tmp_path: Path) -> None:
    """The scenario: boot 1 and boot 2 of the module's docstring."""
    root = rootfs(minimal_image)
    mac = NODE.mac.replace(":", "-")
    with PxeLab(uniq("sb"), minimal_image.state, "minimal", [NODE], tmp_path,
                serve_command=SERVE) as lab, evidence(lab):
        # --http: the node's boot reports (initramfs, booted unit) go to serve-pxe's HTTP
        lab.start_serve("--nfs", "ganesha", "--efi-loader", "shim", "--http")
        for f in ("shimx64.efi", "mmx64.efi", "grubx64.efi", "grub/grub.cfg",
                  "grub/x86_64-efi/grub.cfg"):
            assert (lab.tftp_root / f).is_file(), f
        g = lab.boot(NODE, secure_boot=True, nic_rom=False, timeout=BOOT_TIMEOUT)
        login_s = g.login(timeout=BOOT_TIMEOUT)
        print(f"secure boot: login prompt {login_s:.1f} s after qemu started")
        text = lab.serve_text()
        assert re.search(rf"DHCP {NODE.mac}: REQUEST \(selecting\) -> ACK {NODE.ip} .*"
                         r"boot file shimx64\.efi \(arch 7 x86-64 UEFI\)", text), text[-3000:]
        for f in ("shimx64.efi", "grubx64.efi", "grub/grub.cfg", f"grub/grub.cfg-01-{mac}",
                  "vmlinuz-minimal", "initrd.img-minimal"):
            # the kernel and initrd of the generation served: boot/minimal/<generation>/
            where = r"boot/minimal/gen-[^/ ']+/" if "minimal" in f else ""
            assert re.search(rf"TFTP {re.escape(str(NODE.ip))}:\d+: sent '/?{where}"
                             rf"{re.escape(f)}'", text), f
        assert "grubnetx64.efi'" not in text  # the unsigned GRUB was never fetched
        # the firmware says Secure Boot is on (UEFI global variable SecureBoot = 1) ...
        sb = g.sh(f"od -An -tu1 {SECURE_BOOT_VAR}").split()
        assert sb[-1] == "1", sb
        # ... and the kernel saw it and locked itself down
        lockdown = g.sh("cat /sys/kernel/security/lockdown")
        assert re.search(r"\[(integrity|confidentiality)\]", lockdown), lockdown
        assert "Secure boot enabled" in g.sh("dmesg | grep -i 'secure boot' || true")
        check_node(g, NODE, root)
        # the overlay hook under lockdown: its modules loaded (Debian-signed), it said so
        state = g.sh("cat /run/sidus/state")
        assert "SIDUS_UNION=overlay" in state, state
        mode = re.search(r"\[(integrity|confidentiality)\]", lockdown)
        assert mode is not None
        assert f"SIDUS_LOCKDOWN={mode.group(1)}" in state and "SIDUS_SECUREBOOT=on" in state, state
        assert "SIDUS_MODFAIL=\n" in state + "\n", state
        assert "kernel lockdown: " in g.sh("cat /run/sidus/sidus.log")
        # ... and told serve-pxe, which shows it (pxe status --json, the CLI's own reading)
        deadline = time.monotonic() + 120
        while True:
            r = subprocess.run([*SIDUSCTL, "pxe", "status", "--json"], capture_output=True,
                               text=True, env={**os.environ, "SIDUSCTL_STATE": str(lab.state)},
                               check=True)
            st = {n["name"]: n for n in json.loads(r.stdout)["nodes"]}[NODE.name]
            if st.get("booted_reported") or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert st["secure_boot"] == "on" and st["lockdown"] == mode.group(1), st
        assert st["modules_failed"] is None and st["booted_reported"], st
        assert st["root"] == "nfs" and str(st["generation"]).startswith("gen-"), st
        table = subprocess.run([*SIDUSCTL, "pxe", "status"], capture_output=True, text=True,
                               env={**os.environ, "SIDUSCTL_STATE": str(lab.state)},
                               check=True).stdout
        assert f"secure boot on, lockdown {mode.group(1)}" in table, table
        # 2. the same machine, same firmware and keys, with shim handed the unsigned
        # grub-mkimage GRUB as grubx64.efi (as a site that rebuilt GRUB would): shim refuses it
        unsigned = lab.tftp_root / "grubx64.efi.sdt-tmp"
        shutil.copyfile(lab.tftp_root / "grubnetx64.efi", unsigned)
        unsigned.rename(lab.tftp_root / "grubx64.efi")
        g.reboot()
        g.expect(rb"Security Violation", 240)
        refused_s = time.monotonic() - g.started
        print(f"unsigned GRUB refused {refused_s:.1f} s after the reboot")
        assert lab.stop_serve() == 0


# tests/test_pnode_guest.py finds this module's test by TEST_NAME: a rename must follow
assert callable(globals().get(TEST_NAME)), f"no test named {TEST_NAME}"
