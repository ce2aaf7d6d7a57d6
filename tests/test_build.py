"""``atlas-shards build``: sampling, pair content, determinism, resume, manifest."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from atlas_shards import build as build_mod
from atlas_shards import store as zstore
from atlas_shards.build import BuildConfig, BuildError, build, make_plan
from conftest import build_killed_after_one_shard
from shards.manifest import read_manifest, verify
from shards.norm import normalise
from shards.patches import extract_pairs
from shards.reader import read_records
from shards.sources import resolve

SMALL = dict(num_shards=3, samples_per_record=16, format="pairs")  # this file: the pairs format (blocks: test_blocks)


def _records(out_dir):
    shards, _ = resolve(str(out_dir))
    return list(read_records(shards))


@pytest.fixture(scope="module")
def built(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "train"
    return out, build(tiny_store, out, BuildConfig(split="train", **SMALL), progress=False, log=lambda m: None)


def test_samples_are_the_store_cubes_with_their_labels(tiny_store, built):
    out, manifest = built
    root = zstore.open_store(tiny_store)
    cache, n = {}, 0
    for rec in _records(out):
        for x, y, loc, scan in zip(rec["x"], rec["y"], rec["loc"], rec["scan"]):
            if scan not in cache:
                data = zstore.read_scan(root, scan)
                vol = normalise(data["t1"], data["brain"], "histeq")
                cache[scan] = (vol, data["lesion"], root[scan].attrs["mirror_index"])
            vol, lesion, mirror = cache[scan]
            np.testing.assert_array_equal(x, extract_pairs(vol, mirror, loc[None], 25)[0])
            assert y == lesion[tuple(loc)]
            n += 1
    assert n == manifest["totals"]["samples"] > 0
    assert set(cache) == {s["scan_id"] for s in manifest["scans"]}
    assert verify(out) == []


def test_manifest_records_config_counts_and_checksums(built):
    out, manifest = built
    assert read_manifest(out) == manifest
    assert manifest["schema_version"] == 4 and manifest["format"] == "pairs" and manifest["config"]["split"] == "train"
    assert manifest["config"]["seed"] == 0 and manifest["norm"]["method"] == "histeq"
    assert sum(s["samples"] for s in manifest["shards"]) == manifest["totals"]["samples"]
    assert sum(s["lesion_samples"] for s in manifest["scans"]) == manifest["totals"]["lesion_samples"]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    assert not (out / build_mod.BUILD_DIR).exists()


def test_lesion_fraction_lands_on_target(built):
    _, manifest = built
    assert abs(manifest["totals"]["lesion_fraction"] - 0.437) < 0.005
    # Every lesion voxel of the split is kept (lesion rate 1).
    assert manifest["totals"]["lesion_samples"] == sum(s["lesion_voxels"] for s in manifest["scans"])


@pytest.mark.parametrize("target", [0.05, 0.2, 0.437, 0.6, 0.9])
def test_plan_reaches_any_feasible_target(target):
    rng = np.random.default_rng(int(target * 100))
    scans = [f"s{i}" for i in range(40)]
    counts = [
        {"lesion": int(rng.integers(10, 60000)), "background": int(rng.integers(1e6, 2e6)), "natural": 0} for _ in scans
    ]
    plan = make_plan(BuildConfig(target_lesion_fraction=target), scans, counts, {s: s for s in scans})
    lesion = sum(s["lesion_draws"] for s in plan["scans"])
    assert abs(lesion / plan["samples"] - target) < 0.005
    assert not plan["notes"]


@pytest.mark.parametrize("target", [0.2, 0.437])
def test_a_lesion_cap_keeps_small_lesions_whole_and_the_fraction_on_target(target):
    scans = [f"s{i}" for i in range(6)]
    lesions = [50, 400, 3000, 20000, 150000, 500000]
    counts = [{"lesion": n, "background": 1_500_000, "natural": 0} for n in lesions]
    capped = make_plan(
        BuildConfig(target_lesion_fraction=target, max_lesion_samples=5000), scans, counts, {s: s for s in scans}
    )
    assert [s["lesion_draws"] for s in capped["scans"]] == [50, 400, 3000, 5000, 5000, 5000]
    lesion = sum(s["lesion_draws"] for s in capped["scans"])
    assert abs(lesion / capped["samples"] - target) < 0.005
    uncapped = make_plan(BuildConfig(target_lesion_fraction=target), scans, counts, {s: s for s in scans})
    assert capped["background_rate"] < uncapped["background_rate"] / 10  # fewer lesion samples: fewer background
    with pytest.raises(BuildError, match="--max-lesion-samples"):
        BuildConfig(max_lesion_samples=0).check()


def test_plan_says_when_the_target_is_unreachable():
    counts = [{"lesion": 1000, "background": 10, "natural": 0}]
    plan = make_plan(BuildConfig(target_lesion_fraction=0.2), ["s"], counts, {"s": "s"})
    assert plan["background_rate"] == 1.0 and "not reachable" in plan["notes"][0]


def test_every_shard_mixes_many_scans(built):
    out, manifest = built
    for shard in resolve(str(out))[0]:
        scans = [s for rec in read_records([shard]) for s in rec["scan"]]
        assert len(set(scans)) == len(manifest["scans"])
        runs = 1 + sum(a != b for a, b in zip(scans, scans[1:]))
        assert runs > len(scans) / 3  # shuffled, not grouped by scan


def test_same_config_twice_is_a_no_op_and_another_config_is_refused(tiny_store, built):
    out, manifest = built
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    messages = []
    assert build(tiny_store, out, BuildConfig(split="train", **SMALL), progress=False, log=messages.append) == manifest
    assert "already built" in messages[-1]
    with pytest.raises(BuildError, match="another build"):
        build(tiny_store, out, BuildConfig(split="train", seed=1, **SMALL), progress=False, log=lambda m: None)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_interrupted_build_resumes_to_the_same_bytes(tiny_store, built, tmp_path, monkeypatch):
    _, reference = built
    out = tmp_path / "train"
    build_killed_after_one_shard(monkeypatch, "pairs", tiny_store, out, BuildConfig(split="train", **SMALL))
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert len(finished) == 1 and not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".train")]  # no temporary shard left behind
    again = build(tiny_store, out, BuildConfig(split="train", **SMALL), progress=False, log=lambda m: None)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in reference["shards"]]


@pytest.mark.slow
def test_workers_do_not_change_the_bytes(tiny_store, built, tmp_path):
    out, reference = built
    other = build(
        tiny_store, tmp_path / "w2", BuildConfig(split="train", **SMALL), workers=2, progress=False, log=lambda m: None
    )
    assert other == reference
    assert (tmp_path / "w2" / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()


def test_natural_stream_follows_the_store_prevalence(tiny_store, tmp_path):
    cfg = BuildConfig(split="train", mode="natural", natural_rate=0.5, target_lesion_fraction=None, **SMALL)
    manifest = build(tiny_store, tmp_path / "nat", cfg, progress=False, log=lambda m: None)
    lesion = sum(s["lesion_voxels"] for s in manifest["scans"])
    prevalence = lesion / sum(s["lesion_voxels"] + s["background_voxels"] for s in manifest["scans"])
    assert abs(manifest["totals"]["lesion_fraction"] - prevalence) < 0.02
    assert manifest["config"]["mode"] == "natural"


def test_zscore_build_and_bad_requests(tiny_store, tmp_path):
    manifest = build(
        tiny_store, tmp_path / "z", BuildConfig(split="val", norm="zscore", **SMALL), progress=False, log=lambda m: None
    )
    assert manifest["norm"] == {"method": "zscore", "offset": 128.0, "scale": 1 / 24}
    assert verify(tmp_path / "z") == []
    with pytest.raises(BuildError, match="patch"):
        build(tiny_store, tmp_path / "p", BuildConfig(patch=24), progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not a store")
    with pytest.raises(BuildError, match="not a Zarr store"):
        build(bad, tmp_path / "q", BuildConfig(), progress=False)
    with pytest.raises(BuildError, match="inside the store"):
        build(tiny_store, tiny_store / "shards", BuildConfig(), progress=False)


def test_verify_catches_a_damaged_shard(built, tmp_path):
    out, manifest = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victim = copy / manifest["shards"][1]["name"]
    data = bytearray(victim.read_bytes())
    data[5000] ^= 0xFF
    victim.write_bytes(bytes(data))
    problems = verify(copy)
    assert problems and all(manifest["shards"][1]["name"] in p for p in problems)
    assert "sha256" in " ".join(problems)
    json.loads((copy / "manifest.json").read_text())  # manifest untouched


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pairs", "blocks"])
def test_kill_9_through_the_build_then_rerun_gives_the_same_bytes(tmp_path, fmt):
    """Real SIGKILLs of the build process: no final-named shard is ever partial, and no worker outlives it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import write_tiny_store
    from no_leftovers import alive, descendants
    from shards.tario import sha256_file

    store = write_tiny_store(tmp_path / "store.zarr", n_scans=8, shape=(61, 56, 48))
    options = "--split train --patch 9 --background-rate 0.5 --num-shards 7 --samples-per-record 64 --workers 2"
    cmd = [sys.executable, "-m", "atlas_shards.cli", "build", str(store), "", *options.split(), "--format", fmt]
    cmd += ["--block", "8"]

    def progress(out):
        """Scans spilled plus shards landed: the build's own markers, so a kill lands mid-build on any machine."""
        return len(list((out / build_mod.BUILD_DIR).glob("**/*.done"))) + len(list(out.glob("*.tar")))

    def run(out, kill_at=None):
        cmd[5] = str(out)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kill_at is None:
            assert proc.wait(120) == 0
            return
        deadline = time.monotonic() + 120  # a guard against a hang only
        while progress(out) < kill_at and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        children = descendants(proc.pid)  # the pool's 2 workers and the resource tracker they share
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert len(children) >= 2, children
        deadline = time.monotonic() + 5  # the workers exit when their pipe from the build closes
        while any(map(alive, children)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(alive, children)), [c for c in children if alive(c)]

    reference = tmp_path / "reference"
    run(reference)
    ref = read_manifest(reference)
    ref_sha = {s["name"]: s["sha256"] for s in ref["shards"]}
    events = len(ref["scans"]) + len(ref["shards"])  # 6 spills then 7 shards
    for trial, kill_at in enumerate([1, len(ref["scans"]), events - 4]):  # mid-spill, between phases, mid-shards
        out = tmp_path / f"killed{trial}"
        run(out, kill_at=kill_at)  # ... and every process it started is gone
        assert not (out / "manifest.json").exists()  # the kill did interrupt the build

        for tar in out.glob("*.tar"):  # whatever landed under a final name is whole
            assert sha256_file(tar) == ref_sha[tar.name]
        run(out)
        assert (out / "manifest.json").read_bytes().replace(str(out).encode(), b"") == (
            reference / "manifest.json"
        ).read_bytes().replace(str(reference).encode(), b"")
        assert verify(out) == []


