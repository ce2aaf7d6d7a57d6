"""Dense vs patch-by-patch whole-volume prediction for cnn3d-sym on one phantom volume.

Usage: .venv/bin/python bench/bench_evaluate.py --store bench-out/store-16.zarr [--samples 2000] [--device cpu]

Times the dense (fully convolutional) prediction of every voxel of the brain
mask's bounding box of one 197x233x189 scan, and the patch-by-patch reference
on --samples voxels drawn from the same box (extrapolated to the whole box).
Checks that both give the same probabilities on those voxels. The weights are
random (seeded): speed and exactness do not depend on training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from atlas_shards import store as zstore
from evaluate.predictors import TorchPredictor
from trainer.dense import DenseCNN
from evaluate.volume import brain_bbox, lesion_logits
from shards.norm import normalise
from shards.patches import PairCutter
from trainer.models import ModelConfig, build_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args()
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn3d-sym")).eval().to(args.device)
    pre = {
        "norm": {"method": "histeq", "offset": 0.0, "scale": 1 / 255},
        "build": {"patch": 25, "lesion_rate": 1.0, "background_rate": 0.01},
    }
    dense, device = DenseCNN(model).eval().to(args.device), torch.device(args.device)
    pred = TorchPredictor("cnn3d-sym", Path("."), model.cfg.to_dict(), pre, model=model, dense=dense, device=device)
    root = zstore.open_store(args.store)
    scan = sorted(root.attrs["scans"])[0]
    data = zstore.read_scan(root, scan)
    mirror = float(root[scan].attrs["mirror_index"])
    box = brain_bbox(data["brain"])
    box_voxels = int(np.prod([s.stop - s.start for s in box]))
    start = time.perf_counter()
    dense = lesion_logits(pred, data["t1"], data["brain"], mirror)
    dense_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    centres = np.stack([rng.integers(s.start, s.stop, args.samples) for s in box], 1)
    start = time.perf_counter()
    cutter = PairCutter(normalise(data["t1"], data["brain"], "histeq"), mirror, 25)
    reference = pred.patch_logits(cutter(centres))
    patch_s = time.perf_counter() - start
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    diff = float(np.abs(sigmoid(dense[tuple(centres.T)]) - sigmoid(reference)).max())
    patch_full_s = patch_s / args.samples * box_voxels
    result = {
        "scan": scan,
        "shape": list(data["t1"].shape),
        "box_voxels": box_voxels,
        "device": args.device,
        "dense_seconds_per_volume": round(dense_s, 1),
        "patch_seconds_per_voxel": patch_s / args.samples,
        "patch_seconds_per_volume_extrapolated": round(patch_full_s),
        "speedup": round(patch_full_s / dense_s),
        "max_abs_probability_difference": diff,
        "sampled_voxels": args.samples,
    }
    print(json.dumps(result, indent=1))
    Path(args.out).mkdir(exist_ok=True)
    (Path(args.out) / "bench_evaluate.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
