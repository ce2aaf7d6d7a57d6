"""Ingestion of phantom releases: every scan accounted for, defects caught,
canonical round trip, mirror plane, split, resume, read-only release."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from atlas_shards import orient, store
from atlas_shards.ingest import IngestError, ingest
from atlas_shards.store import StoreError

pytestmark = pytest.mark.slow

REASONS = {
    "truncated": "unreadable or truncated",
    "mismatched_masks": "does not match the T1 grid",
    "empty_masks": "lesion mask is empty",
}


def report(store_path: Path) -> dict[str, dict]:
    with open(store_path / "ingest-report.csv") as f:
        return {r["scan_id"]: r for r in csv.DictReader(f)}


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_every_scan_accounted_for_with_the_right_reason(r11):
    release, truth, store_path, summary = r11
    rows = report(store_path)
    assert set(rows) == {s["scan_id"] for s in truth["scans"]}
    for s in truth["scans"]:
        row = rows[s["scan_id"]]
        if s["defect"]:
            assert row["status"] == "excluded", s["scan_id"]
            assert REASONS[s["defect"]] in row["reason"]
        else:
            assert row["status"] in ("ingested", "repaired"), (s["scan_id"], row["reason"])
            if s["mask_scale"] == 255:
                assert row["status"] == "repaired" and "re-binarised" in row["reason"]
    assert summary.excluded == 3 and summary.ingested == len(truth["scans"]) - 3
    root = store.open_store(store_path)
    assert {e["scan_id"] for e in root.attrs["excluded"]} == {s["scan_id"] for s in truth["scans"] if s["defect"]}


def test_store_arrays_and_attributes(r11):
    release, truth, store_path, _ = r11
    root = store.open_store(store_path)
    assert root.attrs["format"] == "atlas-zarr" and root.attrs["layout"] == "r1.1"
    for s in truth["scans"]:
        if s["defect"]:
            continue
        g = root[s["scan_id"]]
        assert g["t1"].dtype == np.float32 and g["lesion"].dtype == np.uint8 and g["brain"].dtype == np.uint8
        assert g["t1"].shape == (197, 233, 189)
        a = g.attrs
        assert a["mirror_index"] == 98.0 and a["mirror_source"] == "affine"
        assert abs(a["mirror_index_image"] - 98.0) <= 6  # phantoms are jittered a few mm
        assert a["lesion_voxels"] == s["truth"]["lesion_voxels"]
        assert a["metadata"]["INDI Subject ID"] == str(int(s["subject_id"]))
        assert a["hemisphere_source"] == "metadata"
        if s["truth"]["category"] in ("left", "right", "bilateral"):
            assert a["hemisphere"] == a["hemisphere_computed"] == s["truth"]["category"]


def test_split_is_subject_level_and_deterministic(r11, tmp_path):
    release, truth, store_path, summary = r11
    root = store.open_store(store_path)
    split = root.attrs["split"]
    placed = [s for k in ("train", "val", "test", "unassigned") for s in split[k]]
    assert sorted(placed) == sorted(root.attrs["subjects"]) and len(placed) == len(set(placed))
    # both timepoints of a subject are in the store under one subject id
    scans = root.attrs["scans"]
    assert len(set(scans.values())) == len(root.attrs["subjects"])
    again = ingest(release, tmp_path / "again.zarr", progress=False)
    assert again.split == summary.split


def test_native_round_trip_to_original_grid_every_orientation(native):
    release, truth, store_path, summary = native
    root = store.open_store(store_path)
    seen = set()
    for s in truth["scans"]:
        g = root[s["scan_id"]]
        a = g.attrs
        original = np.zeros(a["original_shape"], dtype=bool)
        for m in s["masks"]:
            original |= np.asarray(nib.load(release / m).dataobj) > 0
        back = orient.from_canonical(g["lesion"][...], a["canonical_transform"], tuple(a["original_shape"]))
        np.testing.assert_array_equal(back.astype(bool), original)
        t1_back = orient.from_canonical(g["t1"][...], a["canonical_transform"], tuple(a["original_shape"]))
        np.testing.assert_array_equal(t1_back, np.asarray(nib.load(release / s["t1"]).dataobj, dtype=np.float32))
        assert a["original_axcodes"] == s["truth"]["native"]["axcodes"] and a["original_dtype"] == "int16"
        assert np.allclose(a["original_affine"], nib.load(release / s["t1"]).affine)
        seen.add(a["original_axcodes"])
    assert len(seen) == 5


def test_native_mirror_plane_and_brain_mask(native):
    release, truth, store_path, _ = native
    root = store.open_store(store_path)
    for s in truth["scans"]:
        a = root[s["scan_id"]].attrs
        assert a["mirror_source"] == "image" and a["brain_mask_source"] == "estimated"
        world = np.append(s["truth"]["native"]["midline_world_mm"], 1)
        true_index = (np.linalg.inv(np.array(a["canonical_affine"])) @ world)[0]
        # planted midline, up to the phantom's own deformation jitter (a few mm)
        assert abs(a["mirror_index"] - true_index) * a["voxel_size_mm"][0] <= 8.0, s["scan_id"]
        brain_ml = a["brain_voxels"] * np.prod(a["voxel_size_mm"]) / 1000
        assert 900 < brain_ml < 2300, (s["scan_id"], brain_ml)  # a brain, not the whole head


def test_v20_testing_unlabelled_debris_ignored_metadata_joined(r20):
    release, truth, store_path, summary = r20
    root = store.open_store(store_path)
    testing = {s["scan_id"] for s in truth["scans"] if not s["labelled"]}
    assert testing and set(root.attrs["unlabelled_scans"]) == testing
    for scan_id in testing:
        assert "lesion" not in root[scan_id] and root[scan_id].attrs["labelled"] is False
        assert report(store_path)[scan_id]["split"] == ""
    in_split = {s for k in ("train", "val", "test") for s in root.attrs["split"][k]}
    assert not in_split & {s["subject_id"] for s in truth["scans"] if not s["labelled"]}
    assert any("._" in p.name for p in release.rglob("._*"))
    assert summary.found == len(truth["scans"])
    labelled = [s for s in truth["scans"] if s["labelled"]]
    assert root[labelled[0]["scan_id"]].attrs["metadata"]["Site"] == labelled[0]["cohort"]


def test_resume_after_interrupted_ingest(r11, tmp_path, monkeypatch):
    release, truth, store_path, _ = r11
    before = tree_digest(release)
    target = tmp_path / "resumed.zarr"
    real_write = store.write_scan
    calls = {"n": 0}

    def dying_write(path, scan_id, arrays, attrs):
        calls["n"] += 1
        if calls["n"] == 2:
            # killed mid-write: a half group under the temporary name
            zarr.open_group(Path(path) / store.PARTIAL / scan_id, mode="w").create_array(
                "t1", shape=(2, 2, 2), dtype="float32"
            )
            raise KeyboardInterrupt
        real_write(path, scan_id, arrays, attrs)

    monkeypatch.setattr(store, "write_scan", dying_write)
    with pytest.raises(KeyboardInterrupt):
        ingest(release, target, progress=False)
    assert len(store.complete_scans(target)) == 1
    assert (target / store.PARTIAL).exists()
    monkeypatch.setattr(store, "write_scan", real_write)
    summary = ingest(release, target, progress=False)
    assert summary.resumed == 1 and not (target / store.PARTIAL).exists()
    assert report(target) == report(store_path)
    done, ref = store.open_store(target), store.open_store(store_path)
    for scan_id in done.attrs["scans"]:
        for name in ("t1", "lesion", "brain"):
            np.testing.assert_array_equal(done[scan_id][name][...], ref[scan_id][name][...])
    assert tree_digest(release) == before  # the release is never written to


def test_store_guards(r11, tmp_path):
    release, truth, store_path, _ = r11
    with pytest.raises(IngestError, match="inside the release"):
        ingest(release, release / "store.zarr", progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("not a store")
    with pytest.raises(StoreError, match="not a Zarr store"):
        ingest(release, other, progress=False)
    with pytest.raises(StoreError, match="not a Zarr store"):
        store.open_store(tmp_path / "missing.zarr")


def test_store_of_another_release_is_refused(r11, tmp_path):
    _, _, store_path, _ = r11
    other = tmp_path / "Site1" / "031768" / "t01"
    other.mkdir(parents=True)
    for name in ("031768_t1w_deface_stx.nii.gz", "031768_LesionSmooth_stx.nii.gz"):
        (other / name).write_bytes(b"x")
    before = (store_path / "ingest-report.csv").read_bytes()
    with pytest.raises(IngestError, match="store was built from"):
        ingest(tmp_path, store_path, progress=False)
    assert (store_path / "ingest-report.csv").read_bytes() == before


def test_foreign_zarr_and_files_are_not_stores(tmp_path):
    foreign = zarr.open_group(tmp_path / "foreign.zarr", mode="w")
    foreign.create_array("x", shape=(2,), dtype="uint8")
    with pytest.raises(StoreError, match="not an ingested store"):
        store.open_store(tmp_path / "foreign.zarr", mode="a")
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        store.open_store(tmp_path / "file.zarr", mode="a")
