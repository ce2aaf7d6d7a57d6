"""``atlas-shards``: thin commands over the API functions.

Heavy imports live inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import math

import click

from atlas_shards.plan import BuildConfig
from atlas_shards.split import SPLITS
from shards.common.cli_errors import OneLineErrors, expected
from shards.norm import METHODS
from shards.common.params import LOCATION, POSITIVE, RATE, SEED, FiniteFloat, from_options
from shards.formats import FORMATS


def _numbers(kind: type, text: str | None, name: str) -> tuple | None:
    if text is None:
        return None
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=name) from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise click.BadParameter(f"expected finite non-negative numbers, got {text!r}", param_hint=name)
    return values


@click.group(cls=OneLineErrors)
def main() -> None:
    """Stroke-lesion data: phantom releases, Zarr ingestion, EDA, patch-pair shards."""


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--layout", type=click.Choice(["r1.1", "r1.2", "r2.0", "native"]), default="r2.0", show_default=True)
@click.option("--subjects", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option(
    "--mismatched-masks", type=click.IntRange(min=0), default=0, help="Scans whose mask grid differs from the T1."
)
@click.option("--truncated", type=click.IntRange(min=0), default=0, help="Scans whose T1 file is cut short.")
@click.option("--empty-masks", type=click.IntRange(min=0), default=0, help="Scans whose lesion masks are all zero.")
@click.option(
    "--lesion-scale",
    type=FiniteFloat(0, 100, min_open=True),
    default=1.0,
    show_default=True,
    help="A held-out variant: every subject's lesion volume times this (0.2: mostly small lesions).",
)
@click.option(
    "--locations",
    default="left,right,bilateral,brainstem",
    show_default=True,
    help="A held-out variant: the lesion locations drawn (also midline: lesions across x = 0), comma-separated.",
)
@click.option(
    "--lesion-level",
    type=FiniteFloat(0, 1, max_open=True),
    default=0.18,
    show_default=True,
    help="A held-out variant: the template intensity lesions are painted towards (grey matter is about 0.6; "
    "higher: less contrast).",
)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True)
def synth(out_dir, layout, subjects, lesion_scale, locations, lesion_level, **options) -> None:
    """Write a phantom ATLAS release (from the MNI152 template) to OUT_DIR."""
    from atlas_shards.phantom import Variant
    from atlas_shards.synth import TRUTH_FILE, synthesize_release

    with expected(ValueError):
        places = tuple(p.strip() for p in locations.split(",") if p.strip())
        variant = Variant(lesion_scale=lesion_scale, locations=places, lesion_level=lesion_level)
        truth = synthesize_release(out_dir, layout, subjects, variant=variant, **options)
    click.echo(f"wrote {len(truth['scans'])} {layout} phantom scans under {out_dir} (truth: {out_dir}/{TRUTH_FILE})")


@main.command()
@click.argument("release_dir", type=click.Path())
@click.argument("store", type=click.Path())
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--split", "split_counts", metavar="TRAIN,VAL,TEST", help="Exact subject counts, e.g. 100,25,25.")
@click.option("--split-fractions", metavar="TRAIN,VAL,TEST", help="Subject fractions, e.g. 0.67,0.17,0.16.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the subject split.")
@click.option(
    "--space",
    type=click.Choice(["auto", "mni", "native"]),
    default="auto",
    show_default=True,
    help="Which scans to take when a release holds both standard-space and native scans.",
)
def ingest(release_dir, store, workers, split_counts, split_fractions, seed, space) -> None:
    """Validate an ATLAS release and write it as a canonical Zarr STORE."""
    from atlas_shards.discover import DiscoveryError
    from atlas_shards.ingest import IngestError, ingest as run_ingest
    from atlas_shards.split import SplitError
    from atlas_shards.store import StoreError

    if split_counts and split_fractions:
        raise click.UsageError("give --split or --split-fractions, not both")
    counts, fractions = _numbers(int, split_counts, "--split"), _numbers(float, split_fractions, "--split-fractions")
    for name, values in (("--split", counts), ("--split-fractions", fractions)):
        if values is not None and (len(values) != 3 or sum(values) == 0):
            raise click.BadParameter("three numbers TRAIN,VAL,TEST, not all 0", param_hint=name)  # before any work
    with expected(DiscoveryError, IngestError, StoreError, SplitError):
        s = run_ingest(
            release_dir, store, workers=workers, split_counts=counts, split_fractions=fractions, seed=seed, space=space
        )
    click.echo(
        f"{s.layout} release: {s.found} scans found, {s.ingested} ingested ({s.repaired} repaired, "
        f"{s.resumed} already in the store, {s.unlabelled} unlabelled), {s.excluded} excluded"
    )
    for scan_id, reason in s.excluded_reasons:
        click.echo(f"  excluded {scan_id}: {reason}")
    for note in s.notes:
        click.echo(f"  {note}")
    click.echo("split (subjects): " + ", ".join(f"{k} {len(v)}" for k, v in s.split.items() if v))
    click.echo(f"store: {s.store}  report: {s.store / 'ingest-report.csv'}")
    if s.ingested == 0:
        raise click.ClickException(f"no scan of {release_dir} could be ingested; see {s.store / 'ingest-report.csv'}")


@main.command()
@click.argument("store", type=LOCATION)
@click.argument("out_dir", type=click.Path(file_okay=False))
def eda(store, out_dir) -> None:
    """Exploratory figures and eda.json from an ingested STORE."""
    from atlas_shards.eda import run_eda
    from atlas_shards.store import StoreError

    with expected(StoreError):
        summary = run_eda(store, out_dir)
    click.echo(
        f"{summary['n_scans']} labelled scans, lesion voxel fraction {summary['lesion_voxel_fraction']:.4%} "
        f"of all voxels ({summary['lesion_brain_fraction']:.3%} of brain)"
    )
    for name in summary["figures"]:
        click.echo(f"  {out_dir}/{name}")
    click.echo(f"  {out_dir}/eda.json")


def _count(flag: str, metavar: str, default: int | None, help: str):
    """A positive count option (no default: off)."""
    return click.option(
        flag, type=click.IntRange(min=1), default=default, show_default=default is not None, metavar=metavar, help=help
    )


@main.command()
@click.argument("store", type=click.Path())
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--split", type=click.Choice(SPLITS), required=True)
@click.option("--patch", type=int, default=BuildConfig.patch, show_default=True, help="Cube edge in voxels (odd).")
@click.option(
    "--format",
    type=click.Choice(FORMATS),
    default=BuildConfig.format,
    show_default=True,
    help="blocks: one record a block of the grid with its samples (28x fewer bytes at the paper's sample; "
    "--dry-run prints both). pairs: records of ready-cut pairs. The same samples either way.",
)
@click.option(
    "--block", type=click.IntRange(min=1), default=BuildConfig.block, show_default=True, help="Block edge (voxels)."
)
@click.option(
    "--target-lesion-fraction",
    type=FiniteFloat(0, 1, min_open=True, max_open=True),
    default=None,
    help="Lesion share of the samples; the background rate is derived from it.  "
    f"[default: {BuildConfig.target_lesion_fraction}]",
)
@click.option("--background-rate", type=RATE, default=None, help="Explicit background sampling rate (paper: 0.01).")
@click.option(
    "--lesion-rate", type=RATE, default=BuildConfig.lesion_rate, show_default=True, help="Share of lesion voxels."
)
@_count(
    "--max-lesion-samples",
    "N",
    None,
    "At most N lesion samples a scan (drawn uniformly from its lesion voxels): the interior of a large lesion "
    "is much alike, and small lesions then weigh more. The background still follows the target fraction.",
)
@_count(
    "--component-samples",
    "K",
    None,
    "Sample by lesion, not by voxel: K lesion samples from every lesion component (6-connected), "
    "whatever its size, so a 40-voxel lesion weighs as much as a 400 mL one. Replaces --lesion-rate and "
    "--max-lesion-samples; the background still follows the target fraction.",
)
@_count(
    "--max-repeat",
    "R",
    BuildConfig.max_repeat,
    "With --component-samples: a component smaller than K gives at most R draws of each voxel "
    "(a few-voxel speck of a tracing is not repeated K times).",
)
@click.option(
    "--natural",
    "natural_rate",
    type=FiniteFloat(0, 1, min_open=True),
    default=None,
    metavar="RATE",
    help="Uniform sample of brain voxels, no balancing (un-upsampled validation stream).",
)
@click.option(
    "--hard-negatives",
    type=click.Path(exists=True, file_okay=False, resolve_path=True),
    default=None,
    metavar="DIR",
    help="Probability maps of a prior model (atlas-evaluate run --split train --save-probabilities): "
    "background voxels are drawn in proportion to them. The lesion fraction is unchanged.",
)
@click.option(
    "--hard-share",
    type=RATE,
    default=BuildConfig.hard_share,
    show_default=True,
    help="Share of the background draws that follows the maps (the rest stays uniform).",
)
@click.option("--norm", type=click.Choice(METHODS), default=BuildConfig.norm, show_default=True)
@click.option(
    "--samples-per-record", type=click.IntRange(min=1), default=BuildConfig.samples_per_record, show_default=True
)
@click.option("--shard-size-mb", type=POSITIVE, default=BuildConfig.shard_size_mb, show_default=True)
@click.option("--num-shards", type=click.IntRange(min=1), default=None, help="Exact count (overrides --shard-size-mb).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seed", type=SEED, default=BuildConfig.seed, show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the plan (samples, shards, bytes of both formats) and stop.")
@click.option(
    "--recipe",
    type=click.Choice(["modern", "paper"]),
    default="modern",
    show_default=True,
    help="modern: sampling by lesion (--component-samples 3000 --max-repeat 5), the best measured; paper: the "
    "paper's sample (every lesion voxel, 43.7% lesion). --component-samples, --max-lesion-samples, "
    "a --lesion-rate under 1 or --natural given decides the sampling instead.",
)
def build(store, out_dir, workers, dry_run, recipe, **options) -> None:
    """Cut balanced patch-pair WebDataset shards of one split of STORE into OUT_DIR."""
    from atlas_shards.build import BuildError, build as run_build
    from atlas_shards.plan import MODERN_SAMPLING
    from shards.manifest import ManifestError, summarise

    chosen = ("component_samples", "max_lesion_samples", "natural_rate")
    if recipe == "modern" and all(options[k] is None for k in chosen) and options["lesion_rate"] == 1.0:
        options.update(component_samples=MODERN_SAMPLING)  # with --max-repeat's own default, 5
    natural, fraction, background = (options[k] for k in ("natural_rate", "target_lesion_fraction", "background_rate"))
    if natural is not None and (fraction is not None or background is not None):
        raise click.UsageError("--natural samples without balancing: do not combine it with the balancing rates")
    if fraction is not None and background is not None:
        raise click.UsageError("give --target-lesion-fraction or --background-rate, not both")
    if natural is not None:
        options.update(mode="natural", target_lesion_fraction=None)
    elif background is not None:
        options.update(target_lesion_fraction=None)
    else:
        options.update(target_lesion_fraction=fraction or BuildConfig.target_lesion_fraction)
    config = from_options(BuildConfig, options)
    with expected(BuildError, ManifestError):
        result = run_build(store, out_dir, config, workers=workers, dry_run=dry_run, log=click.echo)
    if not dry_run:
        click.echo(summarise(result, out_dir))


@main.command()
@click.argument("out_dir", type=LOCATION)
@click.option("--verify", "then_verify", is_flag=True, help="Then check it: the same as atlas-shards verify OUT_DIR.")
def inspect(out_dir, then_verify) -> None:
    """Print the manifest of a shard directory: what it holds. (Checking it is ``verify``.)"""
    from shards.manifest import ManifestError, read_manifest, summarise

    with expected(ManifestError):
        click.echo(summarise(read_manifest(out_dir), out_dir))
    if then_verify:
        _verify(out_dir)


@main.command()
@click.argument("path", type=LOCATION)
def verify(path) -> None:
    """Check a whole STORE (every scan against its checksums and counts) or a shard directory.

    Exit status 1 when anything is damaged; each damaged scan or shard is named with its reason.
    """
    _verify(path)


def _verify(path: str) -> None:
    """``verify``: a store or a shard directory (one with a manifest), each problem named; exit status 1 if any."""
    from atlas_shards.store import StoreError, verify_store
    from shards import remote
    from shards.manifest import ManifestError, verify as verify_shards
    from shards.schema import MANIFEST

    with expected(StoreError, ManifestError, remote.RemoteError):
        if remote.exists(remote.join(path, MANIFEST)):
            problems = verify_shards(path)
            for problem in problems:
                click.echo(f"  PROBLEM {problem}")
            kind, checked = (
                "shard directory",
                ("every shard matches the manifest (size, sha256, records, samples, lesion samples)"),
            )
        else:
            results = verify_store(path)
            for scan_id, status in results:
                click.echo(f"  {scan_id}: {status}")
            problems = [r for r in results if r[1] != "ok" and not r[1].startswith("unverified")]
            kind, checked = "store", f"{len(results)} scans read, every chunk and array as ingest wrote it"
    if problems:
        raise click.ClickException(f"{path}: {len(problems)} problem(s) found in the {kind}")
    click.echo(f"verify: {checked}")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port", type=click.IntRange(min=0, max=65535), default=8080, show_default=True, help="0: any free port."
)
@click.option("--server", type=click.Choice(["auto", "nginx", "python"]), default="auto", show_default=True)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the base URL here once the server answers (for scripts).",
)
def serve(directory, host, port, server, ready_file) -> None:
    """Serve shard DIRECTORY over HTTP until interrupted (nginx with atlas_shards/nginx.conf, else Python)."""
    import signal
    import threading

    from atlas_shards.serve import ServeError, serving

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    with expected(ServeError, OSError):
        with serving(directory, host, port, server) as (url, name):
            click.echo(f"serving {directory} at {url}/ with {name}; Ctrl-C to stop", err=True)
            if ready_file:
                from shards.common.atomic import atomic_write_text

                atomic_write_text(ready_file, url + "\n")
            try:
                stop.wait()
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    main()
