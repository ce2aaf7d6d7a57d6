"""Serve a directory over HTTP on localhost for tests: Debian's nginx when installed, else Python's."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

NGINX_CONF = """\
{user}
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    types {{ application/x-tar tar; application/json json; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        autoindex off;
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # the server answers (404 for a missing index is fine)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def serve(directory: str | os.PathLike, prefer: str = "nginx") -> Iterator[tuple[str, str]]:
    """Yield ``(base_url, server_name)`` for ``directory`` served on 127.0.0.1."""
    port, root = free_port(), Path(directory).resolve()
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if prefer == "nginx" and nginx:
        with tempfile.TemporaryDirectory() as tmp:
            user = "user root;" if os.geteuid() == 0 else ""  # workers must read the pytest tmp dirs
            conf = Path(tmp) / "nginx.conf"
            conf.write_text(NGINX_CONF.format(user=user, tmp=tmp, port=port, root=root))
            proc = subprocess.Popen([nginx, "-c", str(conf), "-p", tmp], stderr=subprocess.PIPE)
            try:
                _wait(f"http://127.0.0.1:{port}/")
                yield f"http://127.0.0.1:{port}", "nginx"
            finally:
                proc.terminate()
                proc.wait(10)
        return
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", "python http.server"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass
