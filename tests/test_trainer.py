"""The trainer: model shapes, a loss that falls, resume, safe checkpoints, the forest, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import build_quietly, interrupt_training_at, replay_ranks, sample_ids
from trainer import checkpoint as ckpt_io
from trainer.logbook import read_rows
from trainer.fit import TrainConfig, TrainError, fit
from trainer.config import shuffle_pool
from trainer.forest import ForestModel, train_forest
from trainer.models import ModelConfig, ModelError, build_model, probabilities


@pytest.fixture(scope="module")
def shards(tiny_store, tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    build_quietly(tiny_store, base / "train", split="train", num_shards=5, samples_per_record=32)
    build_quietly(
        tiny_store,
        base / "val",
        split="val",
        mode="natural",
        natural_rate=0.3,
        target_lesion_fraction=None,
        num_shards=2,
    )
    return base / "train", base / "val"


@pytest.mark.parametrize(
    "name, layout, shape",
    [
        ("cnn3d", "channels", (1, 25, 25, 25)),
        ("cnn3d-sym", "channels", (2, 25, 25, 25)),
        ("cnn3d-sym", "concat", (1, 50, 25, 25)),
        ("resnet2d", "channels", (3, 25, 25)),
    ],
)
def test_every_model_takes_stored_batches(name, layout, shape):
    model = build_model(ModelConfig(name=name, layout=layout))
    x = torch.randint(0, 256, (3, 2, 25, 25, 25), dtype=torch.uint8)
    prepared = model.prepare(x)
    assert prepared.shape == (3,) + shape and prepared.dtype == torch.float32
    assert model(prepared).shape == (3, 2)
    p = probabilities(model, x)
    assert p.shape == (3,) and ((p >= 0) & (p <= 1)).all()


def test_cnn3d_is_the_papers_ladder():
    model = build_model(ModelConfig(name="cnn3d-sym"))
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv3d)]
    pools = [i for i, m in enumerate(model.features) if isinstance(m, torch.nn.MaxPool3d)]
    assert len(convs) == 5 and all(c.padding == (0, 0, 0) for c in convs)  # valid: dense-convertible
    assert len(pools) == 2 and pools[1] < model.features.__len__() // 2
    assert model.feature_shape[1:] == (1, 1, 1)
    relus = [m for m in model.features if isinstance(m, torch.nn.ReLU)]
    assert len(relus) == 5  # + the one after fc1 in forward: ReLU after the first 6 layers


def test_model_config_errors_and_offline_imagenet(monkeypatch):
    with pytest.raises(ModelError, match="concat"):
        build_model(ModelConfig(name="cnn3d", layout="concat"))
    with pytest.raises(ModelError, match="too small"):
        build_model(ModelConfig(name="cnn3d", patch=9))
    with pytest.raises(ModelError, match="batch-norm is for the 3D CNNs"):
        build_model(ModelConfig(name="resnet2d", batch_norm=True))
    from torchvision.models import ResNet18_Weights

    def offline(self, *a, **k):
        raise OSError("no network")

    monkeypatch.setattr(ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(ModelError, match="not cached .* could not be downloaded"):
        build_model(ModelConfig(name="resnet2d", pretrained="imagenet"))
    with pytest.raises(ModelError, match="no such weights file"):
        build_model(ModelConfig(name="resnet2d", pretrained="/nonexistent/weights.pt"))


def _cfg(shards, out, **kw):
    train, val = shards
    base = dict(
        shards=str(train),
        out=str(out),
        val_shards=str(val),
        batch_size=16,
        lr=1e-3,
        workers=0,
        log_every=5,
        eval_every=10,
        checkpoint_every=1000,
        recipe="paper",  # Adam at a constant 1e-3, no augmentation: these tests are about the loop, not the recipe
    )
    return TrainConfig(**{**base, **kw})


def test_short_run_lowers_the_loss_and_writes_the_run(shards, tmp_path):
    # 80 steps at 1e-3: at 40 steps and 3e-3 some seeds and sample orders stall at ln 2 (tried on 4 seeds, both formats)
    summary = fit(
        _cfg(shards, tmp_path / "run", steps_per_epoch=80, batch_size=32, lr=1e-3),
        ModelConfig(),
        progress=False,
        log=lambda m: None,
    )
    assert summary["steps"] == 80
    rows = read_rows(tmp_path / "run" / "metrics.csv")
    losses = [float(r["loss"]) for r in rows]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])
    assert [int(r["step"]) for r in rows] == list(range(5, 81, 5))
    assert all(r["val_dice"] != "" for r in rows if int(r["step"]) % 10 == 0)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["name"] == "cnn3d-sym" and config["preprocessing"]["norm"]["method"] == "histeq"
    assert config["model"]["batch_norm"] is False  # the paper recipe's, applied by fit() as by the CLI
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    ckpt = ckpt_io.load(tmp_path / "run")
    assert ckpt["step"] == 80 and ckpt["model_config"]["norm"] == config["preprocessing"]["norm"]
    assert not any(k.startswith("module.") for k in ckpt["model"])
    with pytest.raises(TrainError, match="holds a run already"):
        fit(_cfg(shards, tmp_path / "run", steps_per_epoch=40), ModelConfig(), progress=False, log=lambda m: None)


def _sgd_run(shards, out, **kw) -> dict:
    """10 steps of SGD (the default layout: channels-last); the trained state dict."""
    cfg = _cfg(shards, out, steps_per_epoch=10, optimizer="sgd", **kw)
    fit(cfg, ModelConfig(), progress=False, log=lambda m: None)
    return ckpt_io.load(out)["model"]


@pytest.fixture(scope="module")
def sgd_reference(shards, tmp_path_factory):
    """The runs that float-rounding oracles compare against: the initial weights, a 10-step SGD run, and a control
    that differs from it as a real bug would, by its data (another sample order: a shuffle buffer of 0)."""
    base = tmp_path_factory.mktemp("sgd")
    torch.manual_seed(0)  # what fit does before it builds the model
    init = build_model(ModelConfig()).state_dict()
    return {"init": init, "run": _sgd_run(shards, base / "run"), "control": _sgd_run(shards, base / "ctl", shuffle=0)}


def _relative_gap(weights: dict, ref: dict) -> float:
    """The largest, over tensors, distance from the reference run relative to how far that run moved the tensor."""
    run, init = ref["run"], ref["init"]
    return max(((weights[k] - w).norm() / (w - init[k]).norm()).item() for k, w in run.items() if w.is_floating_point())


@pytest.mark.floats
def test_channels_last_and_compile_train_the_same_model(shards, sgd_reference, tmp_path):
    """The memory layout and compilation change only the order of float sums: 10 steps land on the same weights
    (to rounding), and the checkpoint is the plain module's."""
    weights = {
        "contiguous": _sgd_run(shards, tmp_path / "contiguous", channels_last=False),
        "compiled": _sgd_run(shards, tmp_path / "compiled", compile=True),
    }
    conv = sgd_reference["run"]["features.0.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    assert set(weights["compiled"]) == set(weights["contiguous"])  # no "_orig_mod." prefixes
    # SGD's step is proportional to the gradient: sums in another order change each step by ~1e-7 of itself, and
    # 10 steps through ReLUs and max-pools by < 1e-3 of the run's movement (measured: 7e-6 with AVX-512 kernels,
    # 3.5e-4 with AVX2 ones). Bound: 1e-2. The control (other batches) is ~4 movements away; a scrambled layout
    # would be as far.
    assert _relative_gap(sgd_reference["control"], sgd_reference) > 1
    for name, w in weights.items():
        assert _relative_gap(w, sgd_reference) < 1e-2, name
    assert build_model(ModelConfig()).load_state_dict(weights["compiled"])  # loads into a default-layout model


@pytest.mark.floats
def test_amp_runs_the_forward_in_bf16_on_the_cpu(shards, sgd_reference, tmp_path):
    """--amp on the CPU (bf16 autocast): the run trains, and its weights are near the float32 run's but not equal
    (the option ignored on the CPU, as before, would leave them identical)."""
    amp = _sgd_run(shards, tmp_path / "amp", amp=True)
    assert all(torch.isfinite(w).all() for w in amp.values())
    assert any(not torch.equal(w, sgd_reference["run"][k]) for k, w in amp.items())  # bf16 rounding changed things
    # bf16 keeps 8 significant bits: each forward value and gradient is off by ~0.2-1%, which 10 SGD steps carry
    # into the weights as a few % of the run's movement (measured: 5.0% with native bf16 instructions, 5.1%
    # emulated on AVX2). Bound: 15%, against ~400% for the control trained on other batches.
    assert _relative_gap(amp, sgd_reference) < 0.15
    assert _relative_gap(sgd_reference["control"], sgd_reference) > 1


@pytest.mark.floats
def test_batch_norm_trains_and_its_statistics_reach_the_dense_predictor(shards, tmp_path):
    """--batch-norm: the running statistics learnt in training are saved, and the run's dense twin (the
    statistics folded into the convolutions) gives the patch classifier's logits."""
    from evaluate.predictors import load_run

    fit(
        _cfg(shards, tmp_path / "bn", steps_per_epoch=10),
        ModelConfig(batch_norm=True),
        progress=False,
        log=lambda m: None,
    )
    ckpt = ckpt_io.load(tmp_path / "bn")
    assert ckpt["model_config"]["batch_norm"] is True
    var = [v for k, v in ckpt["model"].items() if k.endswith("running_var")]
    assert len(var) == 5 and all((v - 1).abs().max() > 1e-3 for v in var)  # moved from the initial 1
    pred = load_run(tmp_path / "bn")
    assert pred.dense is not None
    x = torch.randint(0, 256, (6, 2, 25, 25, 25), dtype=torch.uint8)
    patch = pred.patch_logits(x.numpy())
    vol = pred.model.prepare(x)  # a dense pass over one patch alone gives its centre voxel
    with torch.no_grad():
        dense = pred.dense(vol).float()
    dense_logit = (dense[:, 1] - dense[:, 0]).flatten().numpy()
    assert np.abs(dense_logit - patch).max() < 1e-3


@pytest.mark.floats
@pytest.mark.parametrize(
    "straight_kw, interrupted_kw",
    [
        ({}, {}),
        # the device path (here on CPU tensors, 2 DataLoader workers): the same weights as the CPU cut,
        # also after a resume
        ({"workers": 2}, {"workers": 2, "cut_on_device": True}),
    ],
    ids=["cpu-cut", "cut-on-device"],
)
def test_ctrl_c_saves_and_resume_continues_exactly(shards, tmp_path, monkeypatch, straight_kw, interrupted_kw):
    straight = fit(
        _cfg(shards, tmp_path / "a", steps_per_epoch=12, epochs=2, recipe="modern", **straight_kw),
        ModelConfig(),
        progress=False,
        log=lambda m: None,
    )
    undo = interrupt_training_at(monkeypatch, 15)
    cfg = _cfg(shards, tmp_path / "b", steps_per_epoch=12, epochs=2, recipe="modern", **interrupted_kw)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, ModelConfig(), progress=False, log=lambda m: None)
    assert ckpt_io.load(tmp_path / "b")["step"] == 15  # Ctrl-C saved a checkpoint mid-epoch 2
    undo()
    resumed = fit(cfg, ModelConfig(), resume=True, progress=False, log=lambda m: None)
    assert resumed["steps"] == straight["steps"] == 24
    assert ckpt_io.load(tmp_path / "a")["model_config"]["batch_norm"] is True  # the modern recipe's, from fit()
    a, b = ckpt_io.load(tmp_path / "a")["model"], ckpt_io.load(tmp_path / "b")["model"]
    # Exact, on any CPU: both runs are this process's kernels on the same batches in the same order, with the
    # same RNG state restored; nothing but a different computation could move a bit.
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(r["step"]) for r in read_rows(tmp_path / "b" / "metrics.csv")]
    assert steps == sorted(set(steps)) and steps[-1] == 24
    with pytest.raises(TrainError, match="not resnet2d"):
        fit(_cfg(shards, tmp_path / "b"), ModelConfig(name="resnet2d"), resume=True, progress=False, log=lambda m: None)


