"""``sidusctl pxe export``: golden files for every format (dnsmasq, isc-dhcp, kea, tftpd-hpa,
exports), each output accepted by the daemon's own syntax check (``dnsmasq --test``,
``dhcpd -t -cf``, ``kea-dhcp4 -t``; run in a fresh network namespace with ``unshare -n`` so
that nothing could ever bind on this host), a broken copy rejected by the same check, and
bad options refused with one message.

``SIDUSCTL_UPDATE_GOLDEN=1`` rewrites the golden files (review the diff before committing);
without it a missing golden file fails (tests/golden.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import sidusctl
from tests.golden import assert_golden

INVENTORY = """\
[network]
subnet = "10.13.20.0/24"
server = "10.13.20.13"
nfs_root = "/srv/nfsroot/{image}"
domain = "cluster.lan"

[defaults]
image = "sidus"

[[nodes]]
name = "node1"
mac = "52:54:00:12:34:56"
ip = "10.13.20.130"

[[nodes]]
name = "node2"
mac = "52-54-00-AB-CD-EF"
ip = "10.13.20.131"
hostname = "compute2"

[[nodes]]
name = "ws1"
mac = "52:54:00:00:00:07"
ip = "10.13.20.140"
image = "minimal"
"""

CASES = {
    # golden name: (format, extra options)
    "dnsmasq.conf": ("dnsmasq", ()),
    "dnsmasq-proxy.conf": ("dnsmasq", ("--proxy", "--interface", "sdt-br0")),
    "dhcpd.conf": ("isc-dhcp", ()),
    "kea-dhcp4.conf": ("kea", ("--interface", "sdt-br0", "--ipxe-script",
                               "http://10.13.20.13/boot.ipxe")),
    "tftpd-hpa": ("tftpd-hpa", ("--tftp-root", "/srv/tftp/sidus")),
    "exports": ("exports", ()),
}

# The daemons' own syntax checks; none binds a socket, and unshare -n makes sure of it: they
# run in a private network namespace (gone when they exit) holding only the bridge
# sdt-br0 the configurations name (Kea checks that its interfaces exist).
CHECKS = {
    "dnsmasq": lambda f: ["dnsmasq", "--test", f"--conf-file={f}"],
    "isc-dhcp": lambda f: ["dhcpd", "-t", "-cf", str(f)],
    "kea": lambda f: ["kea-dhcp4", "-t", str(f)],
}


def _check(fmt: str, f: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["unshare", "-n", "sh", "-c",
                           'ip link add sdt-br0 type bridge && exec "$@"', "sh",
                           *CHECKS[fmt](f)], capture_output=True, text=True, timeout=60)
DAEMON = {"dnsmasq": "dnsmasq", "isc-dhcp": "dhcpd", "kea": "kea-dhcp4"}


@pytest.fixture
def nodes(tmp_path: Path) -> Path:
    p = tmp_path / "nodes.toml"
    p.write_text(INVENTORY)
    return p


def _export(nodes: Path, fmt: str, *extra: str, out: Path | None = None,
            state: Path | None = None) -> subprocess.CompletedProcess[str]:
    args = ["pxe", "export", "--nodes", str(nodes), "--format", fmt, *extra]
    if out is not None:
        args += ["--out", str(out)]
    return sidusctl(*args, state=state or nodes.parent / "state", timeout=60)


@pytest.mark.parametrize("golden", sorted(CASES))
def test_golden(nodes: Path, golden: str) -> None:
    fmt, extra = CASES[golden]
    out = nodes.parent / golden
    r = _export(nodes, fmt, *extra, out=out)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert_golden(text, f"export/{golden}")
    # stdout (no --out) is the same text
    r2 = _export(nodes, fmt, *extra)
    assert r2.returncode == 0 and r2.stdout == text


@pytest.mark.parametrize("golden", [g for g, (f, _) in CASES.items() if f in CHECKS])
def test_daemon_syntax_check(nodes: Path, golden: str) -> None:
    fmt, extra = CASES[golden]
    if shutil.which(DAEMON[fmt]) is None:
        pytest.fail(f"{DAEMON[fmt]} is not installed (scripts/setup-host installs it)")
    out = nodes.parent / golden
    assert _export(nodes, fmt, *extra, out=out).returncode == 0
    r = _check(fmt, out)
    assert r.returncode == 0, f"{DAEMON[fmt]} rejected {golden}:\n{r.stdout}{r.stderr}"
    # the check is not a rubber stamp: a damaged copy fails it
    bad = nodes.parent / f"bad-{golden}"
    text = out.read_text()
    if fmt == "dnsmasq":
        bad.write_text(text.replace("dhcp-host=", "dhcp-hots=", 1))
    elif fmt == "isc-dhcp":
        bad.write_text(text.replace("fixed-address 10.13.20.130;", "fixed-address 10.13.20.130", 1))
    else:
        bad.write_text(text.replace('"hw-address"', '"hw-adress"', 1))
    r = _check(fmt, bad)
    assert r.returncode != 0, f"{DAEMON[fmt]} accepted a damaged {golden}"


def test_tftpd_hpa_defaults_file_is_shell(nodes: Path) -> None:
    """/etc/default/tftpd-hpa is sourced by the init script: it must be valid sh that sets
    the four variables."""
    out = nodes.parent / "tftpd-hpa"
    assert _export(nodes, "tftpd-hpa", out=out).returncode == 0
    r = subprocess.run(["sh", "-c", f'. "{out}" && printf "%s|%s|%s|%s" "$TFTP_USERNAME" '
                        '"$TFTP_DIRECTORY" "$TFTP_ADDRESS" "$TFTP_OPTIONS"'],
                       capture_output=True, text=True, check=True)
    assert r.stdout == "tftp|/srv/tftp|10.13.20.13:69|--secure --blocksize 1468"


def test_exports_from_the_image_store(tmp_path: Path) -> None:
    """Without nfs_root the exported path is the image store's rootfs; an image that is not
    built is named in the error."""
    from tests.test_pxe import _fake_store_image

    state = tmp_path / "state"
    rootfs = _fake_store_image(state, "minimal")
    nodes = tmp_path / "nodes.toml"
    nodes.write_text(INVENTORY.replace('nfs_root = "/srv/nfsroot/{image}"\n', "")
                     .replace('image = "sidus"', 'image = "minimal"'))
    r = _export(nodes, "exports", state=state)
    assert r.returncode == 0, r.stderr
    assert f"{rootfs} 10.13.20.0/24(ro,no_subtree_check,async,no_root_squash)" in r.stdout
    nodes.write_text(INVENTORY.replace('nfs_root = "/srv/nfsroot/{image}"\n', ""))
    r = _export(nodes, "exports", state=state)
    assert r.returncode == 2
    assert "no exported path known for image(s) sidus" in r.stderr


def test_bad_input(nodes: Path, tmp_path: Path) -> None:
    r = _export(nodes, "kea", "--proxy")
    assert r.returncode == 2 and "proxyDHCP export is not offered for kea" in r.stderr
    r = _export(nodes, "dnsmasq", "--boot-bios", "pxe linux.0")
    assert r.returncode == 2 and "--boot-bios" in r.stderr
    r = _export(nodes, "dnsmasq", "--tftp-root", "srv/tftp")
    assert r.returncode == 2 and "not absolute" in r.stderr
    r = _export(nodes, "nosuch")
    assert r.returncode == 2 and "nosuch" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(INVENTORY.replace('mac = "52:54:00:00:00:07"', 'mac = "52:54:00:00:07"'))
    out = tmp_path / "never.conf"
    r = _export(bad, "dnsmasq", out=out)
    assert r.returncode == 2
    assert "bad.toml:23: key 'nodes.ws1.mac'" in r.stderr and "52:54:00:00:07" in r.stderr
    assert not out.exists()
