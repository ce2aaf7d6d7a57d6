"""How mixed are the training batches? One block's share of a batch, against the shuffle pool's size.

Usage: .venv/bin/python bench/bench_batch_mix.py SHARDS [--batches 2000] [--pool-blocks 128,512,2048]
       [--shuffle 1024] [--batch-size 64] [--seed 0] [--out mix.json]

Streams batches from SHARDS exactly as ``atlas-train fit`` does (``ShardStream``, the fit's batch size and
sample shuffle), once per ``--pool-blocks`` value, and reports per batch: the largest share of its samples
from one block (samples whose voxels fall in the same 32^3 tile of one scan), from one scan, and the share of
repeated samples (the same voxel of the same scan more than once, which ``build --max-repeat`` allows). A batch
half made of one small lesion's block is the hard batch that spikes per-sample training's loss (issue 27,
item 6); this counts them, and tells how large a pool makes them rare. No model, no timing: the counts are
the same on every machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from shards.reader import ShardStream

TILE = 32  # the block core (build's default): samples in one tile of one scan come from one block record


def batch_mix(batch: dict) -> tuple[float, float, float, float]:
    """(largest one-block share, largest one-scan share, repeated share, lesion share) of one batch."""
    loc, scans, n = np.asarray(batch["loc"]), np.asarray(batch["scan"]), len(batch["y"])
    _, scan_codes = np.unique(scans, return_inverse=True)
    tile = np.concatenate([scan_codes[:, None], loc // TILE], axis=1)
    _, block_counts = np.unique(tile, axis=0, return_counts=True)
    _, scan_counts = np.unique(scan_codes, return_counts=True)
    voxels = np.concatenate([scan_codes[:, None], loc], axis=1)
    distinct = len(np.unique(voxels, axis=0))
    lesion = float(np.mean(np.asarray(batch["y"]) > 0))
    return block_counts.max() / n, scan_counts.max() / n, 1 - distinct / n, lesion


def measure(shards: str, pool_blocks: int, batches: int, shuffle: int, batch_size: int, seed: int) -> dict:
    stream = ShardStream(shards, batch_size, shuffle, seed=seed, batches_per_epoch=batches, pool_blocks=pool_blocks)
    rows = np.array([batch_mix(b) for _, b in zip(range(batches), stream)])
    block, scan, repeated, lesion = rows.T
    return {
        "pool_blocks": pool_blocks,
        "batches": len(rows),
        "block_share_mean": round(float(block.mean()), 4),
        "block_share_p99": round(float(np.quantile(block, 0.99)), 4),
        "block_share_max": round(float(block.max()), 4),
        "batches_over_quarter_one_block": round(float(np.mean(block >= 0.25)), 4),
        "scan_share_mean": round(float(scan.mean()), 4),
        "repeated_share_mean": round(float(repeated.mean()), 4),
        "lesion_share_sd": round(float(lesion.std()), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards")
    p.add_argument("--batches", type=int, default=2000)
    p.add_argument("--pool-blocks", default="128,512,2048")
    p.add_argument("--shuffle", type=int, default=1024, help="The sample pool (fit's default).")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="Also write the rows here (JSON).")
    a = p.parse_args()
    rows = []
    for pool in (int(v) for v in a.pool_blocks.split(",")):
        rows.append(measure(a.shards, pool, a.batches, a.shuffle, a.batch_size, a.seed))
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