class Payload:
    """Stands for anything a malicious or careless checkpoint could smuggle in."""


def test_a_pickled_object_in_a_checkpoint_is_refused(tmp_path):
    torch.save(
        {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "model": {}, "extra": Payload()}, tmp_path / "last.pt"
    )
    with pytest.raises(ckpt_io.CheckpointError, match="refused.*Payload"):
        ckpt_io.load(tmp_path)
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ckpt_io.CheckpointError, match="not an atlas-train checkpoint"):
        ckpt_io.load(tmp_path / "other.pt")


def test_forest_trains_on_streamed_samples_and_saves_without_pickle(shards, tmp_path):
    train, val = shards
    result = train_forest(
        str(train), tmp_path / "rf", max_samples=500, val_spec=str(val), workers=1, log=lambda m: None
    )
    assert result["params"] == {"n_estimators": 50, "max_depth": 6, "min_samples_split": 2}
    assert result["train_accuracy"] > 0.8 and 0 <= result["val"]["dice"] <= 1
    model = ForestModel.load(tmp_path / "rf")
    with np.load(tmp_path / "rf" / "forest.npz", allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)
    x = torch.randint(0, 256, (7, 2, 25, 25, 25), dtype=torch.uint8).numpy()
    assert model.lesion_probability(x).shape == (7,)


