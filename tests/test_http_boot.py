"""Secure Boot and UEFI HTTP Boot without a guest (fast tier): the DHCP answers, the signed
chain in the tree, the signed GRUB's configuration and the daemon exports.

- UEFI HTTP Boot (UEFI specification 2.10, 24.7): a client whose option 60 starts with
  ``HTTPClient`` (arch 16, RFC 4578 / IANA) gets option 60 ``HTTPClient`` and an ``http://``
  URL as boot file, in full and in proxy mode; without an HTTP server it gets no boot file.
- ``write_tree`` places Debian's signed chain (shimx64.efi, mmx64.efi, grubx64.efi and the
  signed GRUB's grub.cfg, golden file); ``shim=True`` on a host without it names the package.
- ``pxe export --efi-loader shim --http-base URL`` for dnsmasq, ISC dhcpd and Kea: golden
  files, accepted by the daemons' own syntax checks (tests/test_pxe_export.py's ``_check``).
"""

from __future__ import annotations

import shutil
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from sidusctl.core.errors import PrerequisiteError
from sidusctl.netboot import secureboot
from sidusctl.netboot.inventory import parse
from sidusctl.serve import dhcp_codec as dc
from sidusctl.serve.dhcp import DhcpServer
from sidusctl.serve.dhcp_config import BootPolicy, DhcpConfig, Reservation
from tests.conftest import sidusctl
from tests.golden import assert_golden
from tests.test_dhcp_codec import NET, SERVER, one, raw_request
from tests.test_pxe_export import DAEMON, INVENTORY, _check

URL = "http://10.0.0.1/shimx64.efi"
POLICY = BootPolicy(bios="pxelinux.0", efi_x64="shimx64.efi", http_x64=URL)
# what OVMF's HttpBootDxe sends: option 60 HTTPClient:Arch:00016:UNDI:003001, option 93 = 16
HTTP_DISCOVER_OPTS = (
    b"\x35\x01\x01"                                               # 53 DISCOVER
    + b"\x37\x04\x01\x03\x3c\x43"                                 # 55 parameter list
    + b"\x5d\x02\x00\x10"                                         # 93 arch 16 x64 HTTP
    + b"\x5e\x03\x01\x03\x00"                                     # 94 UNDI 3.0
    + b"\x3c\x21" + b"HTTPClient:Arch:00016:UNDI:003000"          # 60 vendor class
    + b"\xff")
PXE_EFI_DISCOVER_OPTS = (
    b"\x35\x01\x01" + b"\x5d\x02\x00\x07"
    + b"\x3c\x20" + b"PXEClient:Arch:00007:UNDI:003000" + b"\xff")


def make_server(tmp_path: Path, boot: BootPolicy, proxy: bool = False) -> DhcpServer:
    cfg = DhcpConfig(interface="sdt-unbound", lease_file=tmp_path / "leases.sqlite",
                     reservations=(Reservation("52:54:00:ec:33:81", IPv4Address("10.0.0.130"),
                                               "node1"),),
                     boot=boot, lease_time=600, proxy=proxy)
    return DhcpServer(cfg, server_ip=SERVER, subnet=NET)


def test_policy_http_boot_file_by_vendor_class_and_arch() -> None:
    assert POLICY.boot_file(16, False, http=True) == (URL, "HTTPClient arch 16 x64 UEFI HTTP")
    assert POLICY.boot_file(7, False) == ("shimx64.efi", "arch 7 x86-64 UEFI")
    name, why = BootPolicy(http_x64=None).boot_file(16, False, http=True)
    assert name is None and "HTTP server off" in why
    name, why = POLICY.boot_file(19, False, http=True)  # arm64 HTTP: nothing configured
    assert name is None and "arch 19" in why


