"""``atlas-shards build``: a store split -> balanced patch-pair WebDataset shards.

Three passes, each resumable, memory bounded by one scan or one shard:

1. *plan* (parent): count lesion and background voxels of every scan of the
   split, derive the sampling rates and each scan's exact sample counts
   (``plan.make_plan``). The samples are the same in every format
   (``plan.draw_voxels``).
2. *spill* (parallel over scans) and 3. *shard* (parallel over shards): the
   format's own passes (``atlas_shards.formats``: ``build_pairs`` cuts ready
   pairs, ``build_blocks`` whole blocks with their samples), each job a small
   dataclass (``build_jobs``).

The same store, configuration and seed give byte-identical shards and
manifest, whatever the number of workers and however often the build was
interrupted. ``manifest.json`` is written last; ``.build/`` is then removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from atlas_shards import publish
from atlas_shards import store as zstore
from atlas_shards.build_blocks import count_blocks
from atlas_shards.build_jobs import ShardJob, SpillJob
from atlas_shards.formats import FORMATS
from atlas_shards.hard_negatives import HardNegativeError, load_map, map_path
from atlas_shards.plan import BuildConfig, BuildError, describe_plan, lesion_components, make_plan
from atlas_shards.workers import Workers
from shards import remote
from shards.common.atomic import atomic_write_text, check_output_dir
from shards.common.lock import OutputBusy, owned
from shards.manifest import ManifestError, read_manifest, write_manifest
from shards.norm import dequantisation
from shards.schema import MANIFEST, SCHEMA, SCHEMA_VERSION
from atlas_shards.split import split_fingerprint

BUILD_DIR = ".build"
TEMP_SHARDS = ".*-[0-9][0-9][0-9][0-9][0-9][0-9].tar.*.tmp"  # what shards.common.atomic names a shard being written


def build(
    store_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: BuildConfig,
    workers: int = 1,
    progress: bool = True,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Build the shards of ``config.split`` from the store into ``out_dir``; return the manifest.

    With ``dry_run`` only the plan is computed and returned (nothing written). One build at a time writes a
    directory (``shards.common.lock``): a second is refused by name.
    """
    config.check()
    if remote.is_remote(str(out_dir)):
        return _build_into_object_store(store_path, str(out_dir), config, workers, progress, dry_run, log)
    check_output_dir(out_dir)
    if dry_run:
        return _build(store_path, out_dir, config, workers, progress, dry_run, log)
    try:
        with owned(out_dir, "atlas-shards build"):
            return _build(store_path, out_dir, config, workers, progress, dry_run, log)
    except OutputBusy as exc:
        raise BuildError(str(exc)) from None