def test_forest_arrays_predict_exactly_like_scikit_learn():
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(0)
    features = rng.integers(0, 256, (2000, 625)).astype(np.float32)
    labels = (features[:, 300] + features[:, 10] > 255).astype(int)
    forest = RandomForestClassifier(20, max_depth=6, random_state=0).fit(features, labels)
    test = rng.integers(0, 256, (300, 625)).astype(np.float32)
    np.testing.assert_allclose(
        ForestModel.from_sklearn(forest, {}).predict_proba(test), forest.predict_proba(test), atol=1e-12
    )


@pytest.mark.floats
@pytest.mark.slow
def test_torchrun_two_ranks_gloo(shards, tmp_path):
    train, val = shards
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "trainer.cli",
        "fit",
        "--shards",
        str(train),
        "--val-shards",
        str(val),
        "--out",
        str(tmp_path / "ddp"),
        "--batch-size",
        "16",
        "--recipe",
        "paper",  # a constant rate, no augmentation, the contiguous layout: what the replay below does
        "--optimizer",
        "sgd",
        "--no-channels-last",
        "--lr",
        "1e-3",
        "--workers",
        "1",
        "--log-every",
        "5",
        "--eval-every",
        "10",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    audit = json.loads((tmp_path / "ddp" / "ranks.json").read_text())
    assert audit["world_size"] == 2 and audit["identical_parameters"]
    assert audit["samples_compared_per_rank"] > 0 and audit["samples_seen_by_two_ranks"] == 0
    manifest = json.loads((train / "manifest.json").read_text())
    steps = manifest["totals"]["samples"] // (2 * 16)  # 5 shards over 2 ranks: still equal steps
    ckpt = ckpt_io.load(tmp_path / "ddp")
    assert ckpt["step"] == steps
    assert int(read_rows(tmp_path / "ddp" / "metrics.csv")[-1]["step"]) == steps

    # Independent oracle: replay the same global batches (rank 0's and rank 1's, read here with the ranks' own
    # stream settings) in one process; DDP's averaged gradients equal the mean loss's over the 32 samples.
    from shards.reader import ShardStream

    pool = shuffle_pool(None, manifest["config"].get("format", "pairs"), "samples", manifest["totals"]["samples"], 2)
    per_rank = [
        list(
            ShardStream(str(train), batch_size=16, shuffle=pool, seed=0, rank=r, world_size=2, batches_per_epoch=steps)
        )
        for r in range(2)
    ]
    ids = [set(sample_ids(batches)) for batches in per_rank]
    assert not ids[0] & ids[1]  # the samples each rank trained on are disjoint

    def loss_of(model, pair):
        x, y = torch.cat([b["x"] for b in pair]), torch.cat([b["y"] for b in pair])
        return torch.nn.functional.cross_entropy(model(model.prepare(x)).float(), y)

    init, both, one = replay_ranks(ckpt, per_rank, 1e-3, loss_of)
    assert both.keys() == ckpt["model"].keys()
    # Tensor by tensor, relative to how far training moved it. SGD's step is proportional to the gradient, so
    # float sums in another order (DDP's all-reduce, another CPU's kernels) change each step by ~1e-7 of itself
    # and the run by ~1e-5 of its movement (measured: <= 1e-5 with AVX-512 and with AVX2 kernels). Adam would not
    # do: it scales each step to ~lr whatever the gradient's size. Control: replaying one rank's batches only
    # lands > 1.5 movements away (measured), so a DDP that did not average the ranks' gradients fails by far.
    for key, value in ckpt["model"].items():
        moved = (value - init[key]).norm()
        assert moved > 0, key
        assert (value - both[key]).norm() < 1e-3 * moved, (key, ((value - both[key]).norm() / moved).item())
        assert (value - one[key]).norm() > 0.5 * moved, (key, ((value - one[key]).norm() / moved).item())
