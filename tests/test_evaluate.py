"""The evaluator: challenge metrics on toy arrays, dense == patch by patch, the run command's outputs."""

from __future__ import annotations

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import build_quietly
from evaluate.metrics import case_metrics, lesion_count_difference, lesion_f1, summarise
from shards.common.scores import dice
from evaluate.predictors import Predictor, TorchPredictor, load_run
from trainer.dense import DenseCNN
from evaluate.split import evaluate_split
from evaluate.volume import lesion_logits
from shards.norm import normalise
from shards.patches import PairCutter
from trainer import checkpoint as ckpt_io
from trainer.models import ModelConfig, build_model


def _vol(*boxes, shape=(12, 12, 12)):
    v = np.zeros(shape, bool)
    for b in boxes:
        v[b] = True
    return v


def test_dice_including_empty_cases():
    a = _vol(np.s_[0:2, 0:2, 0:2])
    b = _vol(np.s_[1:3, 0:2, 0:2])
    assert dice(a, b) == pytest.approx(2 * 4 / 16)
    assert dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 3))) == 1.0
    assert dice(np.zeros((3, 3, 3)), a[:3, :3, :3]) == 0.0


def test_lesion_f1_counts_components_with_6_connectivity():
    truth = _vol(np.s_[0:2, 0:2, 0:2], np.s_[6:8, 6:8, 6:8])  # two lesions
    pred = _vol(np.s_[1:2, 1:2, 1:2], np.s_[10:11, 0:1, 0:1])  # finds one, adds one elsewhere
    assert lesion_f1(pred, truth) == pytest.approx(1 / (1 + (1 + 1) / 2))  # TP 1, FP 1, FN 1
    assert lesion_f1(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    assert lesion_f1(pred, np.zeros_like(truth)) == 0.0
    assert lesion_f1(np.zeros_like(truth), truth) == 0.0
    diagonal = np.zeros((3, 3, 3), bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 0] = True  # touching by an edge only: two components
    assert lesion_count_difference(diagonal, np.zeros_like(diagonal)) == 2


def test_case_metrics_and_pooled_summary():
    truth = _vol(np.s_[0:2, 0:2, 0:2])  # 8 voxels
    pred = _vol(np.s_[0:2, 0:2, 0:1], np.s_[5:6, 5:6, 5:7])  # 4 right, 2 wrong, 2 components
    m = case_metrics(pred, truth, voxel_ml=0.5)
    assert m["dice"] == pytest.approx(8 / 14) and m["abs_volume_diff_voxels"] == 2 and m["abs_volume_diff_ml"] == 1.0
    assert m["precision"] == pytest.approx(4 / 6) and m["recall"] == pytest.approx(4 / 8)
    assert m["lesion_count_diff"] == 1 and m["lesion_f1"] == pytest.approx(1 / (1 + 0.5))
    empty = case_metrics(np.zeros_like(truth), truth)
    assert empty["dice"] == 0.0 and math.isnan(empty["precision"]) and empty["recall"] == 0.0
    s = summarise([m, empty])
    assert s["n_subjects"] == 2 and s["mean_dice"] == pytest.approx((8 / 14) / 2)
    assert s["pooled_dice"] == pytest.approx(2 * 4 / (2 * 4 + 2 + 12))
    assert s["precision"] == pytest.approx(4 / 6)  # pooled over voxels
    # small-lesion Dice: only the scans under 5 mL of lesion (m: 8 voxels of 0.5 mL = 4 mL; empty: 0.008 mL)
    assert m["true_ml"] == 4.0 and s["n_small"] == 2 and s["small_lesion_dice"] == pytest.approx((8 / 14) / 2)
    large = case_metrics(pred, truth, voxel_ml=1.0)  # the same scan at 8 mL
    s = summarise([large, empty])
    assert s["n_small"] == 1 and s["small_lesion_dice"] == 0.0
    assert math.isnan(summarise([large])["small_lesion_dice"])  # none small: undefined, not 0


def _predictor(name: str, seed: int, batch_norm: bool = False) -> Predictor:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name=name, batch_norm=batch_norm)).eval()
    for p in model.parameters():  # livelier than the default init, so differences would show
        p.data.mul_(3)
    for m in model.modules():  # running statistics far from the identity, so a fold that skipped them would show
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(2, 6)
    pre = {
        "norm": {"method": "histeq", "offset": 0.0, "scale": 1 / 255},
        "build": {"patch": 25, "lesion_rate": 1.0, "background_rate": 0.01},
    }
    return TorchPredictor(name, None, model.cfg.to_dict(), pre, model=model, dense=DenseCNN(model).eval())


@pytest.mark.floats
@pytest.mark.parametrize(
    "name, mirror, batch_norm",
    [("cnn3d", 14.5, False), ("cnn3d-sym", 14.5, False), ("cnn3d-sym", 11.0, False), ("cnn3d-sym", 14.5, True)],
)
def test_dense_equals_patch_by_patch(name, mirror, batch_norm):
    pred = _predictor(name, seed=1, batch_norm=batch_norm)
    rng = np.random.default_rng(2)
    t1 = rng.normal(100, 25, (30, 27, 26)).astype(np.float32)
    brain = np.zeros(t1.shape, np.uint8)
    brain[2:28, 3:25, 1:24] = 1
    dense = lesion_logits(pred, t1, brain, mirror, tile=10)  # tiles smaller than the box: overlaps tested
    centres = np.stack([rng.integers(s.start, s.stop, 400) for s in (slice(2, 28), slice(3, 25), slice(1, 24))], 1)
    pairs = PairCutter(normalise(t1, brain, "histeq"), mirror, 25)(centres)
    reference = pred.patch_logits(pairs)
    prob = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    # The same sums in another order (tiles, dilated kernels, another CPU's kernels): float32 rounding, about
    # 1e-7 of each sum; the bounds leave room for that only, as a shifted patch or a wrong dilation classifies
    # another patch.
    assert np.abs(prob(dense[tuple(centres.T)]) - prob(reference)).max() <= 1e-4
    assert np.abs(dense[tuple(centres.T)] - reference).max() < 1e-3
    assert np.isneginf(dense[0]).all() and np.isfinite(dense[2:28, 3:25, 1:24]).all()


def test_concat_layout_has_no_dense_twin():
    from trainer.registry import ModelError

    with pytest.raises(ModelError, match="patch-by-patch"):
        DenseCNN(build_model(ModelConfig(name="cnn3d-sym", layout="concat")))


def test_the_dense_form_is_the_model_itself_and_refuses_unknown_layers():
    from trainer.registry import ModelError

    model = build_model(ModelConfig(name="cnn3d-sym", batch_norm=True))
    dense = DenseCNN(model)
    assert {id(p) for p in dense.parameters()} == {id(p) for p in model.parameters()}  # shared, not copied
    x = torch.rand(1, 2, 27, 27, 27)
    before = dense.eval()(x)
    with torch.no_grad():
        model.fc2.bias.add_(1.0)  # a change to the patch model is a change to its dense form
    assert torch.allclose(dense(x)[:, 1] - before[:, 1], torch.ones(1))
    model.features[4] = torch.nn.Tanh()  # a layer the dense form does not know: refused, never read as a ReLU
    with pytest.raises(ModelError, match="Tanh"):
        DenseCNN(model)


def test_run_writes_documented_outputs(trained, tmp_path):
    store, run_dir = trained
    metrics = evaluate_split(run_dir, store, "test", tmp_path / "rep", progress=False, log=lambda m: None)
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    for key in (
        "model",
        "n_subjects",
        "mean_dice",
        "pooled_dice",
        "mean_lesion_f1",
        "mean_abs_volume_diff_voxels",
        "mean_lesion_count_diff",
        "precision",
        "recall",
        "threshold",
        "prior_correction",
    ):
        assert key in saved
    assert saved["model"] == "cnn3d-sym" and saved["n_subjects"] == 1 and saved["inference"] == "dense"
    assert saved["prior_correction"] is True and saved["prior_shift"] > 0
    assert metrics["by_hemisphere"]["right"]["n_subjects"] == 1
    mask = nib.load(tmp_path / "rep" / "masks" / "sub-005_ses-1_desc-lesion_mask.nii.gz")
    assert mask.shape == (31, 28, 24) and np.allclose(mask.affine, np.eye(4))
    data = np.asarray(mask.dataobj)
    assert set(np.unique(data)) <= {0, 1}
    rows = (tmp_path / "rep" / "subjects.csv").read_text().splitlines()
    assert rows[0].startswith("scan_id,subject_id,hemisphere") and len(rows) == 2
    assert (tmp_path / "rep" / "report.md").read_text().startswith("# Evaluation of cnn3d-sym")
    assert int(rows[1].split(",")[5]) == int(data.sum())  # predicted_voxels is what the NIfTI holds


