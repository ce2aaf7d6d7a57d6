"""Test-time augmentation: a predictor's mean lesion logit over mirrored copies of its input.

``atlas-evaluate run --tta-flips x`` predicts each volume twice, as it is
and mirrored left-right, and averages the two logits voxel by voxel (the
mirroring of nnU-Net's inference, on the axes asked for: ``xyz`` gives all 8
combinations). The ``modern`` recipe trains on exactly these flips (both
cubes of a pair flipped along the same axis: ``trainer/augment.py``), so
each copy is a view the model was trained to read. Cube B of a pair is the
mirror voxel's cube, stored aligned with cube A; flipping the whole padded
two-channel tile flips both cubes of every pair in it alike, so the pairs
stay pairs (tested against flipping each pair). The cost is one prediction
per combination.
"""

from __future__ import annotations

import itertools

import numpy as np

from evaluate.predictors import EvaluateError, Predictor

AXES = "xyz"  # the store's axes 0, 1, 2 (RAS+: x is left-right)


def parse_flips(flips: str | None) -> tuple[int, ...]:
    """``"none"``, ``""`` or None -> (); ``"x"``, ``"xy"``, ``"xyz"`` -> the axes' indices."""
    if not flips or flips == "none":
        return ()
    if any(c not in AXES for c in flips) or len(set(flips)) < len(flips):
        raise EvaluateError(f"--tta-flips {flips!r}: give distinct axes among x, y, z (e.g. x or xyz), or none")
    return tuple(sorted(AXES.index(c) for c in flips))


def flips_label(axes: tuple[int, ...]) -> str:
    return "".join(AXES[a] for a in axes) or "none"


class FlipAveraged:
    """``pred``'s mean logit over every combination of flips along ``axes`` (the identity included)."""

    def __init__(self, pred: Predictor, axes: tuple[int, ...]):
        if not axes:
            raise EvaluateError("flip averaging needs at least one axis")
        self.pred, self.axes = pred, tuple(axes)
        self.combos = [c for k in range(len(axes) + 1) for c in itertools.combinations(axes, k)]
        self.name = f"{pred.name} (flips {flips_label(self.axes)})"
        self.run_dir, self.config, self.preprocessing = pred.run_dir, pred.config, pred.preprocessing
        self.dense = pred.dense

    @property
    def patch(self) -> int:
        return self.pred.patch

    @property
    def norm(self) -> dict:
        return self.pred.norm

    def prior_shift(self) -> float:
        return self.pred.prior_shift()

    def patch_logits(self, pairs: np.ndarray, batch: int = 512) -> np.ndarray:
        """``(B, 2, P, P, P)``: both cubes of each pair flipped alike (spatial axes 2, 3, 4)."""
        return np.mean([self.pred.patch_logits(_flip(pairs, c, 2), batch=batch) for c in self.combos], axis=0)

    def dense_logits(self, padded_tile: np.ndarray) -> np.ndarray:
        """``(2, X, Y, Z)`` padded tile: flipped, predicted, the logits flipped back."""
        return np.mean([_flip(self.pred.dense_logits(_flip(padded_tile, c, 1)), c, 0) for c in self.combos], axis=0)


def _flip(a: np.ndarray, axes: tuple[int, ...], first: int) -> np.ndarray:
    """``a`` flipped along the spatial ``axes`` (0 = x), which start at array axis ``first``; a contiguous copy."""
    return np.ascontiguousarray(np.flip(a, tuple(first + ax for ax in axes))) if axes else a
