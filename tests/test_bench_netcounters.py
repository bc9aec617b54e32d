"""bench/netcounters.py: the TCP counters bench/bootstorm.py records around each storm are
read per network namespace, and count what really happened there: segments sent, and SYNs
dropped by a full accept queue (caused for real: a listener that never accepts)."""

from __future__ import annotations

import subprocess
import sys

from bench import netcounters
from tests.netns_util import netns, nsexec, uniq

# in the namespace: a listener with a backlog of 1 that never accepts, four clients that
# connect to it (the queue fills: the kernel drops the later SYNs, ListenOverflows), then a
# connection that is accepted and carries 256 KiB
TRAFFIC = r"""
import socket
full = socket.create_server(("127.0.0.1", 0), backlog=1)
for _ in range(4):
    c = socket.socket()
    c.setblocking(False)
    c.connect_ex(full.getsockname())
srv = socket.create_server(("127.0.0.1", 0))
cli = socket.create_connection(srv.getsockname())
conn, _ = srv.accept()
cli.sendall(b"x" * (256 << 10))
cli.close()
got = 0
while data := conn.recv(1 << 16):
    got += len(data)
assert got == 256 << 10, got
import time; time.sleep(0.5)  # the dropped SYNs are counted as they arrive
"""


def test_tables_pair_header_and_value_lines() -> None:
    text = ("Tcp: RtoAlgorithm RetransSegs InSegs\nTcp: 1 7 42\n"
            "TcpExt: ListenOverflows TCPTimeouts\nTcpExt: 3 0\n")
    assert netcounters._tables(text) == {"Tcp.RtoAlgorithm": 1, "Tcp.RetransSegs": 7,
                                         "Tcp.InSegs": 42, "TcpExt.ListenOverflows": 3,
                                         "TcpExt.TCPTimeouts": 0}


def test_counters_are_per_namespace_and_count_real_traffic() -> None:
    with netns(uniq("nca")) as busy, netns(uniq("ncb")) as quiet:
        stop = netcounters.start(busy, quiet)
        subprocess.run(nsexec(busy, sys.executable, "-c", TRAFFIC), check=True, timeout=60)
        got = stop()
    # every counter the bench names is there, on each side, and none went down
    want = {n for _, n in netcounters.TCP}
    assert set(got["server"]) == want and set(got["nodes"]) == want
    assert set(got["machine"]) == set(netcounters.ARP) | set(netcounters.SOFTNET)
    assert all(v >= 0 for side in got.values() for v in side.values()), got
    busy_c, quiet_c = got["server"], got["nodes"]
    assert busy_c["OutSegs"] >= 10 and busy_c["InSegs"] >= 10, busy_c
    assert busy_c["ListenOverflows"] >= 1 and busy_c["ListenDrops"] >= 1, busy_c
    # the namespace where nothing happened counted nothing
    assert all(v == 0 for v in quiet_c.values()), quiet_c
