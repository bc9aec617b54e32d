"""nginx as the benches' reference HTTP server (bench/bootstorm.py, bench/http_serve.py): one
worker per core, ``sendfile on``, every temporary path and the pid file in the run's own
directory, started in a network namespace."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.netns_util import Daemon, nsexec

CONF = """daemon off;
master_process on;
worker_processes {workers};
user root;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {access_log};
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 60;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    types {{ }}
    default_type application/octet-stream;
    server {{
{server}
    }}
}}
"""


def start(ns: str, run: Path, server: str, access_log: str = "off") -> Daemon:
    """nginx in ``ns`` with ``server`` (the lines of its one ``server`` block: ``listen``,
    ``root``, locations) and ``access_log`` (``off`` or a path), its files in ``run``;
    returned once its pid file exists (nginx prints nothing when ready). Stop it with
    ``.stop()``."""
    conf = run / "nginx.conf"
    conf.write_text(CONF.format(workers=os.cpu_count() or 1, run=run, access_log=access_log,
                                server=server))
    d = Daemon(nsexec(ns, "nginx", "-p", str(run), "-c", str(conf)), run / "nginx.log")
    for _ in range(100):
        if (run / "nginx.pid").exists():
            break
        time.sleep(0.05)
    return d