def test_full_mode_http_client_gets_httpclient_and_url(tmp_path: Path) -> None:
    srv = make_server(tmp_path, boot=POLICY)
    try:
        out, _ = one(srv.handle(raw_request(HTTP_DISCOVER_OPTS), ("0.0.0.0", 68), 67))
        assert out.msg_type == dc.OFFER and out.yiaddr == IPv4Address("10.0.0.130")
        assert out.options[dc.OPT_VENDOR_CLASS] == b"HTTPClient"
        assert out.file == URL.encode() and out.options[dc.OPT_BOOTFILE] == URL.encode()
        assert dc.OPT_TFTP_SERVER not in out.options
        req = HTTP_DISCOVER_OPTS.replace(b"\x35\x01\x01", b"\x35\x01\x03") \
            .replace(b"\xff", b"\x32\x04" + bytes([10, 0, 0, 130])
                     + b"\x36\x04" + SERVER.packed + b"\xff")
        ack, _ = one(srv.handle(raw_request(req), ("0.0.0.0", 68), 67))
        assert ack.msg_type == dc.ACK and ack.options[dc.OPT_VENDOR_CLASS] == b"HTTPClient"
        assert ack.file == URL.encode()
        # a PXE client of the same machine still gets the TFTP file, without HTTPClient
        pxe, _ = one(srv.handle(raw_request(PXE_EFI_DISCOVER_OPTS), ("0.0.0.0", 68), 67))
        assert pxe.file == b"shimx64.efi" and dc.OPT_VENDOR_CLASS not in pxe.options
        assert srv.stats.internal_errors == 0
    finally:
        srv.close()


def test_proxy_mode_answers_http_clients_without_address(tmp_path: Path) -> None:
    srv = make_server(tmp_path, boot=POLICY, proxy=True)
    try:
        out, dest = one(srv.handle(raw_request(HTTP_DISCOVER_OPTS), ("0.0.0.0", 68), 67))
        assert out.msg_type == dc.OFFER and out.yiaddr == IPv4Address(0)
        assert out.options[dc.OPT_VENDOR_CLASS] == b"HTTPClient"
        assert out.file == URL.encode() and dc.OPT_VENDOR not in out.options
        assert dest == ("255.255.255.255", 68)
        pxe, _ = one(srv.handle(raw_request(PXE_EFI_DISCOVER_OPTS), ("0.0.0.0", 68), 67))
        assert pxe.options[dc.OPT_VENDOR_CLASS] == b"PXEClient" and pxe.file == b"shimx64.efi"
    finally:
        srv.close()


def test_http_client_without_http_server_gets_no_boot_file(tmp_path: Path) -> None:
    srv = make_server(tmp_path, boot=BootPolicy(efi_x64="shimx64.efi"))
    try:
        out, _ = one(srv.handle(raw_request(HTTP_DISCOVER_OPTS), ("0.0.0.0", 68), 67))
        assert out.file == b"" and dc.OPT_BOOTFILE not in out.options
        assert dc.OPT_VENDOR_CLASS not in out.options  # not an HTTP Boot offer: ignored by it
    finally:
        srv.close()


def test_signed_grub_config_matches_golden_file() -> None:
    inv = parse(INVENTORY, "nodes.toml", known_images=["sidus", "minimal"])
    text = secureboot.signed_grub_config(inv)
    assert_golden(text, "pxe/grub-signed/grub.cfg")
    assert ('if [ "$net_default_mac" = "52:54:00:ab:cd:ef" ]; then configfile '
            "$prefix/grub.cfg-01-52-54-00-ab-cd-ef; fi") in text
    assert secureboot.tree_files(inv) == {"grub/x86_64-efi/grub.cfg": text,
                                         "grub/grub.cfg": text}


def test_missing_signed_package_is_named(tmp_path: Path) -> None:
    chain = (*secureboot.CHAIN[:2],
             secureboot.ChainFile("grubx64.efi", tmp_path / "absent.efi.signed",
                                  "grub-efi-amd64-signed"))
    with pytest.raises(PrerequisiteError) as e:
        secureboot.chain_files(required=True, chain=chain)
    assert "grub-efi-amd64-signed" in str(e.value) and "absent.efi.signed" in str(e.value)
    assert secureboot.chain_files(required=False, chain=chain) == {}


