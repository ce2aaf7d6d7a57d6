"""Ensembles (``atlas-evaluate run/predict --model A --model B``): the mean of the runs' prior-corrected logits."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy.special import expit

from conftest import random_cnn_predictor, random_volume
from evaluate.cli import main
from evaluate.ensemble import Ensemble, load_models
from evaluate.predictors import EvaluateError
from evaluate.split import evaluate_split, scan_logits
from evaluate.volume import lesion_logits
from atlas_shards import store as zstore
from trainer import checkpoint as ckpt_io


@pytest.mark.floats
def test_the_ensemble_is_the_mean_logit_and_the_mean_shift():
    a, b = random_cnn_predictor(1, background_rate=0.01), random_cnn_predictor(2, background_rate=0.002)
    ens = Ensemble([a, b])
    assert ens.name == "cnn3d-sym x2" and ens.dense is not None
    assert ens.prior_shift() == pytest.approx((a.prior_shift() + b.prior_shift()) / 2)
    assert a.prior_shift() != pytest.approx(b.prior_shift())
    t1, brain = random_volume()
    inside = brain > 0
    la, lb, le = (lesion_logits(p, t1, brain, 13.5, tile=12)[inside] for p in (a, b, ens))
    assert np.abs(la - lb).max() > 1  # the members disagree, so a wrong mean would show
    np.testing.assert_allclose(le, (la + lb) / 2, rtol=0, atol=1e-4)  # the members' float32 logits, re-summed
    # what the evaluator computes from it: the mean of each member's corrected logit
    corrected = ((la - a.prior_shift()) + (lb - b.prior_shift())) / 2
    np.testing.assert_allclose(expit(le - ens.prior_shift()), expit(corrected), atol=1e-5)
    pairs = np.random.default_rng(4).integers(0, 256, (5, 2, 25, 25, 25), dtype=np.uint8)
    np.testing.assert_allclose(
        ens.patch_logits(pairs), (a.patch_logits(pairs) + b.patch_logits(pairs)) / 2, rtol=0, atol=1e-9
    )


def test_an_ensemble_goes_patch_by_patch_unless_every_member_is_dense():
    ens = Ensemble([random_cnn_predictor(1), random_cnn_predictor(2, layout="concat")])
    assert ens.dense is None


def test_members_must_read_the_same_input():
    with pytest.raises(EvaluateError, match="must read the same input"):
        Ensemble([random_cnn_predictor(1), random_cnn_predictor(2, norm="zscore")])
    with pytest.raises(EvaluateError, match="at least two"):
        Ensemble([random_cnn_predictor(1)])


@pytest.fixture(scope="module")
def two_runs(trained, tmp_path_factory):
    """(store, run a, run b): the trained run and a copy whose last layer's weights were changed."""
    store, run_a = trained
    run_b = tmp_path_factory.mktemp("ens") / "run-b"
    shutil.copytree(run_a, run_b)
    ckpt = ckpt_io.load(run_b)
    last = [k for k in ckpt["model"] if k.endswith("weight")][-1]
    ckpt["model"][last] = ckpt["model"][last] * 0.5 + 0.2
    ckpt_io.save(run_b / ckpt_io.LAST, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    return store, run_a, run_b


@pytest.mark.floats
def test_run_scores_the_ensemble_and_says_so(two_runs, tmp_path):
    store, run_a, run_b = two_runs
    metrics = evaluate_split(
        [run_a, run_b], store, "test", tmp_path / "rep", save_probabilities=True, progress=False, log=lambda m: None
    )
    assert metrics["model"] == "cnn3d-sym x2" and metrics["run_dir"] == [str(run_a), str(run_b)]
    assert metrics["inference"] == "dense"
    report = (tmp_path / "rep" / "report.md").read_text()
    assert report.startswith("# Evaluation of cnn3d-sym x2") and "Ensemble of 2 runs" in report
    root = zstore.open_store(store, "r")
    scan = zstore.split_scans(root, "test")[0]
    members = [load_models(r) for r in (run_a, run_b)]
    (la, data), (lb, _) = (scan_logits(m, root, scan, 64, True) for m in members)
    inside = data["brain"] > 0
    assert np.abs(la[inside] - lb[inside]).max() > 0.1
    expected = expit(((la - members[0].prior_shift()) + (lb - members[1].prior_shift())) / 2)
    saved = nib.load(tmp_path / "rep" / "masks" / f"{scan}_desc-lesion_probability.nii.gz").get_fdata()
    assert saved.shape == expected.shape
    np.testing.assert_allclose(saved[inside], expected[inside], atol=1e-5)
    assert metrics["prior_shift"] == pytest.approx((members[0].prior_shift() + members[1].prior_shift()) / 2)


def test_cli_takes_several_models_and_refuses_one_given_twice(two_runs, tmp_path):
    store, run_a, run_b = two_runs
    args = ["run", "--model", str(run_a), "--model", str(run_b), "--store", str(store), "--split", "test"]
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert "cnn3d-sym x2 on test: 1 scans" in r.output
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["run_dir"] == [str(run_a), str(run_b)]
    twice = ["run", "--model", str(run_a), "--model", str(run_a), "--store", str(store), "--out", str(tmp_path / "x")]
    r = CliRunner().invoke(main, twice)
    assert r.exit_code != 0 and "given twice" in r.output


def test_predict_with_an_ensemble(native, two_runs, tmp_path, monkeypatch):
    """predict hands both runs to the volume predictor as one ensemble (its arithmetic is tested above)."""
    import evaluate.predict as predict_mod

    release, truth, _, _ = native
    _, run_a, run_b = two_runs
    scan = next(s for s in truth["scans"] if s["labelled"] and not s.get("defect"))
    seen = {}

    def fake(pred, t1, brain, mirror, tile=64, use_dense=True):
        seen["pred"] = pred
        return np.where(brain > 0, 30.0, -np.inf).astype(np.float32)  # lesion everywhere in the brain

    monkeypatch.setattr(predict_mod, "lesion_logits", fake)
    args = ["predict", "--model", str(run_a), "--model", str(run_b), str(release / scan["t1"])]
    r = CliRunner().invoke(main, args + [str(tmp_path / "mask.nii.gz")])
    assert r.exit_code == 0, r.output
    pred = seen["pred"]
    assert isinstance(pred, Ensemble) and [m.run_dir for m in pred.members] == [run_a, run_b]
    assert nib.load(tmp_path / "mask.nii.gz").shape == nib.load(release / scan["t1"]).shape[:3]
