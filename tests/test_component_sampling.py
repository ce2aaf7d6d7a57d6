"""Sampling by lesion (``--component-samples``): every lesion component gives the same draws, whatever its size."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from atlas_shards import store as zstore
from atlas_shards.build import BuildConfig, BuildError, make_plan
from atlas_shards.cli import main
from atlas_shards.plan import draw_voxels, lesion_components
from conftest import build_quietly, sample_ids, write_tiny_store
from shards.reader import ShardStream

K, R = 30, 5  # draws a component; at most R draws of a voxel


@pytest.fixture(scope="module")
def speckled(tmp_path_factory):
    return write_tiny_store(tmp_path_factory.mktemp("specks") / "store.zarr", specks=True)


def _lesion_draws(out) -> dict[str, Counter]:
    """{scan: Counter of lesion locations} of a build: repeats counted."""
    drawn: dict[str, Counter] = {}
    for batch in ShardStream(str(out), batch_size=64):
        for (scan, *loc), y in zip(sample_ids([batch]), batch["y"].tolist()):
            if y:
                drawn.setdefault(scan, Counter())[tuple(loc)] += 1
    return drawn


@pytest.mark.parametrize("fmt", ["blocks", "pairs"])
def test_every_component_gets_its_draws_and_the_fraction_stays(speckled, tmp_path, fmt):
    out = tmp_path / "out"
    manifest = build_quietly(
        speckled, out, split="train", format=fmt, component_samples=K, max_repeat=R, num_shards=2, block=8
    )
    assert abs(manifest["totals"]["lesion_fraction"] - 0.437) < 0.01
    root = zstore.open_store(speckled)
    drawn = _lesion_draws(out)
    train = zstore.split_scans(root, "train")
    assert set(drawn) == set(train)
    for scan in train:
        labels, sizes = lesion_components(zstore.read_scan(root, scan, ("lesion",))["lesion"] > 0)
        assert sorted(sizes.tolist()) == [1, 4, sizes.max()] and sizes.max() > K  # a lesion and two specks
        per_component = Counter()
        for loc, n in drawn[scan].items():
            assert labels[loc] > 0  # every lesion draw is a lesion voxel
            per_component[int(labels[loc])] += n
        for k, size in enumerate(sizes, start=1):
            assert per_component[k] == min(K, R * size), (scan, size)
            repeats = [n for loc, n in drawn[scan].items() if labels[loc] == k]
            if size > K:  # a large component: without replacement
                assert max(repeats) == 1
            else:  # a small one: every voxel R times
                assert repeats == [R] * size
        entry = next(s for s in manifest["scans"] if s["scan_id"] == scan)
        assert entry["lesion_samples"] == sum(min(K, R * n) for n in sizes)


def test_the_plan_counts_components_and_keeps_the_fraction():
    scans = [f"s{i}" for i in range(5)]
    components = [[1], [40, 3], [900], [50_000, 2000, 1], [400_000]]
    counts = [{"lesion": sum(c), "background": 1_500_000, "natural": 0, "components": c} for c in components]
    config = BuildConfig(component_samples=1000, max_repeat=20)
    plan = make_plan(config, scans, counts, {s: s for s in scans})
    assert [s["lesion_draws"] for s in plan["scans"]] == [20, 800 + 60, 1000, 1000 + 1000 + 20, 1000]
    assert [s["lesion_components"] for s in plan["scans"]] == [1, 2, 1, 3, 1]
    lesion = sum(s["lesion_draws"] for s in plan["scans"])
    assert abs(lesion / plan["samples"] - 0.437) < 0.005


def test_draws_are_deterministic_and_tile_small_components():
    lesion = np.zeros((20, 20, 20), bool)
    lesion[2:5, 2:5, 2:5] = True  # 27 voxels
    lesion[10, 10, 10] = True  # 1 voxel
    brain = np.ones_like(lesion)
    config = BuildConfig(component_samples=10, max_repeat=4)
    entry = {"lesion_draws": 10 + 4, "background_draws": 100, "samples": 114}
    a = draw_voxels(lesion, brain, "s", entry, config)
    assert np.array_equal(a, draw_voxels(lesion, brain, "s", entry, config))
    drawn = Counter(a[lesion.ravel()[a]].tolist())
    assert drawn[np.ravel_multi_index((10, 10, 10), lesion.shape)] == 4
    assert sum(drawn.values()) == 14 and len(drawn) == 11  # 10 distinct voxels of the cube, the speck 4 times
    assert (~lesion.ravel()[a]).sum() == 100


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(component_samples=0), "positive"),
        (dict(component_samples=10, max_repeat=0), "positive"),
        (dict(component_samples=10, max_lesion_samples=100), "--component-samples"),
        (dict(component_samples=10, lesion_rate=0.5), "--component-samples"),
        (dict(component_samples=10, mode="natural", natural_rate=0.1, target_lesion_fraction=None), "balanced"),
    ],
)
def test_contradictory_options_are_refused(bad, match):
    with pytest.raises(BuildError, match=match):
        BuildConfig(**bad).check()


def test_cli_says_it_samples_by_component(speckled, tmp_path):
    args = ["build", str(speckled), str(tmp_path / "out"), "--split", "train", "--block", "8"]
    r = CliRunner().invoke(main, args + ["--component-samples", "30", "--max-repeat", "5", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "lesions sampled by component: 12 components, 30 draws each (at most 5x a component's voxels)" in r.output
    r = CliRunner().invoke(main, args + ["--component-samples", "30", "--max-lesion-samples", "9"])
    assert r.exit_code != 0 and "--component-samples sets every lesion's draws itself" in r.output


def test_the_prior_correction_uses_the_rates_actually_drawn(speckled, tmp_path):
    from evaluate.predictors import _Run
    from shards.manifest import sampling_rates

    manifest = build_quietly(speckled, tmp_path / "out", split="train", component_samples=K, max_repeat=R, block=8)
    rates = sampling_rates(manifest)
    lesion_voxels = sum(s["lesion_voxels"] for s in manifest["scans"])
    assert rates["lesion_rate"] == manifest["totals"]["lesion_samples"] / lesion_voxels < 1
    background = manifest["totals"]["samples"] - manifest["totals"]["lesion_samples"]
    assert rates["background_rate"] == background / sum(s["background_voxels"] for s in manifest["scans"])
    build = manifest["config"]
    assert build["lesion_rate"] == 1.0  # the configured rate: every component's draws, not a share
    run = _Run("m", None, {}, {"build": build, "sampling": rates})
    assert run.prior_shift() == pytest.approx(np.log(rates["lesion_rate"] / rates["background_rate"]))
    older = _Run("m", None, {}, {"build": build})  # a run from before the record: the configured rates
    assert older.prior_shift() == pytest.approx(np.log(1.0 / build["background_rate"]))
    assert _Run("m", None, {}, {"build": {**build, "mode": "natural"}, "sampling": rates}).prior_shift() == 0.0
