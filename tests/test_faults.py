"""Fault tolerance of the whole stack: damaged shards, a shard server that goes away, kill -9, bad inputs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from atlas_shards.cli import main as shards_cli
from atlas_shards.serve import free_port, serving
from conftest import assert_stopped_unreachable, build_quietly, fit_argv, start_training
from evaluate.cli import main as evaluate_cli
from trainer import checkpoint as ckpt_io
from trainer.cli import main as train_cli
from trainer.logbook import read_rows

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def shard_dir(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "train"
    build_quietly(tiny_store, out, split="train", num_shards=5, samples_per_record=16)
    return out


def test_training_survives_a_damaged_shard_and_counts_it(shard_dir, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(shard_dir, damaged)
    victim = sorted(damaged.glob("*.tar"))[2]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    r = CliRunner().invoke(train_cli, fit_argv(damaged, tmp_path / "run", 30))
    assert r.exit_code == 0, r.output
    rows = read_rows(tmp_path / "run" / "metrics.csv")
    assert int(rows[-1]["step"]) == 30 and sum(int(row["skipped"]) for row in rows) > 0


def _train_cmd(shards: str, out: Path, steps: int, *extra: str) -> list[str]:
    return [str(BIN / "atlas-train"), *fit_argv(shards, out, steps, "--checkpoint-every", "5", *extra)]


@pytest.mark.slow
def test_shard_server_stopped_and_restarted_mid_training(shard_dir, tmp_path):
    port = free_port()
    out = tmp_path / "run"
    cmd = _train_cmd(f"http://127.0.0.1:{port}/train/", out, 150, "--timeout", "2", "--retries", "6")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with serving(shard_dir.parent, port=port, server="python"):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 60
        while not (out / "metrics.csv").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    # the server is down now (mid-training); bring it back a moment later on the same port
    time.sleep(1.0)
    with serving(shard_dir.parent, port=port, server="python"):
        stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-2000:]
    assert ckpt_io.load(out)["step"] == 150
    # and with no server at all: a clear one-line error (bounded retries; the timeout only guards against a hang)
    done = subprocess.run(
        _train_cmd(
            f"http://127.0.0.1:{port}/train/", out, 300, "--epochs", "1", "--timeout", "1", "--retries", "2", "--resume"
        ),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 1 and "unreachable" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_shard_server_gone_mid_epoch_leaves_a_checkpoint_and_one_line(shard_dir, tmp_path):
    """The manifest was read and training runs; then the server goes for good: checkpoint, one line, exit 1."""
    port = free_port()
    out = tmp_path / "run"
    # many passes over the tiny set: the stream reopens shards again and again, so it meets the dead server
    cmd = _train_cmd(
        f"http://127.0.0.1:{port}/train/", out, 5000, "--timeout", "1", "--retries", "2", "--checkpoint-every", "100000"
    )
    with serving(shard_dir.parent, port=port, server="python"):
        proc = start_training(cmd, out)
    assert_stopped_unreachable(proc, out, 5000)


@pytest.mark.floats
@pytest.mark.slow
def test_kill_9_training_then_resume(shard_dir, tmp_path):
    """With a DataLoader worker: killed, resumed, and the same weights as a run that was never interrupted."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one_worker = ("--workers", "1")
    straight = subprocess.run(
        _train_cmd(str(shard_dir), tmp_path / "straight", 60, *one_worker),
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen(
        _train_cmd(str(shard_dir), out, 60, *one_worker), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (out / "last.pt").exists() and ckpt_io.load(out)["step"] >= 10:
            break
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = ckpt_io.load(out)["step"]
    assert 10 <= killed_at < 60
    assert not [p for p in out.iterdir() if p.name.startswith(".last.pt")]  # no half-written checkpoint left
    done = subprocess.run(
        _train_cmd(str(shard_dir), out, 60, *one_worker, "--resume"),
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming {out} at step {killed_at}" in done.stdout
    steps = [int(r["step"]) for r in read_rows(out / "metrics.csv")]
    assert steps == sorted(set(steps)) and steps[-1] == 60
    a, b = ckpt_io.load(tmp_path / "straight")["model"], ckpt_io.load(out)["model"]
    # Exact: the same machine's kernels, the same batches in the same order, the RNG state restored.
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_fail_in_one_line_and_overwrite_nothing(tiny_store, shard_dir, tmp_path):
    run = tmp_path / "run"
    r = CliRunner().invoke(
        train_cli,
        [
            "fit",
            "--shards",
            str(shard_dir),
            "--out",
            str(run),
            "--steps-per-epoch",
            "2",
            "--batch-size",
            "8",
            "--workers",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    fake_report = tmp_path / "report"
    fake_report.mkdir()
    cases = [
        (shards_cli, ["build", str(shard_dir), str(tmp_path / "o1"), "--split", "train"], "not a Zarr store"),
        (shards_cli, ["build", str(tiny_store), str(shard_dir), "--split", "val"], "another build"),
        (shards_cli, ["ingest", str(tmp_path / "nowhere"), str(tmp_path / "s.zarr")], "nowhere"),
        (shards_cli, ["inspect", str(tiny_store)], "no manifest.json"),
        (train_cli, ["fit", "--shards", str(tiny_store), "--out", str(tmp_path / "o2")], "manifest"),
        (train_cli, ["fit", "--shards", str(shard_dir), "--out", str(run)], "holds a run already"),
        (
            train_cli,
            ["fit", "--shards", str(shard_dir), "--out", str(run), "--model", "resnet2d", "--resume"],
            "not resnet2d",
        ),
        (
            train_cli,
            ["fit", "--shards", "foo://host/train-{0..3}.tar", "--out", str(tmp_path / "o3")],
            "unknown URL scheme foo://",
        ),
        (
            evaluate_cli,
            ["run", "--model", str(shard_dir), "--store", str(tiny_store), "--out", str(fake_report)],
            "no checkpoint",
        ),
        (evaluate_cli, ["run", "--model", str(run), "--store", str(shard_dir), "--out", str(fake_report)], "Zarr"),
        (
            evaluate_cli,
            ["predict", "--model", str(run), str(shard_dir / "manifest.json"), str(tmp_path / "m.nii.gz")],
            "manifest.json",
        ),
    ]
    for cli, args, message in cases:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code != 0, (args, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output, (args, result.output)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert list(fake_report.iterdir()) == []
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and not (tmp_path / "m.nii.gz").exists()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_a_finished_run_resumes_to_nothing(shard_dir, tmp_path):
    """`docker stop` sends SIGTERM: a checkpoint, then --resume finishes; resuming a finished run is a no-op."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _train_cmd(str(shard_dir), out, 60, "--workers", "1", "--checkpoint-every", "100000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.csv").exists() and time.monotonic() < deadline:  # training has started
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    stopped_at = ckpt_io.load(out)["step"]  # only the save on SIGTERM writes one (--checkpoint-every is out of reach)
    assert 5 <= stopped_at < 60 and f"interrupted at step {stopped_at}" in stdout
    for expected in (f"resuming {out} at step {stopped_at}", "already finished (60 of 60 steps); nothing to do"):
        done = subprocess.run(
            _train_cmd(str(shard_dir), out, 60, "--resume"), capture_output=True, text=True, timeout=240, env=env
        )
        assert done.returncode == 0 and expected in done.stdout, done.stdout + done.stderr[-2000:]
    assert ckpt_io.load(out)["step"] == 60
