"""Remote I/O has deadlines: a server that accepts connections and never answers, or refuses them, ends every
command that reads remote data with one line naming the location, within the configured timeout."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from click.testing import CliRunner

from shards import remote


@pytest.fixture(scope="module")
def silent():
    """A port on 127.0.0.1 whose server accepts every connection and never sends a byte."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture(scope="module")
def refused():
    """A port on 127.0.0.1 where nothing listens."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def _commands(port: int, run_dir, tmp_path) -> dict:
    from atlas_shards.cli import main as shards_cli
    from evaluate.cli import main as evaluate_cli
    from trainer.cli import main as train_cli

    url = f"http://127.0.0.1:{port}"
    return {
        "inspect": (shards_cli, ["inspect", f"{url}/train/"]),
        "verify": (shards_cli, ["verify", f"{url}/train/"]),
        "build": (shards_cli, ["build", f"{url}/store.zarr", str(tmp_path / "out"), "--split", "train"]),
        "fit": (train_cli, ["fit", "--shards", f"{url}/train/", "--out", str(tmp_path / "run"), "--workers", "0"]),
        "stream": (
            evaluate_cli,
            ["stream", "--model", str(run_dir), "--shards", f"{url}/val/", "--out", str(tmp_path / "s")],
        ),
        "run": (
            evaluate_cli,
            ["run", "--model", str(run_dir), "--store", f"{url}/store.zarr", "--out", str(tmp_path / "r")],
        ),
    }


@pytest.mark.parametrize("server", ["silent", "refused"])
def test_every_remote_reader_ends_in_one_line_within_the_timeout(trained, tmp_path, monkeypatch, request, server):
    port = request.getfixturevalue(server)
    monkeypatch.setenv(remote.TIMEOUT_ENV, "1")
    for name, (cli, argv) in _commands(port, trained[1], tmp_path).items():
        start = time.monotonic()
        done = CliRunner().invoke(cli, argv)
        took = time.monotonic() - start
        # connect and read timeouts of 1 s, a few tries with a short backoff: well under the 30 s default
        assert took < 15, (name, took)
        assert done.exit_code == 1, (name, done.output)
        assert done.output.count("\n") == 1 and f"127.0.0.1:{port}" in done.output, (name, done.output)
        assert "Traceback" not in done.output, name
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output directory left by any of them


def test_a_bad_timeout_setting_is_named(monkeypatch):
    monkeypatch.setenv(remote.TIMEOUT_ENV, "soon")
    with pytest.raises(remote.RemoteError, match="ATLAS_TIMEOUT is 'soon'"):
        remote.open_read("http://127.0.0.1:9/x", retries=1)
