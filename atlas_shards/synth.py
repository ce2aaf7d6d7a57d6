"""Write phantom releases in the exact on-disk layouts of the ATLAS releases.

``synthesize_release`` writes ``OUT_DIR/<release tree>`` plus
``OUT_DIR/phantom-truth.json``, which records what was planted (lesions,
sides, defects, native orientations) so tests can check the ingester against
it. The truth file sits outside the release tree and is not part of any real
release.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from atlas_shards import phantom
from atlas_shards.workers import Workers
from shards.common.atomic import atomic_path, atomic_write_bytes, atomic_write_text

LAYOUTS = ("r1.1", "r1.2", "r2.0", "native")
TRUTH_FILE = "phantom-truth.json"
R11_META = "ATLAS_Meta-Data_Release_1.1_standard_mni.csv"
R20_META = "20220425_ATLAS_2.0_MetaData.csv"
R20_SPACE = "space-MNI152NLin2009aSym"
# AppleDouble header: what macOS leaves as ._name beside copied files.
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4070)


@dataclass
class ScanPlan:
    """One scan to synthesise: identity, where its files go, what to plant."""

    scan_id: str
    subject_id: str
    subject_index: int
    timepoint: int
    cohort: str
    t1: str  # path relative to OUT_DIR
    mask_stem: str  # relative path prefix; mask k appends its suffix
    mask_suffixes: list[str]
    labelled: bool = True
    native_protocol: int | None = None
    mask_scale: int = 1  # 255 for releases whose masks are 0/255
    defect: str | None = None
    masks: list[str] = field(default_factory=list)  # written mask paths, relative to OUT_DIR
    truth: dict = field(default_factory=dict)


def synthesize_release(
    out_dir: str | os.PathLike,
    layout: str,
    subjects: int,
    seed: int = 0,
    mismatched_masks: int = 0,
    truncated: int = 0,
    empty_masks: int = 0,
    workers: int = 1,
    progress: bool = True,
    variant: phantom.Variant | None = None,
) -> dict:
    """Synthesise a phantom release; return the truth record (also written). ``variant``: how its lesions depart
    from the default generator (sizes, locations, contrast), for checks on data no recipe was tuned on."""
    from tqdm import tqdm

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if subjects < 1:
        raise ValueError("--subjects must be at least 1")
    out = Path(out_dir)
    defects = {"mismatched_masks": mismatched_masks, "truncated": truncated, "empty_masks": empty_masks}
    variant = variant or phantom.Variant()
    params = {"layout": layout, "seed": seed, "subjects": subjects, "defects": defects, "variant": variant.to_dict()}
    _check_output(out, params)
    rng = np.random.default_rng([seed, 7919])
    plans = _plan(layout, subjects, rng)
    _assign_defects(plans, rng, mismatched_masks=mismatched_masks, truncated=truncated, empty_masks=empty_masks)
    jobs = [(out, p, seed, variant) for p in plans]
    done: list[ScanPlan] = []
    bar = tqdm(total=len(jobs), desc=f"synth {layout}", unit="scan", disable=not progress)
    with Workers(workers) as pool:
        for plan in pool.map(_write_scan, jobs):
            done.append(plan)
            bar.update()
    bar.close()
    _write_extras(out, layout, done)
    truth = {
        "layout": layout,
        "seed": seed,
        "subjects": subjects,
        "defects": defects,
        "variant": variant.to_dict(),
        "scans": [asdict(p) for p in done],
    }
    atomic_write_text(out / TRUTH_FILE, json.dumps(truth, indent=1))
    return truth


def _check_output(out: Path, params: dict) -> None:
    """Refuse an output that is a file, or a non-empty directory that is not this very phantom (mixing releases)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    truth = out / TRUTH_FILE
    try:
        previous = json.loads(truth.read_text())
        previous.setdefault("defects", {k: 0 for k in params["defects"]})
        previous.setdefault("variant", phantom.Variant().to_dict())  # written before variants existed
        same = all(previous.get(k) == v for k, v in params.items())
    except (OSError, ValueError):
        same = False
    if not same:
        raise ValueError(
            f"{out}: not empty (and not this phantom: layout, subjects, seed, defects and variant); "
            "synth writes into a new or empty directory"
        )


