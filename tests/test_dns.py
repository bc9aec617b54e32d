"""DNS: the zone's A and PTR answers, NXDOMAIN, REFUSED without an upstream (dnslib client,
in-process); then the real resolver (``getent`` through glibc, with /etc/netns/<ns>/resolv.conf)
inside an sdt- namespace against ``sidusctl serve run``, forwarding to a dnsmasq upstream, and a
SIGHUP reload that adds a name. The fuzz asserts no internal error (a bug, counted apart from
undecodable input); an injected bug proves that counter is honest."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from dnslib import RCODE, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidusctl.serve.dns import DnsConfig, DnsServer, Zone
from tests.fuzz_util import mutations
from tests.netns_util import Daemon, netns, nsexec, sidusctl_serve, uniq, veth

ZONE = Zone("cluster.test", (("node1", IPv4Address("10.77.0.130")),
                             ("node2", IPv4Address("10.77.0.131"))))


def ask(srv: DnsServer, name: str, qtype: str = "A") -> DNSRecord:
    out, forward = srv.answer(DNSRecord.question(name, qtype).pack())
    assert out is not None and not forward
    return DNSRecord.parse(out)


def test_a_ptr_nxdomain_refused() -> None:
    srv = DnsServer(DnsConfig(zone=ZONE))
    r = ask(srv, "node1.cluster.test")
    assert r.header.aa == 1 and [str(a.rdata) for a in r.rr] == ["10.77.0.130"]
    assert [str(a.rdata) for a in ask(srv, "NODE2.Cluster.Test.").rr] == ["10.77.0.131"]
    r = ask(srv, "130.0.77.10.in-addr.arpa", "PTR")
    assert [str(a.rdata) for a in r.rr] == ["node1.cluster.test."]
    r = ask(srv, "nope.cluster.test")
    assert r.header.rcode == RCODE.NXDOMAIN
    r = ask(srv, "node1.cluster.test", "AAAA")  # exists, no IPv6: NODATA
    assert r.header.rcode == RCODE.NOERROR and not r.rr
    r = ask(srv, "www.example.org")
    assert r.header.rcode == RCODE.REFUSED
    assert srv.stats.refused == 1 and srv.stats.nxdomain == 1


def test_with_upstream_other_names_go_upstream() -> None:
    srv = DnsServer(DnsConfig(zone=ZONE, upstream=("127.0.0.1", 53)))
    assert srv.answer(DNSRecord.question("www.example.org").pack()) == (None, True)
    assert srv.answer(DNSRecord.question("1.2.0.192.in-addr.arpa", "PTR").pack()) == (None, True)


VALID = [DNSRecord.question(n, t).pack() for n, t in (
    ("node1.cluster.test", "A"), ("node2", "ANY"), ("130.0.77.10.in-addr.arpa", "PTR"),
    ("nope.cluster.test", "A"), ("cluster.test", "AAAA"), ("www.example.org", "A"))]


mutated = mutations(VALID)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.binary(max_size=200), mutated),
       st.sampled_from([None, ("127.0.0.1", 53)]))
def test_fuzz_never_raises(data: bytes, upstream: tuple[str, int] | None) -> None:
    srv = DnsServer(DnsConfig(zone=ZONE, upstream=upstream))
    out, _forward = srv.answer(data)
    assert srv.stats.internal_errors == 0, "answer() hit a bug (see the logged traceback)"
    if out is not None:
        DNSRecord.parse(out)  # what we send decodes


def test_an_injected_bug_is_counted_as_internal_not_malformed(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    srv = DnsServer(DnsConfig(zone=ZONE))

    def boom(*_a: object) -> tuple[bytes | None, bool]:
        raise RuntimeError("injected bug")
    monkeypatch.setattr(srv, "_answer", boom)
    with caplog.at_level(logging.ERROR, logger="sidusctl"):
        assert srv.answer(VALID[0]) == (None, False)
        assert srv.answer(b"\x00") == (None, False)
    assert srv.stats.internal_errors == 1 and srv.stats.malformed == 1
    bug = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(bug) == 1 and bug[0].exc_info is not None
    monkeypatch.undo()
    assert [str(a.rdata) for a in ask(srv, "node1.cluster.test").rr] == ["10.77.0.130"]
    assert srv.stats.internal_errors == 1


def test_bad_zone_is_refused() -> None:
    from sidusctl.core.errors import ConfigError
    with pytest.raises(ConfigError, match="given twice"):
        Zone("c.test", (("a", IPv4Address("10.0.0.1")), ("A", IPv4Address("10.0.0.2")))).validate()


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_getent_through_our_dns_in_a_namespace(tmp_path: Path) -> None:
    s_ns, c_ns = uniq("ns"), uniq("nc")
    res = tmp_path / "reservations"
    res.write_text("52:54:00:00:00:01 10.79.0.130 node1\n52:54:00:00:00:02 10.79.0.131 node2\n")
    with netns(s_ns), netns(c_ns, resolv="nameserver 10.79.0.1\nsearch cluster.test\n"
                                          "options timeout:1 attempts:1\n"):
        veth(s_ns, uniq("vx"), c_ns, uniq("vy"), a_addr="10.79.0.1/24", b_addr="10.79.0.2/24")
        upstream = Daemon(nsexec(s_ns, "dnsmasq", "--no-daemon", "--conf-file=/dev/null",
                                 "--listen-address=127.0.0.1", "--bind-interfaces",
                                 "--port=5353", "--no-resolv", "--no-hosts",
                                 "--address=/upstream.test/192.0.2.7",
                                 f"--pid-file={tmp_path / 'dnsmasq.pid'}"),
                          tmp_path / "dnsmasq.log", ready="started")
        d = sidusctl_serve(s_ns, tmp_path / "state", "--interface", uniq("vx"), "--reservations",
                           str(res), "--domain", "cluster.test", "--dns-upstream",
                           "127.0.0.1:5353", log=tmp_path / "serve.log")

        def getent(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(nsexec(c_ns, "getent", "hosts", *args), capture_output=True,
                                  text=True, timeout=20, check=False)
        try:
            assert getent("node1.cluster.test").stdout.split()[:2] == ["10.79.0.130",
                                                                      "node1.cluster.test"]
            assert getent("node2").stdout.split()[0] == "10.79.0.131"  # via the search domain
            assert getent("10.79.0.131").stdout.split()[:2] == ["10.79.0.131", "node2.cluster.test"]
            assert getent("ghost.cluster.test").returncode == 2
            assert getent("www.upstream.test").stdout.split()[0] == "192.0.2.7"  # forwarded
            # SIGHUP: a new reservation is a new name, without a restart
            res.write_text(res.read_text() + "52:54:00:00:00:03 10.79.0.132 node3\n")
            d.proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 10
            while "reloaded the configuration" not in d.text() and time.time() < deadline:
                time.sleep(0.1)
            assert getent("node3.cluster.test").stdout.split()[0] == "10.79.0.132"
            # a broken file on SIGHUP keeps the old configuration
            res.write_text("garbage\n")
            d.proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 10
            while "reload refused" not in d.text() and time.time() < deadline:
                time.sleep(0.1)
            assert getent("node3.cluster.test").stdout.split()[0] == "10.79.0.132"
        finally:
            rc = d.stop()
            upstream.stop()
        assert rc == 0  # SIGTERM: clean shutdown
        assert "stopping on signal" in d.text()
