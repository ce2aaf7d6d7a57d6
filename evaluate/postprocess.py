"""From lesion probabilities to a mask: the threshold, then small components removed and holes filled.

``PostProcessing`` is the whole rule, applied alike by ``atlas-evaluate run``
and ``predict``. ``choose`` searches threshold, minimum component volume and
hole filling jointly for the best mean Dice over scans it is given; the
evaluator gives it the *validation* scans only (``--threshold auto``), never
the scans it reports on.

Components are 6-connected (``scipy.ndimage.label``'s default, as the
lesion-wise F1 counts them); hole filling is ``scipy.ndimage.binary_fill_holes``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from shards.scores import dice

THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.05, 0.96, 0.05), 2))
MIN_COMPONENTS = (0, 10, 30, 100, 300)  # voxels (at 1 mm^3: 0.01 to 0.3 mL)
FILL = (False, True)


@dataclass(frozen=True)
class PostProcessing:
    """The rule from probabilities to a mask."""

    threshold: float = 0.5
    min_component: int = 0  # voxels: smaller connected components are removed
    fill_holes: bool = False

    def apply(self, prob: np.ndarray) -> np.ndarray:
        """``prob`` (X, Y, Z) float -> mask (X, Y, Z) bool."""
        return clean(prob > self.threshold, self.min_component, self.fill_holes)

    def to_dict(self) -> dict:
        return asdict(self)


def rule_of_report(report: str | os.PathLike) -> PostProcessing:
    """The rule a report of ``atlas-evaluate run`` applied (its directory or ``metrics.json``).

    Raises:
        ValueError: not such a report.
    """
    path = Path(report)
    path = path / "metrics.json" if path.is_dir() else path
    try:
        metrics = json.loads(path.read_text())
        rule = metrics.get("postprocessing") or {"threshold": metrics["threshold"]}
        return PostProcessing(
            float(rule["threshold"]), int(rule.get("min_component", 0)), bool(rule.get("fill_holes", False))
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a metrics.json of atlas-evaluate run ({type(exc).__name__}: {exc})") from None


def clean(mask: np.ndarray, min_component: int, fill_holes: bool) -> np.ndarray:
    """Drop components under ``min_component`` voxels, then fill enclosed holes if asked."""
    if min_component > 0:
        labels, n = ndimage.label(mask)
        if n:
            keep = np.bincount(labels.ravel()) >= min_component
            keep[0] = False
            mask = keep[labels]
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return mask


def _crop(prob: np.ndarray, truth: np.ndarray, lowest: float) -> tuple[np.ndarray, np.ndarray]:
    """The box holding every voxel any rule could mark and every true voxel, one voxel wider.

    Outside it no rule marks anything and nothing is true, and with the margin a
    hole is enclosed in the box exactly when it is in the whole volume: scores
    on the box equal scores on the volume.
    """
    where = np.argwhere((prob > lowest) | truth)
    if not len(where):
        return prob[:1, :1, :1], truth[:1, :1, :1]
    lo = np.maximum(where.min(0) - 1, 0)
    hi = np.minimum(where.max(0) + 2, prob.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return prob[box], truth[box]


def choose(
    scans: Iterable[tuple[np.ndarray, np.ndarray]],
    thresholds: tuple[float, ...] = THRESHOLDS,
    min_components: tuple[int, ...] = MIN_COMPONENTS,
    fill: tuple[bool, ...] = FILL,
) -> tuple[PostProcessing, int]:
    """The rule with the best mean Dice over ``scans`` (``(probability, truth)`` pairs), and how many were used.

    Ties go to the lowest threshold, then the smallest minimum volume, then no
    hole filling: the simplest rule that does as well.
    """
    total, n = np.zeros((len(thresholds), len(min_components), len(fill))), 0
    for prob, truth in scans:
        prob, truth = _crop(prob, truth > 0, min(thresholds))
        n += 1
        for i, t in enumerate(thresholds):
            mask = prob > t
            labels, count = ndimage.label(mask)
            sizes = np.bincount(labels.ravel())
            for j, m in enumerate(min_components):
                keep = sizes >= m
                keep[0] = False
                kept = keep[labels] if m > 0 and count else mask
                for k, f in enumerate(fill):
                    total[i, j, k] += dice(ndimage.binary_fill_holes(kept) if f else kept, truth)
    i, j, k = np.unravel_index(int(np.argmax(total)), total.shape)
    return PostProcessing(thresholds[i], int(min_components[j]), bool(fill[k])), n