def test_curve_scores_snapshots_as_run_does(trained, tmp_path):
    from evaluate.snapshots import volume_curve

    store, run_dir = trained
    run = evaluate_split(run_dir, store, "val", tmp_path / "rep", progress=False, log=lambda m: None)
    snapshots = tmp_path / "run" / ckpt_io.SNAPSHOTS
    snapshots.mkdir(parents=True)
    shutil.copy(run_dir / ckpt_io.LAST, snapshots / ckpt_io.snapshot_name(30))  # the same weights, as a snapshot
    rows = volume_curve(tmp_path / "run", store, tmp_path / "curve", progress=False, log=lambda m: None)
    assert [(r["step"], r["scans"]) for r in rows] == [(30, 1)]
    for key in ("mean_dice", "pooled_dice", "mean_lesion_f1", "precision", "recall"):
        assert rows[0][key] == pytest.approx(run[key], nan_ok=True)
    assert (tmp_path / "curve" / "volume-curve.png").stat().st_size > 1000
    again = volume_curve(tmp_path / "run", store, tmp_path / "curve", progress=False, log=print)  # nothing new
    assert [r["step"] for r in again] == ["30"] and float(again[0]["mean_dice"]) == pytest.approx(run["mean_dice"])


def test_a_failing_scan_is_reported_and_the_rest_go_on(trained, tmp_path):
    import shutil

    import zarr

    store, run_dir = trained
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    root = zarr.open_group(copy, mode="a")
    root.attrs["split"] = {**root.attrs["split"], "val": ["sub-004", "sub-005"]}
    del root["sub-004_ses-1"]["t1"]
    metrics = evaluate_split(run_dir, copy, "val", tmp_path / "rep", progress=False, log=lambda m: None)
    assert metrics["n_subjects"] == 1 and metrics["failed"] == ["sub-004_ses-1"]
    assert "failed" in (tmp_path / "rep" / "subjects.csv").read_text()


def test_load_run_refuses_what_is_not_a_run(tmp_path):
    from evaluate.predictors import EvaluateError

    with pytest.raises(EvaluateError, match="no checkpoint"):
        load_run(tmp_path)


@pytest.mark.slow
def test_predict_lands_on_the_input_grid_of_native_scans(native, trained, tmp_path, monkeypatch):
    """Every native orientation: the mask comes back on the file's own grid and affine, voxel for voxel."""
    import evaluate.predict as predict_mod
    from atlas_shards.orient import from_canonical, to_canonical

    release, truth, _, _ = native
    _, run_dir = trained
    scans = [s for s in truth["scans"] if s["labelled"] and not s.get("defect")]
    for scan in scans:
        t1_path = release / scan["t1"]
        img = nib.load(t1_path)
        lesion = np.zeros(img.shape[:3], bool)
        for m in scan["masks"]:
            lesion |= np.asarray(nib.load(release / m).dataobj) > 0
        canonical, _, transform = to_canonical(lesion.astype(np.uint8), img.affine)
        seen = {}

        def oracle(pred, t1, brain, mirror, tile=64, use_dense=True):
            assert t1.shape == canonical.shape
            seen["brain"] = brain > 0
            return np.where(canonical > 0, 20.0, -20.0).astype(np.float32)

        monkeypatch.setattr(predict_mod, "lesion_logits", oracle)
        out = tmp_path / f"{scan['scan_id']}.nii.gz"
        predict_mod.predict_file(run_dir, t1_path, out, prior_correction=False)
        mask = nib.load(out)
        assert mask.shape == img.shape[:3] and np.allclose(mask.affine, img.affine)
        got = np.asarray(mask.dataobj) > 0
        # exactly the planted lesion, where the (estimated) brain mask allows predictions
        expected = from_canonical((canonical > 0) & seen["brain"], transform, img.shape[:3]) > 0
        assert got.sum() > 0 and np.array_equal(got, expected) and not (got & ~lesion).any()
    monkeypatch.undo()
    real = tmp_path / "real.nii.gz"
    result = predict_mod.predict_file(run_dir, release / scans[0]["t1"], real)  # the trained model, end to end
    assert nib.load(real).shape == nib.load(release / scans[0]["t1"]).shape[:3] and result["space"] == "native"


