"""``atlas-train`` through click: help, a short fit, the forest, one-line errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from atlas_shards.serve import free_port
from conftest import heavy_modules_after_import, tiny_shards
from trainer import checkpoint as ckpt_io
from trainer.cli import main


@pytest.fixture(scope="module")
def train_shards(tiny_store, tmp_path_factory):
    return tiny_shards(tiny_store, tmp_path_factory, "cli", num_shards=2, samples_per_record=32)


@pytest.mark.parametrize("cmd", ["fit", "rf"])
def test_help_is_instant(cmd):
    result = CliRunner().invoke(main, [cmd, "--help"])
    assert result.exit_code == 0 and "--shards" in result.output
    assert heavy_modules_after_import("trainer.cli", ("torch", "sklearn")) == []


def test_fit_then_refuse_to_overwrite_then_resume(train_shards, tmp_path):
    runner = CliRunner()
    args = [
        "fit",
        "--shards",
        str(train_shards),
        "--out",
        str(tmp_path / "run"),
        "--steps-per-epoch",
        "3",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--log-every",
        "1",
    ]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "trained 3 steps (world size 1)" in r.output and "last.pt" in r.output
    assert ckpt_io.load(tmp_path / "run")["model_config"]["batch_norm"]  # the modern recipe's, none asked for
    r = runner.invoke(main, args)
    assert r.exit_code == 1 and "holds a run already" in r.output and "Traceback" not in r.output
    r = runner.invoke(
        main, args[:-6] + ["--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "8", "--workers", "0", "--resume"]
    )
    assert r.exit_code == 0 and "resuming" in r.output and "trained 6 steps" in r.output


@pytest.mark.parametrize(
    "extra, batch_norm",
    [(["--recipe", "paper"], False), (["--no-batch-norm"], False), (["--recipe", "paper", "--batch-norm"], True)],
)
def test_the_recipe_decides_batch_norm_unless_asked(train_shards, tmp_path, extra, batch_norm):
    out = tmp_path / "run"
    args = ["fit", "--shards", str(train_shards), "--out", str(out), "--steps-per-epoch", "1", "--batch-size", "8"]
    r = CliRunner().invoke(main, args + ["--workers", "0"] + extra)
    assert r.exit_code == 0, r.output
    saved = ckpt_io.load(out)
    assert saved["model_config"]["batch_norm"] is batch_norm
    assert any("running_mean" in k for k in saved["model"]) is batch_norm


def test_rf_command(train_shards, tmp_path):
    r = CliRunner().invoke(
        main, ["rf", "--shards", str(train_shards), "--out", str(tmp_path / "rf"), "--max-samples", "300"]
    )
    assert r.exit_code == 0, r.output
    assert "'n_estimators': 50" in r.output and (tmp_path / "rf" / "forest.npz").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "--shards", "{missing}", "--out", "{out}"], "no such shard"),
        (["fit", "--shards", "{shards}", "--out", "{out}", "--widths", "8,8"], "5 widths"),
        (["fit", "--shards", "{shards}", "--out", "{out}", "--class-weights", "1"], "two comma-separated"),
        (["fit", "--shards", "http://127.0.0.1:{port}/train-{{000000..000001}}.tar", "--out", "{out}"], "unreachable"),
        (["rf", "--shards", "{missing}", "--out", "{out}"], "no such shard"),
    ],
)
def test_errors_are_one_line(train_shards, tmp_path, args, message):
    fill = {
        "missing": str(tmp_path / "nope.tar"),
        "out": str(tmp_path / "out"),
        "shards": str(train_shards),
        "port": free_port(),
    }  # a port nothing listens on
    r = CliRunner().invoke(main, [a.format(**fill) for a in args])
    assert r.exit_code != 0 and message in r.output, r.output
    assert "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.startswith("Error")]) == 1
