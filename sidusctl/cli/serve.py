"""``sidusctl serve``: the built-in DHCP (full or proxy), TFTP and DNS servers as a dev-level
command (``serve run``), and the lease table (``serve leases``). ``serve-pxe`` builds the same
configuration from the node inventory.
"""

from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import click
from rich.table import Table

from sidusctl.cli.common import (
    console,
    emit_json,
    get_ctx,
    lease_cache_option,
    lease_time_option,
    parse_dns_upstream,
)
from sidusctl.core.config import Checker, read_text
from sidusctl.core.mac import normalize_mac
from sidusctl.serve import supervisor
from sidusctl.serve.dhcp_config import BootPolicy, DhcpConfig, Reservation
from sidusctl.serve.dns import DnsConfig, Zone
from sidusctl.serve.leases import read_leases
from sidusctl.serve.tftp import TftpConfig


def parse_reservations(path: Path) -> tuple[Reservation, ...]:
    """Read a reservations file: one ``MAC IP [HOSTNAME [BOOTFILE]]`` per line, ``#`` comments.
    :class:`ConfigErrors` listing every bad line (file, line, what was found and expected),
    duplicate MACs and addresses included."""
    text = read_text(path, "reservations file")
    c = Checker(str(path))
    out: list[Reservation] = []
    seen_mac: dict[str, int] = {}
    seen_ip: dict[IPv4Address, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue

        def bad(problem: str, expected: str | None = None, n: int = n) -> None:
            c.error(None, problem, expected, line=n)

        if not 2 <= len(fields) <= 4:
            bad(f"found {len(fields)} fields", "MAC IP [HOSTNAME [BOOTFILE]]")
            continue
        mac = ip = None
        try:
            mac = normalize_mac(fields[0])
        except ValueError:
            bad(f"found {fields[0]!r}", "a MAC address such as 52:54:00:12:34:56")
        try:
            ip = IPv4Address(fields[1])
        except ValueError:
            bad(f"found {fields[1]!r}", "an IPv4 address such as 10.13.20.130")
        host = fields[2] if len(fields) > 2 else None
        if host is not None and not all(ch.isalnum() or ch == "-" for ch in host):
            bad(f"found host name {host!r}", "letters, digits and '-' (no domain)")
            host = None
        if mac is not None and mac in seen_mac:
            bad(f"duplicate MAC {mac} (also line {seen_mac[mac]})", "one line per MAC")
        if ip is not None and ip in seen_ip:
            bad(f"duplicate address {ip} (also line {seen_ip[ip]})", "one line per address")
        if mac is None or ip is None:
            continue
        seen_mac.setdefault(mac, n)
        seen_ip.setdefault(ip, n)
        out.append(Reservation(mac, ip, host, fields[3] if len(fields) > 3 else None))
    c.done()
    return tuple(out)


def _ip(value: str | None, what: str) -> IPv4Address | None:
    if value is None:
        return None
    try:
        return IPv4Address(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an IPv4 address", param_hint=what) from None


def _pool(value: str | None) -> tuple[IPv4Address, IPv4Address] | None:
    if value is None:
        return None
    try:
        lo, hi = value.split("-", 1)
        return IPv4Address(lo.strip()), IPv4Address(hi.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}", param_hint="--pool (expected FIRST-LAST)") from None


@click.group("serve")
def serve_group() -> None:
    """Built-in netboot servers: DHCP (full or proxyDHCP), TFTP, DNS."""


@serve_group.command("run")
@click.option("--interface", "-i", required=True,
              help="The one interface to serve (sockets bound to it with SO_BINDTODEVICE).")
@click.option("--proxy", is_flag=True, help="proxyDHCP: answer PXE clients only, no addresses "
              "(ports 67 and 4011), next to the site's DHCP server.")
@click.option("--reservations", type=click.Path(dir_okay=False, path_type=Path),
              help="File of 'MAC IP [HOSTNAME [BOOTFILE]]' lines.")
@click.option("--pool", help="Dynamic pool FIRST-LAST for MACs without a reservation.")
@click.option("--unknown", type=click.Choice(["pool", "ignore"]), default=None,
              help="Unknown MACs: lease from the pool or ignore (default: pool if --pool).")
@click.option("--server-ip", help="Server address (default: the interface's IPv4 address).")
@click.option("--subnet", help="Subnet CIDR (default: the interface's).")
@click.option("--router", help="Option 3.")
@click.option("--dns-server", multiple=True, help="Option 6 (default: this server when "
              "--domain is given).")
@click.option("--domain", help="Cluster domain: option 15 and the DNS zone of the "
              "reservations' host names (enables the DNS server).")
@click.option("--dns-upstream", default=None, callback=parse_dns_upstream,
              metavar="IP[:PORT]", help="IP[:PORT] other DNS names are forwarded "
              "to (default: refused).")
@click.option("--no-dns", is_flag=True, help="Do not run the DNS server even with --domain.")
@lease_time_option
@click.option("--next-server", help="siaddr: the TFTP server (default: this server).")
@click.option("--boot-bios", default="pxelinux.0", show_default=True,
              help="Boot file for option 93 = 0 (BIOS).")
@click.option("--boot-efi64", default="grubnetx64.efi", show_default=True,
              help="Boot file for option 93 = 7/9 (x86-64 UEFI).")
@click.option("--ipxe-script", default=None, help="What iPXE (user class 'iPXE') gets: a "
              "script URL or TFTP path.")
@click.option("--tftp-root", type=click.Path(file_okay=False, path_type=Path),
              help="Serve this directory read-only over TFTP.")
@click.option("--no-dhcp", is_flag=True, help="Run TFTP/DNS only.")
@click.option("--lease-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Lease database (default: <state>/serve/leases.sqlite).")
@lease_cache_option
@click.option("--durable", is_flag=True, help="fsync every lease (survives power loss, "
              "not only kill -9).")
def run_cmd(interface: str, proxy: bool, reservations: Path | None, pool: str | None,
            unknown: str | None, server_ip: str | None, subnet: str | None,
            router: str | None, dns_server: tuple[str, ...], domain: str | None,
            dns_upstream: tuple[str, int] | None, no_dns: bool, lease_time: int,
            next_server: str | None, boot_bios: str, boot_efi64: str,
            ipxe_script: str | None, tftp_root: Path | None, no_dhcp: bool,
            lease_file: Path | None, lease_cache_threshold: float,
            durable: bool) -> None:
    """Run the servers on INTERFACE until SIGTERM; SIGHUP re-reads the reservations."""
    state = get_ctx().state / "serve"
    leases = lease_file or state / "leases.sqlite"
    sip = _ip(server_ip, "--server-ip")
    net: IPv4Network | None = None
    if subnet:
        try:
            net = IPv4Network(subnet, strict=False)
        except ValueError:
            raise click.BadParameter(subnet, param_hint="--subnet") from None
    pool_range = _pool(pool)

    def load() -> supervisor.ServeConfig:
        res = parse_reservations(reservations) if reservations else ()
        dhcp = None
        if not no_dhcp:
            from sidusctl.serve.dhcp_config import interface_ipv4
            ip, inet = (sip, net) if sip and net else interface_ipv4(interface)
            dns_ips = tuple(IPv4Address(str(_ip(d, "--dns-server"))) for d in dns_server)
            if not dns_ips and domain and not no_dns:
                dns_ips = (sip or ip,)
            dhcp = DhcpConfig(
                interface=interface, lease_file=leases, reservations=res,
                boot=BootPolicy(bios=boot_bios, efi_x64=boot_efi64, ipxe_script=ipxe_script),
                server_ip=sip or ip, subnet=net or inet, router=_ip(router, "--router"),
                dns_servers=dns_ips, domain=domain, lease_time=lease_time, pool=pool_range,
                unknown=unknown or ("pool" if pool_range else "ignore"),  # type: ignore[arg-type]
                next_server=_ip(next_server, "--next-server"), proxy=proxy, durable=durable,
                cache_threshold=lease_cache_threshold)
            dhcp.validate(str(reservations or "command line"))
        tftp = TftpConfig(root=tftp_root, interface=interface) if tftp_root else None
        dns = None
        if domain and not no_dns:
            zone = Zone(domain, tuple((r.hostname, r.ip) for r in res if r.hostname))
            zone.validate(str(reservations or "command line"))
            dns = DnsConfig(zone=zone, interface=interface, upstream=dns_upstream)
        return supervisor.ServeConfig(dhcp=dhcp, tftp=tftp, dns=dns,
                                      status_file=state / "status.json")

    supervisor.run(load)


@serve_group.command("leases")
@click.option("--lease-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Lease database (default: <state>/serve/leases.sqlite).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def leases_cmd(lease_file: Path | None, as_json: bool) -> None:
    """List the DHCP leases (readable while the server runs)."""
    path = lease_file or get_ctx().state / "serve" / "leases.sqlite"
    rows = read_leases(path)
    now = time.time()
    if as_json:
        emit_json([{**r.as_dict(), "active": r.active(now)} for r in rows])
        return
    t = Table("address", "MAC", "host name", "state", "expires")
    for r in rows:
        left = r.expires - now
        t.add_row(str(r.ip), r.mac or "-", r.hostname or "-", r.state,
                  f"in {int(left)} s" if left > 0 else "expired")
    console.print(t)


@serve_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status_cmd(as_json: bool) -> None:
    """Counters of the running (or last) server and what each client did last."""
    _, st = supervisor.read_status(get_ctx().state, "serve run")
    if as_json:
        emit_json(st)
        return
    age = time.time() - float(st.get("updated", 0))
    console.print(f"pid {st.get('pid')}, status written {age:.0f} s ago", highlight=False)
    for name in ("dhcp", "tftp", "dns"):
        counters = st.get(name)
        if counters:
            console.print(f"{name.upper()}: " + ", ".join(
                f"{k} {v}" for k, v in counters.items() if v), highlight=False)
    t = Table("client", "last events")
    for who, ev in sorted(st.get("clients", {}).items()):
        t.add_row(who, ", ".join(f"{k} {v}" for k, v in ev.items() if k != "at"))
    console.print(t)


def register(cli: click.Group) -> None:
    """Add the ``serve`` group (``run``, ``leases``, ``status``) to ``cli`` (called by
    :class:`sidusctl.cli.main.LazyGroup` on first use)."""
    cli.add_command(serve_group)
