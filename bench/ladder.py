"""The paper's model ladder, measured: RF, ResNet-18, 3D CNN and 3D CNN + symmetry on the same shards.

Usage: .venv/bin/python bench/ladder.py --out ladder-out [--budget 20] [--subjects 50] [--split 24,8,8]
       .venv/bin/python bench/ladder.py --out seeds --data ladder-out --models cnn3d-sym --train-seed 1
       .venv/bin/python bench/ladder.py --out capped --data ladder-out --max-lesion-samples 20000
       .venv/bin/python bench/ladder.py --out by-lesion --data ladder-out --component-samples 3000

Every step runs the project's own commands, as a user would, and is skipped
when its output is already there (rerun after an interruption: it goes on):

1. a phantom v2.0 release (``--subjects``; the Testing part has no masks) and
   its store, split ``--split`` (train, val, test subjects);
2. training shards at the paper's sample (``build --recipe paper``: every lesion voxel, 43.7% lesion;
   with ``--max-lesion-samples N`` at most N lesion samples a scan, the
   fraction kept; with ``--component-samples K``, K a lesion component) and
   an un-upsampled validation stream;
3. each model trained for at most ``--budget`` CPU-minutes (``--budget-clock
   cpu``: this process's CPU time, so other work on the machine does not eat
   into it; the forest fits on ``--rf-samples`` samples);
4. each model scored on the same whole validation volumes at threshold 0.5
   with the prior correction and no post-processing (nothing chosen on what
   is reported); the patch-by-patch models (rf, resnet2d) at one voxel in
   ``--stride`` per axis (the dense models: every voxel, exactly);
5. the best 3D model on the held-out test volumes, its threshold and
   post-processing chosen on validation (``--threshold auto``);
6. ``ladder.md`` (and ``ladder.json``): the tables beside the paper's numbers
   and whether the paper's order (RF < 2D < 3D < 3D + symmetry) holds.

Model entries are ``NAME``, ``NAME@RECIPE`` (``cnn3d-sym@paper``: the
paper's optimiser settings; the default recipe is the trainer's) or
``NAME+OBJECTIVE`` (``cnn3d-sym+dense``: ``fit --objective dense``, every
labelled voxel of the blocks, at that objective's batch size).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from shards.common.tables import read_rows
from evaluate.compare import PAPER_DICE
from trainer.registry import model_entry

BIN = Path(sys.executable).parent
# What this ladder adds to a model's training command: no ImageNet weights offline, so ResNet-18 trains every layer
# from scratch.
OFFLINE_OPTIONS = {"resnet2d": ["--finetune", "all"]}


def sh(*cmd, log: Path) -> None:
    """Run one of the project's commands; its output goes to ``log``; stop the ladder if it fails."""
    cmd = [str(c) for c in cmd]
    print("$", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")


def data(out: Path, args, log: Path) -> tuple[Path, Path, Path]:
    release, store, shards = out / "release", out / "store.zarr", out / "shards"
    if not (store / "zarr.json").exists() or not (store / "ingest-report.csv").exists():
        seeded = ["--subjects", args.subjects, "--seed", args.seed, "--workers", 2]
        sh(BIN / "atlas-shards", "synth", release, *seeded, log=log)
        sh(BIN / "atlas-shards", "ingest", release, store, "--split", args.split, "--workers", 2, log=log)
    cap, per = args.max_lesion_samples, args.component_samples
    repeat = f"-r{args.max_repeat}" if per and args.max_repeat else ""
    train = shards / (f"train-comp{per}{repeat}" if per else f"train-cap{cap}" if cap else "train")
    if not (train / "manifest.json").exists():
        more = ["--component-samples", per] if per else ["--max-lesion-samples", cap] if cap else ["--recipe", "paper"]
        more += ["--max-repeat", args.max_repeat] if repeat else []
        sh(BIN / "atlas-shards", "build", store, train, "--split", "train", "--workers", 2, *more, log=log)
    if not (shards / "val" / "manifest.json").exists():
        natural = ["--split", "val", "--natural", 0.002, "--workers", 2]
        sh(BIN / "atlas-shards", "build", store, shards / "val", *natural, log=log)
    return store, train, shards / "val"


def parse_entry(entry: str) -> tuple[str, str, str]:
    """``NAME[+OBJECTIVE][@RECIPE]`` -> (name, objective or "", recipe or "")."""
    rest, _, recipe = entry.partition("@")
    name, _, objective = rest.partition("+")
    return name, objective, recipe


def train(entry: str, train_shards: Path, val_shards: Path, runs: Path, args, log: Path) -> tuple[Path, float]:
    """Train one ladder entry within the budget; returns its run directory and the wall seconds it took."""
    name, objective, recipe = parse_entry(entry)
    run = runs / (entry.replace("@", "-").replace("+", "-") + (f"-seed{args.train_seed}" if args.train_seed else ""))
    t0 = time.perf_counter()
    if model_entry(name).command == "rf":
        if not (run / "config.json").exists():
            samples = ["--max-samples", args.rf_samples]
            sh(BIN / "atlas-train", "rf", "--shards", train_shards, "--out", run, *samples, log=log)
        return run, time.perf_counter() - t0
    cmd = [BIN / "atlas-train", "fit", "--shards", train_shards, "--val-shards", val_shards, "--out", run]
    cmd += ["--model", name, "--time-budget", args.budget, "--budget-clock", "cpu", "--workers", 0]
    cmd += ["--val-batches", 20, "--seed", args.train_seed, "--resume", "--epochs", args.epochs]
    cmd += ["--objective", objective] if objective else ["--batch-size", args.batch_size]  # dense: its own default
    cmd += ["--amp"] if args.amp else []
    cmd += (["--recipe", recipe] if recipe else []) + OFFLINE_OPTIONS.get(name, [])
    sh(*cmd, log=log)
    return run, time.perf_counter() - t0


def evaluate(run: Path, store: Path, split: str, out: Path, threshold: str, stride: int, log: Path) -> dict:
    if not (out / "metrics.json").exists():
        cmd = [BIN / "atlas-evaluate", "run", "--model", run, "--store", store, "--split", split, "--out", out]
        cmd += ["--threshold", threshold] + (["--stride", stride] if stride > 1 else [])
        sh(*cmd, log=log)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="ladder-out")
    p.add_argument("--data", default=None, help="Release, store and shards from here [OUT] (another ladder's).")
    p.add_argument("--subjects", type=int, default=50)
    p.add_argument("--split", default="24,8,8")
    p.add_argument("--seed", type=int, default=7, help="Of the phantom.")
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=20.0, help="CPU-minutes of training per model.")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=20, help="At most; the budget usually ends the run first.")
    p.add_argument("--rf-samples", type=int, default=200_000)
    p.add_argument("--stride", type=int, default=3, help="Patch-by-patch models: every Kth voxel per axis.")
    p.add_argument("--models", default="rf,resnet2d,cnn3d,cnn3d-sym,cnn3d-sym@paper")
    p.add_argument(
        "--max-lesion-samples", type=int, default=0, help="Cap each scan's lesion samples (0: the paper's sample)."
    )
    p.add_argument(
        "--component-samples", type=int, default=0, help="Sample by lesion: K samples a lesion component (0: off)."
    )
    p.add_argument("--max-repeat", type=int, default=0, help="With --component-samples: build --max-repeat.")
    p.add_argument("--amp", action="store_true", help="Pass fit --amp; without it, fit's default (bf16 where it pays).")
    args = p.parse_args()
    if args.component_samples and args.max_lesion_samples:
        p.error("--component-samples and --max-lesion-samples are two ways to draw the lesions: give one")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "ladder.log"
    store, train_shards, val_shards = data(Path(args.data or out), args, log)
    results = []
    for entry in args.models.split(","):
        run, seconds = train(entry, train_shards, val_shards, out / "runs", args, log)
        name = parse_entry(entry)[0]
        stride = 1 if model_entry(name).dense else args.stride  # the patch-by-patch models
        metrics = evaluate(run, store, "val", out / "reports" / f"{run.name}-val", "0.5", stride, log)
        config = json.loads((run / "config.json").read_text())
        rows = read_rows(run / "metrics.csv")
        steps = int(rows[-1]["step"]) if rows else None
        cpu_s = round(float(rows[-1]["trained_s"])) if rows and rows[-1].get("trained_s") else None
        recipe = config.get("train", {}).get("recipe")
        row = {"entry": entry, "run": str(run), "steps": steps, "train_wall_s": round(seconds), "train_cpu_s": cpu_s}
        results.append({**row, "val": metrics, "recipe": recipe})
    dense = [r for r in results if model_entry(parse_entry(r["entry"])[0]).dense]
    best = max(dense, key=lambda r: r["val"]["mean_dice"], default=None)
    if best is not None:
        name = Path(best["run"]).name
        best["test_fixed"] = evaluate(
            Path(best["run"]), store, "test", out / "reports" / f"{name}-test-0.5", "0.5", 1, log
        )
        best["test"] = evaluate(
            Path(best["run"]), store, "test", out / "reports" / f"{Path(best['run']).name}-test", "auto", 1, log
        )
    (out / "ladder.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "ladder.md").write_text(table(results, args))
    print((out / "ladder.md").read_text())


def table(results: list[dict], args) -> str:
    from evaluate.postprocess import PostProcessing

    def f(v):
        return "n/a" if v is None or v != v else f"{v:.3f}"

    lines = [
        f"Phantom: {args.subjects} subjects (seed {args.seed}), split {args.split}; "
        + (f"at most {args.max_lesion_samples} lesion samples a scan; " if args.max_lesion_samples else "")
        + (f"{args.component_samples} lesion samples a lesion component; " if args.component_samples else "")
        + f"budget {args.budget} CPU-minutes a model; validation at threshold 0.5, prior correction, "
        f"no post-processing; rf and resnet2d at one voxel in {args.stride} per axis.",
        "",
        "| model | recipe | steps | train CPU s | val mean Dice | pooled Dice | lesion F1 | Dice < 5 mL "
        "| paper test Dice |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, name = r["val"], parse_entry(r["entry"])[0]
        lines.append(
            f"| {r['entry']} | {r['recipe'] or '-'} | {r['steps'] or '-'} | {r['train_cpu_s'] or '-'} | "
            f"{f(m['mean_dice'])} | "
            f"{f(m['pooled_dice'])} | {f(m['mean_lesion_f1'])} | {f(m.get('small_lesion_dice'))} | "
            f"{f(PAPER_DICE.get(name))} |"
        )
    plain = {r["entry"]: r["val"]["mean_dice"] for r in results if not set("@+") & set(r["entry"])}
    ladder = [m for m in PAPER_DICE if m in plain]  # the paper's order (the model registry's)
    holds = all(plain[a] < plain[b] for a, b in zip(ladder, ladder[1:]))
    order = " < ".join(sorted(plain, key=plain.get))
    lines += ["", f"Paper's order ({' < '.join(ladder)}) {'holds' if holds else 'does not hold'} here: {order}."]
    for r in results:
        if "test" in r:
            t = r["test"]
            lines += [
                "",
                f"Test ({t['n_subjects']} held-out scans), {r['entry']}, "
                f"{PostProcessing.from_dict(t['postprocessing']).describe()} (chosen on validation): "
                f"mean Dice {f(t['mean_dice'])}, pooled Dice {f(t['pooled_dice'])}, lesion F1 "
                f"{f(t['mean_lesion_f1'])}, Dice < 5 mL {f(t.get('small_lesion_dice'))} ({t.get('n_small')} scans).",
                f"The same at threshold 0.5 without post-processing: mean Dice {f(r['test_fixed']['mean_dice'])}, "
                f"pooled Dice {f(r['test_fixed']['pooled_dice'])}, lesion F1 {f(r['test_fixed']['mean_lesion_f1'])}, "
                f"Dice < 5 mL {f(r['test_fixed'].get('small_lesion_dice'))}.",
            ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
