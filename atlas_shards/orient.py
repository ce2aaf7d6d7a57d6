"""Canonical RAS orientation, its exact inverse, and the mirror plane.

Reorientation is a permutation and flips of the voxel axes (nibabel's
closest-canonical orientation): no resampling, so a prediction on the
canonical grid maps back to the original file grid voxel for voxel.
"""

from __future__ import annotations

import os

import numpy as np
from nibabel import orientations as nio

from atlas_shards.brainmask import head_mask
from shards.common.atomic import atomic_path

RAS = nio.axcodes2ornt(("R", "A", "S"))


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[list[float]]]:
    """Reorient a 3D array to closest RAS.

    Returns:
        (canonical array, canonical affine, transform) where ``transform`` is
        the nibabel orientation transform (axis, flip) rows, kept in the store
        so ``from_canonical`` can undo it.
    """
    ornt = nio.io_orientation(affine)
    transform = nio.ornt_transform(ornt, RAS)
    canonical = np.ascontiguousarray(nio.apply_orientation(data, transform))
    canonical_affine = affine @ nio.inv_ornt_aff(transform, data.shape)
    return canonical, canonical_affine, transform.tolist()


def from_canonical(canonical: np.ndarray, transform: list[list[float]], original_shape: tuple[int, ...]) -> np.ndarray:
    """Map a canonical-grid array back onto the original file's voxel grid."""
    transform = np.asarray(transform, dtype=float)
    # The inverse of "move axis i to transform[i,0], flipping if -1".
    inverse = np.zeros_like(transform)
    for i, (axis, flip) in enumerate(transform):
        inverse[int(axis)] = (i, flip)
    out = np.ascontiguousarray(nio.apply_orientation(canonical, inverse))
    if out.shape != tuple(original_shape):
        raise ValueError(f"inverse reorientation gave shape {out.shape}, expected {tuple(original_shape)}")
    return out


def axcodes(affine: np.ndarray) -> str:
    return "".join(nio.aff2axcodes(affine))


def mirror_from_affine(canonical_affine: np.ndarray, shape: tuple[int, ...]) -> float:
    """Voxel index (first axis, canonical grid) of the plane world x = 0 on the
    line through the grid centre, rounded to a half voxel so the mirror of a
    voxel is a voxel."""
    a = canonical_affine
    j, k = (shape[1] - 1) / 2, (shape[2] - 1) / 2
    i = -(a[0, 1] * j + a[0, 2] * k + a[0, 3]) / a[0, 0]
    return float(np.round(2 * i) / 2)


def estimate_mirror(volume: np.ndarray, search: float = 0.2) -> float:
    """Estimate the mid-sagittal plane as the left-right flip that best maps
    the head outline onto itself.

    The outline (not the intensities) is used because a large lesion breaks
    the intensity symmetry and pulls an intensity-based estimate towards it.
    For every candidate c (mirror index m = c / 2), the overlap
    sum_i h[i] * h[c - i] is one full convolution along the first axis,
    computed for all c at once by FFT.

    Args:
        volume: canonical (RAS) image with the head in it.
        search: fraction of the axis length either side of the head's centre
            to search.

    Returns:
        The mirror index, a multiple of 0.5.
    """
    head = head_mask(volume)
    xs = np.flatnonzero(head.any(axis=(1, 2)))
    if xs.size == 0:
        return (volume.shape[0] - 1) / 2
    n = head.shape[0]
    spectrum = np.fft.rfft(head.astype(np.float32), n=2 * n, axis=0)
    corr = np.fft.irfft((spectrum * spectrum).sum(axis=(1, 2)), n=2 * n)[: 2 * n - 1]
    centre = xs.min() + xs.max()  # c of the head's bounding-box centre
    half = int(search * 2 * n)
    lo, hi = max(centre - half, 0), min(centre + half, 2 * n - 2)
    return (lo + int(np.argmax(corr[lo : hi + 1]))) / 2


def mirror_indices(n: int, mirror: float) -> np.ndarray:
    """Index of each voxel's mirror along the first axis (may fall outside)."""
    return (int(round(2 * mirror)) - np.arange(n)).astype(np.int64)


def write_on_original_grid(path: str | os.PathLike, canonical: np.ndarray, attrs: dict, dtype=np.uint8) -> None:
    """Write a canonical array on the scan's original grid and affine (temporary name, then rename)."""
    import nibabel as nib

    data = from_canonical(canonical.astype(dtype), attrs["canonical_transform"], tuple(attrs["original_shape"][:3]))
    img = nib.Nifti1Image(data, np.asarray(attrs["original_affine"], dtype=float))
    img.header.set_data_dtype(dtype)
    with atomic_path(path, suffix=".nii.gz" if str(path).endswith(".gz") else ".nii") as tmp:
        nib.save(img, tmp)  # nibabel compresses by the extension: .nii.gz or .nii, as the caller named it
