"""Hard negatives: background voxels drawn in proportion to a prior model's lesion probability.

The sharder stays model-free: its input is a directory of probability maps
that ``atlas-evaluate run --save-probabilities`` wrote (one
``<scan>_desc-lesion_probability.nii.gz`` per scan, on the scan's original
grid). A share ``h`` of the background draws follows the map (where the
prior model saw lesion in healthy tissue: its false positives), the rest
stays uniform, so every background voxel keeps a chance. Only *which*
background voxels are drawn changes: the per-scan counts, and so the lesion
fraction, are the plan's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SUFFIX = "_desc-lesion_probability.nii.gz"


class HardNegativeError(ValueError):
    """A probability map that cannot be used (absent, unreadable, another grid); the scan samples uniformly."""


def map_path(directory: str | Path, scan_id: str) -> Path:
    """The scan's map in ``directory`` or in its ``masks/`` (a whole ``atlas-evaluate run`` report)."""
    directory = Path(directory)
    for candidate in (directory / f"{scan_id}{SUFFIX}", directory / "masks" / f"{scan_id}{SUFFIX}"):
        if candidate.is_file():
            return candidate
    raise HardNegativeError(f"{directory}: no probability map {scan_id}{SUFFIX} (nor in masks/)")


def load_map(directory: str | Path, scan_id: str, shape: tuple[int, ...]) -> np.ndarray:
    """The scan's lesion probability on the store's canonical grid (float32, ``shape``)."""
    import nibabel as nib

    from atlas_shards.orient import to_canonical

    path = map_path(directory, scan_id)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise HardNegativeError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if data.ndim != 3:
        raise HardNegativeError(f"{path}: a {data.ndim}D image, not a 3D probability map")
    canonical = to_canonical(data, img.affine)[0]
    if canonical.shape != tuple(shape):
        raise HardNegativeError(f"{path}: grid {canonical.shape} is not the scan's {tuple(shape)}")
    if not np.isfinite(canonical).all() or canonical.min() < 0 or canonical.max() > 1:
        raise HardNegativeError(f"{path}: values outside [0, 1] (not a probability map)")
    return canonical


def draw_background(
    candidates: np.ndarray, count: int, probability: np.ndarray, share: float, rng: np.random.Generator
) -> np.ndarray:
    """``count`` of the flat indices ``candidates``, without replacement, weighted.

    Weight of voxel i: ``(1 - share) / n + share * p_i / sum(p)`` (uniform if
    the map is zero everywhere there). Weighted sampling without replacement
    by exponential keys (Efraimidis and Spirakis): the ``count`` smallest
    ``E_i / w_i``, ``E_i ~ Exp(1)``; linear in the candidates.
    """
    n = candidates.size
    p = probability.ravel()[candidates].astype(np.float64)
    total = p.sum()
    weights = np.full(n, 1.0 / n) if total <= 0 else (1 - share) / n + share * p / total
    with np.errstate(divide="ignore"):
        keys = rng.exponential(size=n) / weights  # weight 0 (share 1, p 0): key inf, drawn last
    if count >= n:
        return candidates
    return candidates[np.sort(np.argpartition(keys, count)[:count])]
