"""Training throughput of cnn3d-sym on this machine, and the share of step time spent waiting for data.

Usage: .venv/bin/python bench/bench_train.py --shards bench-out/shards-16 [--steps 120] [--batch-size 64]

Runs ``atlas-train fit`` as a user would (a subprocess; DDP through torchrun
with gloo), then reads its ``metrics.csv``: samples/s (all ranks together) and
data wait (time blocked on the next batch / wall time, averaged over ranks),
leaving out the first logging window (start-up: workers spawning, first
shard opening). Results print as a table and go to OUT/bench_train.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


def run(name: str, cmd: list[str], run_dir: Path, env: dict) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))[1:]
    return {
        "setup": name,
        "samples_per_s": round(float(np.mean([float(r["samples_per_s"]) for r in rows])), 1),
        "data_wait_share": round(float(np.mean([float(r["data_wait"]) for r in rows])), 4),
        "steps": int(rows[-1]["step"]),
        "command": " ".join(str(c) for c in cmd),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="bench-out")
    args = p.parse_args()
    out = Path(args.out)
    common = ["fit", "--shards", args.shards, *f"--model cnn3d-sym --batch-size {args.batch_size}".split()]
    common += f"--steps-per-epoch {args.steps} --log-every 20 --lr 1e-5".split()
    setups = [
        (
            "1 process, 1 DataLoader worker",
            [str(BIN / "atlas-train"), *common, "--workers", "1", "--out", str(out / "train-1w")],
            out / "train-1w",
            {},
        ),
        (
            "1 process, reader inline (0 workers)",
            [str(BIN / "atlas-train"), *common, "--workers", "0", "--out", str(out / "train-0w")],
            out / "train-0w",
            {},
        ),
        (
            "2 DDP processes (torchrun, gloo), 1 worker each",
            [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "trainer.cli", *common]
            + ["--workers", "1", "--out", str(out / "train-ddp")],
            out / "train-ddp",
            {"OMP_NUM_THREADS": "1"},
        ),
    ]
    results = [run(name, cmd, run_dir, env) for name, cmd, run_dir, env in setups]
    print(f"{'setup':50s} {'samples/s':>10s} {'data wait':>10s}")
    for r in results:
        print(f"{r['setup']:50s} {r['samples_per_s']:10.1f} {100 * r['data_wait_share']:9.2f}%")
    (out / "bench_train.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
