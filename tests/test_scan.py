"""Validation and repair of single scans, on small synthetic NIfTI files."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from atlas_shards.discover import ScanSource
from atlas_shards.scan import ScanError, prepare_scan, preprocess

SHAPE = (40, 44, 40)
AFFINE = np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS, like many native scans
AFFINE[:3, 3] = [20, -22, -20]


def small_head() -> tuple[np.ndarray, np.ndarray]:
    x, y, z = np.indices(SHAPE, dtype=np.float32)
    r = np.sqrt(((x - 20) / 1.0) ** 2 + ((y - 22) / 1.1) ** 2 + (z - 20) ** 2)
    t1 = np.where(r < 13, 100.0, 0.0) + np.where((r >= 15) & (r < 18), 80.0, 0.0)
    lesion = ((x - 27) ** 2 + (y - 22) ** 2 + (z - 20) ** 2) <= 9
    t1[lesion] = 20.0
    rng = np.random.default_rng(0)
    return (t1 + rng.normal(0, 2, SHAPE)).astype(np.float32), lesion


def write(path: Path, data, affine=AFFINE) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path.name


def source(tmp_path, t1="t1.nii.gz", masks=("lesion.nii.gz",)) -> ScanSource:
    return ScanSource("s1", "s1", "", "", "generic", "native", t1, list(masks))


def test_clean_scan_canonical_arrays_and_attrs(tmp_path):
    t1, lesion = small_head()
    write(tmp_path / "t1.nii.gz", t1)
    write(tmp_path / "lesion.nii.gz", lesion.astype(np.uint8))
    scan = prepare_scan(tmp_path, source(tmp_path))
    assert scan.repairs == [] and scan.t1.dtype == np.float32 and scan.lesion.dtype == np.uint8
    # LAS -> RAS flips the first axis
    np.testing.assert_array_equal(scan.lesion, lesion[::-1].astype(np.uint8))
    a = scan.attrs
    assert a["original_axcodes"] == "LAS" and a["canonical_shape"] == list(SHAPE)
    assert a["lesion_voxels"] == int(lesion.sum()) and a["lesion_components"] == 1
    # lesion at original x=27 (LAS) sits at canonical x=12, left of the mirror at ~19.5
    assert a["mirror_index"] == pytest.approx(19.0, abs=1.0)
    assert a["hemisphere_computed"] == "left"
    assert scan.brain[scan.lesion > 0].all() and 0 < a["brain_voxels"] < np.prod(SHAPE) / 2


def test_repairs_nan_255_mask_and_singleton_4d(tmp_path):
    t1, lesion = small_head()
    t1[0, 0, :5] = np.nan
    t1[1, 1, 1] = np.inf
    write(tmp_path / "t1.nii.gz", t1[..., None])
    write(tmp_path / "lesion.nii.gz", (lesion * 255).astype(np.uint8))
    scan = prepare_scan(tmp_path, source(tmp_path))
    text = "; ".join(scan.repairs)
    assert "6 NaN/inf voxels, set to 0" in text
    assert "values {0, 255} re-binarised" in text
    assert "singleton 4th axis" in text
    assert np.isfinite(scan.t1).all() and set(np.unique(scan.lesion)) == {0, 1}


def test_multiple_masks_are_or_ed(tmp_path):
    t1, lesion = small_head()
    other = np.zeros(SHAPE, dtype=np.uint8)
    other[5:8, 20:23, 20:23] = 1
    write(tmp_path / "t1.nii.gz", t1)
    write(tmp_path / "a_LesionSmooth.nii.gz", lesion.astype(np.uint8))
    write(tmp_path / "a_LesionSmooth_1.nii.gz", other)
    scan = prepare_scan(tmp_path, source(tmp_path, masks=("a_LesionSmooth.nii.gz", "a_LesionSmooth_1.nii.gz")))
    assert scan.attrs["lesion_voxels"] == int(lesion.sum()) + 27 and scan.attrs["lesion_components"] == 2


@pytest.mark.parametrize(
    "defect,reason",
    [
        ("shape", "does not match the T1 grid"),
        ("affine", "affines differ"),
        ("empty", "lesion mask is empty"),
        ("truncated", "unreadable or truncated"),
        ("4d", "is 4D"),
        ("constant", "is constant"),
    ],
)
def test_unusable_scans_are_excluded_with_reason(tmp_path, defect, reason):
    t1, lesion = small_head()
    mask = lesion.astype(np.uint8)
    mask_affine = AFFINE
    if defect == "shape":
        mask = mask[:, :, 2:]
    elif defect == "affine":
        mask_affine = AFFINE.copy()
        mask_affine[0, 3] += 1.5
    elif defect == "empty":
        mask[:] = 0
    elif defect == "4d":
        t1 = np.stack([t1, t1], axis=-1)
    elif defect == "constant":
        t1[:] = 7
    write(tmp_path / "t1.nii.gz", t1)
    write(tmp_path / "lesion.nii.gz", mask, mask_affine)
    if defect == "truncated":
        raw = gzip.compress(nib.Nifti1Image(t1, AFFINE).to_bytes())
        (tmp_path / "t1.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ScanError, match=reason):
        prepare_scan(tmp_path, source(tmp_path))


def test_user_brain_mask_is_used(tmp_path):
    t1, lesion = small_head()
    brain = np.zeros(SHAPE, dtype=np.uint8)
    brain[8:32, 10:34, 10:30] = 1
    files = {"t1": t1, "lesion": lesion.astype(np.uint8), "brain": brain}
    paths = {name: tmp_path / f"{name}.nii.gz" for name in files}
    for name, data in files.items():
        write(paths[name], data)
    scan = preprocess(paths["t1"], [paths["lesion"]], brain_mask=paths["brain"])  # by file paths, as predict does
    assert scan.attrs["brain_mask_source"] == "user" and scan.attrs["brain_voxels"] == int(brain.sum())
