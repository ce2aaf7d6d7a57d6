"""webdataset's stages against ours: reading tar shards into records, and the whole stream into batches.

Usage: .venv/bin/python bench/bench_stages.py [--subjects 8] [--workers 2] [--out bench-out/stages]

Synthesises an R1.2 phantom, ingests it and builds blocks shards of its
training split at a tenth of the paper's sample (every tenth lesion voxel,
background drawn to 43.7% lesion). Then, one process, reading from the page
cache, median of 3 after a warm-up:

1. records/s and MB/s from the shards to decoded records:
   ``shards.tario.iter_grouped`` + ``shards.formats.decode_any`` (ours: what
   ``ShardStream`` runs) against ``webdataset.tarfile_to_samples`` +
   ``shards.stages.decode`` (webdataset's tar reader);
2. samples/s from the shards to shuffled tensor batches of 256 (pool 4096):
   ``ShardStream`` against ``webdataset.DataPipeline(SimpleShardList,
   tarfile_to_samples, stages.decode, stages.batched)``.
Results print and go to OUT/bench_stages.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import webdataset as wds

from atlas_shards.build import BuildConfig, build
from atlas_shards.ingest import ingest
from atlas_shards.synth import synthesize_release
from shards import stages
from shards.reader import ShardStream
from shards.formats import decode_any
from shards.tario import iter_grouped


def timed(fn, repeats: int = 3) -> tuple[float, int]:
    fn()  # warm-up: the page cache, imports
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="bench-out/stages")
    args = ap.parse_args()
    out = Path(args.out)
    release, store, shard_dir = out / "release", out / "store.zarr", out / "train"
    if not store.exists():
        synthesize_release(release, "r1.2", args.subjects + 4, seed=0, workers=args.workers, progress=False)
        ingest(release, store, workers=args.workers, split_counts=(args.subjects, 2, 2), progress=False)
    manifest = build(
        store,
        shard_dir,
        BuildConfig(split="train", lesion_rate=0.1),
        workers=args.workers,
        progress=False,
        log=lambda m: None,
    )
    urls = [str(shard_dir / s["name"]) for s in manifest["shards"]]
    total_bytes = manifest["totals"]["bytes"]
    patch, fmt = manifest["config"]["patch"], manifest["format"]

    def ours_records() -> int:
        n = 0
        for url in urls:
            with open(url, "rb") as f:
                for _, fields in iter_grouped(f):
                    decode_any(fields, patch, fmt)
                    n += 1
        return n

    def wds_records() -> int:
        pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), stages.decode(patch, fmt))
        return sum(1 for _ in pipeline)

    def ours_stream() -> int:
        return sum(len(b["y"]) for b in ShardStream(str(shard_dir), batch_size=256, shuffle=4096, seed=0))

    def wds_stream() -> int:
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.tarfile_to_samples(),
            stages.decode(patch, fmt),
            stages.batched(256, shuffle=4096, seed=0),
        )
        return sum(len(b["y"]) for b in pipeline)

    result = {
        "shards": len(urls),
        "records": manifest["totals"]["records"],
        "samples": manifest["totals"]["samples"],
        "bytes": total_bytes,
    }
    for name, fn in (("ours_records", ours_records), ("wds_records", wds_records)):
        seconds, count = timed(fn)
        result[name] = {"seconds": seconds, "records_per_s": count / seconds, "mb_per_s": total_bytes / seconds / 1e6}
    for name, fn in (("ours_stream", ours_stream), ("wds_stream", wds_stream)):
        seconds, count = timed(fn)
        result[name] = {"seconds": seconds, "samples_per_s": count / seconds}
    result["records_wds_over_ours"] = result["wds_records"]["records_per_s"] / result["ours_records"]["records_per_s"]
    result["stream_wds_over_ours"] = result["wds_stream"]["samples_per_s"] / result["ours_stream"]["samples_per_s"]
    print(json.dumps(result, indent=1))
    (out / "bench_stages.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
