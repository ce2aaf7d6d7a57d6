"""Seconds per scan for `synth` and `ingest` on phantom releases.

Usage: .venv/bin/python bench/bench_synth_ingest.py [--subjects 8] [--workers 2]
Prints one line per layout: scans, synth s/scan, ingest s/scan (wall clock,
including worker start-up and the template load).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from atlas_shards.ingest import ingest
from atlas_shards.synth import synthesize_release


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--layouts", default="r2.0,native")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts.split(","):
            out = Path(tmp) / layout
            t0 = time.perf_counter()
            truth = synthesize_release(out, layout, args.subjects, seed=0, workers=args.workers, progress=False)
            t1 = time.perf_counter()
            summary = ingest(out, Path(tmp) / f"{layout}.zarr", workers=args.workers, progress=False)
            t2 = time.perf_counter()
            n = len(truth["scans"])
            print(
                f"{layout:7s} scans={n:3d} workers={args.workers} synth={(t1 - t0) / n:.2f} s/scan "
                f"ingest={(t2 - t1) / summary.found:.2f} s/scan"
            )


if __name__ == "__main__":
    main()
