"""Odd paths and outputs: names that are not UTF-8, masks that are not NIfTI, report directories used twice, shard
counts that cannot be met."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from atlas_shards import store as zstore
from atlas_shards.discover import discover
from atlas_shards.ingest import ingest
from conftest import build_quietly
from evaluate.predictors import EvaluateError
from evaluate.split import evaluate_split


def test_names_that_are_not_utf8_are_named_escaped_and_skipped(r11, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(r11[0], release)
    scan_dir = next(p.parent for p in sorted(release.rglob("*_t1w_*.nii.gz")))
    odd_file = os.path.join(os.fsencode(scan_dir), b"sub-r\xe9sum\xe9_T1w.nii.gz")
    odd_dir = os.path.join(os.fsencode(release), b"sub-\xff")
    with open(odd_file, "wb") as f:
        f.write(b"not read")
    os.makedirs(os.path.join(odd_dir, b"ses-1"))
    skipped = []
    sources = discover(release, skipped=skipped)
    assert sorted(skipped) == sorted(
        [
            f"{scan_dir}/sub-r\\xe9sum\\xe9_T1w.nii.gz: skipped, its name is not UTF-8",
            f"{release}/sub-\\xff: skipped, its name is not UTF-8",
        ]
    )
    assert all(s.scan_id.encode() for s in sources)  # every name left is text
    summary = ingest(release, tmp_path / "store.zarr", progress=False)
    assert skipped[0] in summary.notes and skipped[1] in summary.notes
    root = zstore.open_store(tmp_path / "store.zarr", "r")
    assert skipped[0] in root.attrs["metadata_notes"]  # the store's JSON holds them, escaped
    manifest = build_quietly(tmp_path / "store.zarr", tmp_path / "shards", split="train", num_shards=1)
    assert manifest["totals"]["samples"] > 0  # and later builds read the store as usual


def test_predict_writes_nifti_only(trained, r11, tmp_path):
    from evaluate.predict import predict_file

    t1 = next(sorted(r11[0].rglob("*_t1w_*.nii.gz")).__iter__())
    for name in ("mask.png", "mask.nii.gz.tmp", "mask"):
        with pytest.raises(EvaluateError, match=f"{tmp_path / name}: a mask is written as NIfTI"):
            predict_file(trained[1], t1, tmp_path / name)
    with pytest.raises(EvaluateError, match="probabilities.npy: a mask is written as NIfTI"):
        predict_file(trained[1], t1, tmp_path / "mask.nii.gz", probabilities=tmp_path / "probabilities.npy")
    assert list(tmp_path.iterdir()) == []


def test_a_report_directory_used_again_holds_only_its_own_masks(trained, tmp_path):
    store, run_dir = trained
    quiet = dict(progress=False, log=lambda m: None, save_probabilities=True)
    evaluate_split(run_dir, store, "test", tmp_path / "rep", **quiet)
    assert sorted(p.name for p in (tmp_path / "rep" / "masks").iterdir()) == [
        "sub-005_ses-1_desc-lesion_mask.nii.gz",
        "sub-005_ses-1_desc-lesion_probability.nii.gz",
    ]
    evaluate_split(run_dir, store, "val", tmp_path / "rep", progress=False, log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "rep" / "masks").iterdir()) == ["sub-004_ses-1_desc-lesion_mask.nii.gz"]
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["split"] == "val"


def test_a_shard_count_that_cannot_be_met_is_said(tiny_store, tmp_path):
    said = []
    from atlas_shards.build import BuildConfig, build

    manifest = build(
        tiny_store,
        tmp_path / "out",
        BuildConfig(split="train", block=8, num_shards=10_000),
        log=said.append,
        progress=False,
    )
    blocks = manifest["totals"]["records"]
    note = f"--num-shards 10000 cannot be met: {blocks} shards hold every block once; building {blocks}"
    assert len(manifest["shards"]) == blocks < 10_000
    assert note in said and note in manifest["notes"]
