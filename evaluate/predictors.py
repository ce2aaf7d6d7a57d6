"""Trained runs as voxel classifiers: patch by patch (every model) or dense (the 3D CNNs).

The dense path is the model's own fully convolutional form
(``trainer.dense.DenseCNN``, the one training uses too): run over the padded
two-channel volume it gives, at every voxel, exactly the classifier's output
for the patch centred there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from scipy.special import logit
from torch import nn

from shards.common.views import dequantise
from trainer import checkpoint as ckpt_io
from trainer.forest import FOREST, ForestModel
from trainer.dense import DenseCNN
from trainer.devices import resolve_device
from trainer.models import ModelConfig, build_model
from trainer.registry import ModelError, model_entry


class EvaluateError(Exception):
    """A run, store or input cannot be evaluated; the message says why."""


class Predictor(Protocol):
    """A trained run as a voxel classifier: lesion logits for stored pairs, patch by patch or dense.

    Implemented by ``TorchPredictor`` (the CNNs and the ResNet) and ``ForestPredictor``.
    """

    name: str
    run_dir: Path | None
    config: dict
    preprocessing: dict
    dense: DenseCNN | None  # the exact dense twin, when the model has one

    @property
    def patch(self) -> int: ...

    @property
    def norm(self) -> dict: ...

    def prior_shift(self) -> float: ...

    def patch_logits(self, pairs: np.ndarray, batch: int = 512) -> np.ndarray: ...

    def dense_logits(self, padded_tile: np.ndarray) -> np.ndarray: ...


@dataclass
class _Run:
    """What every trained run has: its name, directory, model settings and preprocessing."""

    name: str
    run_dir: Path | None
    config: dict
    preprocessing: dict

    @property
    def patch(self) -> int:
        return int(self.preprocessing["build"]["patch"])

    @property
    def norm(self) -> dict:
        return self.preprocessing["norm"]

    def prior_shift(self) -> float:
        """log(lesion rate / background rate) of the training sample: 0 for an un-upsampled one.

        The rates actually drawn (``shards.manifest.sampling_rates``, recorded
        at training time), not the configured ones: with a lesion cap or
        sampling by component the configured lesion rate (1) overstates the
        drawn one. Runs from before that record use the configured rates.

        A dense run (``fit --objective dense``) records the rates its voxel
        weights stand for (``trainer.objectives.dense_rates``); they are used
        whatever the build drew.

        0 for hard-negative shards (``build --hard-negatives``): the shift
        assumes a uniformly drawn background, but there the voxels a prior
        model mistook for lesion were drawn more often, so the model has already
        lowered its odds where it matters (BENCHMARKS.md, "hard negatives").
        """
        build, sampling = self.preprocessing["build"], self.preprocessing.get("sampling") or {}
        if sampling.get("objective") == "dense":  # a dense loss's voxel weights (trainer/objectives.py)
            return math.log(float(sampling["lesion_rate"]) / float(sampling["background_rate"]))
        if build.get("hard_negatives") and float(build.get("hard_share", 0.0)) > 0:
            return 0.0
        if build.get("mode") == "natural":
            return 0.0
        rates = self.preprocessing.get("sampling") or build
        lesion, background = float(rates["lesion_rate"]), float(rates["background_rate"])
        return 0.0 if lesion <= 0 or background <= 0 else math.log(lesion / background)


@dataclass
class TorchPredictor(_Run):
    """A trained network (``atlas-train fit``); ``dense`` is its fully convolutional twin, when it has one."""

    model: nn.Module = None
    dense: DenseCNN | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.no_grad()
    def patch_logits(self, pairs: np.ndarray, batch: int = 512) -> np.ndarray:
        """``(B, 2, P, P, P) uint8`` -> lesion logit ``(B,)`` (float64), the reference path."""
        out = []
        for start in range(0, len(pairs), batch):
            x = torch.from_numpy(np.ascontiguousarray(pairs[start : start + batch])).to(self.device)
            logits = self.model(self.model.prepare(x)).double()
            out.append((logits[:, 1] - logits[:, 0]).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    @torch.no_grad()
    def dense_logits(self, padded_tile: np.ndarray) -> np.ndarray:
        """``(2, x+P-1, y+P-1, z+P-1) uint8`` padded pair tile -> lesion logit ``(x, y, z)``."""
        x = dequantise(torch.from_numpy(np.ascontiguousarray(padded_tile)).to(self.device), self.norm)
        logits = self.dense(self.model.channels(x.unsqueeze(0)))[0].double()
        return (logits[1] - logits[0]).cpu().numpy()


@dataclass
class ForestPredictor(_Run):
    """The random-forest baseline (``atlas-train rf``): patch by patch only."""

    forest: ForestModel = None
    dense: None = None

    def patch_logits(self, pairs: np.ndarray, batch: int = 512) -> np.ndarray:
        """``(B, 2, P, P, P) uint8`` -> lesion logit ``(B,)`` (float64)."""
        return logit(np.clip(self.forest.lesion_probability(pairs), 1e-6, 1 - 1e-6))

    def dense_logits(self, padded_tile: np.ndarray) -> np.ndarray:
        raise EvaluateError("the random forest has no dense path; it is evaluated patch by patch")


def run_model_name(run_dir: Path) -> str | None:
    """The registered model a run directory holds, as its ``config.json`` names it (``fit`` and ``rf`` write one);
    None without one, or for a checkpoint file (a snapshot): the checkpoint then says."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as exc:
        raise EvaluateError(f"{run_dir / 'config.json'}: unreadable ({exc})") from None
    name = config.get("model", {}).get("name") if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise EvaluateError(f"{run_dir / 'config.json'}: no model name (model.name)")
    return name


