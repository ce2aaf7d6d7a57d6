"""``report.md`` and its figures: overlays (the paper's Figure 16), per-hemisphere Dice
(Figure 15), the Dice histogram and the run's training curves."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from atlas_shards import store as zstore
from evaluate.postprocess import PostProcessing
from shards.common.atomic import atomic_write_text, save_figure
from shards.common.figures import PREDICTION, TRUTH, mark_sides
from shards.common.tables import cell

KEYS = (
    "mean_dice",
    "pooled_dice",
    "mean_lesion_f1",
    "mean_abs_volume_diff_voxels",
    "mean_abs_volume_diff_ml",
    "mean_lesion_count_diff",
    "precision",
    "recall",
    "small_lesion_dice",
    "n_small",
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    return save_figure(fig, path, dpi=90, bbox_inches="tight")


def overlay_slices(truth: np.ndarray, pred: np.ndarray) -> list[tuple[str, int]]:
    """Axial slices worth looking at: where the truth is widest, and where the largest false-positive component
    (predicted voxels outside the truth, 6-connected) is widest; ``(what, z)``, without repeats."""
    from scipy import ndimage

    picks = [("lesion", int(np.argmax(truth.sum(axis=(0, 1)))) if truth.any() else truth.shape[2] // 2)]
    labels, n = ndimage.label(pred & ~truth)
    if n:
        biggest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
        z = int(np.argmax((labels == biggest).sum(axis=(0, 1))))
        if z != picks[0][1]:
            picks.append(("largest false positive", z))
    return picks


def _overlays(out: Path, rows: list[dict], masks: dict, root) -> str | None:
    """Best, median and worst scan (columns); the truth's widest slice and, where there is one, the slice of the
    largest false positive (rows). Truth: an orange outline; prediction: blue, filled."""
    from matplotlib.colors import ListedColormap

    ranked = sorted(rows, key=lambda r: r["dice"])
    chosen = [ranked[-1], ranked[len(ranked) // 2], ranked[0]] if len(ranked) >= 3 else ranked
    plt = _plt()
    fig, axes = plt.subplots(2, len(chosen), figsize=(4 * len(chosen), 8.4), squeeze=False)
    for col, (label, row) in enumerate(zip(("best", "median", "worst"), chosen)):
        data = zstore.read_scan(root, row["scan_id"], ("t1", "lesion"))
        truth = data["lesion"] > 0
        pred = np.unpackbits(masks[row["scan_id"]])[: truth.size].reshape(truth.shape).astype(bool)
        slices = overlay_slices(truth, pred)
        for r, ax in enumerate(axes[:, col]):
            ax.axis("off")
            if r >= len(slices):
                ax.text(0.5, 0.5, "no false positive", ha="center", va="center", transform=ax.transAxes, fontsize=8)
                continue
            what, z = slices[r]
            ax.imshow(data["t1"][:, :, z].T, cmap="gray", origin="lower")
            shown = pred[:, :, z].T
            ax.imshow(np.ma.masked_where(~shown, shown), cmap=ListedColormap([PREDICTION]), alpha=0.55, origin="lower")
            if truth[:, :, z].any():
                ax.contour(truth[:, :, z].T, levels=[0.5], colors=TRUTH, linewidths=1.2)
            mark_sides(ax, truth.shape[0])
            head = f"{label}: {row['scan_id']}, Dice {row['dice']:.3f}\n" if r == 0 else ""
            ax.set_title(f"{head}{what}, axial z={z}", fontsize=8)
    fig.suptitle("orange outline: truth; blue: prediction", fontsize=9)
    return _save(fig, out / "overlays.png")


def _hemispheres(out: Path, metrics: dict) -> str:
    groups = metrics["by_hemisphere"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = list(groups)
    ax.bar(names, [groups[g]["mean_dice"] for g in names], color="C0")
    for i, g in enumerate(names):
        ax.text(i, groups[g]["mean_dice"], f"n={groups[g]['n_subjects']}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.set_title("Dice by lesion hemisphere")
    return _save(fig, out / "dice_by_hemisphere.png")


def _histogram(out: Path, rows: list[dict]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    from matplotlib.ticker import MaxNLocator

    ax.hist([r["dice"] for r in rows], bins=np.linspace(0, 1, 21), color=PREDICTION)
    ax.set_xlabel("Dice per scan")
    ax.set_ylabel("scans")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of scans
    return _save(fig, out / "dice_histogram.png")


def _fmt(v) -> str:
    return cell(v, ".4g", "n/a")


def write_report(out: Path, metrics: dict, rows: list[dict], masks: dict, root) -> Path:
    figures = [_overlays(out, rows, masks, root), _hemispheres(out, metrics), _histogram(out, rows)]
    ensemble = isinstance(metrics["run_dir"], list)
    curves = None if ensemble else Path(metrics["run_dir"]) / "curves.png"  # an ensemble has no one training curve
    if curves is not None and curves.is_file():
        shutil.copyfile(curves, out / "training_curves.png")
        figures.append("training_curves.png")
    lines = [
        f"# Evaluation of {metrics['model']} on the {metrics['split']} split",
        "",
        (
            f"Ensemble of {len(metrics['run_dir'])} runs (the mean of their prior-corrected logits): "
            + ", ".join(f"`{r}`" for r in metrics["run_dir"])
            if ensemble
            else f"Run `{metrics['run_dir']}`"
        )
        + f", store `{metrics['store']}`: {metrics['n_subjects']} scans, "
        f"{metrics['inference']} inference, {PostProcessing.from_dict(metrics['postprocessing']).describe()} "
        f"({metrics['threshold_source']}), prior correction "
        + (f"on (logit - {metrics['prior_shift']:.3f})" if metrics["prior_correction"] else "off")
        + ".",
        "",
        *[f"**Warning: {w}.**\n" for w in metrics.get("warnings", [])],
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(metrics.get(k))} |" for k in KEYS],
        "",
    ]
    for title, key in (("By hemisphere", "by_hemisphere"), ("By lesion-size tertile", "by_size_tertile")):
        lines += [f"## {title}", "", "| group | scans | mean Dice | pooled Dice | lesion F1 |", "|---|---|---|---|---|"]
        lines += [
            f"| {g} | {m['n_subjects']} | {_fmt(m['mean_dice'])} | {_fmt(m['pooled_dice'])} | "
            f"{_fmt(m['mean_lesion_f1'])} |"
            for g, m in metrics[key].items()
        ]
        lines.append("")
    if metrics["failed"]:
        lines += ["## Failed scans", "", *[f"- {s} (see subjects.csv)" for s in metrics["failed"]], ""]
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures if f] + [""]
    lines += ["Per-scan scores: `subjects.csv`; predicted masks on each scan's original grid: `masks/`.", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"
