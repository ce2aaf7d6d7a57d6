"""The evaluator against independent oracles: prior correction, where the threshold comes from, both paths, scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import evaluate.split as split_mod
from atlas_shards import store as zstore
from conftest import build_quietly
from evaluate.predictors import load_run
from evaluate.split import evaluate_split
from shards.norm import normalise
from shards.patches import PairCutter

QUIET = dict(progress=False, log=lambda m: None)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _mask(report, scan_id: str) -> np.ndarray:
    return np.asarray(nib.load(report / "masks" / f"{scan_id}_desc-lesion_mask.nii.gz").dataobj) > 0


def _constant_logits(monkeypatch, value_of_scan):
    """Make every scan's lesion logit a constant inside its brain mask (``value_of_scan(scan_id, data)``)."""
    real = split_mod.scan_logits

    def oracle(pred, root, scan_id, tile, use_dense, stride=1):
        logits, data = real(pred, root, scan_id, tile, use_dense, stride)
        inside = np.isfinite(logits)
        return np.where(inside, value_of_scan(scan_id, data), -np.inf).astype(np.float32), data

    monkeypatch.setattr(split_mod, "scan_logits", oracle)


def test_prior_correction_subtracts_log_lesion_over_background_rate(trained, tmp_path, monkeypatch):
    store, run_dir = trained
    preprocessing = json.loads((run_dir / "config.json").read_text())["preprocessing"]
    build = preprocessing["build"]
    assert build["lesion_rate"] == 1.0 and 0 < build["background_rate"] < 1
    # By hand, from the training manifest's per-scan counts: every lesion voxel drawn (rate 1), and the
    # background at the rate actually drawn (the configured one, to per-scan rounding).
    scans = json.loads((Path(preprocessing["shards"]) / "manifest.json").read_text())["scans"]
    assert sum(s["lesion_samples"] for s in scans) == sum(s["lesion_voxels"] for s in scans)
    drawn = sum(s["samples"] - s["lesion_samples"] for s in scans) / sum(s["background_voxels"] for s in scans)
    assert drawn == pytest.approx(build["background_rate"], rel=0.02)
    shift = math.log(1.0 / drawn)
    assert load_run(run_dir).prior_shift() == pytest.approx(shift)
    # A logit between 0 and the shift: p > 0.5 uncorrected, p < 0.5 corrected (and > 0.5 if the sign were flipped).
    _constant_logits(monkeypatch, lambda scan_id, data: shift / 2)
    on = evaluate_split(run_dir, store, "test", tmp_path / "on", **QUIET)
    off = evaluate_split(run_dir, store, "test", tmp_path / "off", prior_correction=False, **QUIET)
    assert on["prior_shift"] == pytest.approx(shift) and on["prior_correction"] is True
    brain = zstore.read_scan(zstore.open_store(store), "sub-005_ses-1", ("brain",))["brain"] > 0
    assert not _mask(tmp_path / "on", "sub-005_ses-1").any()
    assert np.array_equal(_mask(tmp_path / "off", "sub-005_ses-1"), brain)  # identity grid in the tiny store
    assert off["prior_shift"] == 0.0


def test_auto_threshold_is_chosen_on_validation_scans_only(trained, tmp_path, monkeypatch):
    store, run_dir = trained
    root = zstore.open_store(store)
    val = set(split_mod.split_scans(root, "val"))
    assert val and not val & set(split_mod.split_scans(root, "test"))

    # val: lesion p 0.32, rest 0.02 -> every threshold in [0.05, 0.30] is perfect; the first, 0.05, is kept.
    # test: lesion p 0.97, rest 0.52 -> only thresholds >= 0.55 are perfect there.
    def value(scan_id, data):
        lesion = data["lesion"] > 0
        hi, lo = (0.32, 0.02) if scan_id in val else (0.97, 0.52)
        return np.where(lesion, _logit(hi), _logit(lo))

    _constant_logits(monkeypatch, value)
    metrics = evaluate_split(run_dir, store, "test", tmp_path / "t", threshold="auto", prior_correction=False, **QUIET)
    assert metrics["threshold"] == 0.05 and metrics["threshold_source"] == "chosen on the validation split"
    assert metrics["mean_dice"] < 0.5  # on test, 0.05 lets the whole brain through: chosen on test it would be 1.0
    on_val = evaluate_split(run_dir, store, "val", tmp_path / "v", threshold="auto", prior_correction=False, **QUIET)
    assert on_val["threshold"] == 0.05 and on_val["mean_dice"] == 1.0


