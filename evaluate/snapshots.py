"""``atlas-evaluate curve``: whole-volume validation scores of a run's snapshots, step by step.

The training curve's validation Dice is voxel-level, on a sampled stream.
What users care about is the whole-volume Dice; this scores every snapshot
(``atlas-train fit --snapshot-every N``) and the last checkpoint on whole
validation volumes, exactly as ``atlas-evaluate run`` does (dense inference,
prior correction, a fixed rule, no choice on the scans scored). Run it while
training goes on: rows already scored are kept, new snapshots are added.
"""

from __future__ import annotations

from pathlib import Path

from evaluate.metrics import case_metrics, summarise
from evaluate.postprocess import PostProcessing
from evaluate.predictors import EvaluateError, load_run
from evaluate.split import open_split, predicted_scans
from evaluate.volume import to_probability
from shards.common.atomic import check_output_dir, save_figure
from shards.common.tables import read_rows, write_csv
from trainer import checkpoint as ckpt_io

CURVE = "volume-curve.csv"
COLUMNS = ("step", "scans", "mean_dice", "pooled_dice", "mean_lesion_f1", "small_lesion_dice", "precision", "recall")


def volume_curve(
    run_dir,
    store_path,
    out,
    scans: int | None = None,
    rule: PostProcessing = PostProcessing(),
    progress=True,
    log=print,
) -> list[dict]:
    """Score each snapshot of ``run_dir`` (and its last checkpoint) on the first ``scans`` validation volumes."""
    from tqdm import tqdm

    check_output_dir(out)
    out = Path(out)
    run_dir = Path(run_dir)
    root, chosen = open_split(store_path, "val", empty=f"{store_path}: no labelled validation scans")
    chosen = chosen[:scans]
    points = list(ckpt_io.snapshots(run_dir))
    if (run_dir / ckpt_io.LAST).is_file():
        last_step = int(ckpt_io.load(run_dir)["step"])
        if last_step not in {s for s, _ in points}:
            points.append((last_step, run_dir / ckpt_io.LAST))
    if not points:
        raise EvaluateError(f"{run_dir}: no snapshots and no {ckpt_io.LAST} (train with --snapshot-every N)")
    out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(out / CURVE)
    done = {int(r["step"]) for r in rows if int(r["scans"]) == len(chosen)}
    rows = [r for r in rows if int(r["step"]) in done]
    for step, path in tqdm(points, desc="snapshots", unit="snapshot", disable=not progress):
        if step in done:
            continue
        pred = load_run(path)
        shift = pred.prior_shift()
        cases = []
        for _, logits, data in predicted_scans(pred, root, chosen, tile=64, use_dense=True, log=log):
            if logits is not None:  # a damaged scan is named and left out
                mask = rule.apply(to_probability(logits, shift))
                cases.append(case_metrics(mask, data["lesion"] > 0, data["ml"]))
        if not cases:
            raise EvaluateError("every validation scan is damaged (see atlas-shards verify STORE)")
        s = summarise(cases)
        rows.append({"step": step, "scans": len(cases), **{k: s[k] for k in COLUMNS[2:]}})
        rows.sort(key=lambda r: int(r["step"]))
        write_csv(out / CURVE, COLUMNS, rows)  # after every snapshot: an interrupted curve keeps what it scored
        log(f"step {step}: mean Dice {s['mean_dice']:.3f}, pooled {s['pooled_dice']:.3f} on {len(cases)} scans")
    _plot(rows, out / "volume-curve.png", run_dir.name)
    return rows


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for key, label in (("mean_dice", "mean Dice"), ("pooled_dice", "pooled Dice"), ("mean_lesion_f1", "lesion F1")):
        ax.plot(steps, [float(r[key]) for r in rows], "o-", label=label)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: whole validation volumes")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