def _build(store_path, out_dir, config: BuildConfig, workers: int, progress: bool, dry_run: bool, log) -> dict:
    out_dir = Path(out_dir).resolve()
    if not remote.is_remote(str(store_path)):  # a store on object storage is read through zarr's fsspec store
        store_path = Path(store_path).resolve()
        if out_dir == store_path or store_path in out_dir.parents:
            raise BuildError(f"{out_dir}: the shard directory must not be inside the store {store_path}")
    try:
        root = zstore.open_store(store_path, "r")
    except zstore.StoreError as exc:
        raise BuildError(str(exc)) from None
    scans = zstore.split_scans(root, config.split)
    if not scans:
        raise BuildError(f"{store_path}: split {config.split!r} has no labelled scans")
    with Workers(workers) as pool:
        by_component = config.component_samples is not None
        jobs = [(str(store_path), s, config.hard_negatives, by_component) for s in scans]
        counts = list(pool.map(_count_scan, jobs))
        skipped = [f"scan {s} skipped: {c['problem']}" for s, c in zip(scans, counts) if "problem" in c]
        usable = [(s, c) for s, c in zip(scans, counts) if "problem" not in c]
        if not usable:
            raise BuildError(f"{store_path}: no usable scan in split {config.split!r}: " + "; ".join(skipped))
        unmapped = [(s, c["hard_problem"]) for s, c in usable if "hard_problem" in c]
        if config.hard_negatives is not None and len(unmapped) == len(usable):
            raise BuildError(
                f"--hard-negatives {config.hard_negatives}: no usable probability map for any of the {len(usable)} "
                f"scans of split {config.split!r} (e.g. {unmapped[0][0]}: {unmapped[0][1]}); nothing would be hard"
            )
        scans, counts = (list(v) for v in zip(*usable))
        plan = make_plan(config, scans, counts, {s: root.attrs["scans"][s] for s in scans}, skipped)
        if dry_run:  # both formats' sizes: blocks need the samples drawn to count their blocks
            jobs = [SpillJob(str(store_path), "", i, e, None, config) for i, e in enumerate(plan["scans"])]
            blocks = list(pool.map(count_blocks, jobs))
            log(describe_plan(plan, config, out_dir, sum(blocks)))
            return {**plan, "blocks": sum(blocks)}
        log(describe_plan(plan, config, out_dir))
        done = _existing(out_dir, plan)
        if done is not None:
            log(f"{out_dir}: already built with this configuration; nothing to do")
            shutil.rmtree(out_dir / BUILD_DIR, ignore_errors=True)  # killed after the manifest landed
            _remove_leftovers(out_dir)
            return done
        work = out_dir / BUILD_DIR
        _prepare(out_dir, work, plan)
        spill = work / "spill"
        todo = [i for i, s in enumerate(plan["scans"]) if not (spill / f"{i:06d}.done").exists()]
        fmt = FORMATS[config.format]
        jobs = [SpillJob(str(store_path), str(spill), i, plan["scans"][i], plan["num_shards"], config) for i in todo]
        total = sum(plan["scans"][i]["samples"] for i in todo)
        with _bar(progress, fmt.cutting, total, "sample") as bar:
            for result in pool.map(fmt.spill, jobs):
                bar.update(result["samples"])
        spilled = [json.loads((spill / f"{i:06d}.done").read_text()) for i in range(len(plan["scans"]))]
        layout = fmt.layout(config, plan, spilled)
        num_shards = layout["num_shards"]
        if config.num_shards is not None and num_shards < config.num_shards:
            note = (
                f"--num-shards {config.num_shards} cannot be met: {num_shards} shards hold every "
                f"{'block' if config.format == 'blocks' else 'sample'} once; building {num_shards}"
            )
            log(note)
            plan["notes"].append(note)
        shard_jobs = [
            ShardJob(str(out_dir), str(work), k, shard_name(config.split, k), plan, layout, config)
            for k in range(num_shards)
            if not (work / "shards" / f"{k:06d}.json").exists()
        ]
        with _bar(progress, "write shards", len(shard_jobs), "shard") as bar:
            for _ in pool.map(fmt.write, shard_jobs):
                bar.update()
    shards = [json.loads((work / "shards" / f"{k:06d}.json").read_text()) for k in range(num_shards)]
    manifest = _manifest(plan, config, shards, spilled, store_path, root)
    write_manifest(out_dir, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _build_into_object_store(
    store_path, url: str, config: BuildConfig, workers: int, progress: bool, dry_run: bool, log: Callable[[str], None]
) -> dict:
    """A local build staged for ``url``, then uploaded shard by shard, the manifest last."""
    if not remote.is_object_store(url):
        raise BuildError(
            f"{url}: shards are written to a local directory or object storage (s3://...), not to {remote.scheme(url)}:"
        )
    try:
        existing = publish.published(url)
    except ManifestError as exc:
        raise BuildError(str(exc)) from None
    staged = publish.staging_dir(url)
    log(f"staging the build for {url} in {staged}")
    manifest = build(store_path, staged, config, workers, progress, dry_run, log)
    if dry_run:
        return manifest
    if existing is not None and existing.get("plan_id") != manifest["plan_id"]:
        raise BuildError(
            f"{url}: already holds shards of another build (split "
            f"{existing['config'].get('split')!r}, plan {existing.get('plan_id')}); use another prefix"
        )
    publish.publish(staged, url, log)
    return manifest


def _count_scan(args: tuple[str, str, str | None, bool]) -> dict:
    """Worker: lesion, background (brain, not lesion) and candidate voxel counts of one scan.

    A scan the build cannot use gives ``{"problem": reason}`` instead; the
    build goes on without it and the manifest's notes say why. With hard
    negatives, a scan whose probability map cannot be used is sampled
    uniformly, and ``hard_problem`` says why.
    """
    store_path, scan_id, hard_dir, by_component = args
    try:
        root = zstore.open_store(store_path, "r")
        if scan_id not in root:
            return {"problem": "listed in the split but not in the store"}
        group = root[scan_id]
        absent = [a for a in zstore.ARRAYS if a not in group]
        if absent:
            return {"problem": f"no {'/'.join(absent)} array"}
        shapes = {a: tuple(group[a].shape) for a in zstore.ARRAYS}
        if len(set(shapes.values())) != 1 or len(shapes["t1"]) != 3:
            return {"problem": f"arrays of different or non-3D shapes {shapes}"}
        mirror = group.attrs.get("mirror_index")
        if not isinstance(mirror, (int, float)) or not np.isfinite(mirror):
            return {"problem": f"attribute mirror_index missing or invalid ({mirror!r})"}
        data = zstore.read_scan(root, scan_id)  # all three: each verified against its ingest checks
    except zstore.DamagedScan as exc:
        return {"problem": f"damaged: {str(exc).removeprefix(f'{scan_id}: ')}"}
    except Exception as exc:  # an unreadable group: this scan only
        return {"problem": f"unreadable: {type(exc).__name__}: {exc}"}
    lesion, brain = data["lesion"] > 0, data["brain"] > 0
    if not brain.any():
        return {"problem": "empty brain mask (nothing to normalise over or sample)"}
    n_lesion = int(lesion.sum())
    counts = {"lesion": n_lesion, "background": int((brain & ~lesion).sum()), "natural": int((brain | lesion).sum())}
    if by_component:  # only sampling by lesion needs the component sizes
        counts["components"] = lesion_components(lesion)[1].tolist()
    if hard_dir is not None:
        try:
            load_map(hard_dir, scan_id, lesion.shape)
            # The plan (and so plan_id) holds the map's checksum: other maps, another build.
            counts["hard_map_sha256"] = hashlib.sha256(map_path(hard_dir, scan_id).read_bytes()).hexdigest()
        except HardNegativeError as exc:
            counts["hard_problem"] = str(exc)
    return counts


def _existing(out_dir: Path, plan: dict) -> dict | None:
    """The manifest of a finished identical build, None if none; refuse a different one."""
    if not (out_dir / MANIFEST).exists():
        return None
    manifest = read_manifest(out_dir)
    if manifest.get("plan_id") != plan["plan_id"]:
        raise BuildError(
            f"{out_dir}: already holds shards of another build (split {manifest['config'].get('split')!r}, "
            f"plan {manifest.get('plan_id')}); build into an empty directory or remove it"
        )
    return manifest


def _remove_leftovers(out_dir: Path) -> None:
    """A killed build's half-written shards (under our own temporary names) go."""
    for leftover in out_dir.glob(TEMP_SHARDS):
        leftover.unlink(missing_ok=True)


def _prepare(out_dir: Path, work: Path, plan: dict) -> None:
    """Start or resume ``.build``; a different plan's leftovers are discarded."""
    plan_file = work / "plan.json"
    _remove_leftovers(out_dir)
    shards = sorted(out_dir.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    if not plan_file.exists() and shards:  # no build of ours left them: they are someone else's
        raise BuildError(
            f"{out_dir}: holds shard files this command did not make ({shards[0].name}"
            + (f" and {len(shards) - 1} more" if len(shards) > 1 else "")
            + "); build into an empty directory, or remove them"
        )
    if plan_file.exists() and json.loads(plan_file.read_text()).get("plan_id") != plan["plan_id"]:
        for stale in shards:
            stale.unlink()  # shards of an unfinished build of ours (its .build/ is here; no manifest)
        shutil.rmtree(work)
    if not plan_file.exists():
        (work / "spill").mkdir(parents=True, exist_ok=True)
        (work / "shards").mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan_file, json.dumps(plan, sort_keys=True))


def _bar(progress: bool, desc: str, total: int, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not progress or total == 0)


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def _manifest(plan: dict, config: BuildConfig, shards: list[dict], spilled: list[dict], store_path, root) -> dict:
    samples = sum(s["samples"] for s in shards)
    lesion = sum(s["lesion_samples"] for s in shards)
    records = sum(s["records"] for s in shards)
    p = config.patch
    stored = FORMATS[config.format].stored(config)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "format": config.format,
        "plan_id": plan["plan_id"],
        "config": {**asdict(config), "lesion_rate": plan["lesion_rate"], "background_rate": plan["background_rate"]},
        "norm": {"method": config.norm, **dequantisation(config.norm)},
        "sample": {
            "x": {"dtype": "uint8", "shape": [2, p, p, p], "channels": ["voxel cube", "mirror cube (flipped)"]},
            "y": {"dtype": "uint8", "shape": [], "values": {"0": "not lesion", "1": "lesion"}},
            "loc": {"dtype": "int16", "shape": [3], "space": "store canonical RAS voxel indices"},
            "scan": {"dtype": "str"},
            "outside_volume": 0,
            "stored_as": stored,
        },
        "store": {
            "path": str(store_path),
            "layout": root.attrs.get("layout"),
            "space": root.attrs.get("space"),
            "split_fingerprint": split_fingerprint(root.attrs.get("split") or {}),
        },
        "scans": [
            {
                "scan_id": s["scan_id"],
                "subject_id": s["subject_id"],
                "samples": s["samples"],
                "lesion_samples": done["lesion_samples"],
                "lesion_voxels": s["lesion_voxels"],
                "background_voxels": s["background_voxels"],
            }
            for s, done in zip(plan["scans"], spilled)
        ],
        "subjects": sorted({s["subject_id"] for s in plan["scans"]}),
        "shards": shards,
        "notes": plan["notes"],
        "totals": {
            "samples": samples,
            "lesion_samples": lesion,
            "lesion_fraction": lesion / samples if samples else 0.0,
            "shards": len(shards),
            "records": records,
            "bytes": sum(s["bytes"] for s in shards),
            "bytes_per_sample": sum(s["bytes"] for s in shards) / samples if samples else 0.0,
            **_voxel_totals(shards),
        },
    }


def _voxel_totals(shards: list[dict]) -> dict:
    """``{"voxels": {"lesion", "background"}, "draws": {...}}``: the labelled voxels the shards' records carry
    (blocks: their cores' voxels; what dense training learns from) and their expected draws, or nothing for a
    format whose records carry none."""
    if not shards or not all("voxels" in s for s in shards):
        return {}
    totals = {"voxels": {k: sum(int(s["voxels"][k]) for s in shards) for k in ("lesion", "background")}}
    if all("draws" in s for s in shards):
        totals["draws"] = {k: sum(float(s["draws"][k]) for s in shards) for k in ("lesion", "background")}
    return totals
