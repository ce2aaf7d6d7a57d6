"""ATLAS release on disk -> validated, canonical, resumable Zarr store.

The release is only read. Each scan is validated and written as its own
group, atomically; a re-run skips the scans already complete and redoes any
interrupted one. ``STORE/ingest-report.csv`` accounts for every scan found.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from shards.common.atomic import atomic_write_text, check_output_dir
from shards.common.lock import OutputBusy, owned

from atlas_shards import metadata, store
from atlas_shards.discover import ScanSource, discover, release_layout
from atlas_shards.scan import ScanError, prepare_scan
from atlas_shards.split import make_split, moved_subjects, split_fingerprint, split_sizes
from atlas_shards.workers import Workers

REPORT = "ingest-report.csv"
REPORT_COLUMNS = (
    "scan_id",
    "subject_id",
    "session",
    "cohort",
    "layout",
    "space",
    "labelled",
    "status",
    "reason",
    "split",
    "lesion_voxels",
    "hemisphere",
    "t1",
    "masks",
)


class IngestError(Exception):
    """Nothing could be ingested, or the store cannot be used for this release."""


@dataclass
class IngestSummary:
    store: Path
    layout: str
    found: int
    ingested: int
    repaired: int
    excluded: int
    unlabelled: int
    resumed: int
    split: dict[str, list[str]]
    excluded_reasons: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def ingest(
    release: str | os.PathLike,
    store_path: str | os.PathLike,
    workers: int = 1,
    split_counts: tuple[int, ...] | None = None,
    split_fractions: tuple[float, ...] | None = None,
    seed: int = 0,
    space: str = "auto",
    progress: bool = True,
) -> IngestSummary:
    """Ingest every usable scan of ``release`` into the store at ``store_path`` (which it owns meanwhile:
    ``shards.common.lock``)."""
    check_output_dir(store_path)
    release = Path(release).resolve()
    store_path = Path(store_path).resolve()
    if store_path == release or release in store_path.parents:
        raise IngestError(
            f"{store_path}: the store must not be inside the release {release} (the release is read-only)"
        )
    odd_names: list[str] = []
    sources = discover(release, space=space, skipped=odd_names)
    subjects = {s.subject_id for s in sources if s.labelled and not s.problem}
    split_sizes(len(subjects), split_counts, split_fractions)  # counts the release cannot meet: before any scan
    root = store.open_store(store_path, mode="a")  # made first: the lock file lives in the store's directory
    try:
        with owned(store_path, "atlas-shards ingest"):
            split = (split_counts, split_fractions, seed)
            return _ingest(release, store_path, root, sources, odd_names, workers, split, progress)
    except OutputBusy as exc:
        raise IngestError(str(exc)) from None


def _ingest(release, store_path, root, sources, odd_names, workers, split, progress) -> IngestSummary:
    split_counts, split_fractions, seed = split
    from tqdm import tqdm

    previous = root.attrs.get("release_dir")
    if previous and previous != str(release):
        raise IngestError(f"{store_path}: store was built from {previous}, not {release}; use a new store path")
    _check_same_split(store_path, root.attrs.get("split_config"), seed, split_counts, split_fractions)
    root.attrs.update({"release_dir": str(release)})
    store.clear_partial(store_path)
    done = set(store.complete_scans(store_path))
    rows_meta, notes = metadata.join_metadata(release, sorted({s.subject_id for s in sources}))
    notes = odd_names + notes  # printed, and kept in the store's attributes

    results: dict[str, dict] = {}
    todo: list[ScanSource] = []
    for src in sources:
        if src.problem:
            results[_key(src)] = _excluded(src.problem)
        elif src.scan_id in done:
            results[_key(src)] = {**store.scan_attrs(root, src.scan_id), "resumed": True}
        else:
            todo.append(src)
    bar = tqdm(total=len(todo), desc="ingest", unit="scan", disable=not progress)
    with Workers(workers) as pool:
        jobs = [(release, store_path, src, rows_meta.get(src.subject_id)) for src in todo]
        for src, result in zip(todo, pool.map(_ingest_job, jobs)):
            results[_key(src)] = result
            bar.update()
    bar.close()
    ordered = [(src, results[_key(src)]) for src in sources]
    return _finish(store_path, root, release, sources, ordered, notes, seed, split_counts, split_fractions)


def _split_options(seed: int, counts, fractions) -> dict:
    as_list = lambda v: list(v) if v else None  # noqa: E731
    return {"seed": seed, "counts": as_list(counts), "fractions": as_list(fractions)}


def _shown(options: dict) -> str:
    """Split options as the command line gives them."""
    flags = {"counts": "--split", "fractions": "--split-fractions"}
    return f"--seed {options['seed']}" + "".join(
        f" {flags[k]} {','.join(map(str, options[k]))}" for k in flags if options[k]
    )


def _check_same_split(store_path: Path, config: dict | None, seed: int, counts, fractions) -> None:
    """A store's split is fixed once written: re-ingesting asks for the same one, or is refused before any work."""
    if not config:
        return
    had = {k: config.get(k) for k in ("seed", "counts", "fractions")}
    asked = _split_options(seed, counts, fractions)
    if had != asked:
        raise IngestError(
            f"{store_path}: its subject split was made with {_shown(had)}; this ingest asks for {_shown(asked)}. "
            "A store's split is fixed once written (runs trained on it must never be scored on their own "
            "training subjects): ingest with the same options, or into a new store"
        )


