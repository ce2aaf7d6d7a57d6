"""Say what a run is: fit and run print a banner first; config.json and metrics.json record the resolved
device and the software versions."""

from __future__ import annotations

import json
import re

import numpy as np
import torch
from click.testing import CliRunner

from conftest import tiny_shards
from evaluate.split import evaluate_split


def _software_ok(software: dict) -> None:
    assert software["torch"] == torch.__version__ and software["numpy"] == np.__version__
    assert software["cuda"] == torch.version.cuda and re.fullmatch(r"3\.\d+\.\d+", software["python"])
    assert software["commit"] is None or re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", software["commit"])


def test_fit_says_what_it_runs_first_and_records_it(tiny_store, tmp_path_factory, tmp_path):
    from trainer.cli import main

    shards = tiny_shards(tiny_store, tmp_path_factory, "banner", num_shards=1)
    argv = ["fit", "--shards", str(shards), "--out", str(tmp_path / "run"), "--workers", "0", "--epochs", "2"]
    done = CliRunner().invoke(main, argv + ["--steps-per-epoch", "3", "--batch-size", "8", "--time-budget", "5"])
    assert done.exit_code == 0, done.output
    first, second = done.output.splitlines()[:2]
    assert first.startswith("fit cnn3d-sym (channels) on cpu, world size 1, objective patch, 8 samples a step a rank")
    assert second.startswith(f"  shards {shards}: ") and "3 steps an epoch x 2 epochs = 6 steps" in second
    assert "time budget 5 WALL-minutes" in second
    samples = json.loads((shards / "manifest.json").read_text())["totals"]["samples"]
    assert f"shuffle pool {min(samples, 65536)} samples" in second  # blocks shards; never past the epoch
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["device"] == "cpu"  # --device auto, resolved
    _software_ok(config["software"])


def test_run_says_what_it_scores_first_and_records_it(trained, tmp_path):
    store, run_dir = trained
    said = []
    m = evaluate_split(run_dir, store, "test", tmp_path / "rep", progress=False, log=said.append, device="auto")
    assert said[0] == (
        f"run cnn3d-sym on cpu: split test of {store}, 1 scans; dense inference; rule threshold 0.5; "
        f"report {tmp_path / 'rep'}"
    )
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved["device"] == m["device"] == "cpu"
    _software_ok(saved["software"])
