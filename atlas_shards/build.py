"""``atlas-shards build``: a store split -> balanced patch-pair WebDataset shards.

Three passes, each resumable, memory bounded by one scan or one shard. The
samples are the same in both formats (``plan.draw_voxels``); how they are
stored differs in passes 2 and 3. For pairs:

1. *plan* (parent): count lesion and background voxels of every scan of the
   split, derive the sampling rates and each scan's exact sample counts, the
   number of shards, and where each scan's samples go. Sample j of a scan
   (after a seeded shuffle) goes to shard (offset + j) mod S, where offset is
   the number of samples of the scans before it: every scan is spread over
   every shard and shard sizes differ by at most one.
2. *spill* (parallel over scans): normalise the volume, cut the pairs, and
   write them to ``OUT/.build/spill/`` grouped by destination shard.
3. *shard* (parallel over shards): gather the shard's slice of every scan's
   spill, shuffle it (seeded per shard), write records of K samples to a tar
   under a temporary name and rename it.

For blocks, passes 2 and 3 are ``build_blocks.spill_blocks`` and
``build_blocks.write_block_shard``: whole blocks rather than samples are
spread over the shards.

The same store, configuration and seed give byte-identical shards and
manifest, whatever the number of workers and however often the build was
interrupted. ``manifest.json`` is written last; ``.build/`` is then removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from atlas_shards import publish
from atlas_shards import store as zstore
from atlas_shards.build_blocks import block_layout, count_blocks, spill_blocks, write_block_shard
from atlas_shards.hard_negatives import HardNegativeError, load_map, map_path
from atlas_shards.plan import (
    BuildConfig,
    BuildError,
    describe_plan,
    draw_voxels,
    lesion_components,
    make_plan,
    scan_hardness,
)
from atlas_shards.spill import write_spill
from atlas_shards.workers import Workers
from shards import remote
from shards.common.atomic import atomic_write_text, check_output_dir
from shards.blocks import block_size
from shards.manifest import ManifestError, read_manifest, write_manifest
from shards.norm import dequantisation, normalise
from shards.patches import PairCutter
from shards.schema import LOC_DTYPE, MANIFEST, SCHEMA, SCHEMA_VERSION, X_DTYPE, encode_record, record_key
from shards.tario import write_shard

BUILD_DIR = ".build"
TEMP_SHARDS = ".*-[0-9][0-9][0-9][0-9][0-9][0-9].tar.*.tmp"  # what shards.common.atomic names a shard being written
CHUNK = 512  # samples cut and written at a time (16 MB at P=25)


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

    With ``dry_run`` only the plan is computed and returned (nothing written).
    """
    config.check()
    if remote.is_remote(str(out_dir)):
        return _build_into_object_store(store_path, str(out_dir), config, workers, progress, dry_run, log)
    check_output_dir(out_dir)
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
        scans, counts = (list(v) for v in zip(*usable))
        plan = make_plan(config, scans, counts, {s: root.attrs["scans"][s] for s in scans}, skipped)
        if dry_run:  # both formats' sizes: blocks need the samples drawn to count their blocks
            blocks = list(pool.map(count_blocks, [(str(store_path), e, asdict(config)) for e in plan["scans"]]))
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
        blocks = config.format == "blocks"
        if blocks:
            jobs = [(str(store_path), str(spill), i, plan["scans"][i], asdict(config)) for i in todo]
        else:
            jobs = [
                (str(store_path), str(spill), i, plan["scans"][i], plan["num_shards"], asdict(config)) for i in todo
            ]
        total = sum(plan["scans"][i]["samples"] for i in todo)
        with _bar(progress, "cut blocks" if blocks else "cut pairs", total, "sample") as bar:
            for result in pool.map(spill_blocks if blocks else _spill_scan, jobs):
                bar.update(result["samples"])
        spilled = [json.loads((spill / f"{i:06d}.done").read_text()) for i in range(len(plan["scans"]))]
        num_shards = plan["num_shards"]
        if blocks:
            layout = block_layout(config, spilled)
            num_shards = layout["num_shards"]
            shard_jobs = [
                (str(out_dir), k, plan, layout, asdict(config), shard_name(config.split, k), str(work))
                for k in range(num_shards)
            ]
        else:
            shard_jobs = [(str(out_dir), k, plan, asdict(config)) for k in range(num_shards)]
        shard_jobs = [j for j in shard_jobs if not (work / "shards" / f"{j[1]:06d}.json").exists()]
        with _bar(progress, "write shards", len(shard_jobs), "shard") as bar:
            for _ in pool.map(write_block_shard if blocks else _write_one_shard, shard_jobs):
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


