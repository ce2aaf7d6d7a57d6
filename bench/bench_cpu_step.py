"""Training steps per CPU-second of cnn3d-sym on the CPU: memory format, torch.compile, bf16, threads.

Usage: .venv/bin/python bench/bench_cpu_step.py [--batch-size 64] [--steps 40] [--threads 1,2]

One optimiser step (AdamW, cross-entropy) on a random uint8 pair batch, as
``atlas-train fit`` takes it, timed by this process's CPU clock and the wall
clock after ``--warmup`` steps (torch.compile's compilation is reported
apart). A variant ending in ``+bf16`` runs the forward pass under bf16
autocast, as ``atlas-train fit --amp`` does. The issue asks whether channels_last or torch.compile pays on the CPU;
this measures it instead of assuming it. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from trainer.models import ModelConfig, build_model


def measure(variant: str, threads: int, batch: int, steps: int, warmup: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    parts = set(variant.split("+"))
    fmt = torch.channels_last_3d if "channels_last" in parts else torch.contiguous_format
    model = model.to(memory_format=fmt)
    step_model = torch.compile(model) if "compile" in parts else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randint(0, 256, (batch, 2, 25, 25, 25), dtype=torch.uint8)
    y = torch.randint(0, 2, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in parts):
            xb = model.prepare(x).contiguous(memory_format=fmt)
            logits = step_model(xb)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(warmup):
        step()
    first_s = time.perf_counter() - w0
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        step()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {
        "variant": variant,
        "threads": threads,
        "batch": batch,
        "steps_per_cpu_s": round(steps / cpu, 3),
        "steps_per_wall_s": round(steps / wall, 3),
        "warmup_wall_s": round(first_s, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--variants", default="eager,channels_last,compile,channels_last+compile,channels_last+bf16")
    args = p.parse_args()
    for threads in (int(t) for t in args.threads.split(",")):
        for variant in args.variants.split(","):
            try:
                r = measure(variant, threads, args.batch_size, args.steps, args.warmup)
            except Exception as exc:  # torch.compile needs a C compiler; say so and go on
                r = {"variant": variant, "threads": threads, "error": f"{type(exc).__name__}: {exc}"[:300]}
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
