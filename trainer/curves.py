"""The run's record: ``metrics.csv`` and the loss / Dice curves (the paper's Figures 8, 9, 12, 13)."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from shards import atomic_path, atomic_write_text

COLUMNS = ("step", "epoch", "samples", "loss", "samples_per_s", "data_wait", "skipped",
           "val_loss", "val_dice", "val_precision", "val_recall")


def voxel_scores(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Dice, precision and recall from confusion counts (Dice 1.0 when both are empty)."""
    dice = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    return {"dice": dice, "precision": precision, "recall": recall}


def read_rows(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rewrite the whole metrics CSV atomically (it is small: one row per logged step)."""
    write_csv(path, COLUMNS, rows)


def write_csv(path: str | os.PathLike, columns: tuple[str, ...], rows: list[dict]) -> None:
    """A CSV of ``columns`` written atomically; floats as 6 significant digits, NaN/None empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def _fmt(value) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def plot(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Training loss and validation loss/Dice against steps, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(*series("loss"), label="train loss")
    ax1.plot(*series("val_loss"), "o-", label="validation loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax2.plot(*series("val_dice"), "o-", color="C2", label="validation Dice (voxels)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("Dice")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)
