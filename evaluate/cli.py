"""``atlas-evaluate``: thin commands over the evaluation API (heavy imports inside)."""

from __future__ import annotations

from pathlib import Path

import click

from shards.common.cli_errors import OneLineErrors, expected
from shards.common.params import FiniteFloat
from shards.common.tables import cell


MODEL = click.option("--model", "run_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Run.")
MODELS = click.option(
    "--model",
    "run_dir",
    required=True,
    multiple=True,
    type=click.Path(exists=True, file_okay=False),
    help="Run; give it again for an ensemble (the mean of the runs' prior-corrected logits).",
)
MIN_COMPONENT = click.option(
    "--min-component",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Smallest component kept (voxels).",
)
FILL_HOLES = click.option("--fill-holes", is_flag=True, help="Fill enclosed holes in the mask.")
MIN_PEAK = click.option(
    "--min-peak",
    type=FiniteFloat(0, 1, max_open=True),
    default=0.0,
    show_default=True,
    help="Keep a component only if its highest probability reaches this (hysteresis; 0: no limit).",
)


class FlipAxes(click.ParamType):
    """``--tta-flips``: ``none``, ``x``, ``xyz`` ... parsed once, here, into the axes' indices (``()``: none)."""

    name = "axes"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from evaluate.predictors import EvaluateError
        from evaluate.tta import parse_flips

        try:
            return parse_flips(value)
        except EvaluateError as exc:
            self.fail(str(exc), param, ctx)


def tta_flips(default: str | None, help: str):
    return click.option(
        "--tta-flips", type=FlipAxes(), default=default, metavar="AXES", show_default=default is not None, help=help
    )


TTA_HELP = (
    "Test-time flips: the mean logit over the input as it is and mirrored along these axes, every combination "
    "(x: left-right, 2 predictions; xyz: 8). The rule is chosen with them too."
)


def prior_correction(default: bool, help: str):
    return click.option("--prior-correction/--no-prior-correction", default=default, show_default=True, help=help)


@click.group(cls=OneLineErrors)
def main() -> None:
    """Evaluate trained runs: whole volumes, shard streams, single scans, the model ladder."""
    from shards.common.memory import keep_freed_memory

    keep_freed_memory()  # whole-volume prediction frees and allocates large buffers scan after scan


@main.command()
@MODELS
@click.option("--store", required=True, type=click.Path(), help="The Zarr store the shards came from.")
@click.option("--split", type=click.Choice(["val", "test", "train"]), default="test", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Report directory.")
@click.option(
    "--threshold",
    default="auto",
    show_default=True,
    help="'auto': threshold and post-processing chosen together on the val split (the best measured), or a "
    "probability threshold (then --min-component, --fill-holes, --min-peak apply).",
)
@MIN_COMPONENT
@FILL_HOLES
@MIN_PEAK
@prior_correction(True, "Undo the balanced sample's prior: logit - log(lesion rate / background rate).")
@click.option("--device", default="auto", show_default=True, help="auto: CUDA when there is a GPU, else the CPU.")
@click.option(
    "--tile", type=click.IntRange(min=8), default=64, show_default=True, help="Dense tile edge (output voxels)."
)
@click.option(
    "--stride",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Patch-by-patch models (rf, resnet2d) on the CPU: classify every Kth voxel per axis, fill the rest from "
    "it (K^3 times faster, coarser masks).",
)
@tta_flips("none", TTA_HELP)
@click.option("--save-probabilities", is_flag=True, help="Also write probability maps (float32 NIfTI).")
@click.option("--patchwise", is_flag=True, help="Force the patch-by-patch path (the reference; slow).")
@click.option(
    "--allow-training-subjects",
    is_flag=True,
    help="Score a split that holds subjects the model trained on (refused by default; the report says so).",
)
def run(run_dir, store, split, out_dir, patchwise, **options) -> None:
    """Predict and score every scan of a split; masks, metrics.json, subjects.csv, report.md."""
    from evaluate.postprocess import PostProcessing
    from evaluate.predictors import EvaluateError
    from evaluate.split import evaluate_split

    if options["threshold"] != "auto":
        try:
            if not 0 < float(options["threshold"]) < 1:
                raise ValueError
        except ValueError:
            raise click.BadParameter("a number in (0, 1) or 'auto'", param_hint="--threshold") from None
    with expected(EvaluateError):
        m = evaluate_split(run_dir, store, split, out_dir, use_dense=not patchwise, log=click.echo, **options)
    click.echo(
        f"{m['model']} on {m['split']}: {m['n_subjects']} scans, mean Dice {m['mean_dice']:.3f}, pooled Dice "
        f"{m['pooled_dice']:.3f}, lesion F1 {m['mean_lesion_f1']:.3f}, Dice under 5 mL "
        f"{cell(m['small_lesion_dice'], '.3f', 'n/a')} ({m['n_small']} scans) "
        f"({PostProcessing.from_dict(m['postprocessing']).describe()}, "
        f"prior correction {'on' if m['prior_correction'] else 'off'}, {m['inference']})"
    )
    click.echo(f"report: {out_dir}/report.md (metrics.json, subjects.csv, masks/)")


@main.command()
@MODEL
@click.option("--shards", required=True, help="Shards (build --natural for un-upsampled voxel scores).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--threshold", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=0.5, show_default=True)
@prior_correction(False, "Off by default: the same numbers as the training curve.")
@click.option("--device", default="auto", show_default=True, help="auto: CUDA when there is a GPU, else the CPU.")
def stream(run_dir, shards, out_dir, threshold, prior_correction, device) -> None:
    """Voxel-level Dice, precision, recall, ROC AUC on a shard stream (any model, bounded memory)."""
    import json
    from pathlib import Path

    from evaluate.predictors import EvaluateError
    from evaluate.stream import score_stream
    from shards.common.atomic import atomic_write_text, check_output_dir
    from shards.sources import ShardSourceError

    check_output_dir(out_dir)
    with expected(EvaluateError, ShardSourceError):
        result = score_stream(run_dir, shards, threshold=threshold, prior_correction=prior_correction, device=device)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out_dir) / "stream_metrics.json", json.dumps(result, indent=1, default=str))
    click.echo(
        f"{result['model']}: {result['samples']} samples ({result['lesion_samples']} lesion): Dice "
        f"{result['dice']:.3f}, precision {result['precision']:.3f}, recall {result['recall']:.3f}, "
        f"ROC AUC {result['roc_auc']:.3f}"
    )
    click.echo(f"scores: {out_dir}/stream_metrics.json")


