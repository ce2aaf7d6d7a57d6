"""What a training step learns from: one voxel a patch (the paper's), or every labelled voxel of a block.

- ``patch``: batches of patch pairs, one label each (``shards.pool``); the
  loss is the cross-entropy over the batch's samples.
- ``dense``: batches of whole blocks (``shards.block_batches``); the model
  runs densely over each block (``trainer.dense.DenseCNN``) and the loss
  covers every brain or lesion voxel of the blocks' cores, each weighted
  (``--voxel-weights``) by

  - ``draws`` (the default): how often the build's sampling draws it, in
    expectation (version-4 records carry it). The loss is then the
    expectation of the ``patch`` loss over the build's draw, every voxel
    seen at once: sampling by component gives every lesion the same weight,
    whatever its size, as it gives a ``patch`` run the same samples;
  - ``share``: one weight a class, lesion voxels carrying ``lesion_share``
    of the total weight over the shards (43.7% by default, the paper's
    balance), every lesion voxel alike.

  Weights have mean 1 over the shards' labelled voxels. They act as the
  sampling rates of a per-sample build: the evaluator's prior correction
  uses them (``dense_rates``).
- ``dense-sampled``: the same dense forward, the loss only at each block's
  sampled voxels (the build's draw), with ``--class-weights`` as for
  ``patch``: with batch norm off it equals ``patch`` training on the same
  samples (tests/test_dense.py checks loss and gradients).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

OBJECTIVES = ("patch", "dense", "dense-sampled")
VOXEL_WEIGHTS = ("draws", "share")  # --objective dense: each voxel's expected draws, or one weight a class
LESION_SHARE = 0.437  # the paper's training sample: 43.7% lesion
BATCH = {"patch": 64, "dense": 4, "dense-sampled": 4}  # samples, or blocks, a batch by default


class ObjectiveError(ValueError):
    """The shards cannot serve this objective; the message names them and why."""


def is_dense(objective: str) -> bool:
    return objective != "patch"


def check_dense_shards(manifest: dict, where: str) -> None:
    """Dense objectives need blocks shards whose records carry voxel labels (schema version 3 on)."""
    fmt, version = manifest.get("format", "pairs"), manifest.get("schema_version")
    if fmt != "blocks":
        raise ObjectiveError(f"{where}: {fmt} shards; dense training needs blocks shards (build --format blocks)")
    voxels = manifest.get("totals", {}).get("voxels")
    if not isinstance(version, int) or version < 3 or not isinstance(voxels, dict):
        raise ObjectiveError(
            f"{where}: blocks shards of schema version {version} carry no voxel labels; "
            "rebuild them with this version of atlas-shards for a dense objective"
        )
    if not (int(voxels.get("lesion", 0)) > 0 and int(voxels.get("background", 0)) > 0):
        raise ObjectiveError(f"{where}: the blocks hold {voxels} labelled voxels; dense training needs both classes")


def dense_weights(manifest: dict, share: float) -> tuple[float, float]:
    """(background, lesion) voxel weights: lesion voxels carry ``share`` of the shards' total weight, mean 1."""
    if not 0 < share < 1:
        raise ObjectiveError(f"--lesion-share must be in (0, 1), got {share}")
    voxels = manifest["totals"]["voxels"]
    lesion, background = int(voxels["lesion"]), int(voxels["background"])
    total = lesion + background
    return (1 - share) * total / background, share * total / lesion


def draws_scale(manifest: dict, where: str) -> float:
    """``--voxel-weights draws``: the factor that turns the cores' expected draws into loss weights of mean 1."""
    draws, voxels = manifest["totals"].get("draws"), manifest["totals"]["voxels"]
    if not isinstance(draws, dict):
        raise ObjectiveError(
            f"{where}: blocks shards of schema version {manifest.get('schema_version')} carry no expected draws "
            "of their voxels; rebuild them with this version of atlas-shards, or train with --voxel-weights share"
        )
    if manifest["config"].get("hard_negatives") is not None:
        raise ObjectiveError(
            f"{where}: built with --hard-negatives, whose background draws follow probability maps the records "
            "do not hold; train with --voxel-weights share"
        )
    total = float(draws["lesion"]) + float(draws["background"])
    if not (math.isfinite(total) and total > 0 and float(draws["lesion"]) > 0):
        raise ObjectiveError(f"{where}: the blocks' expected draws are {draws}; dense training needs lesion draws")
    return (int(voxels["lesion"]) + int(voxels["background"])) / total


def weight_totals(manifest: dict, weights: tuple[float, float] | None, scale: float | None) -> tuple[float, float]:
    """(background, lesion): the dense loss's weight summed over the cores' voxels of each class, for the class
    weights ``weights`` (``--voxel-weights share``) or the expected draws times ``scale`` (``draws``)."""
    if weights is not None:
        voxels = manifest["totals"]["voxels"]
        return weights[0] * int(voxels["background"]), weights[1] * int(voxels["lesion"])
    draws = manifest["totals"]["draws"]
    return scale * float(draws["background"]), scale * float(draws["lesion"])


def dense_rates(manifest: dict, totals: tuple[float, float]) -> dict | None:
    """The sampling rates a dense run's weights stand for, over the split's voxels (for the prior correction).

    A voxel in a streamed block's core counts its weight times; voxels
    outside the streamed blocks count 0. So the lesion rate is the lesion
    voxels' total weight (``weight_totals``) over the lesion voxels of the
    split, and the background rate likewise; ``log(lesion rate / background
    rate)`` is the shift.
    """
    scans = manifest.get("scans") or []
    try:
        lesion = sum(int(s["lesion_voxels"]) for s in scans)
        background = sum(int(s["background_voxels"]) for s in scans)
    except (KeyError, TypeError, ValueError):
        return None
    if lesion <= 0 or background <= 0:
        return None
    return {"lesion_rate": totals[1] / lesion, "background_rate": totals[0] / background, "objective": "dense"}


def dense_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Weighted cross-entropy over the labelled voxels of ``logits (B, 2, N, N, N)``; ``labels (B, 2, N, N, N)``
    (lesion, brain); ``weights``: (background, lesion), or one a voxel ``(B, N, N, N)``. Returns the loss and
    how many voxels it covers.

    The weighted sum is divided by the number of labelled voxels, not by the batch's sum of weights: the
    weights have mean 1 over the shards (``dense_weights``), so a batch's loss is an unbiased estimate of the
    shards' weighted mean loss, and the weights act exactly as sampling rates (the prior correction assumes
    it). Dividing by each batch's own weight sum would give a batch without lesion voxels the weight of one
    with many, and the lesion voxels far less than their share over a run.
    """
    import torch.nn.functional as F  # here: the CLI reads this module's choices, and --help stays instant

    lesion = labels[:, 0].long()
    counted = (labels[:, 0] | labels[:, 1]).bool()
    ce = F.cross_entropy(logits, lesion, reduction="none")
    n = int(counted.sum())
    per_voxel = weights[lesion] if weights.dim() == 1 else weights
    return (per_voxel * counted * ce).sum() / max(n, 1), n


def sampled_loss(
    logits: torch.Tensor, owner: torch.Tensor, off: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """Cross-entropy at the sampled voxels only: sample k is voxel ``off[k]`` of block ``owner[k]``."""
    import torch.nn.functional as F

    picked = logits[owner, :, off[:, 0], off[:, 1], off[:, 2]]
    return F.cross_entropy(picked, y, weight=weight), len(y)
