"""Labelled voxels per CPU-second, dense against per-sample training: the same model, the same machine, one run.

Usage: .venv/bin/python bench/bench_dense.py [--shards DIR] [--threads 2] [--steps 6] [--blocks 16,32,48] [--amp]

Each configuration runs in a fresh process (its peak memory is its own): a
training step (AdamW, the modern recipe's batch norm, channels-last, as
``atlas-train fit`` takes it) on random uint8 input of the stored shapes:

- ``patch``: a batch of 64 pairs ``(2, 25, 25, 25)``, 64 labelled voxels;
- ``dense``: a batch of 4 blocks ``(2, N+24, N+24, N+24)`` through the model's
  dense form (``trainer.dense.DenseCNN``), ``4 * N^3 * f`` labelled voxels,
  ``f`` the share of a block's core the loss covers (brain or lesion). With
  ``--shards`` (a blocks build of this version) ``f`` is that build's; without,
  every core voxel counts (f = 1).

Timed by this process's CPU clock (all threads) after ``--warmup`` steps;
the peak resident memory of the process is reported too. Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from trainer.dense import DenseCNN
from trainer.models import ModelConfig, build_model
from trainer.objectives import dense_loss

PATCH = 25


def measure(kind: str, block: int, batch: int, steps: int, warmup: int, threads: int, amp: bool = False) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(ModelConfig(batch_norm=True)).to(memory_format=torch.channels_last_3d)
    net = DenseCNN(model) if kind == "dense" else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    side = block + PATCH - 1 if kind == "dense" else PATCH
    x = torch.randint(0, 256, (batch, 2, side, side, side), dtype=torch.uint8)
    if kind == "dense":
        labels = torch.stack([torch.rand(batch, block, block, block) < 0.05, torch.ones(batch, block, block, block)], 1)
        labels, weights = labels.to(torch.uint8), torch.tensor([1.0, 10.0])
    else:
        y = torch.randint(0, 2, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = net(model.prepare(x).contiguous(memory_format=torch.channels_last_3d)).float()
        if kind == "dense":
            loss = dense_loss(logits, labels, weights)[0]
        else:
            loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        step()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    voxels = batch * (block**3 if kind == "dense" else 1)
    return {
        "kind": kind,
        "block": block if kind == "dense" else None,
        "batch": batch,
        "threads": threads,
        "amp": amp,
        "step_wall_s": round(wall / steps, 3),
        "step_cpu_s": round(cpu / steps, 3),
        "voxels_per_step": voxels,
        "voxels_per_cpu_s": round(voxels * steps / cpu, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def labelled_share(shards: str | None) -> float:
    """The share of the blocks' core voxels a dense loss covers, from a blocks build's manifest (1 without one)."""
    if shards is None:
        return 1.0
    manifest = json.loads((Path(shards) / "manifest.json").read_text())
    voxels, block = manifest["totals"]["voxels"], manifest["config"]["block"]
    return (voxels["lesion"] + voxels["background"]) / (manifest["totals"]["records"] * block**3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=None, help="A blocks build of this version: its labelled share of a core.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--blocks", default="16,32,48", help="Core edges N to measure dense steps at.")
    p.add_argument("--amp", action="store_true", help="bf16 autocast of the forward, as fit --amp.")
    p.add_argument("--one", nargs=3, metavar=("KIND", "BLOCK", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        kind, block, batch = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(measure(kind, block, batch, args.steps, args.warmup, args.threads, args.amp)))
        return
    share = labelled_share(args.shards)
    runs = [("patch", 0, 64)] + [("dense", int(n), 4) for n in args.blocks.split(",")]
    results = []
    for kind, block, batch in runs:
        cmd = [sys.executable, __file__, "--one", kind, str(block), str(batch)]
        cmd += ["--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--amp"] if args.amp else []
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        if kind == "dense":
            r["labelled_share"] = round(share, 3)
            r["labelled_voxels_per_cpu_s"] = round(r["voxels_per_cpu_s"] * share, 1)
        else:
            r["labelled_voxels_per_cpu_s"] = r["voxels_per_cpu_s"]
        results.append(r)
        print(json.dumps(r), flush=True)
    base = results[0]["labelled_voxels_per_cpu_s"]
    for r in results[1:]:
        ratio = r["labelled_voxels_per_cpu_s"] / base
        print(f"dense {r['block']}^3 cores: {ratio:.0f}x the labelled voxels a CPU-second of patch training")


if __name__ == "__main__":
    main()
