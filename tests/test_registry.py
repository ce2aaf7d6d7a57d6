"""The model registry: one table that configuration, the CLIs, evaluation and the ladder read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import build_quietly
from evaluate.compare import PAPER_DICE, PAPER_NAMES
from evaluate.predictors import EvaluateError, ForestPredictor, load_run
from trainer import registry
from trainer.config import MODELS, ModelConfig
from trainer.fit import TrainConfig, fit
from trainer.models import ModelError, build_model


def test_every_model_fit_trains_is_built_from_its_entry_and_reads_its_view():
    assert MODELS == registry.FIT_MODELS == ("resnet2d", "cnn3d", "cnn3d-sym")
    channels = {"pair": 2, "cube": 1, "slice": 3}  # the ResNet replicates its slice to 3 channels
    for name in MODELS:
        entry = registry.model_entry(name)
        model = build_model(ModelConfig(name=name))
        assert type(model).__name__ == entry.builder.partition(":")[2]
        x = model.prepare(torch.zeros((2, 2, 25, 25, 25), dtype=torch.uint8))
        assert x.shape[1] == channels[entry.view], name
    with pytest.raises(ModelError, match="trained with atlas-train rf"):
        build_model(ModelConfig(name="rf"))
    with pytest.raises(ModelError, match="unknown model 'unet'; choose from rf, resnet2d, cnn3d, cnn3d-sym"):
        build_model(ModelConfig(name="unet"))


def test_the_cli_and_compare_read_the_table():
    from trainer.cli import fit as fit_command

    choices = next(p for p in fit_command.params if p.name == "name").type.choices
    assert tuple(choices) == registry.FIT_MODELS
    assert list(PAPER_DICE) == ["rf", "resnet2d", "cnn3d", "cnn3d-sym"] and PAPER_DICE["cnn3d-sym"] == 0.499
    assert PAPER_NAMES["rf"] == registry.model_entry("rf").title


def test_a_run_is_loaded_by_the_trainer_its_model_names(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"name": "rf"}}))
    with pytest.raises(EvaluateError, match="names a forest, but there is no forest.npz"):
        load_run(run)
    (run / "config.json").write_text(json.dumps({"model": {"name": "unet"}}))
    with pytest.raises(EvaluateError, match="run: unknown model 'unet'"):
        load_run(run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(EvaluateError, match="config.json: unreadable"):
        load_run(run)


def test_a_forest_run_loads_as_the_forest(tiny_store, tmp_path):
    from trainer.forest import train_forest

    build_quietly(tiny_store, tmp_path / "train", split="train", num_shards=2, samples_per_record=32)
    train_forest(str(tmp_path / "train"), tmp_path / "rf", max_samples=300, workers=1, log=lambda m: None)
    pred = load_run(tmp_path / "rf")
    assert isinstance(pred, ForestPredictor) and pred.name == "rf" and pred.dense is None


def test_the_worked_example_of_docs_adding_a_model(tiny_store, tmp_path, monkeypatch):
    """docs/adding-a-model.md: a module of its own (tests/example_model.py) and one registry line give a model that
    fit trains and the evaluator loads, patch by patch."""
    entry = registry.ModelEntry("mlp", "2-layer perceptron on the pair", "pair", "example_model:PairMLP")
    monkeypatch.setitem(registry.REGISTRY, "mlp", entry)  # what the one line in ENTRIES does
    build_quietly(tiny_store, tmp_path / "train", split="train", num_shards=2, samples_per_record=32)
    cfg = TrainConfig(shards=str(tmp_path / "train"), out=str(tmp_path / "run"), batch_size=16, workers=0)
    cfg.steps_per_epoch = 5
    summary = fit(cfg, ModelConfig(name="mlp", hidden=8), progress=False, log=lambda m: None)
    assert summary["steps"] == 5
    pred = load_run(tmp_path / "run")
    assert pred.name == "mlp" and pred.dense is None  # no dense form: evaluated patch by patch
    pairs = np.random.default_rng(0).integers(0, 256, (3, 2, 25, 25, 25), dtype=np.uint8)
    assert pred.patch_logits(pairs).shape == (3,)
