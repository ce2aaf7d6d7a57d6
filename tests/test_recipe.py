"""The training recipes: settings, the schedule, augmentation that keeps the pair's meaning, the time budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_quietly
from shards.patches import extract_pairs
from trainer import checkpoint as ckpt_io
from trainer.augment import flip_pairs, jitter, step_generator
from trainer.optim import learning_rate
from trainer.config import RECIPES, TrainConfig, recipe_batch_norm
from trainer.logbook import read_rows
from trainer.fit import TrainError, fit
from trainer.models import ModelConfig


def test_a_recipe_gives_the_defaults_and_options_win():
    paper = TrainConfig(shards="s", out="o", recipe="paper").resolved()
    assert (paper.optimizer, paper.lr, paper.schedule, paper.augment) == ("adam", 1e-5, "constant", False)
    modern = TrainConfig(shards="s", out="o", lr=3e-4, augment=False).resolved()
    assert (modern.recipe, modern.optimizer, modern.lr, modern.schedule, modern.augment) == (
        "modern",
        "adamw",
        3e-4,
        "cosine",
        False,
    )
    assert set(RECIPES["paper"]) == set(RECIPES["modern"])
    assert (recipe_batch_norm("modern", "cnn3d-sym"), recipe_batch_norm("modern", "cnn3d")) == (True, True)
    assert (recipe_batch_norm("paper", "cnn3d-sym"), recipe_batch_norm("modern", "resnet2d")) == (False, False)
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        TrainConfig(shards="s", out="o", recipe="fast").resolved()


def test_warmup_then_cosine():
    lr = [learning_rate(1.0, "cosine", 0.1, p) for p in np.linspace(0, 1, 101)]
    assert lr[0] == pytest.approx(0.01) and lr[10] == pytest.approx(1.0) and lr[100] == pytest.approx(0.01)
    assert all(a < b for a, b in zip(lr[:10], lr[1:11]))  # rising through the warm-up
    assert all(a > b for a, b in zip(lr[10:100], lr[11:101]))  # then falling
    assert lr[55] == pytest.approx(0.01 + 0.99 * 0.5)  # half-way through the decay: half-way down
    assert learning_rate(0.3, "constant", 0.1, 0.7) == 0.3


def test_flipping_both_cubes_is_the_pair_of_the_flipped_head():
    """The claim augmentation rests on: flip a pair's two cubes alike and you get a real pair (of the flipped head)."""
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 255, (30, 27, 24)).astype(np.uint8)
    mirror = 14.5  # not the grid centre: the flipped head has its own mirror plane
    centres = rng.integers(0, 24, (20, 3))
    pairs = extract_pairs(volume, mirror, centres, 9)
    flipped_head = volume[::-1, ::-1, ::-1]
    flipped_centres = np.array(volume.shape) - 1 - centres
    expected = extract_pairs(flipped_head, (volume.shape[0] - 1) - mirror, flipped_centres, 9)
    np.testing.assert_array_equal(pairs[:, :, ::-1, ::-1, ::-1], expected)
    # and flip_pairs flips both cubes of a sample alike, each axis for about half the samples
    x = torch.from_numpy(pairs).repeat(20, 1, 1, 1, 1)
    out = flip_pairs(x, step_generator(0, 0, 7))
    kinds = set()
    for a, b in zip(x, out):
        found = [
            axes for axes in ((), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)) if torch.equal(a.flip(axes), b)
        ]
        assert found  # both cubes by the same flips
        kinds.add(found[0])
    assert len(kinds) == 8
    assert torch.equal(out, flip_pairs(x, step_generator(0, 0, 7)))  # a function of (seed, rank, step)
    assert not torch.equal(out, flip_pairs(x, step_generator(0, 0, 8)))


