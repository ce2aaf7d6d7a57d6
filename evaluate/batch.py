"""Many scans, one model load: a folder (or a glob, or a list) of T1 files, or a store's unlabelled scans.

``predict_many`` is ``atlas-evaluate predict IN_DIR OUT_DIR`` (nnU-Net's ``-i DIR -o DIR`` convention; the
compose stack's ``segment`` service runs it on a mounted folder): each input's mask is written on its own grid
as ``<name>_desc-lesion_mask.nii.gz``, ``_T1w`` dropped from the name. ``segment_store`` is ``atlas-evaluate
segment``: a store's scans without masks (the release's ``Testing/`` part), predicted, written on their original
grids, not scored. A scan that fails is named with its reason; the others go on; ``predictions.csv`` lists
every scan with its status.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from evaluate.ensemble import load_models
from evaluate.postprocess import PostProcessing
from evaluate.predictors import EvaluateError
from shards.common.atomic import check_output_dir
from shards.common.tables import write_csv

COLUMNS = ("input", "mask", "lesion_voxels", "lesion_ml", "status")
NIFTI = (".nii.gz", ".nii")


def mask_name(t1: str | os.PathLike) -> str:
    """``sub-1_ses-1_space-MNI_T1w.nii.gz`` -> ``sub-1_ses-1_space-MNI_desc-lesion_mask.nii.gz``."""
    name = Path(t1).name
    stem = next((name[: -len(e)] for e in NIFTI if name.endswith(e)), name)
    return f"{stem.removesuffix('_T1w').removesuffix('_t1w')}_desc-lesion_mask.nii.gz"


def inputs_of(spec: str | os.PathLike | list) -> list[Path]:
    """The NIfTI files a spec names: a folder (its ``*.nii``/``*.nii.gz``, not recursive), a glob, or a list."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in inputs_of(s)]
    spec = str(spec)
    if Path(spec).is_dir():
        found = [p for p in sorted(Path(spec).iterdir()) if p.is_file() and p.name.endswith(NIFTI)]
    elif any(c in spec for c in "*?["):
        found = [Path(p) for p in sorted(glob.glob(spec)) if p.endswith(NIFTI)]
    else:
        found = [Path(spec)]
    if not found:
        raise EvaluateError(f"{spec}: no NIfTI files (.nii, .nii.gz) to segment")
    return found


def predict_many(run_dir, inputs, out_dir, log=print, **options) -> list[dict]:
    """Segment every input into ``out_dir`` (``mask_name``), the model loaded once; returns ``predictions.csv``'s
    rows. ``options``: those of ``evaluate.predict.predict_file`` (rule, space, device, tta_flips...)."""
    from evaluate.predict import predict_file

    files = inputs_of(inputs)
    names = [mask_name(f) for f in files]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise EvaluateError(f"two inputs would write the same mask {twice[0]}: segment them into other folders")
    check_output_dir(out_dir)
    out_dir = Path(out_dir)
    device, flips = options.pop("device", "auto"), options.pop("tta_flips", ())
    pred = load_models(run_dir, device=device, tta_flips=flips)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for t1, name in zip(files, names):
        try:
            r = predict_file(run_dir, t1, out_dir / name, pred=pred, **options)
        except Exception as exc:  # one bad scan is named; the others go on
            status = str(exc) if isinstance(exc, EvaluateError) else f"failed: {type(exc).__name__}: {exc}"
            rows.append({"input": str(t1), "mask": "", "status": status})
            log(f"  {t1}: {status}")
            continue
        ml = r["lesion_voxels"] * r["voxel_ml"]
        rows.append(
            {"input": str(t1), "mask": name, "lesion_voxels": r["lesion_voxels"], "lesion_ml": ml, "status": "ok"}
        )
        log(f"  {name}: {r['lesion_voxels']} lesion voxels ({ml:.2f} mL)")
    write_csv(out_dir / "predictions.csv", COLUMNS, rows)
    if not any(r["status"] == "ok" for r in rows):
        raise EvaluateError(f"every one of the {len(rows)} inputs failed; see {out_dir / 'predictions.csv'}")
    return rows


def segment_store(
    run_dir,
    store_path,
    out_dir,
    rule: PostProcessing | str = PostProcessing(),
    device: str = "auto",
    tile: int = 64,
    tta_flips: tuple[int, ...] = (),
    prior_correction: bool = True,
    progress: bool = True,
    log=print,
) -> list[dict]:
    """Masks for a store's unlabelled scans on their original grids (nothing scored); ``rule="auto"``: the rule
    ``--threshold auto`` chooses on the store's validation split. Returns ``predictions.csv``'s rows."""
    import numpy as np
    from tqdm import tqdm

    from atlas_shards.orient import write_on_original_grid
    from evaluate.split import choose_postprocessing, open_split, predicted_scans
    from evaluate.volume import to_probability

    check_output_dir(out_dir)
    root, _ = open_split(store_path, "val")
    scans = [s for s in root.attrs.get("unlabelled_scans", []) if s in root]
    if not scans:
        raise EvaluateError(f"{store_path}: no unlabelled scans (the release's Testing part) to segment")
    pred = load_models(run_dir, device=device, tta_flips=tta_flips)
    shift = pred.prior_shift() if prior_correction else 0.0
    if rule == "auto":
        rule = choose_postprocessing(pred, root, shift, tile, True, progress, log)
        log(f"chosen on the validation split: {rule.describe()}")
    out_dir = Path(out_dir)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    shown = tqdm(scans, desc="segment", unit="scan", disable=not progress)
    for scan_id, logits, data in predicted_scans(pred, root, shown, tile, True, log=log):  # t1 and brain only
        if logits is None:  # damaged or failed: named in the log, and its row says why
            rows.append({"input": scan_id, "mask": "", "status": data})
            continue
        mask = rule.apply(to_probability(logits, shift))
        name = f"masks/{scan_id}_desc-lesion_mask.nii.gz"
        write_on_original_grid(out_dir / name, mask, data["attrs"])
        voxels = int(np.sum(mask))
        rows.append(
            {"input": scan_id, "mask": name, "lesion_voxels": voxels, "lesion_ml": voxels * data["ml"], "status": "ok"}
        )
    write_csv(out_dir / "predictions.csv", COLUMNS, rows)
    return rows
