"""Several trained runs as one predictor: the mean of their prior-corrected lesion logits.

``atlas-evaluate run --model A --model B ...`` and ``predict`` take more than
one run. Each member's logit is corrected by its own prior shift (its own
training sample's rates), then the corrected logits are averaged: the
geometric mean of the members' odds. Because the correction is a subtraction,
that equals the mean raw logit less the mean shift, which is how ``Ensemble``
computes it (so ``--no-prior-correction`` drops every member's shift at once).
The members must read the same input (patch size and normalisation); they may
be different models, seeds or shard builds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from evaluate.predictors import EvaluateError, Predictor, load_run
from evaluate.tta import FlipAveraged


class Ensemble:
    """The members' mean logit, patch by patch or dense (dense when every member has a dense twin)."""

    def __init__(self, members: list[Predictor]):
        if len(members) < 2:
            raise EvaluateError("an ensemble needs at least two runs")
        first = members[0]
        for m in members[1:]:
            if m.patch != first.patch or m.norm != first.norm:
                raise EvaluateError(
                    f"{m.run_dir}: patch {m.patch}, normalisation {m.norm}; {first.run_dir}: patch {first.patch}, "
                    f"normalisation {first.norm}: an ensemble's runs must read the same input"
                )
        self.members = members
        names = [m.name for m in members]
        self.name = f"{names[0]} x{len(names)}" if len(set(names)) == 1 else "+".join(names)
        self.run_dir = None
        self.config = {"ensemble": [m.config for m in members]}
        self.preprocessing = first.preprocessing
        # volume.lesion_logits goes dense when ``dense`` is set: only if every member has a dense twin
        self.dense = first.dense if all(m.dense is not None for m in members) else None

    @property
    def patch(self) -> int:
        return self.members[0].patch

    @property
    def norm(self) -> dict:
        return self.members[0].norm

    def prior_shift(self) -> float:
        return float(np.mean([m.prior_shift() for m in self.members]))

    def patch_logits(self, pairs: np.ndarray, batch: int = 512) -> np.ndarray:
        return np.mean([m.patch_logits(pairs, batch=batch) for m in self.members], axis=0)

    def dense_logits(self, padded_tile: np.ndarray) -> np.ndarray:
        return np.mean([m.dense_logits(padded_tile) for m in self.members], axis=0)


def _as_list(run_dirs) -> list[Path]:
    """One run directory, or any sequence of them, as a list."""
    return [Path(run_dirs)] if isinstance(run_dirs, (str, os.PathLike)) else [Path(r) for r in run_dirs]


def load_models(run_dirs, device: str = "cpu", dense: bool = True, tta_flips: tuple[int, ...] = ()) -> Predictor:
    """One run directory (or a list of one): that run; several: their ``Ensemble``; with ``tta_flips`` (axes,
    ``evaluate.tta.parse_flips``) the mean over those flips of the input."""
    axes = tuple(tta_flips)
    run_dirs = _as_list(run_dirs)
    if not run_dirs:
        raise EvaluateError("no run given")
    if len(set(r.resolve() for r in run_dirs)) < len(run_dirs):
        raise EvaluateError("a run is given twice: an ensemble's runs must differ")
    members = [load_run(r, device=device, dense=dense) for r in run_dirs]
    pred = members[0] if len(members) == 1 else Ensemble(members)
    return FlipAveraged(pred, axes) if axes else pred


def run_dirs_label(run_dirs) -> str | list[str]:
    """How a report names its run(s): the directory, or the list of them."""
    names = [str(r) for r in _as_list(run_dirs)]
    return names[0] if len(names) == 1 else names