@main.command()
@MODELS
@click.argument("t1", type=click.Path())
@click.argument("out_mask", type=click.Path())
@click.option("--space", type=click.Choice(["auto", "mni", "native"]), default="auto", show_default=True)
@click.option("--brain-mask", type=click.Path(exists=True, dir_okay=False), default=None, help="Your own brain mask.")
@click.option("--threshold", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=0.5, show_default=True)
@MIN_COMPONENT
@FILL_HOLES
@MIN_PEAK
@click.option(
    "--rule-from",
    type=click.Path(exists=True),
    default=None,
    help="A report of atlas-evaluate run (its directory or metrics.json): use its threshold and post-processing.",
)
@prior_correction(True, "As for run.")
@tta_flips(None, "As for run [the --rule-from report's, else none].")
@click.option(
    "--probabilities", type=click.Path(dir_okay=False), default=None, help="Also write the probability map here."
)
@click.option("--device", default="auto", show_default=True, help="auto: CUDA when there is a GPU, else the CPU.")
def predict(run_dir, t1, out_mask, threshold, min_component, fill_holes, min_peak, rule_from, **options) -> None:
    """Segment one T1 NIfTI (any orientation) into OUT_MASK on the input's grid and affine; or every NIfTI of a
    folder (or a quoted glob) T1 into the folder OUT_MASK, the model loaded once, each mask named after its input
    (<name>_desc-lesion_mask.nii.gz) with predictions.csv beside them."""
    from evaluate.postprocess import PostProcessing, flips_of_report, rule_of_report
    from evaluate.predictors import EvaluateError
    from evaluate.predict import predict_file
    from evaluate.tta import flips_label

    rule = PostProcessing(threshold, min_component, fill_holes, min_peak)
    if rule_from:
        with expected(ValueError):
            rule = rule_of_report(rule_from, run_dir)
            if options["tta_flips"] is None:  # the rule was chosen on these flips' probabilities
                options["tta_flips"] = flips_of_report(rule_from)
        click.echo(f"rule from {rule_from}: {rule.describe()}, test-time flips {flips_label(options['tta_flips'])}")
    options["tta_flips"] = options["tta_flips"] or ()
    if Path(t1).is_dir() or any(c in t1 for c in "*?["):
        from evaluate.batch import predict_many

        if options["probabilities"] or options["brain_mask"]:
            raise click.UsageError("--probabilities and --brain-mask are for one scan, not a folder")
        options.pop("probabilities"), options.pop("brain_mask")
        with expected(EvaluateError):
            rows = predict_many(run_dir, t1, out_mask, rule=rule, log=click.echo, **options)
        done = sum(r["status"] == "ok" for r in rows)
        click.echo(f"{out_mask}: {done} of {len(rows)} scans segmented (predictions.csv)")
        if done < len(rows):
            raise SystemExit(1)
        return
    with expected(EvaluateError):
        r = predict_file(run_dir, t1, out_mask, rule=rule, **options)
    click.echo(
        f"{out_mask}: {r['lesion_voxels']} lesion voxels ({r['lesion_voxels'] * r['voxel_ml']:.2f} mL); "
        f"space {r['space']}, mirror index {r['mirror_index']}, brain mask {r['brain_mask']}"
    )
    for note in r["notes"]:
        click.echo(f"  note: {note}")


