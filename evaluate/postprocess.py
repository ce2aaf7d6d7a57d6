"""From lesion probabilities to a mask: the threshold, then doubtful components removed and holes filled.

``PostProcessing`` is the whole rule, applied alike by ``atlas-evaluate run``
and ``predict``. A component of the thresholded map is kept when it has at
least ``min_component`` voxels and its highest probability reaches
``min_peak`` (hysteresis thresholding: ``threshold`` sets a lesion's extent,
``min_peak`` whether the model is sure enough that it is one, whatever its
size; a size limit alone erases every small lesion). ``choose`` searches
threshold, minimum volume and hole filling (and minimum peaks, when given
``min_peaks``) jointly for the best mean Dice over scans it is given; the
evaluator gives it the *validation* scans only (``--threshold auto``), never
the scans it reports on. The peak is not searched by default (measured in
BENCHMARKS.md, "Seeds, the 20-CPU-minute budget, post-processing").

Components are 6-connected (``scipy.ndimage.label``'s default, as the
lesion-wise F1 counts them); hole filling is ``scipy.ndimage.binary_fill_holes``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from shards.common.scores import dice, voxel_scores

THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.05, 0.96, 0.05), 2))
MIN_COMPONENTS = (0, 10, 30, 100, 300)  # voxels (at 1 mm^3: 0.01 to 0.3 mL)
MIN_PEAKS = (0.0, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)  # a grid for choose(min_peaks=...); 0: no peak required
FILL = (False, True)


@dataclass(frozen=True)
class PostProcessing:
    """The rule from probabilities to a mask."""

    threshold: float = 0.5
    min_component: int = 0  # voxels: smaller connected components are removed
    fill_holes: bool = False
    min_peak: float = 0.0  # components whose highest probability is lower are removed

    def apply(self, prob: np.ndarray) -> np.ndarray:
        """``prob`` (X, Y, Z) float -> mask (X, Y, Z) bool."""
        return clean(prob > self.threshold, self.min_component, self.fill_holes, prob, self.min_peak)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line, as the commands print it."""
        peak = f" peaking at >= {self.min_peak}" if self.min_peak > self.threshold else ""
        return (
            f"threshold {self.threshold}, components of at least {self.min_component} voxels{peak}, "
            f"holes {'filled' if self.fill_holes else 'kept'}"
        )

    @classmethod
    def from_dict(cls, rule: dict) -> PostProcessing:
        """From ``to_dict``'s form (older reports: no ``min_peak``, or only a threshold)."""
        return cls(
            float(rule["threshold"]),
            int(rule.get("min_component", 0)),
            bool(rule.get("fill_holes", False)),
            float(rule.get("min_peak", 0.0)),
        )


