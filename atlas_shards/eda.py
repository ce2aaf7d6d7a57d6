"""The paper's exploratory figures, from an ingested store.

Per-scan numbers come from the group attributes written at ingestion; only
the example slices (and the lesion frequency map) read voxels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from shards.common.atomic import atomic_write_text, check_output_dir, save_figure
from shards.common.figures import SEQUENTIAL, TRUTH, mark_sides

from atlas_shards import store

FIGURES = ("lesion_size_distribution.png", "lesion_examples.png", "lesion_hemisphere.png", "lesion_frequency.png")


def collect(group) -> list[dict]:
    """One record per labelled scan: id, subject, split, sizes, hemisphere."""
    split_of = {s: k for k, subjects in group.attrs.get("split", {}).items() for s in subjects}
    records = []
    for scan_id, subject in group.attrs.get("scans", {}).items():
        a = store.scan_attrs(group, scan_id)
        records.append(
            {
                "scan_id": scan_id,
                "subject_id": subject,
                "split": split_of.get(subject, "unassigned"),
                "lesion_voxels": a["lesion_voxels"],
                "lesion_volume_ml": a["lesion_volume_ml"],
                "image_voxels": int(np.prod(a["canonical_shape"])),
                "brain_voxels": a["brain_voxels"],
                "hemisphere": a.get("hemisphere", a.get("hemisphere_computed", "unknown")),
                "shape": tuple(a["canonical_shape"]),
            }
        )
    return records


def summarise(records: list[dict]) -> dict:
    """The numbers behind the figures (eda.json)."""
    lesion = sum(r["lesion_voxels"] for r in records)
    total = sum(r["image_voxels"] for r in records)
    brain = sum(r["brain_voxels"] for r in records)
    ml = np.array([r["lesion_volume_ml"] for r in records]) if records else np.zeros(0)
    per_split: dict[str, dict] = {}
    for r in records:
        s = per_split.setdefault(r["split"], {"scans": 0, "subjects": set(), "lesion_voxels": 0, "voxels": 0})
        s["scans"] += 1
        s["subjects"].add(r["subject_id"])
        s["lesion_voxels"] += r["lesion_voxels"]
        s["voxels"] += r["image_voxels"]
    hemis: dict[str, int] = {}
    for r in records:
        hemis[r["hemisphere"]] = hemis.get(r["hemisphere"], 0) + 1
    return {
        "n_scans": len(records),
        "n_subjects": len({r["subject_id"] for r in records}),
        "lesion_voxel_fraction": lesion / total if total else 0.0,
        "lesion_brain_fraction": lesion / brain if brain else 0.0,
        "lesion_volume_ml_quantiles": dict(
            zip(("min", "q1", "median", "q3", "max"), np.quantile(ml, [0, 0.25, 0.5, 0.75, 1]).round(3).tolist())
        )
        if ml.size
        else {},
        "per_split": {
            k: {
                **v,
                "subjects": len(v["subjects"]),
                "lesion_fraction": v["lesion_voxels"] / v["voxels"] if v["voxels"] else 0.0,
            }
            for k, v in sorted(per_split.items())
        },
        "hemisphere_counts": dict(sorted(hemis.items())),
    }


def run_eda(store_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Write the figures and ``eda.json`` to ``out_dir``; return the summary."""
    import matplotlib

    matplotlib.use("Agg")
    check_output_dir(out_dir)
    group = store.open_store(store_path, mode="r")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = collect(group)
    summary = summarise(records)
    figures = []
    if records:
        figures.append(_size_distribution(records, out))
        figures.append(_examples(group, records, out))
        figures.append(_hemispheres(records, out))
        freq = _frequency(group, records, out)
        if freq:
            figures.append(freq)
    summary["figures"] = figures
    atomic_write_text(out / "eda.json", json.dumps(summary, indent=2))
    return summary


def _save(fig, path: Path) -> str:
    return save_figure(fig, path, dpi=110, bbox_inches="tight")


