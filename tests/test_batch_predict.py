"""Batch prediction: a folder (or glob) of T1 files, the model loaded once, each mask on its input's grid and
named after it; a store's unlabelled scans segmented, unscored."""

from __future__ import annotations

import csv
import shutil

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from atlas_shards import store as zstore
from evaluate.batch import mask_name, predict_many, segment_store
from evaluate.postprocess import PostProcessing


@pytest.mark.parametrize(
    "name, mask",
    [
        ("sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz", "sub-r001s001_ses-1_space-MNI152NLin2009aSym"),
        ("scan.nii", "scan"),
        ("031768_t1w_deface_stx.nii.gz", "031768_t1w_deface_stx"),
    ],
)
def test_mask_names_follow_their_input(name, mask):
    assert mask_name(f"/data/{name}") == f"{mask}_desc-lesion_mask.nii.gz"


@pytest.fixture()
def folder(trained, tmp_path):
    """Two T1 files of the tiny store (one with a rotated, shifted affine; one uncompressed), a damaged one and
    a text file."""
    store = zstore.open_store(trained[0], "r")
    rotated = np.array([[0, -1, 0, 40], [1, 0, 0, -3], [0, 0, 2, 5], [0, 0, 0, 1]], float)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for scan, name, affine in (("sub-004_ses-1", "a_T1w.nii.gz", np.eye(4)), ("sub-005_ses-1", "b_T1w.nii", rotated)):
        nib.save(nib.Nifti1Image(zstore.read_scan(store, scan)["t1"], affine), inputs / name)
    (inputs / "c_T1w.nii.gz").write_bytes(b"not an image")
    (inputs / "notes.txt").write_text("not a scan")
    return inputs


def test_a_folder_is_segmented_with_one_model_load_each_mask_on_its_grid(trained, folder, tmp_path, monkeypatch):
    import evaluate.batch

    loads = []
    real = evaluate.batch.load_models
    monkeypatch.setattr(evaluate.batch, "load_models", lambda *a, **k: loads.append(1) or real(*a, **k))
    said = []
    rows = predict_many(trained[1], folder, tmp_path / "out", log=said.append, space="native")
    assert len(loads) == 1
    assert [r["status"] for r in rows] == ["ok", "ok", rows[2]["status"]] and "c_T1w.nii.gz" in rows[2]["status"]
    for t1, name in (("a_T1w.nii.gz", "a_desc-lesion_mask.nii.gz"), ("b_T1w.nii", "b_desc-lesion_mask.nii.gz")):
        mask, image = nib.load(tmp_path / "out" / name), nib.load(folder / t1)
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)  # the input's own grid
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    with open(tmp_path / "out" / "predictions.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["mask"] for r in table] == ["a_desc-lesion_mask.nii.gz", "b_desc-lesion_mask.nii.gz", ""]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a_desc-lesion_mask.nii.gz",
        "b_desc-lesion_mask.nii.gz",
        "predictions.csv",
    ]


def test_the_cli_takes_a_glob_and_exits_1_when_a_scan_failed(trained, folder, tmp_path):
    from evaluate.cli import main

    runner = CliRunner()
    done = runner.invoke(
        main, ["predict", "--model", str(trained[1]), str(folder / "[ab]_T1w.nii*"), str(tmp_path / "g")]
    )
    assert done.exit_code == 0, done.output
    assert "2 of 2 scans segmented" in done.output
    done = runner.invoke(main, ["predict", "--model", str(trained[1]), str(folder), str(tmp_path / "all")])
    assert done.exit_code == 1 and "2 of 3 scans segmented" in done.output
    done = runner.invoke(
        main, ["predict", "--model", str(trained[1]), str(tmp_path / "g" / "none*"), str(tmp_path / "x")]
    )
    assert done.exit_code == 1 and "no NIfTI files" in done.output


def test_a_stores_unlabelled_scans_are_segmented_unscored(trained, tmp_path):
    from evaluate.cli import main

    store = tmp_path / "store.zarr"
    shutil.copytree(trained[0], store)
    root = zstore.open_store(store, "a")
    root.attrs["unlabelled_scans"] = ["sub-005_ses-1"]  # as a release's Testing scan
    rows = segment_store(trained[1], store, tmp_path / "seg", rule=PostProcessing(0.5), progress=False, log=print)
    assert [(r["input"], r["status"]) for r in rows] == [("sub-005_ses-1", "ok")]
    mask = nib.load(tmp_path / "seg" / rows[0]["mask"])
    assert rows[0]["mask"] == "masks/sub-005_ses-1_desc-lesion_mask.nii.gz" and mask.shape == (31, 28, 24)
    assert not (tmp_path / "seg" / "metrics.json").exists()  # nothing scored
    done = CliRunner().invoke(
        main,
        [
            "segment",
            "--model",
            str(trained[1]),
            "--store",
            str(store),
            "--out",
            str(tmp_path / "auto"),
            "--threshold",
            "auto",
        ],
    )
    assert done.exit_code == 0 and "chosen on the validation split" in done.output, done.output
    assert "1 of 1 unlabelled scans segmented" in done.output
    done = CliRunner().invoke(
        main, ["segment", "--model", str(trained[1]), "--store", str(trained[0]), "--out", str(tmp_path / "none")]
    )
    assert done.exit_code == 1 and "no unlabelled scans" in done.output
