"""Hard negatives: background draws follow a prior model's probability maps; the lesion fraction does not move."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from atlas_shards import store as zstore
from atlas_shards.build import BuildConfig, BuildError, build
from atlas_shards.hard_negatives import SUFFIX, draw_background
from conftest import build_quietly, sample_ids
from shards.reader import ShardStream

HOT = np.s_[:12]  # the maps' "false positives": the left part of every scan (the lesions lie right of x = 17)


def _write_maps(store, directory, scans, shape_of=None):
    directory.mkdir(parents=True, exist_ok=True)
    root = zstore.open_store(store)
    for scan in scans:
        p = np.zeros(shape_of or root[scan]["t1"].shape, np.float32)
        p[HOT] = 0.9
        nib.save(nib.Nifti1Image(p, np.eye(4)), directory / f"{scan}{SUFFIX}")


def _samples(out):
    """{scan: (lesion locations, background locations)} of a build."""
    out_by_scan: dict[str, tuple[set, set]] = {}
    for batch in ShardStream(str(out), batch_size=64):
        for (scan, *loc), y in zip(sample_ids([batch]), batch["y"].tolist()):
            out_by_scan.setdefault(scan, (set(), set()))[0 if y else 1].add(tuple(loc))
    return out_by_scan


@pytest.fixture(scope="module")
def uniform(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("uniform") / "train"
    return out, build_quietly(tiny_store, out, split="train")


@pytest.mark.parametrize("fmt", ["blocks", "pairs"])
def test_background_follows_the_maps_and_the_lesion_fraction_stays(tiny_store, uniform, tmp_path, fmt):
    root = zstore.open_store(tiny_store)
    train = zstore.split_scans(root, "train")
    maps = tmp_path / "report" / "masks"  # as atlas-evaluate run writes them; the report directory is given
    _write_maps(tiny_store, maps, train[1:])  # the first scan has no map
    out = tmp_path / "hard"
    manifest = build_quietly(
        tiny_store, out, split="train", format=fmt, hard_negatives=str(tmp_path / "report"), hard_share=1.0
    )
    base = build_quietly(tiny_store, tmp_path / "base", split="train", format=fmt) if fmt == "pairs" else uniform[1]
    base_out = tmp_path / "base" if fmt == "pairs" else uniform[0]

    # The plan is the uniform build's: the same samples per scan, lesion samples and lesion fraction.
    assert manifest["totals"]["lesion_fraction"] == base["totals"]["lesion_fraction"]
    assert abs(manifest["totals"]["lesion_fraction"] - 0.437) < 0.01
    counts = [(s["scan_id"], s["samples"], s["lesion_samples"]) for s in manifest["scans"]]
    assert counts == [(s["scan_id"], s["samples"], s["lesion_samples"]) for s in base["scans"]]
    assert [n for n in manifest["notes"] if "background drawn uniformly" in n] == [
        f"scan {train[0]}: background drawn uniformly: {tmp_path / 'report'}: no probability map "
        f"{train[0]}{SUFFIX} (nor in masks/)"
    ]

    hard, plain = _samples(out), _samples(base_out)
    for scan in train:
        assert hard[scan][0] == plain[scan][0]  # the same lesion voxels
        in_hot = np.mean([loc[0] < 12 for loc in hard[scan][1]])
        uniform_in_hot = np.mean([loc[0] < 12 for loc in plain[scan][1]])
        assert 0.2 < uniform_in_hot < 0.6  # the left part holds some of the background, not most
        if scan == train[0]:  # no map: uniform, the same draws as without hard negatives
            assert hard[scan][1] == plain[scan][1]
        else:  # share 1: every background draw where the map is positive
            assert in_hot == 1.0


def test_a_share_mixes_maps_and_uniform(tiny_store, tmp_path):
    root = zstore.open_store(tiny_store)
    train = zstore.split_scans(root, "train")
    _write_maps(tiny_store, tmp_path / "maps", train)
    build_quietly(tiny_store, tmp_path / "half", split="train", hard_negatives=str(tmp_path / "maps"), hard_share=0.5)
    background = [loc for scan in train for loc in _samples(tmp_path / "half")[scan][1]]
    share = np.mean([loc[0] < 12 for loc in background])
    assert 0.6 < share < 0.9  # half from the maps (all left), half uniform (~40% left)


def test_other_maps_in_the_same_directory_are_another_build(tiny_store, tmp_path):
    root = zstore.open_store(tiny_store)
    train = zstore.split_scans(root, "train")
    maps, out = tmp_path / "maps", tmp_path / "out"
    _write_maps(tiny_store, maps, train)
    first = build_quietly(tiny_store, out, split="train", hard_negatives=str(maps), block=8)
    assert build_quietly(tiny_store, out, split="train", hard_negatives=str(maps), block=8) == first  # unchanged: done
    nib.save(
        nib.Nifti1Image(np.full(root[train[0]]["t1"].shape, 0.2, np.float32), np.eye(4)), maps / f"{train[0]}{SUFFIX}"
    )
    with pytest.raises(BuildError, match="already holds shards of another build"):
        build_quietly(tiny_store, out, split="train", hard_negatives=str(maps), block=8)


def test_unusable_maps_are_named_and_the_build_goes_on(tiny_store, tmp_path):
    root = zstore.open_store(tiny_store)
    train = zstore.split_scans(root, "train")
    _write_maps(tiny_store, tmp_path / "maps", train[:1], shape_of=(10, 10, 10))
    bad = tmp_path / "maps" / f"{train[1]}{SUFFIX}"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(
        BuildError, match=f"no usable probability map for any of the {len(train)} scans .* {train[0]}: "
    ):
        build_quietly(tiny_store, tmp_path / "none", split="train", hard_negatives=str(tmp_path / "maps"))
    assert not (tmp_path / "none").exists()  # refused before anything was written
    _write_maps(tiny_store, tmp_path / "maps", train[2:3])  # one usable map: the build goes on, naming the others
    manifest = build_quietly(tiny_store, tmp_path / "out", split="train", hard_negatives=str(tmp_path / "maps"))
    notes = "\n".join(manifest["notes"])
    assert f"{train[0]}{SUFFIX}: grid (10, 10, 10) is not the scan's (31, 28, 24)" in notes
    assert f"{bad}: unreadable" in notes
    assert manifest["totals"]["samples"] > 0


def test_hard_negatives_are_refused_for_a_natural_stream(tiny_store, tmp_path):
    config = BuildConfig(split="val", mode="natural", natural_rate=0.1, target_lesion_fraction=None)
    with pytest.raises(BuildError, match="--hard-negatives is for balanced builds"):
        build(tiny_store, tmp_path / "v", BuildConfig(**{**config.__dict__, "hard_negatives": str(tmp_path)}))


def test_weighted_draw_without_replacement():
    rng = np.random.default_rng(0)
    candidates = np.arange(1000)
    p = np.zeros(1000)
    p[:100] = 1
    drawn = draw_background(candidates, 50, p, 1.0, rng)
    assert len(set(drawn)) == 50 and drawn.max() < 100  # only where p > 0, no repeats
    drawn = draw_background(candidates, 200, p, 1.0, rng)
    assert len(set(drawn)) == 200 and set(range(100)) <= set(
        drawn
    )  # more than the hot voxels: all of them, then the rest
    drawn = draw_background(candidates, 300, np.zeros(1000), 1.0, rng)  # a map of zeros: uniform
    assert len(set(drawn)) == 300 and 0.05 < np.mean(drawn < 100) < 0.15


def test_cli_builds_with_a_report_of_maps_and_says_so(tiny_store, tmp_path):
    from click.testing import CliRunner

    from atlas_shards.cli import main

    root = zstore.open_store(tiny_store)
    _write_maps(tiny_store, tmp_path / "report" / "masks", zstore.split_scans(root, "train"))
    args = ["build", str(tiny_store), str(tmp_path / "out"), "--split", "train", "--block", "8"]
    r = CliRunner().invoke(main, args + ["--hard-negatives", str(tmp_path / "report"), "--hard-share", "0.8"])
    assert r.exit_code == 0, r.output
    assert (
        f"hard negatives: 80% of the background draws follow the probability maps in {tmp_path / 'report'}" in r.output
    )
    r = CliRunner().invoke(main, args + ["--hard-negatives", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_a_run_on_hard_negative_shards_gets_no_prior_correction():
    from evaluate.predictors import _Run

    build = {"lesion_rate": 1.0, "background_rate": 0.01}
    assert _Run("m", None, {}, {"build": build}).prior_shift() == pytest.approx(math.log(100))
    hard = {**build, "hard_negatives": "reports/sym-train", "hard_share": 0.5}
    assert _Run("m", None, {}, {"build": hard}).prior_shift() == 0.0
    assert _Run("m", None, {}, {"build": {**hard, "hard_share": 0.0}}).prior_shift() == pytest.approx(math.log(100))