def _spill_scan(args: tuple) -> dict:
    """Worker: sample one scan, cut its pairs, write them grouped by shard; returns its counts."""
    store_path, spill, index, entry, num_shards, cfg = args
    config = BuildConfig(**cfg)
    scan_id, n = entry["scan_id"], entry["samples"]
    root = zstore.open_store(store_path, "r")
    data = zstore.read_scan(root, scan_id)
    mirror = float(root[scan_id].attrs["mirror_index"])
    lesion, brain = data["lesion"] > 0, data["brain"] > 0
    chosen = draw_voxels(lesion, brain, scan_id, entry, config, scan_hardness(config, entry, lesion.shape))
    shard_of = (entry["offset"] + np.arange(n)) % num_shards
    order = np.argsort(shard_of, kind="stable")
    chosen = chosen[order]
    labels = lesion.ravel()[chosen].astype(np.uint8)
    locs = np.stack(np.unravel_index(chosen, lesion.shape), axis=1).astype(LOC_DTYPE)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(shard_of, minlength=num_shards))])
    del lesion, brain
    cutter = PairCutter(normalise(data.pop("t1"), data["brain"], config.norm), mirror, config.patch)
    p = config.patch
    pieces = (cutter(locs[start : start + CHUNK]) for start in range(0, n, CHUNK))  # x: chunk by chunk to disk
    return write_spill(
        Path(spill) / f"{index:06d}",
        "x",
        (n, 2, p, p, p),
        pieces,
        {"y": labels, "loc": locs, "offsets": offsets},
        {"samples": int(n), "lesion_samples": int(labels.sum())},
    )


def _write_one_shard(args: tuple) -> None:
    """Worker: gather shard k from every scan's spill, shuffle, write the tar, record its counts."""
    out_dir, k, plan, cfg = args
    config = BuildConfig(**cfg)
    work = Path(out_dir) / BUILD_DIR
    spans = []
    for i in range(len(plan["scans"])):
        base = work / "spill" / f"{i:06d}"
        a, b = (int(v) for v in np.load(f"{base}.offsets.npy")[k : k + 2])
        if b > a:
            spans.append((base, i, a, b))
    n, p = sum(b - a for _, _, a, b in spans), config.patch
    x = np.empty((n, 2, p, p, p), dtype=X_DTYPE)  # filled in place: one shard in memory, once
    y, loc, sidx = np.empty(n, np.uint8), np.empty((n, 3), np.int16), np.empty(n, np.int32)
    at = 0
    for base, i, a, b in spans:
        x[at : at + b - a] = np.load(f"{base}.x.npy", mmap_mode="r")[a:b]
        y[at : at + b - a] = np.load(f"{base}.y.npy", mmap_mode="r")[a:b]
        loc[at : at + b - a] = np.load(f"{base}.loc.npy", mmap_mode="r")[a:b]
        sidx[at : at + b - a] = i
        at += b - a
    perm = np.random.default_rng([config.seed, k, 0x5EED]).permutation(len(y))
    names = [s["scan_id"] for s in plan["scans"]]
    size = config.samples_per_record

    def records() -> Iterable[tuple[str, dict[str, bytes]]]:
        for r, start in enumerate(range(0, len(perm), size)):
            sel = perm[start : start + size]
            yield record_key(k, r), encode_record(x[sel], y[sel], loc[sel], [names[j] for j in sidx[sel]])

    name = shard_name(config.split, k)
    sha = write_shard(Path(out_dir) / name, records())
    info = {
        "name": name,
        "samples": int(len(y)),
        "lesion_samples": int(y.sum()),
        "records": math.ceil(len(y) / size),
        "bytes": (Path(out_dir) / name).stat().st_size,
        "sha256": sha,
    }
    atomic_write_text(work / "shards" / f"{k:06d}.json", json.dumps(info))


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def _manifest(plan: dict, config: BuildConfig, shards: list[dict], spilled: list[dict], store_path, root) -> dict:
    samples = sum(s["samples"] for s in shards)
    lesion = sum(s["lesion_samples"] for s in shards)
    records = sum(s["records"] for s in shards)
    p, size = config.patch, block_size(config.block, config.patch)
    if config.format == "blocks":
        stored = {
            "block": {
                "dtype": "uint8",
                "shape": [2, size, size, size],
                "block": config.block,
                "channels": ["volume", "mirrored volume"],
                "extent": "padded pair from the block's first voxel",
            },
            "off": {"dtype": "int16", "shape": [3], "range": [0, config.block - 1]},
            "meta": {"scan": "str", "origin": "block's first voxel, store canonical RAS", "patch": p},
        }
    else:
        stored = {"samples_per_record": config.samples_per_record}
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
        "store": {"path": str(store_path), "layout": root.attrs.get("layout"), "space": root.attrs.get("space")},
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
        },
    }
