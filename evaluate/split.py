"""``atlas-evaluate run``: predict every scan of a split, score it, write masks and a report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from atlas_shards import store as zstore
from atlas_shards.orient import write_on_original_grid
from evaluate.metrics import case_metrics, summarise, voxel_ml
from evaluate.postprocess import PostProcessing, choose
from evaluate.ensemble import load_models, run_dirs_label
from evaluate.predictors import EvaluateError, Predictor
from evaluate.tta import flips_label
from evaluate.unseen import check_unseen, runs_of
from shards.common.versions import software
from evaluate.volume import lesion_logits, to_probability
from shards.common.atomic import atomic_write_text, check_output_dir
from shards.common.tables import write_csv

OPTIMISTIC = (
    "--threshold auto chose the rule on the validation split, the split reported here: its scores are optimistic "
    "(report the test split)"
)

SUBJECT_COLUMNS = (
    "scan_id",
    "subject_id",
    "hemisphere",
    "size_tertile",
    "true_voxels",
    "predicted_voxels",
    "dice",
    "abs_volume_diff_voxels",
    "abs_volume_diff_ml",
    "lesion_f1",
    "lesion_count_diff",
    "precision",
    "recall",
    "true_ml",
    "status",
)


def split_scans(root, split: str) -> list[str]:
    return [s for s in zstore.split_scans(root, split) if s in root]


def open_split(store_path, split: str, empty: str | None = None) -> tuple[object, list[str]]:
    """The store (read-only) and the labelled scans of ``split`` that it holds: the one place the evaluator opens
    a store. ``empty``: the error for a split with no scans (None: an empty list is returned)."""
    try:
        root = zstore.open_store(store_path, "r")
    except zstore.StoreError as exc:
        raise EvaluateError(str(exc)) from None
    scans = split_scans(root, split)
    if not scans and empty is not None:
        raise EvaluateError(empty)
    return root, scans


def scan_logits(
    pred: Predictor, root, scan_id: str, tile: int, use_dense: bool, stride: int = 1
) -> tuple[np.ndarray, dict]:
    """A scan's lesion logits (-inf outside the brain mask) and its arrays, attributes and voxel volume (``ml``)."""
    data = zstore.read_scan(root, scan_id)
    attrs = dict(root[scan_id].attrs)
    mirror = float(attrs["mirror_index"])
    logits = lesion_logits(pred, data["t1"], data["brain"], mirror, tile=tile, use_dense=use_dense, stride=stride)
    logits[data["brain"] == 0] = -np.inf  # predictions outside the brain mask are 0
    return logits, {**data, "attrs": attrs, "ml": voxel_ml(attrs)}


def predicted_scans(pred: Predictor, root, scans: list[str], tile: int, use_dense: bool, stride: int = 1, log=print):
    """``(scan_id, logits, data)`` for each scan in order, the loop that ``run``, its rule's choice and ``curve``
    share. A damaged scan, or one that fails, is never used silently and does not stop the others: it is named
    in the log with the reason, then given as ``(scan_id, None, reason)``."""
    for scan_id in scans:
        try:
            logits, data = scan_logits(pred, root, scan_id, tile, use_dense, stride)
        except zstore.DamagedScan as exc:
            reason = f"damaged: {str(exc).removeprefix(f'{scan_id}: ')}"
        except Exception as exc:  # one bad scan is reported; the others go on
            reason = f"failed: {type(exc).__name__}: {exc}"
        else:
            yield scan_id, logits, data
            continue
        log(f"  {scan_id}: {reason}")
        yield scan_id, None, reason


def choose_postprocessing(
    pred: Predictor, root, shift: float, tile: int, use_dense: bool, progress: bool, log=print, stride: int = 1
) -> PostProcessing:
    """Threshold, minimum component volume and hole filling with the best mean Dice over the *validation* split.

    Damaged validation scans are left out, by name. Never the split being reported on.
    """
    from tqdm import tqdm

    scans = split_scans(root, "val")
    if not scans:
        raise EvaluateError("--threshold auto needs a validation split in the store")

    def probabilities():
        scans_shown = tqdm(scans, desc="post-processing on val", unit="scan", disable=not progress)
        for _, logits, data in predicted_scans(pred, root, scans_shown, tile, use_dense, stride, log):
            if logits is not None:
                yield to_probability(logits, shift), data["lesion"] > 0

    rule, used = choose(probabilities())
    if not used:
        raise EvaluateError("--threshold auto: every validation scan is damaged (see atlas-shards verify STORE)")
    return rule


