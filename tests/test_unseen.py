"""A subject split is fixed once written, and a model is never silently scored on its own training subjects."""

from __future__ import annotations

import json
import shutil

import pytest

from atlas_shards import store as zstore
from atlas_shards.ingest import IngestError, ingest
from atlas_shards.split import SplitError, split_fingerprint
from conftest import write_tiny_store
from evaluate.predictors import EvaluateError
from evaluate.split import OPTIMISTIC, evaluate_split
from trainer import checkpoint as ckpt_io


def _attrs(store) -> str:
    return (store / "zarr.json").read_bytes()


def test_reingesting_with_another_split_is_refused_and_the_split_kept(r11, tmp_path):
    release, _, store_path, _ = r11
    store = tmp_path / "store.zarr"
    shutil.copytree(store_path, store)
    before = _attrs(store)
    for options, shown in (({"seed": 5}, "--seed 5"), ({"split_counts": (1, 1, 1)}, "--seed 0 --split 1,1,1")):
        with pytest.raises(
            IngestError, match=f"^{store}: its subject split was made with --seed 0; .* asks for {shown}"
        ):
            ingest(release, store, progress=False, **options)
        assert _attrs(store) == before  # the split (and every other attribute) as it was
    again = ingest(release, store, progress=False)  # the same options: the same split, nothing moves
    root = zstore.open_store(store, "r")
    assert again.split == root.attrs["split"] and root.attrs["split_fingerprint"] == split_fingerprint(again.split)


def test_a_changed_release_that_would_move_subjects_is_refused_by_name(r11, tmp_path):
    release, _, store_path, _ = r11
    store = tmp_path / "store.zarr"
    shutil.copytree(store_path, store)
    root = zstore.open_store(store, "a")
    split = root.attrs["split"]
    moved = split["train"][0]
    split = {**split, "train": split["train"][1:], "val": sorted(split["val"] + [moved])}
    root.attrs["split"] = split  # as if an earlier ingest had seen other scans
    with pytest.raises(
        IngestError, match=f"would move 1 subject\\(s\\) of the store's split: {moved} \\(val -> train\\)"
    ):
        ingest(release, store, progress=False)
    assert zstore.open_store(store, "r").attrs["split"] == split


def test_split_counts_the_release_cannot_meet_are_refused_before_any_scan(r11, tmp_path):
    release = r11[0]
    with pytest.raises(SplitError, match="--split 9,9,9 needs 27 subjects but only"):
        ingest(release, tmp_path / "store.zarr", split_counts=(9, 9, 9), progress=False)
    assert not (tmp_path / "store.zarr").exists()


def _resplit(store, tmp_path, name: str, move: str) -> object:
    """A copy of the tiny store whose test split also holds training subject ``move`` (a re-split store)."""
    copy = tmp_path / name
    shutil.copytree(store, copy)
    root = zstore.open_store(copy, "a")
    split = root.attrs["split"]
    root.attrs["split"] = {**split, "train": [s for s in split["train"] if s != move], "test": split["test"] + [move]}
    return copy


def test_a_split_holding_training_subjects_is_refused_unless_allowed(trained, tmp_path):
    store, run_dir = trained
    kept = ckpt_io.load(run_dir)["preprocessing"]["trained_on"]
    assert kept["subjects"] == ["sub-000", "sub-001", "sub-002", "sub-003"] and kept["split"] == "train"
    assert kept["split_fingerprint"] == split_fingerprint(zstore.open_store(store, "r").attrs["split"])
    leaky = _resplit(store, tmp_path, "leaky.zarr", "sub-001")
    quiet = dict(progress=False, log=lambda m: None)
    with pytest.raises(
        EvaluateError,
        match=f"^{leaky}: split 'test' holds 1 subject\\(s\\) the model trained on "
        "\\(sub-001\\).* --allow-training-subjects",
    ):
        evaluate_split(run_dir, leaky, "test", tmp_path / "rep", **quiet)
    assert not (tmp_path / "rep" / "metrics.json").exists()
    said = []
    m = evaluate_split(
        run_dir, leaky, "test", tmp_path / "rep", allow_training_subjects=True, progress=False, log=said.append
    )
    assert m["unseen_subjects"]["training_subjects_scored"] == ["sub-001"] and m["n_subjects"] == 2
    assert m["unseen_subjects"]["runs_of_another_split"] == [str(run_dir)]  # the store was re-split since
    assert any("1 of the 2 subjects scored are training subjects" in s for s in said)
    assert "training subjects" in (tmp_path / "rep" / "report.md").read_text()
    clean = evaluate_split(run_dir, store, "test", tmp_path / "clean", **quiet)
    assert (
        clean["unseen_subjects"]
        == {
            "checked": True,
            "training_subjects_scored": [],
            "split_fingerprint": kept["split_fingerprint"],
            "runs_of_another_split": [],
        }
        and clean["warnings"] == []
    )


def test_a_rule_chosen_on_the_reported_split_is_called_optimistic(trained, tmp_path):
    store, run_dir = trained
    said = []
    m = evaluate_split(run_dir, store, "val", tmp_path / "val", threshold="auto", progress=False, log=said.append)
    assert m["warnings"] == [OPTIMISTIC] and any(OPTIMISTIC in s for s in said)
    assert f"**Warning: {OPTIMISTIC}.**" in (tmp_path / "val" / "report.md").read_text()
    saved = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert saved["warnings"] == [OPTIMISTIC]


def test_the_cli_refuses_training_subjects_in_one_line(trained, tmp_path):
    from click.testing import CliRunner

    from evaluate.cli import main

    store, run_dir = trained
    leaky = _resplit(store, tmp_path, "leaky.zarr", "sub-000")
    out = CliRunner().invoke(
        main, ["run", "--model", str(run_dir), "--store", str(leaky), "--split", "test", "--out", str(tmp_path / "rep")]
    )
    assert out.exit_code == 1 and out.output.count("\n") == 1 and "sub-000" in out.output, out.output
    assert "Traceback" not in out.output


def test_an_old_run_without_a_record_is_scored_and_says_it_was_not_checked(tmp_path):
    from trainer.fit import TrainConfig, fit
    from trainer.models import ModelConfig
    from conftest import build_quietly

    store = write_tiny_store(tmp_path / "store.zarr", n_scans=4)
    build_quietly(store, tmp_path / "train", split="train", num_shards=1, samples_per_record=32)
    cfg = TrainConfig(
        shards=str(tmp_path / "train"), out=str(tmp_path / "run"), batch_size=16, workers=0, steps_per_epoch=2
    )
    fit(cfg, ModelConfig(batch_norm=False), progress=False, log=lambda m: None)
    ckpt = ckpt_io.load(tmp_path / "run")
    del ckpt["preprocessing"]["trained_on"]  # as a run of an earlier version saved it
    ckpt_io.save(tmp_path / "run" / ckpt_io.LAST, ckpt)
    said = []
    m = evaluate_split(tmp_path / "run", store, "test", tmp_path / "rep", progress=False, log=said.append)
    assert m["unseen_subjects"] == {"checked": False, "runs_without_record": [str(tmp_path / "run")]}
    assert any("not checked" in s for s in said)