@main.command()
@MODELS
@click.option("--store", required=True, type=click.Path(), help="A store with unlabelled scans (Testing/).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Masks and predictions.csv.")
@click.option(
    "--threshold",
    default="auto",
    show_default=True,
    help="'auto': threshold and post-processing chosen on the store's val split (as run does), or a probability "
    "threshold; --rule-from a run report reuses the rule it chose.",
)
@MIN_COMPONENT
@FILL_HOLES
@MIN_PEAK
@click.option("--rule-from", type=click.Path(exists=True), default=None, help="As for predict.")
@prior_correction(True, "As for run.")
@tta_flips("none", "As for run.")
@click.option("--device", default="auto", show_default=True, help="auto: CUDA when there is a GPU, else the CPU.")
@click.option("--tile", type=click.IntRange(min=8), default=64, show_default=True)
def segment(run_dir, store, out_dir, threshold, min_component, fill_holes, min_peak, rule_from, **options) -> None:
    """Masks for a store's unlabelled scans (the release's Testing part) on their original grids, unscored."""
    from evaluate.batch import segment_store
    from evaluate.postprocess import PostProcessing, rule_of_report
    from evaluate.predictors import EvaluateError

    if rule_from:
        with expected(ValueError):
            rule = rule_of_report(rule_from, run_dir)
    elif threshold == "auto":
        rule = "auto"
    else:
        try:
            if not 0 < float(threshold) < 1:
                raise ValueError
        except ValueError:
            raise click.BadParameter("a number in (0, 1) or 'auto'", param_hint="--threshold") from None
        rule = PostProcessing(float(threshold), min_component, fill_holes, min_peak)
    with expected(EvaluateError):
        rows = segment_store(run_dir, store, out_dir, rule=rule, log=click.echo, **options)
    done = sum(r["status"] == "ok" for r in rows)
    click.echo(f"{out_dir}: {done} of {len(rows)} unlabelled scans segmented (masks/, predictions.csv)")


@main.command()
@MODEL
@click.option("--store", required=True, type=click.Path(), help="The Zarr store the shards came from.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Where the curve goes.")
@click.option("--scans", type=click.IntRange(min=1), default=None, help="Score the first N validation scans [all].")
@click.option("--threshold", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=0.5, show_default=True)
def curve(run_dir, store, out_dir, scans, threshold) -> None:
    """Whole-volume validation Dice of every snapshot of a run (fit --snapshot-every), step by step."""
    from evaluate.snapshots import CURVE, volume_curve
    from evaluate.postprocess import PostProcessing
    from evaluate.predictors import EvaluateError

    with expected(EvaluateError):
        rows = volume_curve(run_dir, store, out_dir, scans, PostProcessing(threshold), log=click.echo)
    best = max(rows, key=lambda r: float(r["mean_dice"]))
    click.echo(f"best mean Dice {float(best['mean_dice']):.3f} at step {best['step']} ({len(rows)} points)")
    click.echo(f"curve: {out_dir}/{CURVE} and volume-curve.png")


@main.command()
@click.argument("report_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None, help="Also write the table here.")
def compare(report_dirs, out_file) -> None:
    """The paper's model ladder (its Figure 10) beside the given run reports."""
    from evaluate.compare import ladder
    from shards.common.atomic import atomic_write_text

    with expected(FileNotFoundError, KeyError, ValueError):
        table = ladder(list(report_dirs))
    click.echo(table)
    if out_file:
        atomic_write_text(out_file, table)


if __name__ == "__main__":
    main()
