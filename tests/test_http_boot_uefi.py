"""UEFI HTTP Boot proven with a real firmware: OVMF's Secure Boot build with Microsoft's keys,
NIC without an iPXE ROM, serve-pxe with ``--efi-loader shim --http``.

OVMF offers "UEFI HTTPv4" only after its PXE options time out, so the test prepares the
machine's variable store with ``virt-firmware`` (PyPI): a boot entry whose device path is a
single empty URI node, made ``BootNext``. The firmware's boot manager hands that to the HTTP
Boot driver of the NIC, which, having no URI of its own, asks DHCP with vendor class
``HTTPClient:Arch:00016`` and boots the URL it is offered (EDK2 HttpBootDxe). So what boots
is what serve-pxe's DHCP answered: ``http://SERVER/shimx64.efi``; shim fetches
``grubx64.efi`` from the same URL directory over HTTP and the firmware's Secure Boot lets
both run: serve-pxe's log has no TFTP request from this node. (A short boot: see the test's
docstring for why it stops at GRUB.)
"""

from __future__ import annotations

import os
import re
import shutil
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from sidusctl.netboot import secureboot
from sidusctl.netboot.lab import LabNode, PxeLab
from sidusctl.subsys import qemu
from tests.conftest import SIDUSCTL, BuiltImage
from tests.netns_util import uniq
from tests.test_pxe_boot import BOOT_TIMEOUT, evidence

virt_firmware = pytest.importorskip("virt.firmware", reason="needs virt-firmware (PyPI)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, qemu, NFS)"),
    pytest.mark.skipif(not qemu.OVMF_CODE_SECBOOT.is_file(), reason="needs ovmf"),
    pytest.mark.skipif(bool(secureboot.missing_packages()), reason="needs the signed chain"),
]

NODE = LabNode("hb1", "52:54:00:4b:00:01", IPv4Address("10.77.0.160"))
SERVE = [*SIDUSCTL, "serve-pxe"]


def http_boot_vars(template: Path, dest: Path) -> Path:
    """``dest``: a copy of ``template`` whose ``BootNext`` is an entry with an empty URI
    device path (UEFI spec 2.10, 10.3.5.23 "Uniform Resource Identifiers (URI) Device Path"):
    HTTP Boot with the URL from DHCP."""
    from virt.firmware.efi import devpath  # type: ignore[import-untyped]
    from virt.firmware.varstore import autodetect  # type: ignore[import-untyped]

    shutil.copyfile(template, dest)
    store = autodetect.open_varstore(str(dest))
    varlist = store.get_varlist()
    varlist.set_boot_entry(0x99, "sidusctl UEFI HTTP Boot", devpath.DevicePath.uri(""))
    varlist.set_boot_next(0x99)
    store.write_varstore(str(dest), varlist)
    return dest


def test_uefi_http_boot_with_secure_boot_reaches_signed_grub(minimal_image: BuiltImage,
                                                             tmp_path: Path) -> None:
    """What is proven today: firmware → DHCP (HTTPClient, arch 16) → shim over HTTP → signed
    GRUB over HTTP, verified under Secure Boot, and no TFTP at all. Debian 12's signed GRUB
    2.06 then finds no configuration after an HTTP boot (it asks for none and stops at
    ``grub>``: its prefix is not tied to the HTTP boot device), so the boot to login over
    HTTP Boot is not reached yet (docs/netboot.md)."""
    with PxeLab(uniq("hb"), minimal_image.state, "minimal", [NODE], tmp_path,
                serve_command=SERVE) as lab, evidence(lab):
        lab.start_serve("--nfs", "off", "--efi-loader", "shim", "--http")
        vars_fd = http_boot_vars(qemu.OVMF_VARS_MS, tmp_path / "hb1.vars.fd")
        g = lab.boot(NODE, secure_boot=True, nic_rom=False, uefi_vars=vars_fd,
                     timeout=BOOT_TIMEOUT)
        g.expect(rb"Welcome to GRUB!", 240)
        print(f"HTTP Boot: signed GRUB running {time.monotonic() - g.started:.1f} s after "
              "qemu started")
        text = lab.serve_text()
        assert re.search(rf"DHCP {NODE.mac}: DISCOVER -> OFFER {NODE.ip} .*boot file "
                         r"http://10\.77\.0\.1/shimx64\.efi \(HTTPClient arch 16",
                         text), text[-3000:]
        assert re.search(rf"DHCP {NODE.mac}: REQUEST \(selecting\) -> ACK {NODE.ip} .*"
                         r"http://10\.77\.0\.1/shimx64\.efi", text), text[-3000:]
        assert f"TFTP {NODE.ip}:" not in text, "the HTTP Boot node used TFTP"
        deadline = time.monotonic() + 20
        files: list[str] = []
        while time.monotonic() < deadline:  # status.json is written every few seconds
            files = lab.status()[NODE.name]["files"]
            if "grubx64.efi" in files:
                break
            time.sleep(1)
        assert {"shimx64.efi", "grubx64.efi"} <= set(files), files
        assert "Security Violation" not in g.transcript()
        assert lab.stop_serve() == 0


NODE2 = LabNode("hb2", "52:54:00:4b:00:02", IPv4Address("10.77.0.161"))


def test_uefi_http_boot_through_ipxe_reaches_login(minimal_image: BuiltImage,
                                                   tmp_path: Path) -> None:
    """UEFI HTTP Boot to a login prompt, with nothing over TFTP: OVMF (no Secure Boot: Debian's
    ipxe.efi is not signed) boots the URI entry, asks DHCP as ``HTTPClient``, gets
    ``http://SERVER/ipxe.efi``; that iPXE asks again with user class ``iPXE`` and fetches its
    script, the kernel and the initrd over HTTP; NFS root and overlay as for every node."""
    from tests.test_pxe_boot import check_node, rootfs

    root = rootfs(minimal_image)
    with PxeLab(uniq("hi"), minimal_image.state, "minimal", [NODE2], tmp_path,
                serve_command=SERVE) as lab, evidence(lab):
        lab.start_serve("--nfs", "ganesha", "--efi-loader", "ipxe", "--http")
        vars_fd = http_boot_vars(qemu.OVMF_VARS, tmp_path / "hb2.vars.fd")
        g = lab.boot(NODE2, uefi=True, nic_rom=False, uefi_vars=vars_fd, timeout=BOOT_TIMEOUT)
        g.login(timeout=BOOT_TIMEOUT)
        text = lab.serve_text()
        assert re.search(rf"DHCP {NODE2.mac}: REQUEST \(selecting\) -> ACK {NODE2.ip} .*"
                         r"http://10\.77\.0\.1/ipxe\.efi \(HTTPClient arch 16", text), \
            text[-3000:]
        # that iPXE asks again (user class iPXE) and gets its script, not ipxe.efi: no loop
        assert re.search(rf"DHCP {NODE2.mac}: REQUEST \(selecting\) -> ACK {NODE2.ip} .*"
                         r"\(iPXE user class: script\)", text), text[-3000:]
        assert f"TFTP {NODE2.ip}:" not in text, "the HTTP Boot node used TFTP"
        assert g.sh("test -d /sys/firmware/efi && echo uefi") == "uefi"
        mac = NODE2.mac.replace(":", "-")
        assert f"BOOTIF=01-{mac}" in g.sh("cat /proc/cmdline")
        check_node(g, NODE2, root)
        assert lab.stop_serve() == 0