def _key(src: ScanSource) -> str:
    return f"{src.scan_id}|{src.t1}"


def _excluded(reason: str) -> dict:
    return {"excluded": reason}


def _ingest_job(job: tuple) -> dict:
    return _ingest_one(*job)


def _ingest_one(release: Path, store_path: Path, src: ScanSource, meta_row: dict | None) -> dict:
    """Worker: validate, canonicalise and write one scan; return its attrs.

    Any failure excludes this scan only: the reason goes to the report.
    """
    try:
        scan = prepare_scan(release, src)
    except ScanError as exc:
        return _excluded(str(exc))
    except Exception as exc:  # keep going: one bad scan must not stop the run
        return _excluded(f"unexpected error: {type(exc).__name__}: {exc}")
    attrs = dict(scan.attrs)
    notes = list(scan.notes)
    if src.ignored:
        notes.append(f"ignored files in the scan folder: {', '.join(Path(p).name for p in src.ignored)}")
    attrs["repairs"] = list(scan.repairs)
    attrs["notes"] = notes
    attrs["metadata"] = meta_row or {}
    if src.labelled:
        stated = metadata.hemisphere_from_row(meta_row or {})
        attrs["hemisphere"] = stated or attrs["hemisphere_computed"]
        attrs["hemisphere_source"] = "metadata" if stated else "computed"
    arrays = {"t1": scan.t1, "brain": scan.brain}
    if scan.lesion is not None:
        arrays["lesion"] = scan.lesion
    store.write_scan(store_path, src.scan_id, arrays, attrs)
    return attrs


def _finish(store_path, root, release, sources, ordered, notes, seed, split_counts, split_fractions) -> IngestSummary:
    ingested = {a["scan_id"]: a for _, a in ordered if "excluded" not in a}
    labelled = {k: a for k, a in ingested.items() if a.get("labelled")}
    volumes: dict[str, list[int]] = {}
    for a in labelled.values():
        volumes.setdefault(a["subject_id"], []).append(a["lesion_voxels"])
    split = make_split({s: sum(v) / len(v) for s, v in volumes.items()}, seed, split_counts, split_fractions)
    moved = moved_subjects(root.attrs.get("split") or {}, split)
    if moved:  # the same options, other subjects (scans added or lost since): the old split stays as it was
        raise IngestError(
            f"{store_path}: this ingest would move {len(moved)} subject(s) of the store's split: "
            f"{', '.join(moved[:5])}{' ...' if len(moved) > 5 else ''}; the scans are stored, the split is kept "
            "as it was. A store's split is fixed once written: ingest a changed release into a new store"
        )
    split_of = {s: name for name, subjects in split.items() for s in subjects}
    excluded = [(src.scan_id, src.t1 or ",".join(src.masks), a["excluded"]) for src, a in ordered if "excluded" in a]
    layout = release_layout(sources)
    root.attrs.update(
        {
            "format": store.FORMAT,
            "format_version": store.FORMAT_VERSION,
            "layout": layout,
            "space": sorted({s.space for s in sources}),
            "release_dir": str(release),
            "scans": {k: a["subject_id"] for k, a in sorted(labelled.items())},
            "unlabelled_scans": sorted(k for k, a in ingested.items() if not a.get("labelled")),
            "subjects": sorted(volumes),
            "excluded": [{"scan_id": s, "path": p, "reason": r} for s, p, r in excluded],
            "split": split,
            "split_fingerprint": split_fingerprint(split),
            "split_config": {
                **_split_options(seed, split_counts, split_fractions),
                "default": "paper proportions 100:25:25" if not (split_counts or split_fractions) else None,
                "unit": "subject",
                "stratified_by": "lesion volume",
            },
            "metadata_notes": notes,
        }
    )
    _write_report(store_path / REPORT, ordered, split_of)
    store.clear_partial(store_path)
    repaired = sum(1 for a in ingested.values() if a.get("repairs"))
    return IngestSummary(
        store=store_path,
        layout=layout,
        found=len(sources),
        ingested=len(ingested),
        repaired=repaired,
        excluded=len(excluded),
        unlabelled=len(ingested) - len(labelled),
        resumed=sum(1 for _, a in ordered if a.get("resumed")),
        split=split,
        excluded_reasons=[(s, r) for s, _, r in excluded],
        notes=notes,
    )


def _write_report(path: Path, ordered: list[tuple[ScanSource, dict]], split_of: dict[str, str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REPORT_COLUMNS)
    writer.writeheader()
    for src, a in ordered:
        if "excluded" in a:
            status, reason = "excluded", a["excluded"]
        else:
            status = "repaired" if a.get("repairs") else "ingested"
            reason = "; ".join(a.get("repairs", []) + a.get("notes", []))
        writer.writerow(
            {
                "scan_id": src.scan_id,
                "subject_id": src.subject_id,
                "session": src.session,
                "cohort": src.cohort,
                "layout": src.layout,
                "space": src.space,
                "labelled": src.labelled,
                "status": status,
                "reason": reason,
                "split": split_of.get(src.subject_id, "") if src.labelled and status != "excluded" else "",
                "lesion_voxels": a.get("lesion_voxels", ""),
                "hemisphere": a.get("hemisphere", ""),
                "t1": src.t1 or "",
                "masks": ";".join(src.masks),
            }
        )
    atomic_write_text(path, buf.getvalue())
