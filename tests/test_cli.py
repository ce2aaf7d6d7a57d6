"""The atlas-shards commands end to end through click: synth -> ingest -> eda."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from atlas_shards.cli import main
from conftest import heavy_modules_after_import


@pytest.mark.parametrize("cmd", ["synth", "ingest", "eda", "build", "inspect"])
def test_help(cmd):
    result = CliRunner().invoke(main, [cmd, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_help_is_instant_no_heavy_imports():
    heavy = ("zarr", "nilearn", "scipy", "matplotlib", "torch")
    assert heavy_modules_after_import("atlas_shards.cli", heavy) == []


@pytest.mark.slow
def test_synth_ingest_eda(tmp_path):
    runner = CliRunner()
    release, store, figs = tmp_path / "rel", tmp_path / "store.zarr", tmp_path / "eda"
    r = runner.invoke(
        main,
        [
            "synth",
            str(release),
            "--layout",
            "r1.2",
            "--subjects",
            "4",
            "--seed",
            "2",
            "--truncated",
            "1",
            "--workers",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["ingest", str(release), str(store), "--split-fractions", "0.5,0.25,0.25"])
    assert r.exit_code == 0, r.output
    assert "r1.2 release: 5 scans found, 4 ingested" in r.output and "unreadable or truncated" in r.output
    r = runner.invoke(main, ["eda", str(store), str(figs)])
    assert r.exit_code == 0, r.output
    summary = json.loads((figs / "eda.json").read_text())
    assert summary["n_scans"] == 4 and 0 < summary["lesion_voxel_fraction"] < 0.1
    assert set(summary["per_split"]) == {"train", "val", "test"}
    for name in summary["figures"]:
        assert (figs / name).stat().st_size > 1000
    assert len(summary["figures"]) == 4


def test_errors_are_one_line_and_nonzero(tmp_path):
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    r = runner.invoke(main, ["ingest", str(tmp_path / "empty"), str(tmp_path / "s.zarr")])
    assert r.exit_code != 0 and "no NIfTI scans found" in r.output
    r = runner.invoke(main, ["ingest", str(tmp_path / "nope"), str(tmp_path / "s.zarr")])
    assert r.exit_code != 0 and "not a directory" in r.output
    r = runner.invoke(
        main, ["ingest", str(tmp_path), str(tmp_path / "s.zarr"), "--split", "1,2", "--split-fractions", "1,1,1"]
    )
    assert r.exit_code != 0 and "not both" in r.output
    r = runner.invoke(main, ["eda", str(tmp_path / "empty"), str(tmp_path / "out")])
    assert r.exit_code != 0 and "not a Zarr store" in r.output
    assert not (tmp_path / "s.zarr").exists()


def test_ingest_with_nothing_usable_fails(tmp_path):
    scan = tmp_path / "rel" / "scan1"
    scan.mkdir(parents=True)
    (scan / "scan1_t1w.nii.gz").write_bytes(b"garbage")
    (scan / "scan1_LesionSmooth.nii.gz").write_bytes(b"garbage")
    r = CliRunner().invoke(main, ["ingest", str(tmp_path / "rel"), str(tmp_path / "s.zarr")])
    assert r.exit_code != 0 and "no scan" in r.output and "could be ingested" in r.output
    assert "unreadable or truncated" in (tmp_path / "s.zarr" / "ingest-report.csv").read_text()


def test_build_and_inspect(tiny_store, tmp_path):
    runner = CliRunner()
    out = tmp_path / "val"
    r = runner.invoke(
        main,
        [
            "build",
            str(tiny_store),
            str(out),
            "--split",
            "val",
            "--num-shards",
            "2",
            "--samples-per-record",
            "32",
            "--target-lesion-fraction",
            "0.3",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "split val" in r.output
    achieved = float(re.search(r"lesion, fraction ([0-9.]+)\)", r.output).group(1))
    assert abs(achieved - 0.3) < 0.005
    r = runner.invoke(main, ["inspect", str(out), "--verify"])
    assert r.exit_code == 0 and "every shard matches" in r.output
    shard = sorted(out.glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    r = runner.invoke(main, ["inspect", str(out), "--verify"])
    assert r.exit_code == 1 and "3 problem(s) found" in r.output
    assert r.output.count(f"PROBLEM {shard}") == 3 and "unreadable" in r.output
    r = runner.invoke(
        main, ["build", str(tiny_store), str(tmp_path / "n"), "--split", "val", "--dry-run", "--natural", "0.1"]
    )
    assert r.exit_code == 0 and "natural" in r.output and not (tmp_path / "n").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["build", "{missing}", "{out}", "--split", "train"], "not a Zarr store"),
        (
            ["build", "{store}", "{out}", "--split", "train", "--natural", "0.1", "--background-rate", "0.01"],
            "--natural",
        ),
        (
            [
                "build",
                "{store}",
                "{out}",
                "--split",
                "train",
                "--target-lesion-fraction",
                "0.4",
                "--background-rate",
                "0.1",
            ],
            "not both",
        ),
        (["build", "{store}", "{out}", "--split", "train", "--target-lesion-fraction", "1.5"], "0<x<1"),
        (["inspect", "{store}"], "no manifest.json"),
    ],
)
def test_build_and_inspect_errors(tiny_store, tmp_path, args, message):
    fill = {"missing": str(tmp_path / "nope"), "out": str(tmp_path / "out"), "store": str(tiny_store)}
    r = CliRunner().invoke(main, [a.format(**fill) for a in args])
    assert r.exit_code != 0 and message in r.output, r.output
    assert len([line for line in r.output.splitlines() if line.startswith("Error:")]) == 1
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()


def test_every_option_of_every_command_lands_in_a_setting():
    """A command that passes its options on (``**options``): each one is a field of the settings it builds
    (``from_options``, which refuses any other, naming it) or a parameter of the function it calls, or one the
    command takes by name. Commands without ``**options`` take every option by name (click fails otherwise)."""
    import inspect
    from dataclasses import fields

    from atlas_shards.plan import BuildConfig
    from atlas_shards.synth import synthesize_release
    from evaluate.cli import main as evaluate_main
    from evaluate.split import evaluate_split
    from evaluate.batch import segment_store
    from evaluate.predict import predict_file
    from shards.common.params import from_options
    from trainer.cli import main as train_main
    from trainer.config import ModelConfig, TrainConfig

    settings = {"build": (BuildConfig,), "fit": (TrainConfig, ModelConfig)}
    functions = {"synth": synthesize_release, "run": evaluate_split, "predict": predict_file, "segment": segment_store}
    checked = []
    for group in (main, train_main, evaluate_main):
        for name, command in group.commands.items():
            signature = inspect.signature(command.callback).parameters
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()):
                continue
            if name in settings:
                names = set().union(*({f.name for f in fields(c)} for c in settings[name]))
            else:
                names = set(inspect.signature(functions[name]).parameters)
            for param in command.params:
                assert param.name in signature or param.name in names, (name, param.name)
            checked.append(name)
    assert sorted(checked) == ["build", "fit", "predict", "run", "segment", "synth"]
    with pytest.raises(TypeError, match=r"option\(s\) batchsize match no field of TrainConfig, ModelConfig"):
        from_options(TrainConfig, {"shards": "s", "out": "o", "batchsize": 8}, others=(ModelConfig,))
