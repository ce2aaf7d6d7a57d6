"""--resume continues the same run: other settings or other samples are refused by name; a longer run is kept in
the run's history."""

from __future__ import annotations

import json

import pytest

from conftest import build_quietly, tiny_shards
from trainer.fit import TrainConfig, TrainError, fit
from trainer.models import ModelConfig


@pytest.fixture(scope="module")
def shards(tiny_store, tmp_path_factory):
    return tiny_shards(tiny_store, tmp_path_factory, "resume", num_shards=1, samples_per_record=16)


def _fit(shards, out, resume=False, **kw):
    base = dict(shards=str(shards), out=str(out), batch_size=8, workers=0, steps_per_epoch=2, log_every=1)
    return fit(TrainConfig(**{**base, **kw}), ModelConfig(), resume=resume, progress=False, log=lambda m: None)


def _files(run) -> dict:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def test_resume_with_other_settings_is_refused_naming_each_change(shards, tmp_path):
    _fit(shards, tmp_path / "run")
    before = _files(tmp_path / "run")
    with pytest.raises(
        TrainError, match="changes batch_size 8 -> 4; lr 0.001 -> 0.002; seed 0 -> 3\\. Train into another --out"
    ):
        _fit(shards, tmp_path / "run", resume=True, lr=2e-3, seed=3, batch_size=4)
    with pytest.raises(
        TrainError, match="changes optimizer adamw -> sgd; weight_decay 0.0001 -> 0.0; clip_grad None -> 1"
    ):
        _fit(shards, tmp_path / "run", resume=True, optimizer="sgd", weight_decay=0.0, clip_grad=1.0)
    assert _files(tmp_path / "run") == before  # checkpoint, config.json and metrics as they were


def test_resume_on_other_samples_is_refused(shards, tiny_store, tmp_path):
    _fit(shards, tmp_path / "run")
    other = build_quietly(tiny_store, tmp_path / "other", split="train", num_shards=1, seed=5, samples_per_record=16)
    assert other["config"]["seed"] == 5
    with pytest.raises(
        TrainError, match=f"the shards' build \\({tmp_path / 'other'} is not the {shards} it trained on"
    ):
        _fit(tmp_path / "other", tmp_path / "run", resume=True)


def test_a_longer_resumed_run_is_kept_in_the_history(shards, tmp_path):
    _fit(shards, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["history"] == []
    done = _fit(shards, tmp_path / "run", resume=True, epochs=2, workers=1)  # how it runs may change too
    assert done["steps"] == 4
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["history"] == [{"resumed_at_step": 2, "changed": ["epochs 1 -> 2"]}]
    assert config["train"]["epochs"] == 2 and config["total_steps"] == 4
