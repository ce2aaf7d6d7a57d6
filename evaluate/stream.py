"""``atlas-evaluate stream``: voxel-level scores of any model on a shard stream, in bounded memory."""

from __future__ import annotations

import numpy as np

from evaluate.predictors import EvaluateError, load_run
from evaluate.volume import to_probability
from shards.manifest import ManifestError, check_compatible
from shards.reader import ShardStream
from shards.common.scores import add, confusion, voxel_scores

BINS = 2000


def roc_auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC from per-class probability histograms (ties within a bin count half)."""
    if pos.sum() == 0 or neg.sum() == 0:
        return float("nan")
    below = np.concatenate([[0], np.cumsum(neg)[:-1]])
    return float(((below + 0.5 * neg) * pos).sum() / (pos.sum() * neg.sum()))


def score_stream(
    run_dir,
    spec: str,
    threshold: float = 0.5,
    prior_correction: bool = False,
    batch_size: int = 512,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Dice, precision, recall, ROC AUC and confusion counts over every sample of the stream."""
    from tqdm import tqdm

    pred = load_run(run_dir, device=device, dense=False)
    shift = pred.prior_shift() if prior_correction else 0.0
    stream = ShardStream(spec, batch_size=batch_size, shuffle=0)
    if stream.manifest is not None:
        try:
            check_compatible(pred.preprocessing, f"run {run_dir}", stream.manifest, f"shards {spec}")
        except ManifestError as exc:
            raise EvaluateError(str(exc)) from None
    pos, neg = np.zeros(BINS), np.zeros(BINS)
    counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    skipped = 0
    for batch in tqdm(stream, desc="score stream", unit="batch", disable=not progress):
        prob = to_probability(pred.patch_logits(batch["x"].numpy()), shift)
        y = batch["y"].numpy().astype(bool)
        bins = np.minimum((prob * BINS).astype(int), BINS - 1)
        pos += np.bincount(bins[y], minlength=BINS)
        neg += np.bincount(bins[~y], minlength=BINS)
        hit = prob > threshold
        counts = add(counts, {**confusion(hit, y), "tn": int((~hit & ~y).sum())})
        skipped += int(batch["skipped"])
    scores = voxel_scores(counts["tp"], counts["fp"], counts["fn"])
    return {
        "model": pred.name,
        "shards": spec,
        "samples": sum(counts.values()),
        "lesion_samples": counts["tp"] + counts["fn"],
        **scores,
        "roc_auc": roc_auc_from_histograms(pos, neg),
        **counts,
        "threshold": threshold,
        "prior_correction": bool(prior_correction and shift),
        "skipped": skipped,
    }