def test_stream_scores_every_model_type(trained, tmp_path):
    from evaluate.stream import roc_auc_from_histograms, score_stream
    from trainer.forest import train_forest

    store, run_dir = trained
    build_quietly(store, tmp_path / "val", split="val", mode="natural", natural_rate=0.4, target_lesion_fraction=None)
    cnn = score_stream(run_dir, str(tmp_path / "val"), progress=False)
    manifest = json.loads((tmp_path / "val" / "manifest.json").read_text())
    assert (
        cnn["samples"] == manifest["totals"]["samples"]
        and cnn["lesion_samples"] == manifest["totals"]["lesion_samples"]
    )
    assert cnn["tp"] + cnn["fp"] + cnn["fn"] + cnn["tn"] == cnn["samples"] and 0 <= cnn["roc_auc"] <= 1
    train_forest(str(tmp_path / "val"), tmp_path / "rf", max_samples=300, workers=1, log=lambda m: None)
    rf = score_stream(tmp_path / "rf", str(tmp_path / "val"), progress=False)
    assert rf["model"] == "rf" and rf["samples"] == cnn["samples"]
    assert roc_auc_from_histograms(np.array([0, 0, 5]), np.array([5, 0, 0])) == 1.0
    assert roc_auc_from_histograms(np.array([0, 4, 0]), np.array([0, 4, 0])) == 0.5