@pytest.mark.floats
def test_patch_by_patch_run_equals_the_dense_run(trained, tmp_path):
    store, run_dir = trained
    kw = dict(prior_correction=False, save_probabilities=True, **QUIET)
    dense = evaluate_split(run_dir, store, "val", tmp_path / "dense", **kw)
    patchwise = evaluate_split(run_dir, store, "val", tmp_path / "patch", use_dense=False, **kw)
    assert dense["inference"] == "dense" and patchwise["inference"] == "patch by patch"
    for scan_id in split_mod.split_scans(zstore.open_store(store), "val"):
        a, b = _mask(tmp_path / "dense", scan_id), _mask(tmp_path / "patch", scan_id)
        assert a.any() and np.array_equal(a, b)
        name = f"masks/{scan_id}_desc-lesion_probability.nii.gz"
        pa, pb = (np.asarray(nib.load(d / name).dataobj) for d in (tmp_path / "dense", tmp_path / "patch"))
        assert np.abs(pa - pb).max() <= 1e-4 and 0.01 < pa.max()  # float32 sums in another order
    for key in ("mean_dice", "pooled_dice", "mean_lesion_f1", "precision", "recall"):
        assert dense[key] == pytest.approx(patchwise[key])


def test_forest_run_predicts_each_brain_voxel_from_its_own_slice(trained, tmp_path):
    """rf has no dense path: ``run`` classifies every brain voxel's pair; check against the forest on cut pairs."""
    from trainer.forest import ForestModel, slice_features, train_forest

    store, _ = trained
    build_quietly(store, tmp_path / "train", split="train", num_shards=2)
    train_forest(str(tmp_path / "train"), tmp_path / "rf", max_samples=400, workers=1, log=lambda m: None)
    metrics = evaluate_split(tmp_path / "rf", store, "test", tmp_path / "rep", prior_correction=False, **QUIET)
    assert metrics["inference"] == "patch by patch"
    root = zstore.open_store(store)
    scan_id = "sub-005_ses-1"
    data = zstore.read_scan(root, scan_id)
    vol = normalise(data["t1"], data["brain"], "histeq")
    grid = np.argwhere(data["brain"] > 0)
    pairs = PairCutter(vol, root[scan_id].attrs["mirror_index"], 25)(grid)
    forest = ForestModel.load(tmp_path / "rf")
    expected = np.zeros(vol.shape, bool)
    expected[tuple(grid.T)] = forest.predict_proba(slice_features(pairs))[:, 1] > 0.5
    assert np.array_equal(_mask(tmp_path / "rep", scan_id), expected)


