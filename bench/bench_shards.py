"""Shard build cost and reader throughput, side by side on the same phantom samples.

Usage: .venv/bin/python bench/bench_shards.py [--subjects 8] [--workers 2] [--out bench-out]

1. Synthesises an R1.2 phantom release (every scan labelled) of 2N+2 subjects and ingests it twice:
   once with N training subjects, once with 2N (the rest go to val/test).
2. Builds balanced train shards (pairs format; blocks: bench_blocks.py) from
   each (lesion rate --lesion-rate, target 43.7%): build throughput (samples/s per worker, MB/s written) and peak
   memory for N and 2N scans: each process's high-water mark (VmHWM), the
   largest and the sum, and the tree's RSS sampled every 20 ms.
3. Reads the 2N-scan shards (page cache warm; median of 3 runs after a
   warm-up run) with:
   - raw:   a sequential read of the same files, no decoding (memory speed);
   - ours:  shards.reader.ShardStream, batches of 256 as tensors, with and
            without the shuffle pool;
   - wds-K: plain webdataset on the same micro-batched shards, ``.decode()``;
   - wds-1: plain webdataset on the same samples re-written one .npy per record,
            ``.decode().to_tuple().batched(256)`` and tensors;
   - TorchIO Queue + LabelSampler and MONAI RandCropByPosNegLabeld cutting
     the same 25^3 pairs on the fly from the (already normalised, in-RAM)
     two-channel volumes of the same scans: their best case, no disk I/O.
   All single process (samples/s per process).
Results print as a table and go to OUT/bench_shards.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from atlas_shards.ingest import ingest
from atlas_shards.synth import synthesize_release

BATCH = 256


def tree_memory_kb(pid: int) -> dict[int, tuple[int, int]]:
    """``{pid: (VmRSS, VmHWM)}`` in kB for ``pid`` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    family, grew = {pid}, True
    while grew:
        more = {p for p, pp in parents.items() if pp in family} - family
        family |= more
        grew = bool(more)
    out = {}
    for p in family:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines())
            out[p] = (int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0]))
        except (OSError, KeyError, ValueError):
            pass
    return out


def run_build(store: Path, out: Path, workers: int, lesion_rate: float, fmt: str = "pairs") -> dict:
    options = f"--split train --lesion-rate {lesion_rate} --shard-size-mb 64 --workers {workers} --format {fmt}"
    cmd = [sys.executable, "-m", "atlas_shards.cli", "build", str(store), str(out), *options.split()]
    shutil.rmtree(out, ignore_errors=True)
    peak_sum, hwm, start = 0, {}, time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        mem = tree_memory_kb(proc.pid)
        peak_sum = max(peak_sum, sum(rss for rss, _ in mem.values()))
        hwm.update({p: max(hwm.get(p, 0), h) for p, (_, h) in mem.items()})
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"build failed: {' '.join(cmd)}")
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["totals"]
    return {
        "scans": len(manifest["scans"]),
        "samples": t["samples"],
        "lesion_fraction": round(t["lesion_fraction"], 4),
        "shards": t["shards"],
        "seconds": round(seconds, 1),
        "samples_per_s_per_worker": round(t["samples"] / seconds / workers),
        "mb_per_s": round(t["bytes"] / 2**20 / seconds, 1),
        "peak_rss_mb_largest_process": round(max(hwm.values()) / 1024),  # VmHWM: exact per process
        "peak_rss_mb_sum_of_processes": round(sum(hwm.values()) / 1024),  # an upper bound for the tree
        "peak_rss_mb_tree_sampled": round(peak_sum / 1024),  # sampled every 20 ms
        "peak_rss_mb_per_process": sorted(round(h / 1024) for h in hwm.values()),
        "bytes_per_sample": round(t["bytes_per_sample"]),
        "bytes": t["bytes"],
        "records": sum(s["records"] for s in manifest["shards"]),
    }


def timed(fn, repeats: int = 3) -> float:
    """Median samples/s of ``repeats`` runs of ``fn()`` after one warm-up run; ``fn`` returns its sample count."""
    fn()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - start))
    return float(np.median(rates))


def read_raw(paths: list[Path], per_sample: float) -> float:
    def go():
        total = 0
        for p in paths:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    total += len(chunk)
        return int(total / per_sample)

    return timed(go)


def read_ours(shard_dir: Path, shuffle: int) -> float:
    from shards.reader import ShardStream

    def go():
        return sum(len(b["y"]) for b in ShardStream(str(shard_dir), batch_size=BATCH, shuffle=shuffle))

    return timed(go)


def read_wds_records(paths: list[Path]) -> float:
    import webdataset as wds

    def go():
        n = 0
        for rec in wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode():
            x = torch.from_numpy(rec["x.npy"])
            n += len(x)
        return n

    return timed(go)


def one_per_record(paths: list[Path], out: Path, limit: int) -> list[Path]:
    """The same samples as webdataset's usual layout: one sample, one .npy per record."""
    import webdataset as wds

    from shards.reader import read_records
    from shards.sources import Shard

    out.mkdir(parents=True, exist_ok=True)
    shard_paths, n = [], 0
    writer = None
    for rec in read_records([Shard(str(p)) for p in paths]):
        for x, y in zip(rec["x"], rec["y"]):
            if writer is None or n % 4000 == 0:
                if writer:
                    writer.close()
                shard_paths.append(out / f"one-{len(shard_paths):06d}.tar")
                writer = wds.TarWriter(str(shard_paths[-1]))
            writer.write({"__key__": f"{n:09d}", "x.npy": np.ascontiguousarray(x), "y.cls": int(y)})
            n += 1
            if n >= limit:
                writer.close()
                return shard_paths
    writer.close()
    return shard_paths