def evaluate_split(
    run_dir,
    store_path,
    split: str,
    out,
    threshold: str = "0.5",
    min_component: int = 0,
    fill_holes: bool = False,
    min_peak: float = 0.0,
    prior_correction: bool = True,
    device: str = "cpu",
    tile: int = 64,
    save_probabilities: bool = False,
    use_dense: bool = True,
    stride: int = 1,
    tta_flips: tuple[int, ...] = (),
    allow_training_subjects: bool = False,
    progress: bool = True,
    log=print,
) -> dict:
    """Evaluate a trained run (or several: their ensemble) on every labelled scan of ``split``; returns
    ``metrics.json``'s content. ``tta_flips`` (axes, ``evaluate.tta.parse_flips``): the mean logit over those
    flips of the input, for the chosen rule as for the scores. A split holding subjects the model trained on is
    refused (``evaluate.unseen``) unless ``allow_training_subjects``."""
    from tqdm import tqdm

    from evaluate.report import write_report

    check_output_dir(out)
    pred = load_models(run_dir, device=device, tta_flips=tta_flips)
    flips = flips_label(tta_flips)
    dense = use_dense and pred.dense is not None
    if stride > 1 and dense:
        raise EvaluateError(f"--stride is for models without a dense path; {pred.name} is predicted densely, exactly")
    inference = "dense" if dense else "patch by patch" + (f", one voxel in {stride} per axis" if stride > 1 else "")
    inference += f", mean over flips {flips}" if flips != "none" else ""
    root, scans = open_split(store_path, split, empty=f"{store_path}: split {split!r} has no labelled scans")
    unseen = check_unseen(pred, root, scans, split, store_path, allow_training_subjects, log)  # refusal: one line
    device_used = str(getattr(runs_of(pred)[0], "device", "cpu"))
    rule_said = "chosen on the validation split" if threshold == "auto" else f"threshold {threshold}"
    log(
        f"run {pred.name} on {device_used}: split {split} of {store_path}, {len(scans)} scans; {inference} "
        f"inference; rule {rule_said}; report {out}"
    )
    shift = pred.prior_shift() if prior_correction else 0.0
    warnings = []
    if threshold == "auto":
        if split == "val":
            warnings.append(OPTIMISTIC)
            log(f"warning: {OPTIMISTIC}")
        rule = choose_postprocessing(pred, root, shift, tile, use_dense, progress, log, stride)
        log(f"chosen on the validation split: {rule.describe()}")
    else:
        rule = PostProcessing(float(threshold), min_component, fill_holes, min_peak)
    if unseen.get("training_subjects_scored"):
        warnings.append(f"{len(unseen['training_subjects_scored'])} of the scored subjects are training subjects")
    source = "chosen on the validation split" if threshold == "auto" else "given"
    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for stale in [*(out / "masks").glob("*_desc-lesion_mask.nii.gz"), *(out / "masks").glob("*_probability.nii.gz")]:
        stale.unlink()  # a report directory used again (another split, other scans): only this report's masks
    rows, masks = [], {}
    scans_shown = tqdm(scans, desc=f"evaluate {split}", unit="scan", disable=not progress)
    for scan_id, logits, data in predicted_scans(pred, root, scans_shown, tile, use_dense, stride, log):
        if logits is None:  # damaged or failed: subjects.csv says why
            rows.append({"scan_id": scan_id, "status": data})
            continue
        try:
            prob = to_probability(logits, shift)
            mask = rule.apply(prob)
            attrs = data["attrs"]
            row = {
                "scan_id": scan_id,
                "subject_id": attrs.get("subject_id"),
                "hemisphere": attrs.get("hemisphere"),
                **case_metrics(mask, data["lesion"] > 0, data["ml"]),
                "status": "ok",
            }
            write_on_original_grid(out / "masks" / f"{scan_id}_desc-lesion_mask.nii.gz", mask, attrs)
            if save_probabilities:
                write_on_original_grid(
                    out / "masks" / f"{scan_id}_desc-lesion_probability.nii.gz", prob, attrs, np.float32
                )
            masks[scan_id] = np.packbits(mask)
        except Exception as exc:  # one bad scan is reported; the others go on
            row = {"scan_id": scan_id, "status": f"failed: {type(exc).__name__}: {exc}"}
            log(f"  {scan_id}: {row['status']}")
        rows.append(row)
    done = [r for r in rows if r["status"] == "ok"]
    if not done:
        raise EvaluateError(f"every scan of split {split!r} failed; see the messages above")
    _tertiles(done)
    metrics = {
        "model": pred.name,
        **summarise(done),
        "split": split,
        "threshold": rule.threshold,
        "threshold_source": source,
        "postprocessing": {**rule.to_dict(), "source": source},
        "prior_correction": bool(prior_correction and shift != 0.0),
        "prior_shift": shift if prior_correction else 0.0,
        "inference": inference,
        "tta_flips": flips,
        "run_dir": run_dirs_label(run_dir),
        "store": str(store_path),
        "failed": [r["scan_id"] for r in rows if r["status"] != "ok"],
        "unseen_subjects": unseen,
        "device": device_used,
        "software": software(),
        "warnings": warnings,
        "by_hemisphere": _breakdown(done, "hemisphere"),
        "by_size_tertile": _breakdown(done, "size_tertile"),
    }
    atomic_write_text(out / "metrics.json", json.dumps(_clean(metrics), indent=1))
    write_csv(out / "subjects.csv", SUBJECT_COLUMNS, rows)
    write_report(out, metrics, done, masks, root)
    return metrics


def _tertiles(rows: list[dict]) -> None:
    volumes = np.array([r["true_voxels"] for r in rows], dtype=float)
    edges = np.quantile(volumes, [1 / 3, 2 / 3]) if len(rows) else [0, 0]
    for r in rows:
        r["size_tertile"] = ("small", "medium", "large")[int(np.searchsorted(edges, r["true_voxels"], side="right"))]


def _breakdown(rows: list[dict], key: str) -> dict:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get(key)), []).append(r)
    return {g: summarise(members) for g, members in sorted(groups.items())}


def _clean(value):
    """JSON without NaN (null instead), recursively."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
