"""``atlas-train``: thin commands over ``trainer.fit`` and ``trainer.forest``.

Heavy imports (torch, scikit-learn) live inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import math

import click

from shards.common.cli_errors import OneLineErrors, expected, one_line
from shards.common.params import POSITIVE, SEED, FiniteFloat, from_options
from trainer.config import LAYOUTS, MODELS, OPTIMIZERS, RECIPES, SCHEDULES, ModelConfig, ModelError, TrainConfig
from trainer.objectives import BATCH, OBJECTIVES, VOXEL_WEIGHTS


def _pair(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected two comma-separated numbers (background,lesion), got {text!r}") from None
    if not all(math.isfinite(v) and v >= 0 for v in (a, b)) or a + b == 0:
        raise click.BadParameter(f"class weights must be finite, non-negative and not both 0, got {text!r}")
    return a, b


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@click.group(cls=OneLineErrors)
def main() -> None:
    """Train the paper's models on streamed patch-pair shards."""


@main.command()
@click.option("--shards", required=True, help="Training shards: directory, manifest, URL or brace pattern.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--model", "name", type=click.Choice(MODELS), default=ModelConfig.name, show_default=True)
@click.option(
    "--layout",
    type=click.Choice(LAYOUTS),
    default=ModelConfig.layout,
    show_default=True,
    help="cnn3d-sym input: 2 channels (dense-convertible) or the paper's 50x25x25 stack.",
)
@click.option("--val-shards", default=None, help="An un-upsampled stream (build --natural) for the curves.")
@click.option("--epochs", type=click.IntRange(min=1), default=TrainConfig.epochs, show_default=True)
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=None, help="Default: one pass over the shards.")
@click.option(
    "--objective",
    type=click.Choice(OBJECTIVES),
    default=TrainConfig.objective,
    show_default=True,
    help="patch: one label a 25^3 pair (the paper's). dense: every brain voxel of each block's core, the 3D CNNs "
    "run densely (blocks shards of this version). dense-sampled: the dense forward, the loss at the blocks' "
    "sampled voxels only (= patch training on the same samples).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help=f"Samples a batch, or blocks with a dense objective [{', '.join(f'{k} {v}' for k, v in BATCH.items())}].",
)
@click.option(
    "--voxel-weights",
    type=click.Choice(VOXEL_WEIGHTS),
    default=TrainConfig.voxel_weights,
    show_default=True,
    help="--objective dense: each voxel weighted by how often the build's sampling draws it (draws: sampling by "
    "component then weighs every lesion alike), or one weight a class (share).",
)
@click.option(
    "--heavy-repeat",
    type=click.IntRange(min=1),
    default=TrainConfig.heavy_repeat,
    show_default=True,
    help="--voxel-weights draws: a block weighing k times the mean is streamed up to this many times (round(k)), "
    "its weights divided alike: the same expected loss, heavy blocks (small lesions) in many batches, not one.",
)
@click.option(
    "--lesion-share",
    type=FiniteFloat(0, 1, min_open=True, max_open=True),
    default=TrainConfig.lesion_share,
    show_default=True,
    help="--voxel-weights share: the share of the loss's weight lesion voxels carry (the paper's sample: 43.7%).",
)
@click.option(
    "--recipe",
    type=click.Choice(list(RECIPES)),
    default=TrainConfig.recipe,
    show_default=True,
    help="Defaults of the six options below. paper: Adam, lr 1e-5, constant, no augmentation; "
    "modern: AdamW (weight decay 1e-4), lr 1e-3, 5% warm-up then cosine, flips and intensity jitter; "
    "and --batch-norm (modern: on, paper: off).",
)
@click.option("--lr", type=POSITIVE, default=None, help="Peak learning rate [the recipe's].")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None, help="[the recipe's]")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None, help="[the recipe's]")
@click.option("--warmup", type=FiniteFloat(0, 1, max_open=True), default=None, help="Share of the run [the recipe's].")
@click.option("--weight-decay", type=FiniteFloat(min=0), default=None, help="[the recipe's]")
@click.option("--augment/--no-augment", default=None, help="Axis flips of both cubes, intensity jitter [the recipe's].")
@click.option(
    "--time-budget",
    type=POSITIVE,
    default=None,
    metavar="MINUTES",
    help="Stop after this much training (validation not counted); the schedule then follows the clock.",
)
@click.option(
    "--budget-clock",
    type=click.Choice(["wall", "cpu"]),
    default=TrainConfig.budget_clock,
    show_default=True,
    help="What --time-budget counts: elapsed time, or this process's CPU time (all threads; with --workers 0, "
    "the data loading too): CPU-minutes that other work on the machine does not eat into.",
)
@click.option("--workers", type=click.IntRange(min=0), default=TrainConfig.workers, show_default=True, help="Per rank.")
@click.option("--seed", type=SEED, default=TrainConfig.seed, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt at its step.")
@click.option("--device", default=TrainConfig.device, show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option(
    "--amp/--no-amp",
    default=None,
    help="bf16 autocast of the forward pass. Default: on with the modern recipe where it pays (a GPU, or a CPU "
    "with bf16 instructions: BENCHMARKS.md), off with the paper's.",
)
@click.option(
    "--channels-last/--no-channels-last",
    default=TrainConfig.channels_last,
    show_default=True,
    help="3D CNNs: channels-last memory layout (the same model; more steps a CPU-second, see BENCHMARKS.md).",
)
@click.option(
    "--compile",
    is_flag=True,
    help="torch.compile the model for training (a C compiler needed; the first steps compile, then faster).",
)
@click.option(
    "--cut-on-device",
    is_flag=True,
    help="Blocks shards: keep the pool of blocks on the training device and cut pairs there "
    "(each block crosses the bus once). Same batches as the default CPU cut.",
)
@click.option("--class-weights", default=None, metavar="W0,W1", help="Cross-entropy class weights.")
@click.option(
    "--clip-grad",
    type=POSITIVE,
    default=None,
    metavar="NORM",
    help="Clip the gradient's norm to NORM each step (its norm before clipping is logged either way).",
)
@click.option(
    "--shuffle",
    type=click.IntRange(min=0),
    default=None,
    metavar="SAMPLES",
    help="The shuffle pool: batches are drawn from at least this many samples (0: stream order) [65536 for blocks "
    "shards, 1024 for pairs]. A smaller pool fills batches with one block's samples (bench/bench_batch_mix.py).",
)
@click.option("--eval-every", type=click.IntRange(min=1), default=None, help="Steps between validations [total/10].")
@click.option("--val-batches", type=click.IntRange(min=1), default=None, help="Cap on validation batches per rank.")
@click.option("--log-every", type=click.IntRange(min=1), default=TrainConfig.log_every, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=TrainConfig.checkpoint_every, show_default=True)
@click.option(
    "--snapshot-every",
    type=click.IntRange(min=1),
    default=None,
    help="Also keep OUT/snapshots/step-N.pt every N steps (atlas-evaluate curve scores them on whole volumes).",
)
@click.option(
    "--widths", default=",".join(map(str, ModelConfig.widths)), show_default=True, help="cnn3d: the 5 convolutions."
)
@click.option(
    "--hidden", type=click.IntRange(min=1), default=ModelConfig.hidden, show_default=True, help="cnn3d: fc1 width."
)
@click.option(
    "--batch-norm/--no-batch-norm",
    default=None,
    help="cnn3d: BatchNorm3d after each convolution (evaluation mode in whole-volume prediction) "
    "[the recipe's: modern on, paper off].",
)
@click.option(
    "--pretrained", default=ModelConfig.pretrained, show_default=True, help="resnet2d: imagenet, none or a PATH."
)
@click.option("--finetune", type=click.Choice(["last", "all"]), default=ModelConfig.finetune, show_default=True)
@click.option(
    "--timeout", type=FiniteFloat(min=0.1), default=TrainConfig.timeout, show_default=True, help="Seconds a try."
)
@click.option(
    "--retries", type=click.IntRange(min=1), default=TrainConfig.retries, show_default=True, help="Tries a shard."
)
def fit(resume: bool, **options) -> None:
    """Train a model on streamed shards (one process, or DDP under torchrun)."""
    from shards.manifest import ManifestError
    from shards.sources import ShardSourceError
    from trainer.checkpoint import CheckpointError
    from trainer.fit import TrainError, fit as run_fit

    cfg = from_options(TrainConfig, options, others=(ModelConfig,), class_weights=_pair(options["class_weights"]))
    model_cfg = from_options(ModelConfig, options, others=(TrainConfig,), widths=_ints(options["widths"]))
    run_dir = cfg.out
    try:
        summary = run_fit(cfg, model_cfg, resume=resume, log=click.echo)
    except (TrainError, ModelError, CheckpointError, ShardSourceError, ManifestError) as exc:
        raise click.ClickException(one_line(exc)) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    if summary is None:
        return
    last = summary["last"]
    click.echo(
        f"trained {summary['steps']} steps (world size {summary['world_size']}); "
        f"last loss {float(last.get('loss') or 'nan'):.4f}"
        + (f", validation Dice {float(last['val_dice']):.3f}" if last.get("val_dice") not in (None, "") else "")
        + (f"; {summary['skipped']} damaged records skipped (see the warnings)" if summary.get("skipped") else "")
    )
    click.echo(f"run: {run_dir} (checkpoint {summary['checkpoint']}, metrics.csv, curves.png, config.json)")


@main.command()
@click.option("--shards", required=True, help="Training shards: directory, manifest, URL or brace pattern.")
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option(
    "--max-samples",
    type=click.IntRange(min=10),
    default=200_000,
    show_default=True,
    help="Samples drawn from the stream to fit on (held in RAM: 625 floats each).",
)
@click.option("--grid", is_flag=True, help="3-fold grid search over n_estimators, max_depth, min_samples_split.")
@click.option("--val-shards", default=None, help="Score voxel Dice/precision/recall on this stream.")
@click.option("--seed", type=SEED, default=0, show_default=True)
def rf(shards, run_dir, max_samples, grid, val_shards, seed) -> None:
    """Random-forest baseline on the 25x25 axial slice (paper: 50 trees, depth 6, split 2)."""
    from shards.common.lock import OutputBusy
    from shards.manifest import ManifestError
    from shards.sources import ShardSourceError
    from trainer.forest import FOREST, train_forest

    with expected(ShardSourceError, ManifestError, ValueError, OutputBusy):
        result = train_forest(
            shards, run_dir, max_samples=max_samples, grid=grid, seed=seed, val_spec=val_shards, log=click.echo
        )
    click.echo(
        f"forest {result['params']}: train accuracy {result['train_accuracy']:.3f}"
        + (f", validation Dice {result['val']['dice']:.3f}" if "val" in result else "")
    )
    click.echo(f"run: {run_dir} ({FOREST}: node arrays, no pickle; config.json)")


if __name__ == "__main__":
    main()
