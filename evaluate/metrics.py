"""ATLAS 2.0 challenge metrics: pure NumPy/SciPy functions of binary volumes.

- Dice = 2|P∩T| / (|P| + |T|); 1.0 when both are empty (``shards.common.scores``,
  with the confusion counts and precision/recall: one home for all).
- Absolute volume difference = |ΣP - ΣT| voxels (and mL with the voxel volume).
- Lesion-wise F1 = TP / (TP + (FP + FN) / 2) over connected components
  (``scipy.ndimage.label`` default structure: 6-connectivity); a true lesion
  is found (TP) if any predicted voxel overlaps it, otherwise it is a FN; a
  predicted component touching no true lesion is a FP; 1.0 when neither
  volume has a lesion.
- Simple lesion count difference = |#components(P) - #components(T)|.
- Voxel precision TP/(TP+FP) and recall TP/(TP+FN); NaN when undefined.
- Small-lesion Dice: the mean Dice of the scans whose whole lesion load is
  under ``SMALL_LESION_ML`` (5 mL): the cases a model most often misses,
  reported apart because the large ones dominate pooled Dice.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from shards.common.scores import COUNTS, confusion, voxel_scores

SMALL_LESION_ML = 5.0


def lesion_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred.astype(bool), truth.astype(bool)
    t_lab, n_t = ndimage.label(t)
    p_lab, n_p = ndimage.label(p)
    if n_t == 0 and n_p == 0:
        return 1.0
    found = np.unique(t_lab[p & t])
    tp = int((found > 0).sum())
    fn = n_t - tp
    touching = np.unique(p_lab[p & t])
    fp = n_p - int((touching > 0).sum())
    return tp / (tp + (fp + fn) / 2)


def lesion_count_difference(pred: np.ndarray, truth: np.ndarray) -> int:
    return abs(ndimage.label(pred.astype(bool))[1] - ndimage.label(truth.astype(bool))[1])


def voxel_ml(attrs: dict) -> float:
    """One voxel's volume in mL (a scan's voxel size (store or preprocessing attributes); 1 mm^3 when not recorded)."""
    return float(np.prod(attrs.get("voxel_size_mm", [1, 1, 1]))) / 1000


def case_metrics(pred: np.ndarray, truth: np.ndarray, voxel_ml: float = 0.001) -> dict[str, float]:
    """Every per-case score for one scan (``voxel_ml``: one voxel's volume in mL)."""
    c = confusion(pred, truth)
    vol_p, vol_t = c["tp"] + c["fp"], c["tp"] + c["fn"]
    scores = voxel_scores(**c)
    return {
        "dice": scores["dice"],
        "abs_volume_diff_voxels": abs(vol_p - vol_t),
        "abs_volume_diff_ml": abs(vol_p - vol_t) * voxel_ml,
        "lesion_f1": lesion_f1(pred, truth),
        "lesion_count_diff": lesion_count_difference(pred, truth),
        "precision": scores["precision"],
        "recall": scores["recall"],
        "true_voxels": vol_t,
        "true_ml": vol_t * voxel_ml,
        "predicted_voxels": vol_p,
        **c,
    }


def summarise(cases: list[dict]) -> dict[str, float]:
    """Means over cases, pooled Dice, precision and recall over all voxels, and the small-lesion Dice."""

    def mean(key, among=cases):
        values = [c[key] for c in among if not (isinstance(c[key], float) and math.isnan(c[key]))]
        return float(np.mean(values)) if values else math.nan

    small = [c for c in cases if c["true_ml"] < SMALL_LESION_ML]

    pooled = voxel_scores(*(sum(c[k] for c in cases) for k in COUNTS))
    return {
        "n_subjects": len(cases),
        "mean_dice": mean("dice"),
        "pooled_dice": pooled["dice"],
        "mean_lesion_f1": mean("lesion_f1"),
        "mean_abs_volume_diff_voxels": mean("abs_volume_diff_voxels"),
        "mean_abs_volume_diff_ml": mean("abs_volume_diff_ml"),
        "mean_lesion_count_diff": mean("lesion_count_diff"),
        "precision": pooled["precision"],
        "recall": pooled["recall"],
        "n_small": len(small),
        "small_lesion_dice": mean("dice", small),
    }