def rule_of_report(report: str | os.PathLike, run_dirs=None) -> PostProcessing:
    """The rule a report of ``atlas-evaluate run`` applied (its directory or ``metrics.json``), each value
    checked as its option would be. With ``run_dirs`` (the run, or an ensemble's runs, it is for), a report of
    other runs is refused: a threshold is a property of one model's probabilities.

    Raises:
        ValueError: not such a report, or a value out of range: naming the file and the key.
    """
    path, metrics = _report(report)
    rule = metrics.get("postprocessing")
    if rule is None and "threshold" not in metrics:
        raise ValueError(f"{path}: not a metrics.json of atlas-evaluate run (no postprocessing, no threshold)")
    rule = {"threshold": metrics["threshold"]} if rule is None else rule
    if not isinstance(rule, dict):
        raise ValueError(f"{path}: postprocessing is a JSON {type(rule).__name__}, not an object")
    unknown = sorted(set(rule) - {"threshold", "min_component", "fill_holes", "min_peak", "source"})
    if unknown:
        raise ValueError(f"{path}: postprocessing has unknown key(s) {', '.join(unknown)}")
    checks = {
        "threshold": (lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
        "min_component": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a voxel count >= 0"),
        "fill_holes": (lambda v: isinstance(v, bool), "true or false"),
        "min_peak": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    }
    for key, (ok, what) in checks.items():
        if key in rule and not ok(rule[key]):
            raise ValueError(f"{path}: postprocessing.{key} is {json.dumps(rule[key])}, not {what}")
    if run_dirs is not None and metrics.get("run_dir") is not None:
        given = sorted(
            str(Path(r).resolve()) for r in (run_dirs if isinstance(run_dirs, (list, tuple)) else [run_dirs])
        )
        made = metrics["run_dir"] if isinstance(metrics["run_dir"], list) else [metrics["run_dir"]]
        if sorted(str(Path(r).resolve()) for r in made) != given:
            raise ValueError(
                f"{path}: a report of {', '.join(map(str, made))}, not of {', '.join(given)}: its rule was chosen "
                "on another model's probabilities"
            )
    return PostProcessing.from_dict(rule)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def flips_of_report(report: str | os.PathLike) -> tuple[int, ...]:
    """The axes of the test-time flips a report of ``atlas-evaluate run`` averaged over (none before the option)."""
    from evaluate.tta import parse_flips

    return parse_flips(str(_report(report)[1].get("tta_flips") or "none"))


def _report(report: str | os.PathLike) -> tuple[Path, dict]:
    path = Path(report)
    path = path / "metrics.json" if path.is_dir() else path
    try:
        metrics = json.loads(path.read_text())
        if not isinstance(metrics, dict):
            raise TypeError(f"a JSON {type(metrics).__name__}, not an object")
        return path, metrics
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a metrics.json of atlas-evaluate run ({type(exc).__name__}: {exc})") from None


def clean(
    mask: np.ndarray, min_component: int, fill_holes: bool, prob: np.ndarray | None = None, min_peak: float = 0.0
) -> np.ndarray:
    """Drop components under ``min_component`` voxels or whose highest ``prob`` is under ``min_peak``, then fill
    enclosed holes if asked."""
    if min_component > 0 or (prob is not None and min_peak > 0):
        labels, n = ndimage.label(mask)
        if n:
            mask = _kept(labels, n, prob, min_component, min_peak)[labels]
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return mask


def _kept(labels: np.ndarray, n: int, prob: np.ndarray | None, min_component: int, min_peak: float) -> np.ndarray:
    """Which labels 0..n are kept (label 0, the background, never)."""
    keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_component
    if prob is not None and min_peak > 0:
        keep &= _peaks(labels, n, prob) >= min_peak
    keep[0] = False
    return keep


def _peaks(labels: np.ndarray, n: int, prob: np.ndarray) -> np.ndarray:
    """The highest probability of each label 0..n."""
    return np.asarray(ndimage.maximum(prob, labels, index=np.arange(n + 1)), dtype=np.float64)


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
    min_peaks: tuple[float, ...] = (0.0,),
) -> tuple[PostProcessing, int]:
    """The rule with the best mean Dice over ``scans`` (``(probability, truth)`` pairs), and how many were used.

    Ties go to the lowest threshold, then the smallest minimum volume, then the
    lowest minimum peak, then no hole filling: the simplest rule that does as
    well. A minimum peak at or under the threshold is scored as none.
    """
    total, n = np.zeros((len(thresholds), len(min_components), len(min_peaks), len(fill))), 0
    for prob, truth in scans:
        prob, truth = _crop(prob, truth > 0, min(thresholds))
        n += 1
        n_true = int(truth.sum())
        for i, t in enumerate(thresholds):
            labels, count = ndimage.label(prob > t)
            sizes = np.bincount(labels.ravel(), minlength=count + 1)
            hits = np.bincount(labels[truth], minlength=count + 1)  # true voxels in each component
            peaks = _peaks(labels, count, prob) if count else np.zeros(1)
            scored: dict[bytes, list[float]] = {}  # the components kept -> Dice without and with hole filling
            for j, m in enumerate(min_components):
                for q, peak in enumerate(min_peaks):
                    keep = (sizes >= m) & (peaks >= (peak if peak > t else 0.0))
                    keep[0] = False
                    key = keep.tobytes()
                    if key not in scored:  # Dice from counts; only hole filling needs the mask
                        tp, marked = int(hits[keep].sum()), int(sizes[keep].sum())
                        plain = voxel_scores(tp, marked - tp, n_true - tp)["dice"]
                        scored[key] = [
                            dice(ndimage.binary_fill_holes(keep[labels]), truth) if f else plain for f in fill
                        ]
                    total[i, j, q] += scored[key]
    i, j, q, k = np.unravel_index(int(np.argmax(total)), total.shape)
    peak = float(min_peaks[q]) if min_peaks[q] > thresholds[i] else 0.0
    return PostProcessing(thresholds[i], int(min_components[j]), bool(fill[k]), peak), n
