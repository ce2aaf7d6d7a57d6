"""``atlas-evaluate predict``: segment one T1 file, in any orientation, onto its own grid."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from atlas_shards.orient import write_on_original_grid
from atlas_shards.scan import ScanError, preprocess
from evaluate.postprocess import PostProcessing
from evaluate.ensemble import load_models
from evaluate.metrics import voxel_ml
from evaluate.predictors import EvaluateError
from evaluate.volume import lesion_logits, to_probability
from shards.common.atomic import check_output_dir

MNI_SHAPE = (197, 233, 189)


def guess_space(t1: Path) -> str:
    """``mni`` for the MNI152 2009 grid or an MNI/stx file name, else ``native``."""
    import nibabel as nib

    name = t1.name.lower()
    if "space-mni" in name or "_stx" in name:
        return "mni"
    img = nib.load(str(t1))
    return (
        "mni" if tuple(img.shape[:3]) == MNI_SHAPE and np.allclose(nib.affines.voxel_sizes(img.affine), 1) else "native"
    )


def predict_file(
    run_dir: str | os.PathLike,
    t1: str | os.PathLike,
    out_mask: str | os.PathLike,
    space: str = "auto",
    brain_mask: str | os.PathLike | None = None,
    rule: PostProcessing = PostProcessing(),
    prior_correction: bool = True,
    device: str = "cpu",
    tile: int = 64,
    probabilities: str | os.PathLike | None = None,
    tta_flips: tuple[int, ...] = (),
    pred=None,
) -> dict:
    """Preprocess exactly as at ingestion and training, predict (``tta_flips``: the mean over flips along those
    axes of the input, ``evaluate.tta``), write the mask on the input's grid. ``pred``: the model, when the caller
    has loaded it already (``evaluate.batch``: one load for many scans)."""
    t1 = Path(t1).resolve()
    if not t1.is_file():
        raise EvaluateError(f"{t1}: no such file")
    inputs = {t1} | ({Path(brain_mask).resolve()} if brain_mask else set())
    outputs = [Path(p).resolve() for p in (out_mask, probabilities) if p]
    for path in outputs:
        if not path.name.endswith((".nii", ".nii.gz")):
            raise EvaluateError(f"{path}: a mask is written as NIfTI: name it .nii.gz (or .nii)")
        check_output_dir(path.parent)
    for path in outputs:
        if path in inputs:
            raise EvaluateError(f"{path}: is an input; write the prediction elsewhere")
    if len(outputs) == 2 and outputs[0] == outputs[1]:
        raise EvaluateError(f"{outputs[0]}: given for both the mask and the probabilities")
    try:
        space = guess_space(t1) if space == "auto" else space
    except Exception as exc:  # nibabel's errors for a file that is not an image
        raise EvaluateError(f"{t1}: not a readable NIfTI image ({type(exc).__name__}: {exc})") from None
    try:
        scan = preprocess(t1, brain_mask=Path(brain_mask).resolve() if brain_mask else None, space=space)
    except ScanError as exc:
        raise EvaluateError(f"{t1}: {exc}") from None
    pred = pred if pred is not None else load_models(run_dir, device=device, tta_flips=tta_flips)
    logits = lesion_logits(pred, scan.t1, scan.brain, float(scan.attrs["mirror_index"]), tile=tile)
    logits[scan.brain == 0] = -np.inf
    prob = to_probability(logits, pred.prior_shift() if prior_correction else 0.0)
    mask = rule.apply(prob)
    write_on_original_grid(Path(out_mask), mask, scan.attrs)
    if probabilities:
        write_on_original_grid(Path(probabilities), prob, scan.attrs, np.float32)
    return {
        "space": space,
        "mirror_index": scan.attrs["mirror_index"],
        "brain_mask": scan.attrs["brain_mask_source"],
        "lesion_voxels": int(mask.sum()),
        "voxel_ml": voxel_ml(scan.attrs),
        "notes": scan.notes,
    }
