"""sidusctl.subsys.fanout: node sets, clush -b folding, and a host that cannot be reached is a
result, not an exception or a hang (real ssh against a closed loopback port)."""

from __future__ import annotations

import pytest

from sidusctl.core.errors import ConfigError
from sidusctl.subsys import fanout
from sidusctl.subsys.fanout import Fanout, Host, HostResult, expand, fold, fold_names


def test_expand_and_fold_names() -> None:
    assert expand("pn[1-3],fe") == ["fe", "pn1", "pn2", "pn3"]
    assert expand(["n[1-2]", "n2", "n10"]) == ["n1", "n2", "n10"]
    assert fold_names(["n1", "n2", "n3", "x"]) == "n[1-3],x"
    with pytest.raises(ConfigError, match="invalid node set"):
        expand("pn[1-", file="p.toml", key="pnodes.hosts")


def test_fold_gathers_identical_outputs() -> None:
    got = fold({"n1": "a\n", "n2": "b\n", "n3": "a\n", "n4": "a\n"})
    assert got == [("n[1,3-4]", "a\n"), ("n2", "b\n")]


def test_problem_lines() -> None:
    assert HostResult("h", 0).problem() is None
    assert HostResult("h", None, timed_out=True).problem() == "timed out (no answer)"
    assert HostResult("h", 3, stderr="x\nboom\n").problem() == "exit 3: x / boom"
    r = HostResult("h", 255, stderr="ssh: connect to host h port 22: Connection refused",
                   reachable=False)
    assert r.problem() == "unreachable: ssh: connect to host h port 22: Connection refused"


def test_unreachable_host_is_reported_fast(tmp_path) -> None:  # type: ignore[no-untyped-def]
    hosts = [Host("dead1", "127.0.0.1", port=1), Host("dead2", "127.0.0.1", port=2)]
    with Fanout(hosts, connect_timeout=2, known_hosts=tmp_path / "kh") as fo:
        cfg = fo.ssh_config.read_text()
        assert "Host dead1\n  HostName 127.0.0.1\n  Port 1\n  User root" in cfg
        res = fo.run(["true"])
        with pytest.raises(ConfigError, match="unknown host"):
            fo.run(["true"], ["nope"])
    assert not fo.ssh_config.exists()
    assert list(res) == ["dead1", "dead2"]
    assert all(not r.reachable and r.rc == 255 for r in res.values()), res
    assert all(r.elapsed is not None and r.elapsed >= 0 for r in res.values()), res
    assert "Connection refused" in (res["dead1"].problem() or "")


def test_a_node_set_too_large_to_expand_is_refused_before_it_is_expanded() -> None:
    # 10**8 names would take ClusterShell minutes and gigabytes to expand
    with pytest.raises(ConfigError, match=r"names up to 100000000 hosts \(expected at most "):
        expand("x[1-100000000]")
    with pytest.raises(ConfigError, match="names up to 100001 hosts"):
        expand(["a", "x[1-100000]"])
    assert len(expand("x[1-100]y[1-1000]")) == fanout.MAX_NODES
    assert fanout._size_bound("n[1-5]!n3,x[1-10/2],fe") == 12
