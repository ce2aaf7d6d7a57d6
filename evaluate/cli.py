"""``atlas-evaluate``: thin commands over the evaluation API (heavy imports inside)."""

from __future__ import annotations

import click


@click.group()
def main() -> None:
    """Evaluate trained runs: whole volumes, shard streams, single scans, the model ladder."""


@main.command()
@click.option("--model", "run_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Run directory.")
@click.option("--store", required=True, type=click.Path(), help="The Zarr store the shards came from.")
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Report directory.")
@click.option("--threshold", default="0.5", show_default=True, help="Probability threshold, or 'auto' (best mean Dice on val).")
@click.option("--prior-correction/--no-prior-correction", default=True, show_default=True,
              help="Undo the balanced sample's prior: logit - log(lesion rate / background rate).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--tile", type=click.IntRange(min=8), default=64, show_default=True, help="Dense tile edge (output voxels).")
@click.option("--save-probabilities", is_flag=True, help="Also write probability maps (float32 NIfTI).")
@click.option("--patchwise", is_flag=True, help="Force the patch-by-patch path (the reference; slow).")
def run(run_dir, store, split, out_dir, threshold, prior_correction, device, tile, save_probabilities, patchwise) -> None:
    """Predict and score every scan of a split; masks, metrics.json, subjects.csv, report.md."""
    from evaluate.predictors import EvaluateError
    from evaluate.run import evaluate_split

    if threshold != "auto":
        try:
            if not 0 < float(threshold) < 1:
                raise ValueError
        except ValueError:
            raise click.BadParameter("a number in (0, 1) or 'auto'", param_hint="--threshold") from None
    try:
        m = evaluate_split(run_dir, store, split, out_dir, threshold=threshold, prior_correction=prior_correction,
                           device=device, tile=tile, save_probabilities=save_probabilities, use_dense=not patchwise,
                           log=click.echo)
    except EvaluateError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{m['model']} on {m['split']}: {m['n_subjects']} scans, mean Dice {m['mean_dice']:.3f}, pooled Dice "
               f"{m['pooled_dice']:.3f}, lesion F1 {m['mean_lesion_f1']:.3f} (threshold {m['threshold']}, "
               f"prior correction {'on' if m['prior_correction'] else 'off'}, {m['inference']})")
    click.echo(f"report: {out_dir}/report.md (metrics.json, subjects.csv, masks/)")


if __name__ == "__main__":
    main()