def read_wds_single(paths: list[Path]) -> float:
    import webdataset as wds

    def go():
        n = 0
        ds = wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode().to_tuple("x.npy", "y.cls")
        for xs, ys in ds.batched(BATCH):  # webdataset's default collation stacks the arrays
            x = torch.as_tensor(xs)
            torch.as_tensor(ys)
            n += len(x)
        return n

    return timed(go)


def pair_volumes(store: Path, scans: list[str]) -> list[dict]:
    """Normalised two-channel (volume, mirrored) uint8 volumes and labels, in RAM."""
    from atlas_shards import store as zstore
    from shards.norm import normalise
    from shards.patches import mirrored_volume

    root = zstore.open_store(store)
    out = []
    for scan in scans:
        data = zstore.read_scan(root, scan)
        vol = normalise(data["t1"], data["brain"], "histeq")
        pair = np.stack([vol, mirrored_volume(vol, root[scan].attrs["mirror_index"])])
        out.append({"image": pair, "label": data["lesion"][None], "brain": data["brain"]})
    return out


def read_torchio(volumes: list[dict], samples: int) -> float:
    import torchio as tio

    subjects = [
        tio.Subject(
            image=tio.ScalarImage(tensor=torch.from_numpy(v["image"])),
            label=tio.LabelMap(tensor=torch.from_numpy(v["label"])),
        )
        for v in volumes
    ]
    sampler = tio.LabelSampler(patch_size=25, label_name="label", label_probabilities={0: 0.563, 1: 0.437})
    queue = tio.Queue(
        tio.SubjectsDataset(subjects),
        max_length=2048,
        samples_per_volume=512,
        sampler=sampler,
        num_workers=0,
        shuffle_subjects=True,
        shuffle_patches=True,
        verbose=False,
    )
    loader = tio.SubjectsLoader(queue, batch_size=BATCH, num_workers=0)

    def go():
        n = 0
        while n < samples:
            for batch in loader:
                n += len(batch["image"][tio.DATA])
                if n >= samples:
                    break
        return n

    return timed(go)


def read_monai(volumes: list[dict], samples: int) -> float:
    from monai.data import DataLoader, Dataset
    from monai.transforms import RandCropByPosNegLabeld

    crop = RandCropByPosNegLabeld(
        keys=["image", "label"],
        label_key="label",
        spatial_size=(25, 25, 25),
        pos=0.437,
        neg=0.563,
        num_samples=BATCH,
        allow_smaller=True,
    )
    data = [{"image": torch.from_numpy(v["image"]), "label": torch.from_numpy(v["label"])} for v in volumes]
    loader = DataLoader(Dataset(data, transform=crop), batch_size=1, num_workers=0, shuffle=True)

    def go():
        n = 0
        while n < samples:
            for batch in loader:
                n += len(batch["image"])
                if n >= samples:
                    break
        return n

    return timed(go)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--subjects", type=int, default=8, help="N: training scans of the smaller build")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lesion-rate", type=float, default=0.05)
    p.add_argument("--out", default="bench-out")
    p.add_argument("--on-the-fly-samples", type=int, default=4096)
    p.add_argument("--build-only", action="store_true", help="skip the reader comparison")
    args = p.parse_args()
    out = Path(args.out)
    n = args.subjects
    release = out / "release"
    if not (release / "phantom-truth.json").exists():
        shutil.rmtree(release, ignore_errors=True)
        synthesize_release(release, "r1.2", 2 * n + 2, seed=11, workers=args.workers, progress=False)
    stores = {}
    for scans, split in ((n, f"{n},{n + 1},1"), (2 * n, f"{2 * n},1,1")):
        store = out / f"store-{scans}.zarr"
        counts = tuple(int(v) for v in split.split(","))
        ingest(release, store, workers=args.workers, split_counts=counts, progress=False)
        stores[scans] = store
    results: dict = {"config": vars(args), "build": {}, "read": {}}
    for scans, store in stores.items():
        results["build"][scans] = run_build(store, out / f"shards-{scans}", args.workers, args.lesion_rate)
        print(f"build {scans:3d} scans: {results['build'][scans]}", flush=True)
    if args.build_only:
        return
    shard_dir = out / f"shards-{2 * n}"  # the larger set: longer, steadier timings
    paths = sorted(shard_dir.glob("*.tar"))
    per_sample = results["build"][2 * n]["bytes_per_sample"]
    r = results["read"]
    r["raw sequential read"] = read_raw(paths, per_sample)
    r["ours, shuffle pool 1024"] = read_ours(shard_dir, 1024)
    r["ours, no shuffle"] = read_ours(shard_dir, 0)
    r["plain webdataset, 256-sample records"] = read_wds_records(paths)
    single = one_per_record(paths, out / "one-per-record", limit=20000)
    r["plain webdataset, one .npy per record"] = read_wds_single(single)
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    volumes = pair_volumes(stores[2 * n], [s["scan_id"] for s in manifest["scans"]])
    r["TorchIO Queue + LabelSampler (in RAM)"] = read_torchio(volumes, args.on_the_fly_samples)
    r["MONAI RandCropByPosNegLabeld (in RAM)"] = read_monai(volumes, args.on_the_fly_samples)
    ours = r["ours, shuffle pool 1024"]
    print(f"\n{'reader':45s} {'samples/s':>10s} {'ours/this':>10s}")
    for name, rate in r.items():
        print(f"{name:45s} {rate:10.0f} {ours / rate:10.2f}")
    (out / "bench_shards.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out / 'bench_shards.json'}")


if __name__ == "__main__":
    main()
