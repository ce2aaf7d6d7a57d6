"""Training steps a CPU-second against the shuffle pool and glibc's allocator, in real ``atlas-train fit`` runs.

Usage: .venv/bin/python bench/bench_fit_alloc.py SHARDS [--budget 2] [--shuffle 1024,65536]
       [--alloc glibc,keep] [--out alloc.json]

Each combination runs ``atlas-train fit --model cnn3d-sym --batch-size 64 --workers 0 --time-budget BUDGET
--budget-clock cpu`` (one thread, the project's 20-CPU-minute protocol, shorter) in a fresh process, one after
another, and reports the steps it trained per CPU-second of training, its minor page faults per step and its
peak resident memory (``os.wait4``'s rusage of that process). ``--alloc glibc`` runs with glibc's allocator as
it comes (``ATLAS_MALLOC=glibc``); ``keep`` with fit's default, which keeps freed memory in the process
(``shards/common/memory.py``). Run it on an otherwise idle machine: page faults cost more when another process is
zeroing pages too.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def run(shards: str, budget: float, shuffle: int, alloc: str, scratch: Path) -> dict:
    out = scratch / f"run-{shuffle}-{alloc}"
    shutil.rmtree(out, ignore_errors=True)
    fit = Path(sys.executable).with_name("atlas-train")
    cmd = [str(fit), "fit", "--shards", shards, "--out", str(out), "--model", "cnn3d-sym", "--batch-size", "64"]
    cmd += ["--workers", "0", "--time-budget", str(budget), "--budget-clock", "cpu", "--shuffle", str(shuffle)]
    cmd += ["--epochs", "8", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATLAS_MALLOC": alloc}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    last = list(csv.DictReader((out / "metrics.csv").open()))[-1]
    steps, trained = int(last["step"]), float(last["trained_s"])
    shutil.rmtree(out, ignore_errors=True)
    return {
        "shuffle": shuffle,
        "alloc": alloc,
        "steps": steps,
        "steps_per_cpu_s": round(steps / trained, 3),
        "minor_faults_per_step": round(usage.ru_minflt / steps),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards")
    p.add_argument("--budget", type=float, default=2.0, help="CPU-minutes a run.")
    p.add_argument("--shuffle", default="1024,65536")
    p.add_argument("--alloc", default="glibc,keep")
    p.add_argument("--out", default=None, help="Also write the rows here (JSON).")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-alloc-") as scratch:
        for shuffle in (int(v) for v in a.shuffle.split(",")):
            for alloc in a.alloc.split(","):
                rows.append(run(a.shards, a.budget, shuffle, alloc, Path(scratch)))
                print(json.dumps(rows[-1]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