@pytest.mark.skipif(bool(secureboot.missing_packages()), reason="signed chain not installed")
def test_render_places_the_signed_chain(tmp_path: Path) -> None:
    from tests.test_pxe import _images

    inv = parse(INVENTORY, "nodes.toml", known_images=["sidus", "minimal"])
    from sidusctl.netboot.tree import write_tree
    report = write_tree(tmp_path / "tftp", inv, _images(tmp_path), shim=True)
    for f in ("shimx64.efi", "mmx64.efi", "grubx64.efi", "grub/grub.cfg",
              "grub/x86_64-efi/grub.cfg"):
        assert f in report.created, f
    assert (tmp_path / "tftp/shimx64.efi").read_bytes() == \
        Path("/usr/lib/shim/shimx64.efi.signed").read_bytes()
    assert (tmp_path / "tftp/grubx64.efi").read_bytes() == \
        Path("/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed").read_bytes()


@pytest.mark.skipif(bool(secureboot.missing_packages()), reason="signed chain not installed")
def test_render_places_another_signed_grub_and_knows_which_boots_over_http(
        tmp_path: Path) -> None:
    """``--signed-grub``: that file becomes grubx64.efi. Debian 12's GRUB 2.06 cannot find its
    configuration after an HTTP boot (it lacks the efi net config code), a GRUB that has it
    can: serve-pxe warns for the first under ``--http``."""
    from sidusctl.netboot.tree import write_tree
    from tests.test_pxe import _images

    host_grub = Path("/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed")
    assert not secureboot.grub_boots_over_http(host_grub)
    other = tmp_path / "grubnetx64.efi.signed"
    other.write_bytes(b"MZ sdt stand-in " + secureboot.HTTP_BOOT_MARK + b" end")
    assert secureboot.grub_boots_over_http(other)
    inv = parse(INVENTORY, "nodes.toml", known_images=["sidus", "minimal"])
    write_tree(tmp_path / "tftp", inv, _images(tmp_path), shim=True, signed_grub=other)
    assert (tmp_path / "tftp/grubx64.efi").read_bytes() == other.read_bytes()
    assert (tmp_path / "tftp/shimx64.efi").read_bytes() == \
        Path("/usr/lib/shim/shimx64.efi.signed").read_bytes()
    with pytest.raises(PrerequisiteError, match="--signed-grub"):
        secureboot.chain_files(required=True, chain=secureboot.chain(tmp_path / "absent"))


EXPORTS = {
    "dnsmasq-shim-http.conf": ("dnsmasq", ()),
    "dnsmasq-shim-http-proxy.conf": ("dnsmasq", ("--proxy", "--interface", "sdt-br0")),
    "dhcpd-shim-http.conf": ("isc-dhcp", ()),
    "kea-dhcp4-shim-http.conf": ("kea", ("--interface", "sdt-br0")),
}


@pytest.mark.parametrize("golden", sorted(EXPORTS))
def test_exports_carry_secure_boot_and_http_boot(golden: str, tmp_path: Path) -> None:
    fmt, extra = EXPORTS[golden]
    if shutil.which(DAEMON[fmt]) is None:
        pytest.skip(f"{DAEMON[fmt]} not installed")
    nodes = tmp_path / "nodes.toml"
    nodes.write_text(INVENTORY)
    out = tmp_path / golden
    sidusctl("pxe", "export", "--nodes", str(nodes), "--format", fmt, "--efi-loader", "shim",
             "--http-base", "http://10.13.20.13", "--out", str(out), *extra)
    text = out.read_text()
    assert_golden(text, f"export/{golden}")
    assert "shimx64.efi" in text and "http://10.13.20.13/shimx64.efi" in text
    assert "HTTPClient" in text
    res = _check(fmt, out)
    assert res.returncode == 0, res.stdout + res.stderr


def test_export_refuses_a_non_http_base(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes.toml"
    nodes.write_text(INVENTORY)
    res = sidusctl("pxe", "export", "--nodes", str(nodes), "--format", "dnsmasq",
                   "--http-base", "ftp://10.13.20.13", check=False)
    assert res.returncode == 2 and "http://SERVER[:PORT]" in res.stderr
