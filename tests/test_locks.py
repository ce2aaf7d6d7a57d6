"""One owner per output directory: a second writer is refused by name, a dead one's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import tiny_shards
from shards.common.lock import LOCK, OutputBusy, owned

HOLD = """
import sys, time
from shards.common.lock import owned
with owned(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(directory, what: str) -> subprocess.Popen:
    """Another process that holds ``directory`` as ``what`` until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), what], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _listing(directory) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_second_owner_is_refused_and_the_lock_goes_with_its_owner(tmp_path):
    with owned(tmp_path / "out", "atlas-shards build"):
        assert (tmp_path / "out" / LOCK).is_file()
        with pytest.raises(OutputBusy, match=f"^{tmp_path / 'out'}: in use by atlas-shards build \\(pid {os.getpid()}"):
            with owned(tmp_path / "out", "atlas-train fit"):
                pass
    assert not (tmp_path / "out").exists()  # made by the block and left empty: removed with the lock
    (tmp_path / "kept").mkdir()
    with owned(tmp_path / "kept", "a"):
        (tmp_path / "kept" / "result").write_text("x")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["result"]


def test_a_killed_owners_stale_lock_is_taken_over(tmp_path):
    proc = _holder(tmp_path, "atlas-train fit")
    with pytest.raises(OutputBusy, match=f"in use by atlas-train fit \\(pid {proc.pid} "):
        with owned(tmp_path, "atlas-train fit"):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / LOCK).exists()  # left behind by the killed owner...
    with owned(tmp_path, "atlas-train fit"):  # ...and free: the kernel dropped its lock with the process
        pass
    assert not (tmp_path / LOCK).exists()


@pytest.fixture(scope="module")
def shards(tiny_store, tmp_path_factory):
    return tiny_shards(tiny_store, tmp_path_factory, "locks", num_shards=1)


def test_build_fit_and_rf_refuse_a_directory_in_use_by_name(tiny_store, shards, tmp_path):
    from atlas_shards.cli import main as shards_cli
    from trainer.cli import main as train_cli

    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = _holder(out, "atlas-train fit")
    try:
        before = _listing(out)
        runs = {
            "build": (shards_cli, ["build", str(tiny_store), str(out), "--split", "train", "--workers", "1"]),
            "fit": (
                train_cli,
                ["fit", "--shards", str(shards), "--out", str(out), "--steps-per-epoch", "1", "--workers", "0"],
            ),
            "rf": (train_cli, ["rf", "--shards", str(shards), "--out", str(out), "--max-samples", "100"]),
        }
        for name, (cli, argv) in runs.items():
            done = CliRunner().invoke(cli, argv)
            assert done.exit_code == 1, (name, done.output)
            assert done.output.strip().count("\n") == 0, (name, done.output)  # one line
            assert f"{out}: in use by atlas-train fit (pid {proc.pid}" in done.output, (name, done.output)
            assert _listing(out) == before, name  # no .build/, no checkpoint, no forest: as it was
    finally:
        proc.kill()
        proc.wait()


def test_a_run_directory_holds_one_model(shards, tmp_path):
    from trainer.cli import main as train_cli

    runner = CliRunner()
    rf = runner.invoke(
        train_cli, ["rf", "--shards", str(shards), "--out", str(tmp_path / "rf"), "--max-samples", "200"]
    )
    assert rf.exit_code == 0, rf.output
    fit = ["fit", "--shards", str(shards), "--out", str(tmp_path / "rf"), "--steps-per-epoch", "1", "--workers", "0"]
    done = runner.invoke(train_cli, fit)
    assert done.exit_code == 1 and "holds a random forest (forest.npz)" in done.output
    fit[4] = str(tmp_path / "net")
    assert runner.invoke(train_cli, fit).exit_code == 0
    done = runner.invoke(train_cli, ["rf", "--shards", str(shards), "--out", str(tmp_path / "net")])
    assert done.exit_code == 1 and "holds a trained network (last.pt)" in done.output


def test_an_ingest_into_a_store_in_use_is_refused(r11, tmp_path):
    from atlas_shards.ingest import IngestError, ingest

    from atlas_shards.store import open_store

    release = r11[0]
    open_store(tmp_path / "store.zarr", "a")  # as the first ingest made it
    proc = _holder(tmp_path / "store.zarr", "atlas-shards ingest")
    try:
        with pytest.raises(IngestError, match="store.zarr: in use by atlas-shards ingest"):
            ingest(release, tmp_path / "store.zarr", progress=False)
        assert sorted(p.name for p in (tmp_path / "store.zarr").iterdir()) == [LOCK, "zarr.json"]  # no scan
    finally:
        proc.kill()
        proc.wait()
