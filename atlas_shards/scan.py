"""Load and validate one scan: T1, lesion masks, brain mask, orientation.

``prepare_scan`` either returns the canonical arrays and the attributes the
store keeps, or raises ``ScanError`` with the reason the scan is excluded.
Problems that can be repaired (NaN voxels, 0/255 masks, a trailing singleton
fourth axis) are repaired and listed in ``repairs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from atlas_shards import brainmask, orient
from atlas_shards.discover import ScanSource

AFFINE_TOLERANCE_MM = 1e-3
MIRROR_DISAGREEMENT_WARN_VOXELS = 5.0
HEMISPHERE_MIDLINE_MM = 5.0


MAX_NONFINITE = 0.01  # a few NaN/inf voxels are set to 0; more than this share is a damaged image


class ScanError(Exception):
    """The scan cannot be used; the message is the reason in the report."""


@dataclass
class PreparedScan:
    t1: np.ndarray  # float32, canonical RAS
    lesion: np.ndarray | None  # uint8 0/1, canonical; None for unlabelled scans
    brain: np.ndarray  # uint8 0/1, canonical
    attrs: dict
    repairs: list[str] = field(default_factory=list)  # data changed to make it usable
    notes: list[str] = field(default_factory=list)  # worth knowing, data unchanged


def _load(path: Path, what: str, repairs: list[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """Read a NIfTI fully (so truncation shows now), as float32 3D."""
    try:
        img = nib.load(path)
        if img.get_data_dtype().names:  # RGB(A) or other structured voxels: colour, not intensity
            kind = "RGB" if set(img.get_data_dtype().names) >= {"R", "G", "B"} else "structured"
            raise ScanError(f"{what} {path.name} is an {kind} image ({img.get_data_dtype()}), expected one intensity")
        data = np.asarray(img.dataobj, dtype=np.float32)
    except ScanError:
        raise
    except Exception as exc:
        raise ScanError(f"{what} {path.name} unreadable or truncated: {type(exc).__name__}: {exc}") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
        if f"{what} had a singleton 4th axis, dropped" not in repairs:
            repairs.append(f"{what} had a singleton 4th axis, dropped")
    if data.ndim != 3:
        raise ScanError(f"{what} {path.name} is {data.ndim}D (shape {data.shape}), expected a 3D volume")
    bad = ~np.isfinite(data)
    if bad.mean() > MAX_NONFINITE:
        raise ScanError(
            f"{what} {path.name} has {bad.mean():.1%} NaN/inf voxels (more than {MAX_NONFINITE:.0%}): "
            "too damaged to repair"
        )
    if bad.any():
        repairs.append(f"{what} had {int(bad.sum())} NaN/inf voxels, set to 0")
        data[bad] = 0
    return data, img.affine, str(img.get_data_dtype())


def _same_grid(shape_a, affine_a, shape_b, affine_b) -> bool:
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=AFFINE_TOLERANCE_MM)


def prepare_scan(root: Path, source: ScanSource) -> PreparedScan:
    """Validate and canonicalise one scan found in a release: ``preprocess`` on its files, plus its identity."""
    if source.problem:
        raise ScanError(source.problem)
    if source.labelled and not source.masks:
        raise ScanError("labelled, but no lesion mask was found")
    scan = preprocess(
        root / source.t1,
        [root / m for m in source.masks] if source.labelled else [],
        root / source.brain_mask if source.brain_mask else None,
        source.space,
    )
    identity = {
        "scan_id": source.scan_id,
        "subject_id": source.subject_id,
        "session": source.session,
        "cohort": source.cohort,
        "layout": source.layout,
        "source_t1": source.t1,
        "source_masks": list(source.masks),
        "source_brain_mask": source.brain_mask,
    }
    scan.attrs = {**identity, **scan.attrs}
    return scan


def preprocess(
    t1_path: Path, masks: Sequence[Path] = (), brain_mask: Path | None = None, space: str = "native"
) -> PreparedScan:
    """Validate and canonicalise one scan given by its files (see module docstring).

    The one preprocessing of the project: ingest calls it for every scan of a
    release, ``atlas-evaluate predict`` for a single T1 file.

    Args:
        t1_path: the T1 NIfTI.
        masks: its lesion masks (OR-ed); none for an unlabelled scan.
        brain_mask: the user's own brain mask, if any.
        space: ``mni`` (standard space: MNI152 brain mask, mirror plane from
            the affine) or ``native`` (both estimated from the image).

    Raises:
        ScanError: the scan cannot be used; the message says why.
    """
    repairs: list[str] = []
    notes: list[str] = []
    t1, affine, dtype = _load(Path(t1_path), "T1", repairs)
    if float(t1.max()) == float(t1.min()):
        raise ScanError(f"T1 {Path(t1_path).name} is constant ({float(t1.min())}): no image")
    lesion = None
    if masks:
        lesion = np.zeros(t1.shape, dtype=bool)
        for rel in masks:
            mask, mask_affine, _ = _load(Path(rel), "lesion mask", repairs)
            if not _same_grid(mask.shape, mask_affine, t1.shape, affine):
                raise ScanError(
                    f"lesion mask {Path(rel).name} grid (shape {mask.shape}) does not match the T1 grid "
                    f"(shape {t1.shape}){'' if mask.shape != t1.shape else ': affines differ'}"
                )
            values = np.unique(mask)
            if not np.isin(values, (0, 1)).all():
                shown = ", ".join(f"{v:g}" for v in values[:4]) + (", ..." if values.size > 4 else "")
                repairs.append(f"lesion mask {Path(rel).name} values {{{shown}}} re-binarised with > 0")
            lesion |= mask > 0
        if not lesion.any():
            raise ScanError("lesion mask is empty (no voxel > 0)")
    user_brain = None
    if brain_mask:
        user_brain, brain_affine, _ = _load(Path(brain_mask), "brain mask", repairs)
        if not _same_grid(user_brain.shape, brain_affine, t1.shape, affine):
            raise ScanError(f"brain mask {Path(brain_mask).name} grid does not match the T1 grid")

    canon_t1, canon_affine, transform = orient.to_canonical(t1, affine)
    voxel_mm = tuple(float(v) for v in nib.affines.voxel_sizes(canon_affine))
    if user_brain is not None:
        brain = orient.to_canonical(user_brain, affine)[0] > 0
        brain_source = "user"
    elif space == "mni":
        brain = brainmask.mni_brain_mask(canon_t1.shape, canon_affine)
        brain_source = "mni152"
    else:
        brain = brainmask.estimate_brain_mask(canon_t1, voxel_mm)
        brain_source = "estimated"
    canon_lesion = orient.to_canonical(lesion.astype(np.uint8), affine)[0] if lesion is not None else None
    if canon_lesion is not None:
        outside = int((canon_lesion.astype(bool) & ~brain).sum())
        if outside:
            notes.append(f"{outside} lesion voxels outside the brain mask were added to it")
            brain |= canon_lesion.astype(bool)
    if not brain.any():
        raise ScanError("brain mask is empty")

    mirror_image = orient.estimate_mirror(canon_t1)
    if space == "mni":
        mirror, mirror_source = orient.mirror_from_affine(canon_affine, canon_t1.shape), "affine"
        if not 0 <= mirror < canon_t1.shape[0]:
            notes.append(f"affine puts x = 0 outside the image (index {mirror}); mirror estimated from the image")
            mirror, mirror_source = mirror_image, "image"
        elif abs(mirror - mirror_image) > MIRROR_DISAGREEMENT_WARN_VOXELS:
            notes.append(f"mirror plane from the affine ({mirror}) and from the image ({mirror_image}) disagree")
    else:
        mirror, mirror_source = mirror_image, "image"

    attrs = {
        "space": space,
        "labelled": lesion is not None,
        "original_shape": list(t1.shape),
        "original_affine": np.asarray(affine).tolist(),
        "original_axcodes": orient.axcodes(affine),
        "original_dtype": dtype,
        "canonical_shape": list(canon_t1.shape),
        "canonical_affine": canon_affine.tolist(),
        "canonical_transform": transform,
        "crop_offset": [0, 0, 0],
        "voxel_size_mm": list(voxel_mm),
        "mirror_index": mirror,
        "mirror_source": mirror_source,
        "mirror_index_image": mirror_image,
        "brain_mask_source": brain_source,
        "brain_voxels": int(brain.sum()),
    }
    if canon_lesion is not None:
        attrs.update(lesion_stats(canon_lesion.astype(bool), mirror, voxel_mm))
    return PreparedScan(canon_t1, canon_lesion, brain.astype(np.uint8), attrs, repairs, notes)


def lesion_stats(lesion: np.ndarray, mirror: float, voxel_mm: tuple[float, ...]) -> dict:
    """Volume, component count and hemisphere of a canonical lesion mask.

    Each 6-connected component is left, right or midline by its centroid
    relative to the mirror plane (within 5 mm: midline, e.g. brainstem);
    components under 5% of the volume are ignored for the side. A scan is
    ``bilateral`` when it has both left and right components.
    """
    labels, n = ndimage.label(lesion)
    voxels = int(lesion.sum())
    sides = set()
    if n:
        index = np.arange(1, n + 1)
        sizes = ndimage.sum_labels(lesion, labels, index)
        centroids = ndimage.center_of_mass(lesion, labels, index)
        for size, (cx, _, _) in zip(sizes, centroids):
            if size < 0.05 * voxels:
                continue
            offset_mm = (cx - mirror) * voxel_mm[0]
            sides.add("midline" if abs(offset_mm) <= HEMISPHERE_MIDLINE_MM else ("right" if offset_mm > 0 else "left"))
    if {"left", "right"} <= sides:
        hemisphere = "bilateral"
    elif sides - {"midline"}:
        hemisphere = (sides - {"midline"}).pop()
    else:
        hemisphere = "midline" if sides else "none"
    return {
        "lesion_voxels": voxels,
        "lesion_volume_ml": round(voxels * float(np.prod(voxel_mm)) / 1000.0, 4),
        "lesion_components": int(n),
        "hemisphere_computed": hemisphere,
    }