def load_run(run_dir: str | Path, device: str = "cpu", dense: bool = True) -> TorchPredictor | ForestPredictor:
    """Load a training run directory: its model's entry in ``trainer/registry.py`` says which trainer wrote it."""
    run_dir = Path(run_dir)
    try:
        device = resolve_device(device)
        name = run_model_name(run_dir)
        command = "fit" if name is None else model_entry(name).command
    except ValueError as exc:  # ModelError is one
        raise EvaluateError(f"{run_dir}: {exc}" if isinstance(exc, ModelError) else str(exc)) from None
    return LOADERS[command](run_dir, device, dense)


def _load_network(run_dir: Path, device: torch.device, dense: bool) -> TorchPredictor:
    """A run of ``atlas-train fit`` (``last.pt``), with its dense twin when the model has one."""
    try:
        ckpt = ckpt_io.load(run_dir)
    except ckpt_io.CheckpointError as exc:
        raise EvaluateError(f"{exc} (expected a run directory of atlas-train fit or rf)") from None
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    cfg.pretrained = "none"  # the checkpoint holds every weight: never fetch anything
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval().to(device)
    pred = TorchPredictor(cfg.name, run_dir, cfg.to_dict(), ckpt["preprocessing"], model=model, device=device)
    if dense and model_entry(cfg.name).dense and cfg.layout == "channels":
        try:
            pred.dense = DenseCNN(model).eval().to(device)
        except ModelError:  # a patch its pooling does not tile (27, 31, ...): patch by patch, as fit said
            pred.dense = None
    return pred


def _load_forest(run_dir: Path, device: torch.device, dense: bool) -> ForestPredictor:
    """A run of ``atlas-train rf`` (``forest.npz``): patch by patch, on the CPU."""
    if not (run_dir / FOREST).is_file():
        raise EvaluateError(f"{run_dir}: its config.json names a forest, but there is no {FOREST}")
    forest = ForestModel.load(run_dir)
    pre = forest.config.get("preprocessing")
    if pre is None:
        raise EvaluateError(f"{run_dir}: forest trained without a shard manifest: its preprocessing is unknown")
    return ForestPredictor(forest.config["model"]["name"], run_dir, forest.config["model"], pre, forest=forest)


LOADERS = {"fit": _load_network, "rf": _load_forest}  # by the trainer command of the run's registry entry
