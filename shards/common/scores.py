"""Voxel scores: the one home of confusion counts and of Dice, precision and recall.

The training curve (``trainer.fit``'s validation), the forest's validation
(``trainer.forest``), stream scores (``evaluate.stream``), whole-volume
metrics and the threshold choice (``evaluate.metrics``, ``evaluate.split``)
all count and score here, so the README's promise that a stream's score
equals the training curve's rests on one formula:

- Dice = 2 TP / (2 TP + FP + FN) = 2|P∩T| / (|P| + |T|); 1.0 when both are empty.
- precision TP / (TP + FP), recall TP / (TP + FN); NaN when undefined.

``confusion`` takes boolean numpy arrays or torch tensors alike. NumPy only:
the trainer imports it without the evaluator's heavy parts.
"""

from __future__ import annotations

import math

COUNTS = ("tp", "fp", "fn")


def confusion(pred, truth) -> dict[str, int]:
    """True positives, false positives, false negatives of two masks (numpy or torch; nonzero is True)."""
    p, t = pred != 0, truth != 0
    return {"tp": int((p & t).sum()), "fp": int((p & ~t).sum()), "fn": int((~p & t).sum())}


def add(total: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    """Counts summed (a stream's batches, a split's scans)."""
    return {k: total.get(k, 0) + more[k] for k in more}


def voxel_scores(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Dice, precision and recall from confusion counts."""
    dice = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    return {"dice": dice, "precision": precision, "recall": recall}


def dice(pred, truth) -> float:
    """Dice of two masks."""
    return voxel_scores(**confusion(pred, truth))["dice"]