def test_cli_run_compare_and_errors(trained, tmp_path):
    from click.testing import CliRunner

    from evaluate.cli import main

    store, run_dir = trained
    runner = CliRunner()
    r = runner.invoke(
        main,
        [
            "run",
            "--model",
            str(run_dir),
            "--store",
            str(store),
            "--split",
            "test",
            "--out",
            str(tmp_path / "rep"),
            "--threshold",
            "0.4",
            "--min-peak",
            "0.8",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "mean Dice" in r.output and (tmp_path / "rep" / "report.md").is_file()
    assert "peaking at >= 0.8" in r.output and "peaking at >= 0.8" in (tmp_path / "rep" / "report.md").read_text()
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["postprocessing"]["min_peak"] == 0.8
    r = runner.invoke(main, ["compare", str(tmp_path / "rep"), "--out", str(tmp_path / "ladder.md")])
    assert r.exit_code == 0 and "0.499" in (tmp_path / "ladder.md").read_text()
    r = runner.invoke(main, ["curve", "--model", str(run_dir), "--store", str(store), "--out", str(tmp_path / "c")])
    assert r.exit_code == 0 and "best mean Dice" in r.output and "at step 60 (1 points)" in r.output, r.output
    for args, message in [
        (["run", "--model", str(tmp_path), "--store", str(store), "--out", str(tmp_path / "x")], "no checkpoint"),
        (["run", "--model", str(run_dir), "--store", str(tmp_path), "--out", str(tmp_path / "x")], "Zarr"),
        (
            ["run", "--model", str(run_dir), "--store", str(store), "--out", str(tmp_path / "x"), "--threshold", "2"],
            "--threshold",
        ),
        (
            ["predict", "--model", str(run_dir), str(tmp_path / "none.nii.gz"), str(tmp_path / "o.nii.gz")],
            "no such file",
        ),
        (["compare", str(tmp_path)], "no metrics.json"),
        (
            ["run", "--model", str(run_dir), "--store", str(store), "--out", str(tmp_path / "x"), "--stride", "2"],
            "--stride is for models without a dense path",
        ),
        (
            ["curve", "--model", str(tmp_path / "c"), "--store", str(store), "--out", str(tmp_path / "y")],
            "no snapshots",
        ),
    ]:
        r = runner.invoke(main, args)
        assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, (args, r.output)


def test_post_processing_removes_small_components_and_fills_holes():
    from evaluate.postprocess import PostProcessing, choose, clean

    mask = np.zeros((12, 12, 12), bool)
    mask[2:7, 2:7, 2:7] = True  # 125 voxels with a hole in the middle
    mask[4, 4, 4] = False
    mask[10, 10, 10] = True  # a speck
    assert clean(mask, 2, False).sum() == 124 and not clean(mask, 2, False)[10, 10, 10]
    filled = clean(mask, 0, True)
    assert filled[4, 4, 4] and filled[10, 10, 10] and filled.sum() == 126
    truth = np.zeros_like(mask)
    truth[2:7, 2:7, 2:7] = True
    prob = np.where(mask, 0.8, 0.1)
    rule, used = choose([(prob, truth)], thresholds=(0.05, 0.5), min_components=(0, 2), fill=(False, True))
    assert used == 1 and rule == PostProcessing(0.5, 2, True)  # the only rule that gives Dice 1
    assert np.array_equal(rule.apply(prob), truth)


def test_min_peak_keeps_a_small_sure_lesion_where_a_size_limit_cannot():
    from evaluate.postprocess import MIN_PEAKS, PostProcessing, choose, clean

    truth = np.zeros((20, 20, 20), bool)
    truth[2:4, 2:4, 2:4] = True  # a small lesion (8 voxels) the model is sure of
    prob = np.where(truth, 0.95, 0.02)
    prob[10:15, 10:15, 10:12] = 0.6  # a bigger doubtful blob (50 voxels), not a lesion
    assert np.array_equal(clean(prob > 0.5, 0, False, prob, 0.9), truth)
    assert np.array_equal(PostProcessing(0.5, 0, False, 0.9).apply(prob), truth)
    assert PostProcessing(0.5, 0, False, 0.9).describe().endswith("at least 0 voxels peaking at >= 0.9, holes kept")
    # No size limit separates them (the blob is the larger); the peak does, and choose finds it.
    rule, _ = choose([(prob, truth)], thresholds=(0.5,), min_components=(0, 10, 100), min_peaks=MIN_PEAKS)
    assert rule == PostProcessing(0.5, 0, False, 0.7)  # the lowest peak that removes the blob
    size_only, _ = choose([(prob, truth)], thresholds=(0.5,), min_components=(0, 10, 100))  # the default: no peak
    assert size_only.min_peak == 0.0 and size_only.apply(prob).sum() > truth.sum()
    # A peak at or under the threshold is no limit: reported as none.
    rule, _ = choose([(truth * 0.9, truth)], thresholds=(0.5,), min_peaks=(0.0, 0.3, 0.8))
    assert rule.min_peak == 0.0


def test_choose_finds_what_applying_every_rule_finds():
    """The search scores rules from per-component counts; the oracle applies each rule to the volume."""
    import itertools

    from evaluate.postprocess import PostProcessing, choose

    rng = np.random.default_rng(3)
    scans = []
    for _ in range(3):
        prob = ndimage.gaussian_filter(rng.random((24, 24, 24)), 1.5)
        prob = (prob - prob.min()) / (prob.max() - prob.min())
        truth = ndimage.binary_dilation(prob > 0.7, iterations=rng.integers(0, 2)) & (rng.random(prob.shape) > 0.1)
        scans.append((prob, truth))
    grid = dict(thresholds=(0.3, 0.5, 0.6), min_components=(0, 5, 40), min_peaks=(0.0, 0.65, 0.8), fill=(False, True))
    best, best_score = None, -1.0
    for t, m, peak, f in itertools.product(*grid.values()):  # the documented tie order: first best wins
        rule = PostProcessing(t, m, f, peak if peak > t else 0.0)
        score = np.mean([dice(rule.apply(p), tr) for p, tr in scans])
        if score > best_score + 1e-12:
            best, best_score = rule, score
    chosen, used = choose(scans, **grid)
    assert used == 3 and chosen == best


def test_rule_of_an_older_report_has_no_peak(tmp_path):
    from evaluate.postprocess import PostProcessing, rule_of_report

    (tmp_path / "metrics.json").write_text('{"postprocessing": {"threshold": 0.3, "min_component": 5}}')
    assert rule_of_report(tmp_path) == PostProcessing(0.3, 5, False, 0.0)
    (tmp_path / "metrics.json").write_text('{"threshold": 0.4}')
    assert rule_of_report(tmp_path) == PostProcessing(0.4)


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"threshold": 1.5}, "postprocessing.threshold is 1.5, not a number in \\(0, 1\\)"),
        ({"threshold": "0.5"}, 'postprocessing.threshold is "0.5"'),
        ({"threshold": True}, "postprocessing.threshold is true"),
        ({"threshold": 0.5, "min_component": -3}, "postprocessing.min_component is -3, not a voxel count"),
        ({"threshold": 0.5, "min_component": 2.5}, "postprocessing.min_component is 2.5"),
        ({"threshold": 0.5, "fill_holes": "false"}, 'postprocessing.fill_holes is "false", not true or false'),
        ({"threshold": 0.5, "min_peak": 1.0}, "postprocessing.min_peak is 1.0"),
        ({"threshold": 0.5, "treshold": 0.2}, "postprocessing has unknown key\\(s\\) treshold"),
        ([0.5], "postprocessing is a JSON list"),
    ],
)
def test_a_rule_from_a_file_is_checked_like_its_options(tmp_path, rule, message):
    from evaluate.postprocess import rule_of_report

    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"postprocessing": rule}))
    before = path.read_bytes()
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        rule_of_report(tmp_path)
    assert path.read_bytes() == before


