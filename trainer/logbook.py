"""The run's record: ``metrics.csv`` and the loss / Dice curves (the paper's Figures 8, 9, 12, 13)."""

from __future__ import annotations

import os
from pathlib import Path

from shards.common.atomic import save_figure
from shards.common.tables import read_rows, write_csv

__all__ = ["COLUMNS", "plot", "read_rows", "write_rows"]

COLUMNS = (
    "step",
    "epoch",
    "samples",
    "loss",
    "samples_per_s",
    "data_wait",
    "skipped",
    "lr",
    "loss_max",
    "grad_norm",
    "trained_s",
    "val_loss",
    "val_dice",
    "val_precision",
    "val_recall",
)


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rewrite the whole metrics CSV atomically (it is small: one row per logged step)."""
    write_csv(path, COLUMNS, rows)


def plot(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Training loss and validation loss/Dice against steps, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    validated = bool(series("val_dice")[0])  # no --val-shards: one panel, not an empty one
    fig, axes = plt.subplots(1, 2 if validated else 1, figsize=(10 if validated else 5.5, 3.8), squeeze=False)
    ax1 = axes[0][0]
    ax1.plot(*series("loss"), label="train loss")
    if validated:
        ax1.plot(*series("val_loss"), "o-", label="validation loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    if validated:
        ax2 = axes[0][1]
        ax2.plot(*series("val_dice"), "o-", color="C2", label="validation Dice (voxels)")
        ax2.set_xlabel("step")
        ax2.set_ylabel("Dice")
        ax2.set_ylim(0, 1)
        ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return Path(path)
