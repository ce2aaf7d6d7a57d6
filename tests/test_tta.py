"""Test-time flips (``atlas-evaluate run/predict --tta-flips``): the mean logit over mirrored copies of the input."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import random_cnn_predictor, random_volume
from evaluate.cli import main
from evaluate.ensemble import load_models
from evaluate.predictors import EvaluateError
from evaluate.split import evaluate_split
from evaluate.tta import FlipAveraged, parse_flips
from evaluate.volume import lesion_logits

pytestmark = pytest.mark.floats  # every test here compares logits computed two ways


def test_dense_flips_equal_each_pair_flipped():
    """Flipping the padded tile flips both cubes of every pair in it: the dense path equals the pair path."""
    base = random_cnn_predictor(1)
    tta = FlipAveraged(base, (0, 2))
    assert tta.combos == [(), (0,), (2,), (0, 2)] and tta.dense is not None
    t1, brain = random_volume()
    brain[:, :, 4:] = 0  # a slab: the pair path costs 4 predictions a voxel
    inside = brain > 0
    dense = lesion_logits(tta, t1, brain, 12.0, tile=10)[inside]  # uneven tiles: edges of every kind
    pairs = lesion_logits(tta, t1, brain, 12.0, use_dense=False)[inside]
    np.testing.assert_allclose(dense, pairs, rtol=0, atol=1e-4)  # float32 sums in another order
    plain = lesion_logits(base, t1, brain, 12.0, tile=10)[inside]
    assert np.abs(dense - plain).max() > 0.1  # the flips change the answer, so a skipped flip would show


@pytest.mark.parametrize("axes, flipped", [((0,), 0), ((0, 2), 0), ((1,), 1), ((0, 1, 2), 2)])
def test_the_flip_average_follows_a_mirrored_head(axes, flipped):
    """Averaged over a group of flips that holds axis ``flipped``, the prediction for the head mirrored along it
    is the mirrored prediction: every voxel's pair in the mirrored head is its pair flipped (left-right: the
    mirror plane moves with the head)."""
    tta = FlipAveraged(random_cnn_predictor(2), axes)
    t1, brain = random_volume()
    mirror = 12.0
    here = lesion_logits(tta, t1, brain, mirror, tile=12)
    moved = mirror if flipped else t1.shape[0] - 1 - mirror
    there = lesion_logits(tta, np.flip(t1, flipped).copy(), np.flip(brain, flipped).copy(), moved, tile=12)
    inside = brain > 0
    np.testing.assert_allclose(np.flip(there, flipped)[inside], here[inside], rtol=0, atol=1e-4)  # sums reordered


def test_without_the_flip_in_the_group_a_mirrored_head_differs():
    """The control for the test above: with no averaging, mirroring the head changes the prediction."""
    base = random_cnn_predictor(2)
    t1, brain = random_volume()
    here = lesion_logits(base, t1, brain, 12.0, tile=12)
    there = lesion_logits(base, np.flip(t1, 1).copy(), np.flip(brain, 1).copy(), 12.0, tile=12)
    assert np.abs(np.flip(there, 1)[brain > 0] - here[brain > 0]).max() > 0.1


@pytest.mark.parametrize("flips, axes", [(None, ()), ("none", ()), ("x", (0,)), ("zx", (0, 2)), ("xyz", (0, 1, 2))])
def test_parse_flips(flips, axes):
    assert parse_flips(flips) == axes


@pytest.mark.parametrize("flips", ["q", "xx", "x,y", "X"])
def test_bad_flips_are_refused(flips):
    with pytest.raises(EvaluateError, match="distinct axes among x, y, z"):
        parse_flips(flips)


def test_run_with_flips_records_them_and_predict_takes_them_from_the_report(trained, native, tmp_path, monkeypatch):
    import evaluate.predict as predict_mod

    store, run = trained
    quiet = {"progress": False, "log": lambda m: None, "save_probabilities": True}
    plain = evaluate_split(run, store, "test", tmp_path / "plain", **quiet)
    flipped = evaluate_split(run, store, "test", tmp_path / "flips", tta_flips=(0,), **quiet)
    assert (plain["tta_flips"], flipped["tta_flips"]) == ("none", "x")
    assert flipped["inference"] == "dense, mean over flips x" and "flips x" in flipped["model"]
    assert json.loads((tmp_path / "flips" / "metrics.json").read_text())["tta_flips"] == "x"
    name = next((tmp_path / "flips" / "masks").glob("*_desc-lesion_probability.nii.gz")).name
    a, b = (nib.load(tmp_path / d / "masks" / name).get_fdata() for d in ("plain", "flips"))
    assert np.abs(a - b).max() > 1e-5  # the flipped copy was predicted and averaged in (the same path: 0 apart)

    release, truth, _, _ = native
    scan = next(s for s in truth["scans"] if s["labelled"] and not s.get("defect"))
    seen = {}

    def fake(pred, t1, brain, mirror, tile=64, use_dense=True):
        seen["pred"] = pred
        return np.where(brain > 0, 30.0, -np.inf).astype(np.float32)

    monkeypatch.setattr(predict_mod, "lesion_logits", fake)
    args = ["predict", "--model", str(run), str(release / scan["t1"]), str(tmp_path / "mask.nii.gz")]
    r = CliRunner().invoke(main, args + ["--rule-from", str(tmp_path / "flips")])
    assert r.exit_code == 0, r.output
    assert "test-time flips x" in r.output and seen["pred"].axes == (0,)
    r = CliRunner().invoke(main, args + ["--rule-from", str(tmp_path / "flips"), "--tta-flips", "none"])
    assert r.exit_code == 0 and not isinstance(seen["pred"], FlipAveraged)  # given on the command line: it wins
    r = CliRunner().invoke(main, args + ["--tta-flips", "xq"])
    assert r.exit_code != 0 and "distinct axes" in r.output and "Traceback" not in r.output


def test_flips_wrap_an_ensemble(trained, tmp_path):
    store, run = trained
    other = tmp_path / "copy"
    shutil.copytree(run, other)
    pred = load_models([run, other], tta_flips=(1,))
    assert isinstance(pred, FlipAveraged) and pred.name == "cnn3d-sym x2 (flips y)" and pred.dense is not None
