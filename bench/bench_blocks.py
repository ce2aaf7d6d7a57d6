"""Blocks against pairs: bytes per sample, build cost, reader speed, the device cut.

Usage: .venv/bin/python bench/bench_blocks.py [--subjects 16] [--workers 2] [--out bench-out/blocks]

1. Synthesises an R1.2 phantom (every scan labelled) of --subjects + 4 subjects
   and ingests it twice: with --subjects training subjects, and with
   --reader-subjects (a subset, for the pairs copy that must fit on disk).
2. The paper's sample (every lesion voxel, background drawn to 43.7% lesion)
   of all training scans: ``build --dry-run`` at blocks of 16, 24 and 32 and
   at a tenth of the sample (both formats' sizes, from the drawn samples),
   then a real blocks build at the default block size: wall time, peak RSS
   (per-process VmHWM), bytes/sample; and the same on half the subjects
   (peak memory should not grow with the number of scans). A pairs build of the full sample would
   need ~31 kB x samples of disk, twice over while building: the dry run's
   exact sample count gives its size.
3. The same samples, the paper's sample of the subset store, in both formats:
   both builds (wall, RSS, bytes), then the reader, one process, batches of
   256 as tensors, default shuffle pool, median of 3 after a warm-up: blocks /
   pairs samples/s in the same run. The pairs (~11 GB) may not all stay in
   the page cache; so the same again at --cache-lesion-rate of the sample
   (~3 GB of pairs), where both formats are read from memory.
4. The device path's cut (``shards.blocks.DeviceCutter``) on CPU tensors:
   samples/s cutting batches of 256 from the pool of real device-cut batches
   (and on CUDA when there is one).
5. On paper: bytes/s one server sends to keep 8 GPUs at 1e5 samples/s each,
   and the full ATLAS v2.0 (655 training scans) paper sample, both formats,
   from the measured bytes/sample and samples/scan.
Results print and go to OUT/bench_blocks.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from atlas_shards.ingest import ingest
from atlas_shards.synth import synthesize_release
from bench_shards import BATCH, run_build, timed
from shards.schema import BLOCK

ATLAS_V2_TRAINING_SCANS = 655
H100_SAMPLES_PER_S, GPUS = 1e5, 8


def dry_run(store: Path, lesion_rate: float, block: int, workers: int) -> dict:
    """Samples and blocks of a configuration, and both formats' estimated bytes/sample."""
    from atlas_shards.build import BuildConfig, build
    from shards.formats import FORMATS

    config = BuildConfig(split="train", lesion_rate=lesion_rate, block=block)
    quiet = dict(workers=workers, progress=False, dry_run=True, log=lambda m: print(m, flush=True))
    plan = build(store, store.parent / "dry", config, **quiet)
    n, blocks = plan["samples"], plan["blocks"]
    blocks_bps = FORMATS["blocks"].estimate_bytes(n, blocks, config.patch, block) / n
    pairs_bps = FORMATS["pairs"].estimate_bytes(n, -(-n // config.samples_per_record), config.patch, block) / n
    return {
        "lesion_rate": lesion_rate,
        "block": block,
        "samples": n,
        "blocks": blocks,
        "scans": len(plan["scans"]),
        "blocks_bytes_per_sample": round(blocks_bps),
        "pairs_bytes_per_sample": round(pairs_bps),
        "fewer_bytes": round(pairs_bps / blocks_bps, 1),
    }


def read_rate(shard_dir: Path) -> float:
    from shards.reader import ShardStream

    return timed(lambda: sum(len(b["y"]) for b in ShardStream(str(shard_dir), batch_size=BATCH)))


def device_cut_rate(shard_dir: Path, device: str, batches: int = 40) -> float:
    """Samples/s of ``DeviceCutter`` cutting batches from real device-cut batches already on the host."""
    from shards.blocks import DeviceCutter
    from shards.reader import ShardStream

    stream = iter(ShardStream(str(shard_dir), batch_size=BATCH, device_cut=True))
    held = [next(stream) for _ in range(batches)]
    cutter = DeviceCutter(device, 25)
    for b in held:  # fill the pools (the uploads are not the cut)
        cutter.load(b)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def go():
        for b in held:
            cutter({k: v for k, v in b.items() if k not in ("blocks", "block_slots")})
        sync()
        return sum(len(b["y"]) for b in held)

    return timed(go)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--subjects", type=int, default=16, help="training scans")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reader-subjects", type=int, default=4, help="training subjects of the same-samples store")
    p.add_argument(
        "--cache-lesion-rate",
        type=float,
        default=0.3,
        help="a second same-samples comparison small enough for both formats to stay in the page cache",
    )
    p.add_argument("--out", default="bench-out/blocks")
    args = p.parse_args()
    out = Path(args.out)
    release, store = out / "release", out / "store.zarr"
    if not (release / "phantom-truth.json").exists():
        shutil.rmtree(release, ignore_errors=True)
        synthesize_release(release, "r1.2", args.subjects + 4, seed=12, workers=args.workers, progress=False)
    ingest(release, store, workers=args.workers, split_counts=(args.subjects, 2, 2), progress=False)
    subset = out / "subset.zarr"
    ingest(release, subset, workers=args.workers, split_counts=(args.reader_subjects, 1, 1), progress=False)
    res: dict = {"config": vars(args)}

    # -- the paper's sample of every training scan: sizes by block size, and a real blocks build --
    res["sizes"] = [
        dry_run(store, rate, block, args.workers) for rate, block in ((1.0, 16), (1.0, 24), (1.0, BLOCK), (0.1, BLOCK))
    ]
    paper = next(d for d in res["sizes"] if d["block"] == BLOCK and d["lesion_rate"] == 1.0)
    full = run_build(store, out / "full-blocks", args.workers, 1.0, "blocks")
    res["paper_sample_blocks_build"] = full
    print(f"blocks, paper's sample: {full}", flush=True)
    # memory against the number of scans: the same build on half the training subjects
    half = out / "half.zarr"
    ingest(release, half, workers=args.workers, split_counts=(args.subjects // 2, 2, 2), progress=False)
    res["paper_sample_blocks_build_half_the_subjects"] = run_build(
        half, out / "half-blocks", args.workers, 1.0, "blocks"
    )
    print(
        f"blocks, paper's sample, half the subjects: {res['paper_sample_blocks_build_half_the_subjects']}", flush=True
    )
    shutil.rmtree(out / "half-blocks", ignore_errors=True)

    # -- the same samples in both formats: build cost and reader speed --
    for key, rate in (("same_samples", 1.0), ("same_samples_in_cache", args.cache_lesion_rate)):
        res[key] = same = {"store": str(subset), "lesion_rate": rate}
        for fmt in ("pairs", "blocks"):
            same[fmt] = run_build(subset, out / f"same-{fmt}", args.workers, rate, fmt)
            print(f"{fmt}, lesion rate {rate} of {args.reader_subjects} subjects: {same[fmt]}", flush=True)
        assert same["pairs"]["samples"] == same["blocks"]["samples"]
        for fmt in ("pairs", "blocks"):
            same[fmt]["reader_samples_per_s"] = round(read_rate(out / f"same-{fmt}"))
        same["reader_blocks_over_pairs"] = round(
            same["blocks"]["reader_samples_per_s"] / same["pairs"]["reader_samples_per_s"], 2
        )
        print(f"reader, blocks / pairs: {same['reader_blocks_over_pairs']}", flush=True)
        shutil.rmtree(out / "same-pairs", ignore_errors=True)  # large; keep only the numbers
    same = res["same_samples"]
    res["reader_all_scans_blocks_samples_per_s"] = round(read_rate(out / "full-blocks"))

    # -- the device path's cut --
    res["device_cut_samples_per_s"] = {"cpu": round(device_cut_rate(out / "full-blocks", "cpu"))}
    if torch.cuda.is_available():
        res["device_cut_samples_per_s"]["cuda"] = round(device_cut_rate(out / "full-blocks", "cuda"))

    # -- on paper --
    pairs_bps = same["pairs"]["bytes_per_sample"]
    blocks_bps = full["bytes_per_sample"]
    per_scan = paper["samples"] / paper["scans"]
    res["on_paper"] = {
        "pairs_bytes_per_sample": pairs_bps,
        "blocks_bytes_per_sample_paper_sample": blocks_bps,
        "fewer_bytes": round(pairs_bps / blocks_bps, 1),
        "server_GB_per_s_8_gpus_pairs": round(GPUS * H100_SAMPLES_PER_S * pairs_bps / 1e9, 2),
        "server_GB_per_s_8_gpus_blocks": round(GPUS * H100_SAMPLES_PER_S * blocks_bps / 1e9, 2),
        "samples_per_training_scan": round(per_scan),
        "atlas_v2_paper_sample_GB_pairs": round(ATLAS_V2_TRAINING_SCANS * per_scan * pairs_bps / 1e9),
        "atlas_v2_paper_sample_GB_blocks": round(ATLAS_V2_TRAINING_SCANS * per_scan * blocks_bps / 1e9),
    }
    print(json.dumps(res, indent=1))
    (out / "bench_blocks.json").write_text(json.dumps(res, indent=1))
    print(f"results: {out / 'bench_blocks.json'}")


if __name__ == "__main__":
    main()
