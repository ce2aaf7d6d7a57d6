"""How steady was a training run? Spikes, gradient norms and the validation loss, from its ``metrics.csv``.

Usage: .venv/bin/python bench/curve_stats.py RUN [RUN ...] [--json]

Per run (a directory of ``atlas-train fit``), from the rows it logged every ``--log-every`` steps:

- ``spikes``: windows whose mean loss is over 2.5x the median of the 21 windows around it (the jumps of
  issue 27, item 6), and how many of them came in the last quarter of the run;
- ``loss_max``: the largest single-batch loss, and the median over windows of each window's largest;
- ``grad``: the largest gradient norm (before any clipping), its 99th percentile over windows, and the median;
- ``loss_sd_last``: the standard deviation of the window losses over the last quarter, relative to their mean
  (how noisy the batches are where the learning rate is small);
- the last validation loss and Dice on the pairs stream, and the steps trained.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

SPIKE = 2.5
AROUND = 10  # windows on each side


def _column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([float(r[key]) for r in rows if r.get(key) not in (None, "")], dtype=np.float64)


def stats(run: Path) -> dict:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    loss, peak, grad = _column(rows, "loss"), _column(rows, "loss_max"), _column(rows, "grad_norm")
    n = len(loss)
    around = np.array([np.median(loss[max(0, i - AROUND) : i + AROUND + 1]) for i in range(n)])
    spikes = np.flatnonzero(loss > SPIKE * around)
    last = loss[3 * n // 4 :]
    val = [r for r in rows if r.get("val_loss") not in (None, "")]
    return {
        "run": run.name,
        "steps": int(rows[-1]["step"]),
        "spikes": int(len(spikes)),
        "spikes_last_quarter": int(np.sum(spikes >= 3 * n // 4)),
        "loss_max": round(float(peak.max()), 3),
        "loss_max_median": round(float(np.median(peak)), 3),
        "grad_max": round(float(grad.max()), 2),
        "grad_p99": round(float(np.quantile(grad, 0.99)), 2),
        "grad_median": round(float(np.median(grad)), 2),
        "loss_last_quarter": round(float(last.mean()), 4),
        "loss_sd_last": round(float(last.std() / last.mean()), 3),
        "val_loss": round(float(val[-1]["val_loss"]), 4) if val else None,
        "val_dice": round(float(val[-1]["val_dice"]), 4) if val else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--json", action="store_true", help="One JSON object a line instead of a table.")
    a = p.parse_args()
    rows = [stats(r) for r in a.runs]
    if a.json:
        for r in rows:
            print(json.dumps(r))
        return
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
