"""Dense training: every voxel of a block record is a label, the 3D CNNs run fully convolutionally."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import build_quietly, interrupt_training_at, replay_ranks
from shards.blocks import cut_pairs_torch
from shards.reader import ShardStream
from trainer import checkpoint as ckpt_io
from trainer.augment import flip_draws, flip_offsets, flip_pairs, step_generator
from trainer.config import TrainConfig, shuffle_pool
from trainer.dense import DenseCNN
from trainer.fit import TrainError, fit
from trainer.models import ModelConfig, build_model
from trainer.objectives import dense_loss, dense_weights, draws_scale, sampled_loss

BLOCK = 8  # tiny volumes: many small blocks a scan


@pytest.fixture(scope="module")
def blocks(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "blocks"
    manifest = build_quietly(tiny_store, out, split="train", num_shards=4, block=BLOCK)
    return out, manifest


def _batch(shards, n: int = 3) -> dict:
    """The first batch of ``n`` blocks, as a dense stream batches them, whose samples hold both classes."""
    for batch in ShardStream(str(shards), batch_size=n, shuffle=0, unit="blocks"):
        if 0 < int(batch["y"].sum()) < len(batch["y"]):
            return batch
    raise AssertionError("no batch with both classes")


def _cfg(shards, out, **kw) -> TrainConfig:
    base = dict(shards=str(shards), out=str(out), objective="dense", workers=0, log_every=2, checkpoint_every=1000)
    return TrainConfig(**{**base, **kw})


def _quiet(cfg, model_cfg=None, **kw) -> dict:
    return fit(cfg, model_cfg or ModelConfig(), progress=False, log=lambda m: None, **kw)


@pytest.mark.floats
def test_dense_sampled_loss_and_gradients_equal_patch_training_on_the_same_samples(blocks):
    shards, _ = blocks
    batch = _batch(shards)
    torch.manual_seed(3)
    model = build_model(ModelConfig(batch_norm=False))
    with torch.no_grad():
        for p in model.parameters():  # livelier than the default init, so that neighbouring voxels differ
            p.mul_(3)
    weight = torch.tensor([1.0, 2.5])  # class weights apply alike

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    logits = DenseCNN(model)(model.prepare(batch["block"]))
    off = batch["off"].clone()
    dense, k = sampled_loss(logits, batch["owner"], off, batch["y"], weight)
    dense_grads = grads(dense)
    pairs = cut_pairs_torch(batch["block"], batch["owner"], batch["off"], 25)  # the per-sample path's input
    patch = F.cross_entropy(model(model.prepare(pairs)), batch["y"], weight=weight)
    patch_grads = grads(patch)
    assert k == len(batch["y"]) > 5
    # The same sums in another order (dilated convolutions over the block, against one patch at a time): float32
    # rounding only, ~1e-7 of each value.
    assert abs(dense.item() - patch.item()) <= 1e-5 * abs(patch.item())
    for a, b in zip(dense_grads, patch_grads):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-9
    # Control: the loss one voxel off (the wrong offsets) is far from it, so the bounds above can fail.
    shifted, _ = sampled_loss(logits.detach(), batch["owner"], (off + 1).clamp(max=BLOCK - 1), batch["y"], weight)
    assert abs(shifted.item() - patch.item()) > 1e-2 * abs(patch.item())


@pytest.mark.floats
def test_dense_loss_weighs_every_labelled_voxel_of_the_core(blocks):
    shards, manifest = blocks
    batch = _batch(shards, 2)
    torch.manual_seed(4)
    model = build_model(ModelConfig(batch_norm=False)).eval()
    w = torch.tensor(dense_weights(manifest, 0.437), dtype=torch.float32)
    with torch.no_grad():
        loss, count = dense_loss(DenseCNN(model)(model.prepare(batch["block"])), batch["labels"], w)
        # the oracle: every voxel of both cores classified patch by patch, the labelled ones weighted by hand
        owner, *axes = torch.meshgrid(torch.arange(2), *(torch.arange(BLOCK),) * 3, indexing="ij")
        owner, off = owner.reshape(-1), torch.stack([a.reshape(-1) for a in axes], 1)
        ce = F.cross_entropy(
            model(model.prepare(cut_pairs_torch(batch["block"], owner, off, 25))),
            batch["labels"][owner, 0, off[:, 0], off[:, 1], off[:, 2]].long(),
            reduction="none",
        )
    lesion, brain = (batch["labels"][owner, c, off[:, 0], off[:, 1], off[:, 2]].bool() for c in (0, 1))
    counted = lesion | brain
    per_voxel = torch.where(lesion, w[1], w[0]) * counted
    assert count == int(counted.sum()) > 100 and int(counted.sum()) < len(counted)  # the core's edge is outside
    assert abs(loss.item() - ((per_voxel * ce).sum() / counted.sum()).item()) <= 1e-5 * loss.item()
    # --voxel-weights draws: one weight a voxel, its expected draws (the records'), by the same sum
    plane = batch["draws"] * draws_scale(manifest, "")
    with torch.no_grad():
        loss, _ = dense_loss(DenseCNN(model)(model.prepare(batch["block"])), batch["labels"], plane)
    per_voxel = plane[owner, off[:, 0], off[:, 1], off[:, 2]]
    assert torch.equal(per_voxel > 0, counted)  # every labelled voxel is drawn with some chance
    assert abs(loss.item() - ((per_voxel * ce).sum() / counted.sum()).item()) <= 1e-5 * loss.item()


def test_dense_weights_give_the_lesion_share_and_the_prior(blocks, tmp_path):
    shards, manifest = blocks
    voxels = manifest["totals"]["voxels"]
    w0, w1 = dense_weights(manifest, 0.437)
    assert w1 * voxels["lesion"] / (w1 * voxels["lesion"] + w0 * voxels["background"]) == pytest.approx(0.437)
    assert (w0 * voxels["background"] + w1 * voxels["lesion"]) == pytest.approx(sum(voxels.values()))  # mean 1
    _quiet(_cfg(shards, tmp_path / "run", steps_per_epoch=2, voxel_weights="share", lesion_share=0.3))
    from evaluate.predictors import load_run

    pred = load_run(tmp_path / "run")
    w0, w1 = dense_weights(manifest, 0.3)
    lesion = sum(s["lesion_voxels"] for s in manifest["scans"])
    background = sum(s["background_voxels"] for s in manifest["scans"])
    expected = math.log((w1 * voxels["lesion"] / lesion) / (w0 * voxels["background"] / background))
    assert pred.prior_shift() == pytest.approx(expected) and abs(expected) > 1  # not the build's rates
    assert pred.prior_shift() != pytest.approx(math.log(manifest["config"]["lesion_rate"] / 0.01))


@pytest.fixture(scope="module")
def by_component(tiny_store, tmp_path_factory):
    """Blocks shards sampled by lesion component (the tiny store's lesions: 80 and 100 voxels): 270 draws a
    lesion, at most 3 a voxel."""
    out = tmp_path_factory.mktemp("dense-comp") / "blocks"
    return out, build_quietly(tiny_store, out, split="train", num_shards=2, component_samples=270, max_repeat=3)


def test_each_voxels_expected_draws_follow_its_lesion_component_in_the_store(tiny_store, by_component):
    from scipy import ndimage

    from atlas_shards import store as zstore
    from shards.reader import read_records
    from shards.sources import resolve

    shards, manifest = by_component
    root, pad = zstore.open_store(tiny_store), ((0, BLOCK),) * 3
    entries = {s["scan_id"]: s for s in manifest["scans"]}
    rates, totals = {}, [0.0, 0.0]
    for scan in entries:  # the oracle: each component's draws over its size, from the store's mask
        labels, n = ndimage.label(zstore.read_scan(root, scan, ("lesion",))["lesion"] > 0)
        sizes = np.bincount(labels.ravel())[1:]
        rates[scan] = np.pad(np.concatenate([[0], np.minimum(270, 3 * sizes) / sizes])[labels], pad)
    seen = set()
    for rec in read_records(resolve(str(shards))[0]):
        (i, j, k), e = rec["origin"].tolist(), entries[rec["scan"]]
        core = rates[rec["scan"]][i : i + BLOCK, j : j + BLOCK, k : k + BLOCK]
        lesion = rec["labels"][0].astype(bool)
        assert rec["draws"].dtype == np.float32 and np.allclose(rec["draws"], core[lesion], rtol=1e-6)
        assert rec["background_draws"] == pytest.approx((e["samples"] - e["lesion_samples"]) / e["background_voxels"])
        seen |= {round(float(v), 4) for v in rec["draws"]}
        totals[0] += float(rec["draws"].sum())
        totals[1] += rec["background_draws"] * int((rec["labels"][1].astype(bool) & ~lesion).sum())
    assert seen == {2.7, 3.0}  # 270 / 100 a voxel of the larger lesions; the smaller ones' capped at 3
    assert [manifest["totals"]["draws"][k] for k in ("lesion", "background")] == pytest.approx(totals, rel=1e-6)
    # every lesion voxel is drawn (rate > 1), so lies in a stored core: the expected lesion draws are the draws
    assert totals[0] == pytest.approx(manifest["totals"]["lesion_samples"], rel=1e-6)


def test_draws_weights_give_the_builds_prior(by_component, tmp_path):
    from evaluate.predictors import load_run
    from shards.manifest import sampling_rates

    shards, manifest = by_component
    _quiet(_cfg(shards, tmp_path / "dense", steps_per_epoch=2))  # --voxel-weights draws, the default
    draws = manifest["totals"]["draws"]
    lesion = sum(s["lesion_voxels"] for s in manifest["scans"])
    background = sum(s["background_voxels"] for s in manifest["scans"])
    expected = math.log((draws["lesion"] / lesion) / (draws["background"] / background))
    shift = load_run(tmp_path / "dense").prior_shift()
    assert shift == pytest.approx(expected)
    build = sampling_rates(manifest)  # the per-sample run's shift on the same shards: nearly the same
    assert abs(shift - math.log(build["lesion_rate"] / build["background_rate"])) < 0.15


def test_shards_without_voxel_labels_are_refused_by_name(blocks, tiny_store, tmp_path):
    shards, _ = blocks
    old = tmp_path / "v2"
    shutil.copytree(shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["schema_version"] = 2
    manifest["totals"].pop("voxels"), manifest["totals"].pop("draws")
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainError, match=f"{old}: blocks shards of schema version 2 carry no voxel labels"):
        _quiet(_cfg(old, tmp_path / "a"))
    manifest["schema_version"], manifest["totals"]["voxels"] = 3, {"lesion": 9, "background": 99}
    (old / "manifest.json").write_text(json.dumps(manifest))  # version 3: labels, no draws
    with pytest.raises(TrainError, match=f"{old}: .* version 3 carry no expected draws .* --voxel-weights share"):
        _quiet(_cfg(old, tmp_path / "a"))
    pairs = build_quietly(tiny_store, tmp_path / "pairs", split="train", num_shards=2, format="pairs")
    assert pairs["format"] == "pairs"
    with pytest.raises(TrainError, match="pairs shards; dense training needs blocks shards"):
        _quiet(_cfg(tmp_path / "pairs", tmp_path / "b"))
    with pytest.raises(TrainError, match="concat"):
        _quiet(_cfg(shards, tmp_path / "c", steps_per_epoch=1), ModelConfig(layout="concat"))
    with pytest.raises(TrainError, match="resnet2d"):
        _quiet(_cfg(shards, tmp_path / "d", steps_per_epoch=1), ModelConfig(name="resnet2d"))
    assert not (tmp_path / "a" / "last.pt").exists()


@pytest.mark.parametrize(
    "lost, message",
    [
        ({"labels.npy", "draws.npy"}, "a record of .* has no voxel labels"),
        ({"draws.npy"}, "a batch of blocks .* carries no expected draws"),
    ],
)
def test_a_block_without_labels_or_draws_is_one_line_naming_the_shards(blocks, tmp_path, lost, message):
    from shards.tario import iter_grouped, write_shard

    shards, manifest = blocks
    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    for shard in manifest["shards"]:  # every block loses them; the manifest still says version 4
        path = damaged / shard["name"]
        with open(path, "rb") as f:
            records = [(key, {k: v for k, v in fields.items() if k not in lost}) for key, fields in iter_grouped(f)]
        write_shard(path, records)
    before = {p.name: p.read_bytes() for p in damaged.iterdir()}
    with pytest.raises(TrainError, match=f"^{damaged}: {message}"):
        _quiet(_cfg(damaged, tmp_path / "run", steps_per_epoch=2))
    assert {p.name: p.read_bytes() for p in damaged.iterdir()} == before  # the inputs as they were


def test_flips_move_labels_and_sampled_offsets_with_their_block(blocks):
    shards, _ = blocks
    batch = _batch(shards, 4)
    draws = flip_draws(4, step_generator(0, 0, 1))
    assert any(d.any() for d in draws) and not all(d.all() for d in draws)
    x, labels = flip_pairs(batch["block"], None, batch["labels"], draws)
    off = flip_offsets(batch["off"], batch["owner"], BLOCK, draws)
    owner = batch["owner"]
    assert torch.equal(labels[owner, 0, off[:, 0], off[:, 1], off[:, 2]], batch["y"])  # each sample's label follows
    before = cut_pairs_torch(batch["block"], owner, batch["off"], 25)
    after = cut_pairs_torch(x, owner, off, 25)
    for axis, chosen in zip((2, 3, 4), draws):  # each pair is its old pair flipped along the block's axes
        before[chosen[owner]] = before[chosen[owner]].flip(axis)
    assert torch.equal(before, after)


@pytest.mark.floats
def test_dense_ctrl_c_and_resume_continue_exactly_with_workers(blocks, tmp_path, monkeypatch):
    shards, _ = blocks
    kw = dict(steps_per_epoch=4, epochs=2, workers=2, batch_size=2)  # the modern recipe: flips, jitter, batch norm
    straight = _quiet(_cfg(shards, tmp_path / "a", **kw))
    undo = interrupt_training_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        _quiet(_cfg(shards, tmp_path / "b", **kw))
    assert ckpt_io.load(tmp_path / "b")["step"] == 6
    undo()
    resumed = _quiet(_cfg(shards, tmp_path / "b", **kw), resume=True)
    assert resumed["steps"] == straight["steps"] == 8
    a, b = ckpt_io.load(tmp_path / "a")["model"], ckpt_io.load(tmp_path / "b")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same kernels, batches and draws: bit for bit


@pytest.fixture(scope="module")
def dense_sgd(blocks, tmp_path_factory):
    """A short dense SGD run (contiguous layout) and its initial weights: the reference of the layout tests."""
    shards, _ = blocks
    base = tmp_path_factory.mktemp("dense-sgd")
    kw = dict(steps_per_epoch=6, optimizer="sgd", lr=1e-2, recipe="paper", channels_last=False)
    _quiet(_cfg(shards, base / "run", **kw))
    torch.manual_seed(0)
    return {"init": build_model(ModelConfig(batch_norm=False)).state_dict(), "run": ckpt_io.load(base / "run")["model"]}


@pytest.mark.floats
@pytest.mark.parametrize("option, bound", [({"channels_last": True}, 1e-2), ({"amp": True}, 0.15)])
def test_channels_last_and_amp_train_the_same_dense_model(blocks, dense_sgd, tmp_path, option, bound):
    shards, _ = blocks
    kw = dict(steps_per_epoch=6, optimizer="sgd", lr=1e-2, recipe="paper", channels_last=False)
    _quiet(_cfg(shards, tmp_path / "x", **{**kw, **option}))
    got, run, init = ckpt_io.load(tmp_path / "x")["model"], dense_sgd["run"], dense_sgd["init"]
    gaps = [((got[k] - w).norm() / (w - init[k]).norm()).item() for k, w in run.items()]
    # Relative to how far training moved each tensor: the same model in another memory layout differs by float
    # rounding only; bf16 autocast rounds the forward to 8 bits of mantissa (as for patch training).
    assert max(gaps) < bound, gaps


@pytest.mark.floats
@pytest.mark.slow
def test_torchrun_two_ranks_dense(blocks, tmp_path):
    shards, manifest = blocks
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "trainer.cli", "fit", "--objective", "dense"]
    cmd += ["--shards", str(shards), "--out", str(tmp_path / "ddp"), "--batch-size", "2", "--recipe", "paper"]
    cmd += ["--optimizer", "sgd", "--lr", "1e-2", "--no-channels-last", "--workers", "1", "--log-every", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    audit = json.loads((tmp_path / "ddp" / "ranks.json").read_text())
    assert audit["identical_parameters"] and audit["samples_seen_by_two_ranks"] == 0
    steps = manifest["totals"]["records"] // (2 * 2)  # blocks split by rank, equal steps
    ckpt = ckpt_io.load(tmp_path / "ddp")
    assert ckpt["step"] == steps > 2

    # Oracle: the two ranks' block batches replayed in one process; DDP averages the ranks' gradients, so the
    # replay's loss is the mean of the two ranks' losses (each normalised by its own voxels' weight).
    kw = dict(seed=0, world_size=2, batches_per_epoch=steps, unit="blocks")
    pool = shuffle_pool(None, "blocks", "blocks", manifest["totals"]["records"], 2)  # fit's settings
    per_rank = [list(ShardStream(str(shards), 2, pool, rank=r, **kw)) for r in range(2)]
    blocks_seen = [{(s, *loc) for b in batches for s, loc in zip(b["scan"], b["loc"].tolist())} for batches in per_rank]
    assert not blocks_seen[0] & blocks_seen[1]
    scale = draws_scale(manifest, str(shards))  # --voxel-weights draws, the default

    def loss_of(model, pair):
        dense = DenseCNN(model)
        return sum(dense_loss(dense(model.prepare(b["block"])), b["labels"], b["draws"] * scale)[0] for b in pair) / 2

    init, both, one = replay_ranks(ckpt, per_rank, 1e-2, loss_of)
    gaps, control = {}, {}
    for key, value in ckpt["model"].items():
        moved = (value - init[key]).norm()
        assert moved > 0, key
        gaps[key] = ((value - both[key]).norm() / moved).item()
        control[key] = ((value - one[key]).norm() / moved).item()
    # float sums in another order only (as in the per-sample DDP test); control: one rank's batches alone, which
    # a DDP that did not average the ranks' gradients would give, lands far away
    assert max(gaps.values()) < 1e-3, gaps
    assert max(control.values()) > 0.3, control


def test_clip_grad_bounds_each_step_and_the_norm_is_logged(blocks, tmp_path):
    from trainer.logbook import read_rows

    shards, _ = blocks
    kw = dict(steps_per_epoch=3, optimizer="sgd", lr=1e-2, recipe="paper", log_every=1)
    _quiet(_cfg(shards, tmp_path / "free", **kw))
    _quiet(_cfg(shards, tmp_path / "clipped", clip_grad=1e-9, **kw))
    torch.manual_seed(0)
    init = build_model(ModelConfig(batch_norm=False)).state_dict()
    moved = {
        run: max((w - init[k]).abs().max().item() for k, w in ckpt_io.load(tmp_path / run)["model"].items())
        for run in ("free", "clipped")
    }
    # SGD: a step is lr x (momentum-summed) gradient, so a gradient clipped to norm 1e-9 moves no weight by more
    # than 3 steps x 1e-2 x 1e-9 x ~100 (Nesterov momentum 0.99)
    assert moved["clipped"] < 1e-8 < 1e-4 < moved["free"]
    for run in ("free", "clipped"):
        norms = [float(r["grad_norm"]) for r in read_rows(tmp_path / run / "metrics.csv")]
        assert len(norms) == 3 and min(norms) > 1e-6  # the norm before clipping


def test_heavy_blocks_repeat_with_their_weights_divided(by_component):
    shards, manifest = by_component
    plain = list(ShardStream(str(shards), batch_size=2, shuffle=0, unit="blocks"))
    repeated = list(ShardStream(str(shards), batch_size=2, shuffle=0, unit="blocks", heavy_repeat=4))
    blocks = lambda batches: sum(len(b["block"]) for b in batches)  # noqa: E731
    assert blocks(plain) == manifest["totals"]["records"] < blocks(repeated) <= 4 * blocks(plain)
    # the same expected loss: every block's draws, summed over its copies, as once without repeats
    total = lambda batches: sum(float(b["draws"].double().sum()) for b in batches)  # noqa: E731
    assert total(repeated) == pytest.approx(total(plain), rel=1e-5)
    assert total(plain) == pytest.approx(sum(manifest["totals"]["draws"].values()), rel=1e-5)
    peak = lambda batches: max(float(b["draws"].max()) for b in batches)  # noqa: E731
    assert peak(repeated) < peak(plain)  # the heavy blocks' voxels weigh less a copy