def _plan(layout: str, n: int, rng: np.random.Generator) -> list[ScanPlan]:
    """Identities and paths of every scan, in the release's naming scheme."""
    plans: list[ScanPlan] = []
    second = set(rng.choice(n, size=max(1, n // 7), replace=False).tolist()) if n >= 4 else set()
    if layout == "r1.1":
        ids = np.sort(rng.choice(np.arange(10000, 99999), size=n, replace=False))
        for i, sid in enumerate(ids):
            site = f"Site{1 + i % 9}"
            for tp in (1, 2) if i in second else (1,):
                d = f"ATLAS_R1.1/{site}/{sid:06d}/t0{tp}"
                plans.append(
                    ScanPlan(
                        f"{sid:06d}_t0{tp}",
                        f"{sid:06d}",
                        i,
                        tp,
                        site,
                        t1=f"{d}/{sid:06d}_t1w_deface_stx.nii.gz",
                        mask_stem=f"{d}/{sid:06d}_LesionSmooth",
                        mask_suffixes=["_stx.nii.gz"],
                        mask_scale=255 if i % 2 else 1,
                    )
                )
    elif layout in ("r1.2", "native"):
        for i in range(n):
            cohort = f"c{1 + i % 11:04d}"
            subject = f"{cohort}s{1 + i // 11:04d}"
            for tp in (1, 2) if i in second else (1,):
                scan = f"{subject}t{tp:02d}"
                if layout == "r1.2":
                    d = f"ATLAS_R1.2/standard_MNI/{cohort}/{scan}"
                    t1, suffix, proto = f"{d}/{scan}_t1w_stx.nii.gz", "_stx.nii.gz", None
                else:
                    d = f"ATLAS_R1.2/native/native_{1 + i % 2}/{cohort}/{scan}"
                    # The native T1 file name is not fixed across cohorts.
                    names = [f"{scan}_t1w.nii.gz", f"{scan}_T1.nii", "t1_mprage.nii.gz", f"{scan}.nii.gz"]
                    t1, suffix, proto = f"{d}/{names[i % len(names)]}", ".nii.gz", i % 5
                plans.append(
                    ScanPlan(
                        scan,
                        subject,
                        i,
                        tp,
                        cohort,
                        t1=t1,
                        mask_stem=f"{d}/{scan}_LesionSmooth",
                        mask_suffixes=[suffix],
                        native_protocol=proto,
                        mask_scale=255 if i % 3 == 0 else 1,
                    )
                )
    else:  # r2.0: about one subject in five goes to Testing (no masks)
        n_test = n // 5
        for i in range(n):
            testing = i >= n - n_test
            cohort = f"R{1 + i % 33:03d}"
            subject = f"sub-r{1 + i % 33:03d}s{1 + i // 33:03d}"
            d = f"ATLAS_2/{'Testing' if testing else 'Training'}/{cohort}/{subject}/ses-1/anat"
            stem = f"{d}/{subject}_ses-1_{R20_SPACE}"
            plans.append(
                ScanPlan(
                    f"{subject}_ses-1",
                    subject,
                    i,
                    1,
                    cohort,
                    t1=f"{stem}_T1w.nii.gz",
                    mask_stem=f"{stem}_label-L_desc-T1lesion",
                    mask_suffixes=["_mask.nii.gz"],
                    labelled=not testing,
                )
            )
    return plans


def _assign_defects(plans: list[ScanPlan], rng: np.random.Generator, **counts: int) -> None:
    labelled = [p for p in plans if p.labelled]
    wanted = sum(counts.values())
    if wanted > len(labelled):
        raise ValueError(f"asked for {wanted} defective scans but the release has only {len(labelled)} labelled scans")
    order = rng.permutation(len(labelled))
    k = 0
    for name, count in counts.items():
        for _ in range(count):
            labelled[order[k]].defect = name
            k += 1


def _mask_names(plan: ScanPlan, n: int) -> list[str]:
    """LesionSmooth, LesionSmooth_1, ... (R1.x); v2.0 has a single mask."""
    suffix = plan.mask_suffixes[0]
    if "desc-T1lesion" in plan.mask_stem:
        return [plan.mask_stem + suffix]
    return [plan.mask_stem + ("" if k == 0 else f"_{k}") + suffix for k in range(max(n, 1))]


def _write_scan(job: tuple[Path, ScanPlan, int, phantom.Variant]) -> ScanPlan:
    out, plan, seed, variant = job
    anatomy = phantom.load_anatomy()
    # Lesions depend on the subject only (a second timepoint shows the same
    # lesion); deformation, bias and noise on the scan.
    subject_rng = np.random.default_rng([seed, plan.subject_index])
    category, lesions = phantom.plan_lesions(subject_rng, variant=variant)
    labels = (
        phantom.paint_lesions(subject_rng, anatomy, lesions) if plan.labelled else np.zeros(anatomy.shape, np.uint8)
    )
    scan_rng = np.random.default_rng([seed, plan.subject_index, plan.timepoint])
    image, labels = phantom.render_subject(anatomy, labels, scan_rng, lesion_level=variant.lesion_level)
    affine = anatomy.affine
    truth: dict = {
        "category": category if plan.labelled else None,
        "lesions": [asdict(lesion) for lesion in lesions] if plan.labelled else [],
    }
    if plan.native_protocol is not None:
        image, labels, affine, facts = phantom.to_native(anatomy, image, labels, scan_rng, plan.native_protocol)
        truth["native"] = facts
    truth["lesion_voxels"] = int((labels > 0).sum())
    _save(out / plan.t1, image, affine)
    masks = []
    if plan.labelled:
        present = [k for k in range(1, len(lesions) + 1) if (labels == k).any()] or [1]
        mask_dtype = np.uint8 if plan.native_protocol is None else np.int16
        for name, k in zip(_mask_names(plan, len(present)), present):
            mask = ((labels == k) * plan.mask_scale).astype(mask_dtype)
            if plan.defect == "empty_masks":
                mask[:] = 0
            mask_affine = affine
            if plan.defect == "mismatched_masks":
                if plan.subject_index % 2:
                    mask = mask[:, :, 4:]  # a mask cropped to another grid
                else:
                    mask_affine = affine.copy()
                    mask_affine[:3, 3] += 2.0  # same shape, shifted grid
            _save(out / name, mask, mask_affine)
            masks.append(name)
    if plan.defect == "truncated":
        path = out / plan.t1
        data = path.read_bytes()
        atomic_write_bytes(path, data[: len(data) // 2])
    plan.masks = masks
    plan.truth = truth
    return plan


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, tmp)


def _write_extras(out: Path, layout: str, plans: list[ScanPlan]) -> None:
    """Metadata tables, BIDS descriptions and macOS debris, per release."""
    if layout == "r1.1":
        # Integer ids (no zero padding) and stray spaces, as in the real file.
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["INDI Site ID", "INDI Subject ID", "Session", "Stroke Hemisphere", "Lesion count"])
        for p in plans:
            side = (p.truth.get("category") or "").capitalize()
            w.writerow(
                [f" {p.cohort}", f"{int(p.subject_id)} ", f"t0{p.timepoint}", f"{side} ", len(p.truth["lesions"])]
            )
        atomic_write_text(out / "ATLAS_R1.1" / R11_META, buf.getvalue())
    if layout == "r2.0":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["Subject ID", "Site", "Split", "Lesion volume (mm3)"])
        for p in plans:
            w.writerow(
                [
                    p.subject_id.removeprefix("sub-"),
                    p.cohort,
                    "Training" if p.labelled else "Testing",
                    p.truth["lesion_voxels"] if p.labelled else "",
                ]
            )
        atomic_write_text(out / "ATLAS_2" / R20_META, buf.getvalue())
        description = json.dumps(
            {"Name": "ATLAS v2.0 phantom", "BIDSVersion": "1.6.0", "DatasetType": "derivative"}, indent=2
        )
        for p in plans:
            site_dir = out / Path(p.t1).parents[3]
            atomic_write_text(site_dir / "dataset_description.json", description)
        for p in plans[::3]:  # macOS debris beside some files and folders
            t1 = out / p.t1
            atomic_write_bytes(t1.parent / f"._{t1.name}", APPLEDOUBLE)
            atomic_write_bytes(t1.parents[2] / f"._{t1.parents[1].name}", APPLEDOUBLE)