def test_a_rule_chosen_for_another_model_is_refused(tmp_path):
    from evaluate.postprocess import PostProcessing, rule_of_report

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "metrics.json").write_text(json.dumps({"postprocessing": {"threshold": 0.3}, "run_dir": "a"}))
    with pytest.raises(ValueError, match="a report of a, not of .*/b: its rule was chosen on another model"):
        rule_of_report(tmp_path, str(tmp_path / "b"))
    import os

    os.chdir(tmp_path)  # the report's run_dir is as the command gave it: relative to where it ran
    assert rule_of_report(tmp_path, (str(tmp_path / "a"),)) == PostProcessing(0.3)


class _CentreVoxel:
    """A predictor whose logit is the stored value of the voxel itself (an oracle for where each logit came from)."""

    name, patch, norm, dense = "centre", 5, {"method": "histeq", "offset": 0.0, "scale": 1 / 255}, None

    def patch_logits(self, pairs, batch=512):
        return pairs[:, 0, 2, 2, 2].astype(np.float64)


def test_stride_classifies_every_kth_voxel_and_fills_its_block(tiny_store):
    from atlas_shards import store as zstore

    data = zstore.read_scan(zstore.open_store(tiny_store), "sub-000_ses-1")
    pred = _CentreVoxel()
    full = lesion_logits(pred, data["t1"], data["brain"], 15.0, use_dense=False)
    coarse = lesion_logits(pred, data["t1"], data["brain"], 15.0, use_dense=False, stride=2)
    assert coarse.shape == full.shape
    brain = data["brain"] > 0
    np.testing.assert_array_equal(full[brain], normalise(data["t1"], data["brain"], "histeq")[brain])
    idx = np.indices(full.shape)
    corner = tuple(i // 2 * 2 for i in idx)
    np.testing.assert_array_equal(coarse, np.where(brain[corner], full[corner], -np.inf))


def test_overlays_show_the_lesion_and_the_largest_false_positive():
    from evaluate.report import overlay_slices

    truth = np.zeros((10, 10, 12), bool)
    truth[2:4, 2:4, 3] = True
    pred = truth.copy()
    pred[6, 6, 9] = True  # a one-voxel false positive at z=9
    pred[5:9, 5:9, 7:9] = True  # the largest one, widest at z=7 (and 8)
    assert overlay_slices(truth, pred) == [("lesion", 3), ("largest false positive", 7)]
    assert overlay_slices(truth, truth) == [("lesion", 3)]  # none: one slice


def test_training_curves_have_no_empty_validation_panel(tmp_path):
    from PIL import Image

    from trainer.logbook import plot

    rows = [{"step": s, "loss": 1 / s} for s in range(1, 5)]
    narrow = Image.open(plot(rows, tmp_path / "train.png")).size
    rows[-1].update(val_loss=0.5, val_dice=0.4)
    wide = Image.open(plot(rows, tmp_path / "both.png")).size
    assert narrow[0] < 0.7 * wide[0]  # one panel without validation, two with
