"""Whole-volume prediction: every voxel of the brain mask's bounding box, no sampling."""

from __future__ import annotations

import itertools

import numpy as np
from scipy.special import expit

from evaluate.predictors import Predictor
from shards.norm import normalise
from shards.patches import PairCutter, padded_pair


def brain_bbox(brain: np.ndarray) -> tuple[slice, ...]:
    idx = np.nonzero(brain)
    if not idx[0].size:
        raise ValueError("empty brain mask")
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)


def lesion_logits(
    pred: Predictor,
    t1: np.ndarray,
    brain: np.ndarray,
    mirror: float,
    tile: int = 64,
    use_dense: bool = True,
    batch: int = 512,
    stride: int = 1,
) -> np.ndarray:
    """Lesion logit ``(X, Y, Z)`` float32, -inf where it was not computed.

    The volume is normalised with the training run's method (``shards.norm``),
    then each voxel's pair is classified: densely over the brain mask's
    bounding box in tiles of ``tile``^3 output voxels (input tiles overlap by
    P-1), or patch by patch in batches over the brain mask's voxels. A
    ``stride`` k > 1 (patch by patch only: models without a dense twin, on
    the CPU) classifies the brain voxels whose three indices are multiples
    of k and gives every voxel the logit of the one at its k^3 block's corner.
    """
    vol = normalise(t1, brain, pred.norm["method"])
    p = pred.patch
    out = np.full(vol.shape, -np.inf, dtype=np.float32)
    box = brain_bbox(brain)
    if use_dense and pred.dense is not None:
        padded = padded_pair(vol, mirror, p)
        starts = [range(s.start, s.stop, tile) for s in box]
        for a in itertools.product(*starts):
            b = [min(lo + tile, s.stop) for lo, s in zip(a, box)]
            tile_in = padded[:, a[0] : b[0] + p - 1, a[1] : b[1] + p - 1, a[2] : b[2] + p - 1]
            out[a[0] : b[0], a[1] : b[1], a[2] : b[2]] = pred.dense_logits(tile_in)
        return out
    cutter = PairCutter(vol, mirror, p)
    k = stride
    grid = np.argwhere(brain[::k, ::k, ::k] > 0) * k  # outside the brain the answer is 0 anyway: classify only inside
    for start in range(0, len(grid), batch * 8):
        centres = grid[start : start + batch * 8]
        out[tuple(centres.T)] = pred.patch_logits(cutter(centres), batch=batch)
    if k > 1:
        corners = out[::k, ::k, ::k]
        out = np.repeat(np.repeat(np.repeat(corners, k, 0), k, 1), k, 2)[: vol.shape[0], : vol.shape[1], : vol.shape[2]]
        out = np.ascontiguousarray(out)
    return out


def to_probability(logits: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """Sigmoid of (logit - shift): the prior correction subtracts log(lesion rate / background rate)."""
    return expit(logits.astype(np.float64) - shift).astype(np.float32)
