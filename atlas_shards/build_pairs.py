"""The pairs format's two build passes (``atlas-shards build --format pairs``): ready-cut pairs.

*spill* (per scan): sample j of the scan (after a seeded shuffle) goes to shard
(offset + j) mod S, offset being the number of samples of the scans before it:
every scan is spread over every shard and shard sizes differ by at most one.
Normalise the volume, cut the pairs, write them to ``.build/spill/`` grouped by
destination shard.

*shard* (per shard): gather the shard's slice of every scan's spill, shuffle it
(seeded per shard), write records of K samples to a tar under a temporary name
and rename it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from atlas_shards import store as zstore
from atlas_shards.build_jobs import ShardJob, SpillJob
from atlas_shards.plan import BuildConfig, draw_voxels, scan_hardness
from atlas_shards.spill import write_spill
from shards.common.atomic import atomic_write_text
from shards.norm import normalise
from shards.patches import PairCutter
from shards.pairs import encode_record
from shards.schema import LOC_DTYPE, X_DTYPE, record_key
from shards.tario import write_shard

CHUNK = 512  # samples cut and written at a time (16 MB at P=25)


def pair_layout(config: BuildConfig, plan: dict, spilled: list[dict]) -> dict:
    """The plan's shard count: pairs know where each sample goes before they are cut."""
    return {"num_shards": plan["num_shards"]}


def stored_pairs(config: BuildConfig) -> dict:
    """The manifest's description of a pairs record."""
    return {"samples_per_record": config.samples_per_record}


def spill_pairs(job: SpillJob) -> dict:
    """Worker: sample one scan, cut its pairs, write them grouped by shard; returns its counts."""
    config, entry, num_shards = job.config, job.entry, job.num_shards
    scan_id, n = entry["scan_id"], entry["samples"]
    root = zstore.open_store(job.store, "r")
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
        Path(job.spill) / f"{job.index:06d}",
        "x",
        (n, 2, p, p, p),
        pieces,
        {"y": labels, "loc": locs, "offsets": offsets},
        {"samples": int(n), "lesion_samples": int(labels.sum())},
    )


def write_pair_shard(job: ShardJob) -> None:
    """Worker: gather shard k from every scan's spill, shuffle, write the tar, record its counts."""
    config, plan, k, work = job.config, job.plan, job.k, Path(job.work)
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

    name = job.name
    sha = write_shard(Path(job.out_dir) / name, records())
    info = {
        "name": name,
        "samples": int(len(y)),
        "lesion_samples": int(y.sum()),
        "records": math.ceil(len(y) / size),
        "bytes": (Path(job.out_dir) / name).stat().st_size,
        "sha256": sha,
    }
    atomic_write_text(work / "shards" / f"{k:06d}.json", json.dumps(info))