def _size_distribution(records: list[dict], out: Path) -> str:
    import matplotlib.pyplot as plt

    frac = np.array([r["lesion_voxels"] / r["image_voxels"] for r in records]) * 100
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.logspace(np.log10(max(frac.min(), 1e-5)), np.log10(max(frac.max(), 1e-4)), 25)
    ax.hist(frac, bins=bins, color="#8c2d04")
    ax.set_xscale("log")
    ax.axvline(np.median(frac), color="k", ls="--", label=f"median {np.median(frac):.3f}%")
    ax.set_xlabel("lesion size (% of image voxels)")
    ax.set_ylabel("scans")
    ax.set_title(f"Lesion size distribution ({len(records)} scans)")
    ax.legend()
    return _save(fig, out / FIGURES[0])


def _examples(group, records: list[dict], out: Path) -> str:
    """Smallest, median and largest lesion on the axial slice where each is widest."""
    import matplotlib.pyplot as plt

    order = sorted(records, key=lambda r: r["lesion_voxels"])
    picks = [("smallest", order[0]), ("median", order[len(order) // 2]), ("largest", order[-1])]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.5))
    for ax, (label, rec) in zip(axes, picks):
        arrays = store.read_scan(group, rec["scan_id"], ("t1", "lesion"))
        z = int(np.argmax(arrays["lesion"].sum(axis=(0, 1))))
        ax.imshow(arrays["t1"][:, :, z].T, origin="lower", cmap="gray")
        ax.contour(arrays["lesion"][:, :, z].T, levels=[0.5], colors=TRUTH, linewidths=1.2, origin="lower")
        mark_sides(ax, arrays["t1"].shape[0])
        ax.set_title(f"{label}: {rec['scan_id']}\n{rec['lesion_volume_ml']:.2f} mL, axial z={z}")
        ax.axis("off")
    return _save(fig, out / FIGURES[1])


def _hemispheres(records: list[dict], out: Path) -> str:
    import matplotlib.pyplot as plt

    hemis = sorted({r["hemisphere"] for r in records})
    splits = sorted({r["split"] for r in records})
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = np.zeros(len(hemis))
    for split in splits:
        counts = np.array([sum(1 for r in records if r["hemisphere"] == h and r["split"] == split) for h in hemis])
        ax.bar(hemis, counts / len(records), bottom=bottom, label=split)
        bottom += counts / len(records)
    ax.set_ylabel("proportion of scans")
    ax.set_title("Lesions by hemisphere / location")
    ax.legend(title="split")
    return _save(fig, out / FIGURES[2])


def _frequency(group, records: list[dict], out: Path) -> str | None:
    """Lesion frequency map (max over axial slices) when scans share one grid
    (standard-space releases); skipped for native scans."""
    import matplotlib.pyplot as plt

    shapes = {r["shape"] for r in records}
    if len(shapes) != 1:
        return None
    total = np.zeros(next(iter(shapes)), dtype=np.float32)
    anatomy = np.zeros_like(total)  # the scans' mean T1: the anatomy under the map
    for r in records:
        arrays = store.read_scan(group, r["scan_id"], ("t1", "lesion"))
        total += arrays["lesion"]
        anatomy += arrays["t1"] / len(records)
    freq = total / len(records)
    z = int(np.argmax(total.sum(axis=(0, 1))))
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, shown, back, what in (
        (axes[0], freq[:, :, z], anatomy[:, :, z], f"axial slice z={z}, where lesions are most frequent"),
        (axes[1], freq.max(axis=2), anatomy.mean(axis=2), "maximum over the axial slices"),
    ):
        ax.imshow(back.T, origin="lower", cmap="gray")
        im = ax.imshow(
            np.ma.masked_where(shown.T == 0, shown.T),
            origin="lower",
            cmap=SEQUENTIAL,
            vmin=0,
            vmax=freq.max(),
            alpha=0.75,
        )
        mark_sides(ax, freq.shape[0])
        ax.set_title(what, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"Lesion frequency over the {len(records)} scans' mean T1")
    fig.colorbar(im, ax=axes, label="fraction of scans", shrink=0.8)
    return _save(fig, out / FIGURES[3])