def test_unusable_scans_are_skipped_with_a_reason(tmp_path):
    """A store this project did not write quite right: the build uses what it can and says why."""
    import zarr

    from conftest import write_tiny_store

    store = write_tiny_store(tmp_path / "store.zarr", n_scans=6)
    root = zarr.open_group(store, mode="a")
    del root["sub-000_ses-1"].attrs["mirror_index"]
    del root["sub-001_ses-1"]["brain"]
    root["sub-002_ses-1"]["lesion"][0, 0, 0] = 1  # rewritten after ingest: it no longer matches its checks
    del root["sub-003_ses-1"].attrs["checks"]  # ingested before checks were recorded: still usable
    scans = dict(root.attrs["scans"])
    scans["sub-999_ses-1"] = "sub-003"  # listed, never written
    root.attrs["scans"] = scans
    manifest = build(
        store, tmp_path / "out", BuildConfig(split="train", num_shards=2), progress=False, log=lambda m: None
    )
    used = {s["scan_id"] for s in manifest["scans"]}
    assert used == {"sub-003_ses-1"}
    notes = " | ".join(manifest["notes"])
    assert "sub-002_ses-1 skipped: damaged: lesion has 81 nonzero voxels, 80 at ingest" in notes
    assert "sub-000_ses-1 skipped: attribute mirror_index" in notes
    assert "sub-001_ses-1 skipped: no brain array" in notes
    assert "sub-999_ses-1 skipped: listed in the split but not in the store" in notes
    assert verify(tmp_path / "out") == []