def test_stream_scores_equal_a_direct_computation(trained, tmp_path):
    from evaluate.stream import score_stream
    from shards.reader import ShardStream

    store, run_dir = trained
    build_quietly(store, tmp_path / "val", split="val", mode="natural", natural_rate=0.4, target_lesion_fraction=None)
    got = score_stream(run_dir, str(tmp_path / "val"), threshold=0.5, progress=False)
    pred = load_run(run_dir, dense=False)
    ys, ps = [], []
    for batch in ShardStream(str(tmp_path / "val"), batch_size=100, shuffle=0):
        ps.append(1 / (1 + np.exp(-pred.patch_logits(batch["x"].numpy()))))
        ys.append(batch["y"].numpy() == 1)
    y, hit = np.concatenate(ys), np.concatenate(ps) > 0.5
    tp, fp, fn = int((hit & y).sum()), int((hit & ~y).sum()), int((~hit & y).sum())
    assert (got["tp"], got["fp"], got["fn"]) == (tp, fp, fn) and tp > 0
    assert got["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert got["precision"] == pytest.approx(tp / (tp + fp)) and got["recall"] == pytest.approx(tp / (tp + fn))


def test_masks_land_on_a_rotated_original_grid(trained, tmp_path, monkeypatch):
    """A scan stored from a PIR file: the written mask, brought to RAS by nibabel, is the canonical prediction."""
    import shutil

    import zarr
    from nibabel import orientations as nio

    store, run_dir = trained
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    scan_id = "sub-005_ses-1"
    group = zarr.open_group(copy, mode="a")[scan_id]
    canonical_shape = tuple(group["t1"].shape)  # (31, 28, 24) in RAS
    # The original file's voxel axes run Posterior, Inferior, Right (2 mm, offset): a permutation with flips.
    affine = np.array([[0, 0, 2.0, -30], [-2.0, 0, 0, 27], [0, -2.0, 0, 23], [0, 0, 0, 1]])
    original_shape = (canonical_shape[1], canonical_shape[2], canonical_shape[0])
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(("R", "A", "S")))
    group.attrs.update(
        {
            "original_affine": affine.tolist(),
            "original_shape": list(original_shape),
            "canonical_transform": transform.tolist(),
        }
    )
    pattern = np.random.default_rng(3).random(canonical_shape) < 0.3  # asymmetric, so any flip or swap shows
    _constant_logits(monkeypatch, lambda s, data: np.where(pattern, 20.0, -20.0))
    evaluate_split(run_dir, copy, "test", tmp_path / "rep", prior_correction=False, **QUIET)
    img = nib.load(tmp_path / "rep" / "masks" / f"{scan_id}_desc-lesion_mask.nii.gz")
    assert img.shape == original_shape and np.allclose(img.affine, affine)
    ras = nib.as_closest_canonical(img)
    brain = zstore.read_scan(zstore.open_store(copy), scan_id, ("brain",))["brain"] > 0
    assert np.array_equal(np.asarray(ras.dataobj) > 0, pattern & brain) and (pattern & brain).any()


def test_post_processing_is_chosen_on_validation_scans_only(trained, tmp_path, monkeypatch):
    """Val: the lesion plus isolated specks (removing components under 10 voxels is perfect there).
    Test: the lesion as a checkerboard of single voxels, which that rule removes: chosen on test, it would not be."""
    from evaluate.postprocess import PostProcessing, choose, rule_of_report

    store, run_dir = trained
    root = zstore.open_store(store)
    val = set(split_mod.split_scans(root, "val"))
    x, y, z = np.indices(zstore.read_scan(root, sorted(val)[0], ("brain",))["brain"].shape)
    specks = (x % 7 == 0) & (y % 7 == 0) & (z % 7 == 0)
    board = (x + y + z) % 2 == 0
    probability = {}

    def value(scan_id, data):
        lesion, brain = data["lesion"] > 0, data["brain"] > 0
        if scan_id in val:
            far = ~ndimage.binary_dilation(lesion, iterations=2)
            hot = lesion | (specks & brain & far)
        else:
            hot = lesion & board
        probability[scan_id] = (np.where(hot, 0.9, 0.02), lesion)
        return np.where(hot, _logit(0.9), _logit(0.02))

    _constant_logits(monkeypatch, value)
    metrics = evaluate_split(run_dir, store, "test", tmp_path / "t", threshold="auto", prior_correction=False, **QUIET)
    rule = PostProcessing(0.05, 10, False)
    assert metrics["postprocessing"] == {**rule.to_dict(), "source": "chosen on the validation split"}
    assert metrics["mean_dice"] == 0.0  # every test component is one voxel: the val rule removes them all
    test_ids = set(split_mod.split_scans(root, "test"))
    on_test, _ = choose(probability[s] for s in test_ids)
    assert on_test.min_component == 0  # what choosing on test would have done (and scored better)
    assert rule_of_report(tmp_path / "t") == rule  # what `predict --rule-from` applies