@pytest.mark.floats
def test_jitter_moves_both_cubes_of_a_sample_alike():
    x = torch.rand(64, 2, 5, 5, 5)
    y = jitter(x, step_generator(1, 0, 0))
    flat_x, flat_y = x.flatten(1).double(), y.flatten(1).double()
    scale = (flat_y.max(1).values - flat_y.min(1).values) / (flat_x.max(1).values - flat_x.min(1).values)
    shift = flat_y.min(1).values - scale * flat_x.min(1).values
    # one affine map a sample, for both cubes and every voxel
    torch.testing.assert_close(flat_y, scale[:, None] * flat_x + shift[:, None], atol=1e-5, rtol=0)
    assert 0.89 < scale.min() and scale.max() < 1.11 and scale.std() > 0.02
    assert shift.abs().max() < 0.11 and shift.std() > 0.02


@pytest.fixture(scope="module")
def shards(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "train"
    build_quietly(tiny_store, out, split="train", num_shards=3, samples_per_record=32)
    return out


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_time_budget_stops_the_run_and_a_resume_has_nothing_left(shards, tmp_path, clock):
    cfg = TrainConfig(
        shards=str(shards),
        out=str(tmp_path),
        batch_size=8,
        workers=0,
        steps_per_epoch=100_000,
        time_budget=0.05,  # 3 s: enough steps for the schedule's shape on a loaded machine
        budget_clock=clock,
        log_every=1,
    )
    messages = []
    summary = fit(cfg, ModelConfig(), progress=False, log=messages.append)
    assert 0 < summary["steps"] < 100_000
    assert f"time budget of 0.05 minutes spent at step {summary['steps']} of 100000" in messages
    ckpt = ckpt_io.load(tmp_path)
    assert ckpt["step"] == summary["steps"] and 3 <= ckpt["trained_seconds"] < 60
    rows = read_rows(tmp_path / "metrics.csv")
    rates = [float(r["lr"]) for r in rows]
    # the schedule followed the clock, not the 100,000 steps: out of the warm-up (by the steps' count it would
    # still be under 1e-5 * steps / 50), then down the cosine, however few steps a loaded machine gave
    assert max(rates) > 0.5e-3 and rates[-1] < max(rates)
    messages.clear()
    again = fit(cfg, ModelConfig(), resume=True, progress=False, log=messages.append)
    assert again["steps"] == summary["steps"] and any("nothing to do" in m for m in messages)


def test_the_modern_recipe_learns(shards, tmp_path):
    cfg = TrainConfig(shards=str(shards), out=str(tmp_path), batch_size=32, workers=0, steps_per_epoch=80, log_every=5)
    fit(cfg, ModelConfig(), progress=False, log=lambda m: None)
    rows = read_rows(tmp_path / "metrics.csv")
    losses, rates = [float(r["loss"]) for r in rows], [float(r["lr"]) for r in rows]
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3])  # flips and jitter make it harder, not impossible
    assert max(rates) == pytest.approx(1e-3, rel=0.05) and rates[-1] < 1e-4  # warmed up, then decayed
    assert ckpt_io.load(tmp_path)["train_config"]["optimizer"] == "adamw"


def test_snapshots_and_recipe_errors(shards, tmp_path):
    cfg = TrainConfig(shards=str(shards), out=str(tmp_path / "a"), batch_size=8, workers=0, steps_per_epoch=12)
    fit(TrainConfig(**{**cfg.__dict__, "snapshot_every": 5}), ModelConfig(), progress=False, log=lambda m: None)
    assert [s for s, _ in ckpt_io.snapshots(tmp_path / "a")] == [5, 10]
    assert ckpt_io.load(ckpt_io.snapshots(tmp_path / "a")[0][1])["step"] == 5
    with pytest.raises(TrainError, match="--warmup must be in"):
        fit(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "b"), "warmup": 1.5}), ModelConfig(), progress=False)
    with pytest.raises(TrainError, match="unknown recipe"):
        fit(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "c"), "recipe": "x"}), ModelConfig(), progress=False)
