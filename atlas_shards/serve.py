"""``atlas-shards serve``: shards over HTTP on this machine, for a local run or a demo.

Uses Debian's nginx with the project's ``atlas_shards/nginx.conf`` (the config the
docker-compose shard server runs), rewritten for a local port, root and temp
dir; without nginx, Python's ``http.server`` (and says so).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import shutil
import socket
import sys
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CONF = Path(__file__).resolve().parent / "nginx.conf"  # package data: there in any install


class ServeError(Exception):
    """The server could not start."""


def find_nginx() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def local_nginx_config(template: str, root: Path, host: str, port: int, tmp: Path) -> str:
    """The compose config, made to run unprivileged-style on one local port."""
    text = template.replace("listen 80;", f"listen {host}:{port};")
    text = text.replace("root /srv/shards;", f"root {root};")
    text = re.sub(r"/tmp/nginx", f"{tmp}/nginx", text)
    text = text.replace("access_log /dev/stdout shards;", "access_log off;")  # a local server stays quiet
    head = "daemon off;\n" + ("user root;\n" if os.geteuid() == 0 else "")  # root: workers must read private dirs
    return head + text


def _wait(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise ServeError(f"nginx exited: {proc.stderr.read().decode(errors='replace').strip()}") from None
            if time.monotonic() > deadline:
                raise ServeError(f"{url}: no answer after {timeout} s") from None
            time.sleep(0.05)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port(host: str, port: int) -> None:
    """Refuse, naming it, a port another program listens on (before a server's own, longer, complaint)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServeError(f"port {port} on {host} is in use ({exc.strerror}); choose another --port (0: any free)")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    """http.server without a traceback each time a client closes its connection early (a reader that stopped)."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return
        super().handle_error(request, client_address)


@contextlib.contextmanager
def serving(
    directory: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, server: str = "auto"
) -> Iterator[tuple[str, str]]:
    """Serve ``directory``; yield ``(base_url, description)`` while it runs."""
    root = Path(directory).resolve()
    if not root.is_dir():
        raise ServeError(f"{root}: no such directory")
    port = port or free_port(host)
    _check_port(host, port)
    nginx = find_nginx() if server in ("auto", "nginx") else None
    if server == "nginx" and (nginx is None or not CONF.is_file()):
        raise ServeError("nginx (or atlas_shards/nginx.conf) not found; install Debian's nginx or use --server python")
    if nginx and CONF.is_file():
        with tempfile.TemporaryDirectory(prefix="atlas-nginx-") as tmp:
            conf = Path(tmp) / "nginx.conf"
            conf.write_text(local_nginx_config(CONF.read_text(), root, host, port, Path(tmp)))
            proc = subprocess.Popen([nginx, "-c", str(conf), "-p", tmp], stderr=subprocess.PIPE)
            try:
                _wait(f"http://{host}:{port}/healthz", 15, proc)
                yield f"http://{host}:{port}", f"nginx ({CONF.relative_to(CONF.parents[1])})"
            finally:
                proc.terminate()
                proc.wait(10)
        return
    handler = functools.partial(_Quiet, directory=str(root))
    httpd = _QuietServer((host, port), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield (
            f"http://{host}:{port}",
            "Python's http.server (nginx not installed)" if server == "auto" else "Python's http.server",
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
