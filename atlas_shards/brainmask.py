"""Brain masks: the MNI152 mask for standard-space scans, an intensity and
morphology estimate for native scans, or the user's own mask file.

ATLAS images keep the skull, and background sampling, normalisation and the
region where predictions may be non-zero all need the brain.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

MNI_DILATION_VOXELS = 3  # margin against registration error


@functools.lru_cache(maxsize=1)
def _mni_mask():
    from nilearn import datasets

    return datasets.load_mni152_brain_mask(resolution=1)


def mni_brain_mask(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """nilearn's MNI152 brain mask resampled (nearest) onto a grid, dilated."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    template = _mni_mask()
    if template.shape == tuple(shape) and np.allclose(template.affine, affine, atol=1e-3):
        mask = np.asarray(template.dataobj) > 0
    else:
        src = nib.Nifti1Image(np.asarray(template.dataobj, dtype=np.float32), template.affine)
        mask = np.asarray(resample_from_to(src, (shape, affine), order=0).dataobj) > 0
    return ndimage.binary_dilation(mask, iterations=MNI_DILATION_VOXELS)


def head_mask(volume: np.ndarray) -> np.ndarray:
    """Everything that is not air: smoothed intensity above an Otsu threshold
    between background and head, holes filled."""
    smooth = ndimage.gaussian_filter(volume.astype(np.float32), 1.0)
    return ndimage.binary_fill_holes(smooth > _otsu(smooth.ravel()))


def estimate_brain_mask(volume: np.ndarray, voxel_mm: tuple[float, float, float]) -> np.ndarray:
    """A brain mask from a T1 with skull: a second Otsu threshold inside the
    head separates bright tissue from dark CSF and bone, erosion cuts the thin
    bridges between brain and scalp, the largest component is the brain, then
    dilation back and hole filling (ventricles, sulci).

    Crude by design (no atlas registration): it is used for sampling and
    normalisation, not as a segmentation. A user-supplied mask overrides it.
    """
    smooth = ndimage.gaussian_filter(volume.astype(np.float32), 1.0)
    head = smooth > _otsu(smooth.ravel())
    if not head.any():
        return np.zeros(volume.shape, dtype=bool)
    mask = smooth > _otsu(smooth[head])
    radius_mm = 4.0
    struct = _ball(radius_mm, voxel_mm)
    core = ndimage.binary_erosion(mask, structure=struct)
    labels, n = ndimage.label(core)
    if n == 0:
        return ndimage.binary_fill_holes(mask)
    sizes = ndimage.sum_labels(core, labels, index=np.arange(1, n + 1))
    brain = labels == (1 + int(np.argmax(sizes)))
    brain = ndimage.binary_dilation(brain, structure=struct) & mask
    brain = ndimage.binary_closing(brain, structure=struct, iterations=2)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in brain], axis=0)
    return ndimage.binary_fill_holes(filled)


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def _ball(radius_mm: float, voxel_mm: tuple[float, float, float]) -> np.ndarray:
    r = [max(1, int(round(radius_mm / v))) for v in voxel_mm]
    grid = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((g * v / radius_mm) ** 2 for g, v in zip(grid, voxel_mm)) <= 1.0
