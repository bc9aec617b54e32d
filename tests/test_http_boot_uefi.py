"""UEFI HTTP Boot proven with a real firmware: OVMF's Secure Boot build with Microsoft's keys,
NIC without an iPXE ROM, serve-pxe with ``--efi-loader shim --http``; and through ipxe.efi
(``--efi-loader ipxe``): two machines, booted at once, or one after the other beside
tests/test_pnode_guest.py's guest.

OVMF offers "UEFI HTTPv4" only after its PXE options time out, so the test prepares the
machine's variable store with ``virt-firmware`` (PyPI): a boot entry whose device path is a
single empty URI node, made ``BootNext``. The firmware's boot manager hands that to the HTTP
Boot driver of the NIC, which, having no URI of its own, asks DHCP with vendor class
``HTTPClient:Arch:00016`` and boots the URL it is offered (EDK2 HttpBootDxe). So what boots
is what serve-pxe's DHCP answered: ``http://SERVER/shimx64.efi``; shim fetches
``grubx64.efi`` from the same URL directory over HTTP and the firmware's Secure Boot lets
both run: serve-pxe's log has no TFTP request from this node. That GRUB is Debian 13's (2.12,
``--signed-grub``): Debian 12's 2.06 configures its network only from the PXE Base Code's
DHCP packet, which an HTTP boot leaves empty, so it stops at ``grub>`` (a start-up warning of
serve-pxe says so, tested here without a boot).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
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
from tests.test_pxe_boot import BOOT_TIMEOUT, evidence
from tests.test_secureboot import SECURE_BOOT_VAR

#: why the module's tests cannot run here (None: they can)
SKIP_REASON = ("needs root (netns, qemu, NFS)" if os.geteuid() != 0 else
               "needs ovmf" if not qemu.OVMF_CODE_SECBOOT.is_file() else
               "needs the signed chain" if secureboot.missing_packages() else
               "needs virt-firmware (PyPI)" if importlib.util.find_spec("virt") is None
               or importlib.util.find_spec("virt.firmware") is None else None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")]
#: the prefix of the scenarios' keys for :func:`tests.at_once.run_ahead`
#: (tests/test_pnode_guest.py runs them on its second core when the test is in the session)
AHEAD_KEY = "test_http_boot_uefi"
TEST_NAME = "test_uefi_http_boot_reaches_login_under_secure_boot_and_through_ipxe"

NODE = LabNode("hb1", "52:54:00:4b:00:01", IPv4Address("10.77.0.160"))
NODE2 = LabNode("hb2", "52:54:00:4b:00:02", IPv4Address("10.77.0.161"))
#: Debian 13's signed netboot GRUB, where scripts/fetch-signed-grub puts it
SIGNED_GRUB_212 = Path("/var/lib/sidusctl/signed-grub/grubnetx64.efi.signed")

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


def check_secure_boot_node(lab: PxeLab, g: qemu.Guest, root: str) -> None:
    """``NODE`` came through shim and the signed GRUB over HTTP only, under Secure Boot."""
    from tests.test_pxe_boot import check_node

    mac = NODE.mac.replace(":", "-")
    text = lab.serve_text()
    assert re.search(rf"DHCP {NODE.mac}: DISCOVER -> OFFER {NODE.ip} .*boot file "
                     r"http://10\.77\.0\.1/shimx64\.efi \(HTTPClient arch 16",
                     text), text[-3000:]
    assert re.search(rf"DHCP {NODE.mac}: REQUEST \(selecting\) -> ACK {NODE.ip} .*"
                     r"http://10\.77\.0\.1/shimx64\.efi", text), text[-3000:]
    for f in ("shimx64.efi", "/grubx64.efi", "grub/grub.cfg", f"grub/grub.cfg-01-{mac}",
              "vmlinuz-minimal", "initrd.img-minimal"):
        # the kernel and initrd of the generation served: boot/minimal/<generation>/
        where = r"boot/minimal/gen-[^/ ]+/" if "minimal" in f else ""
        assert re.search(rf'HTTP {re.escape(str(NODE.ip))}: "GET /{where}{re.escape(f)} ',
                         text), f
    assert f"TFTP {NODE.ip}:" not in text, "the HTTP Boot node used TFTP"
    assert "Security Violation" not in g.transcript()
    assert g.sh(f"od -An -tu1 {SECURE_BOOT_VAR}").split()[-1] == "1"
    lockdown = g.sh("cat /sys/kernel/security/lockdown")
    assert re.search(r"\[(integrity|confidentiality)\]", lockdown), lockdown
    check_node(g, NODE, root)


def check_ipxe_node(lab: PxeLab, g: qemu.Guest, root: str) -> None:
    """``NODE2`` came through ipxe.efi over HTTP, which asked for its script, not itself."""
    from tests.test_pxe_boot import check_bootif, check_node

    text = lab.serve_text()
    assert re.search(rf"DHCP {NODE2.mac}: REQUEST \(selecting\) -> ACK {NODE2.ip} .*"
                     r"http://10\.77\.0\.1/ipxe\.efi \(HTTPClient arch 16", text), \
        text[-3000:]
    # that iPXE asks again (user class iPXE) and gets its script, not ipxe.efi: no loop
    assert re.search(rf"DHCP {NODE2.mac}: REQUEST \(selecting\) -> ACK {NODE2.ip} .*"
                     r"\(iPXE user class: script\)", text), text[-3000:]
    assert f"TFTP {NODE2.ip}:" not in text, "the HTTP Boot node used TFTP"
    assert g.sh("test -d /sys/firmware/efi && echo uefi") == "uefi"
    check_bootif(g, NODE2)
    check_node(g, NODE2, root)


def test_uefi_http_boot_reaches_login_under_secure_boot_and_through_ipxe(
        minimal_image: BuiltImage, tmp_path: Path) -> None:
    """Two machines, each against its own serve-pxe in its own namespace, nothing over TFTP
    (:func:`scenarios`). When tests/test_pnode_guest.py is in the session, it runs them ahead
    beside its pnode guest, one after the other, while that guest is busy; this test reports
    the outcome of those and boots the others (both when run alone) at once (the host has a
    core for each)."""
    ahead = run_or_replay_each(scenarios(minimal_image, tmp_path))
    if ahead:
        print(f"run ahead by tests/test_pnode_guest.py: {', '.join(ahead)}")


def scenarios(minimal_image: BuiltImage, tmp_path: Path) -> dict[str, Callable[[], None]]:
    """The module's scenarios by their key for :func:`tests.at_once.run_ahead`, each in a
    directory of its own under ``tmp_path``:

    - UEFI HTTP Boot under Secure Boot: firmware → DHCP (HTTPClient, arch 16) → shim over
      HTTP → Debian 13's signed GRUB 2.12 over HTTP (``--signed-grub``, fetched by
      scripts/fetch-signed-grub: Debian 12's 2.06 finds no configuration after an HTTP boot,
      and serve-pxe says so) → its grub.cfg, the node's entry, the signed kernel and the initrd
      over HTTP → NFS root and overlay. Inside: Secure Boot on, lockdown, ``/`` the overlay,
      the inventory's host name;
    - UEFI HTTP Boot through iPXE: OVMF (no Secure Boot: Debian's ipxe.efi is not signed)
      boots the URI entry, asks DHCP as ``HTTPClient``, gets ``http://SERVER/ipxe.efi``; that
      iPXE asks again with user class ``iPXE`` and fetches its script, the kernel and the
      initrd over HTTP; NFS root and overlay as for every node."""
    (tmp_path / "sb").mkdir()
    (tmp_path / "ipxe").mkdir()
    return {f"{AHEAD_KEY}:shim": lambda: http_boot_under_secure_boot(minimal_image,
                                                                     tmp_path / "sb"),
            f"{AHEAD_KEY}:ipxe": lambda: http_boot_through_ipxe(minimal_image,
                                                                tmp_path / "ipxe")}


def http_boot_under_secure_boot(minimal_image: BuiltImage, tmp_path: Path) -> None:
    """The first scenario of :func:`scenarios`."""
    from tests.test_pxe_boot import rootfs

    if not SIGNED_GRUB_212.is_file():
        pytest.fail(f"{SIGNED_GRUB_212} is missing: run scripts/fetch-signed-grub (setup-host "
                    "does)", pytrace=False)
    with PxeLab(uniq("hb"), minimal_image.state, "minimal", [NODE], tmp_path,
                serve_command=SERVE) as lab, evidence(lab):
        lab.start_serve("--nfs", "ganesha", "--efi-loader", "shim", "--http",
                        "--signed-grub", str(SIGNED_GRUB_212))
        assert (lab.tftp_root / "grubx64.efi").read_bytes() == SIGNED_GRUB_212.read_bytes()
        assert "will stop at 'grub>'" not in lab.serve_text()
        g = lab.boot(NODE, secure_boot=True, nic_rom=False, timeout=BOOT_TIMEOUT,
                     uefi_vars=http_boot_vars(qemu.OVMF_VARS_MS, tmp_path / "hb1.vars.fd"))
        qemu.wait_login_prompts([g], BOOT_TIMEOUT)
        print(f"HTTP Boot: login prompt {g.login_prompt_s:.1f} s (Secure Boot) after qemu "
              "started")
        g.login()
        check_secure_boot_node(lab, g, rootfs(minimal_image))
        assert lab.stop_serve() == 0


def http_boot_through_ipxe(minimal_image: BuiltImage, tmp_path: Path) -> None:
    """The second scenario of :func:`scenarios`."""
    from tests.test_pxe_boot import rootfs

    with PxeLab(uniq("hi"), minimal_image.state, "minimal", [NODE2], tmp_path,
                serve_command=SERVE) as lab, evidence(lab):
        lab.start_serve("--nfs", "ganesha", "--efi-loader", "ipxe", "--http")
        g = lab.boot(NODE2, uefi=True, nic_rom=False, timeout=BOOT_TIMEOUT,
                     uefi_vars=http_boot_vars(qemu.OVMF_VARS, tmp_path / "hb2.vars.fd"))
        qemu.wait_login_prompts([g], BOOT_TIMEOUT)
        print(f"HTTP Boot: login prompt {g.login_prompt_s:.1f} s (iPXE) after qemu started")
        g.login()
        check_ipxe_node(lab, g, rootfs(minimal_image))
        assert lab.stop_serve() == 0


def test_serve_pxe_warns_that_debian_12s_grub_stops_after_http_boot(minimal_image: BuiltImage,
                                                                     tmp_path: Path) -> None:
    """No boot: serve-pxe with the host's signed GRUB 2.06, shim and HTTP on, says at start
    that UEFI HTTP Boot clients will stop at ``grub>`` and what to give instead."""
    with PxeLab(uniq("hw"), minimal_image.state, "minimal", [NODE], tmp_path,
                serve_command=SERVE) as lab, evidence(lab):
        lab.start_serve("--nfs", "off", "--efi-loader", "shim", "--http")
        text = lab.serve_text()
        assert "will stop at 'grub>'" in text and "--signed-grub" in text, text[-2000:]
        assert lab.stop_serve() == 0


# tests/test_pnode_guest.py finds this module's test by TEST_NAME: a rename must follow
assert callable(globals().get(TEST_NAME)), f"no test named {TEST_NAME}"
