"""The build plan: what to sample from each scan, and how many shards (pure functions).

``make_plan`` turns the split's voxel counts and a ``BuildConfig`` into
sampling rates, exact per-scan sample counts, the shard count and each scan's
offset (sample j of a scan goes to shard (offset + j) mod S). Its ``plan_id``
(a hash of config and plan) tells a resumable build from a different one.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from atlas_shards.hard_negatives import draw_background, load_map
from atlas_shards.split import SPLITS
from shards.norm import METHODS
from shards.formats import FORMATS
from shards.schema import BLOCK, PATCH

TARGET_LESION_FRACTION = 0.437  # the paper's balanced sample: 43.7% lesion


class BuildError(Exception):
    """The build cannot start or finish; the message says why."""


# ``atlas-shards build --recipe modern`` (the command's default): sampling by lesion, the best measured sample
# (docs/benchmarks-diary.md, "The defaults against the paper's sample": 0.587 against 0.382 test mean Dice over
# 3 seeds): this many samples a lesion component, each voxel at most ``max_repeat`` (5) times. ``--recipe paper``
# and this dataclass's own defaults: the paper's sample.
MODERN_SAMPLING = 3000


@dataclass(frozen=True)
class BuildConfig:
    """What to sample and how to store it. ``mode`` is ``balanced`` or ``natural``.

    ``format`` is how the samples are stored (``blocks``: one record a block of
    ``block``^3 voxels; ``pairs``: records of ``samples_per_record`` pairs);
    which samples are drawn does not depend on it.
    """

    split: str = "train"
    patch: int = PATCH
    format: str = "blocks"
    block: int = BLOCK
    mode: str = "balanced"
    target_lesion_fraction: float | None = TARGET_LESION_FRACTION
    lesion_rate: float = 1.0
    background_rate: float | None = None
    natural_rate: float | None = None
    norm: str = "histeq"
    samples_per_record: int = 256
    shard_size_mb: float = 128.0
    num_shards: int | None = None
    seed: int = 0
    hard_negatives: str | None = None  # a directory of probability maps (``atlas_shards.hard_negatives``)
    hard_share: float = 0.5  # the share of background draws that follows them
    max_lesion_samples: int | None = None  # per scan: a large lesion's interior voxels are much alike
    component_samples: int | None = None  # per lesion component: each lesion weighs the same, whatever its size
    max_repeat: int = 5  # with component_samples: how often a small lesion's voxels may be drawn again

    def check(self) -> None:
        if self.split not in SPLITS:
            raise BuildError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.patch < 1 or self.patch % 2 == 0:
            raise BuildError(f"--patch must be a positive odd number, got {self.patch}")
        if self.format not in FORMATS:
            raise BuildError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.block < 1:
            raise BuildError(f"--block must be a positive number of voxels, got {self.block}")
        if self.norm not in METHODS:
            raise BuildError(f"--norm must be one of {', '.join(METHODS)}")
        if self.mode == "natural":
            if not self.natural_rate or not 0 < self.natural_rate <= 1:
                raise BuildError(f"--natural RATE must be in (0, 1], got {self.natural_rate}")
        elif self.mode == "balanced":
            if (self.target_lesion_fraction is None) == (self.background_rate is None):
                raise BuildError("give either a target lesion fraction or a background rate, not both")
            if self.target_lesion_fraction is not None and not 0 < self.target_lesion_fraction < 1:
                raise BuildError(f"--target-lesion-fraction must be in (0, 1), got {self.target_lesion_fraction}")
            for name in ("lesion_rate", "background_rate"):
                rate = getattr(self, name)
                if rate is not None and not 0 <= rate <= 1:
                    raise BuildError(f"--{name.replace('_', '-')} must be in [0, 1], got {rate}")
        else:
            raise BuildError(f"unknown mode {self.mode!r}")
        if self.hard_negatives is not None and self.mode != "balanced":
            raise BuildError("--hard-negatives is for balanced builds (a natural stream must stay unbiased)")
        if self.max_lesion_samples is not None and self.max_lesion_samples < 1:
            raise BuildError(f"--max-lesion-samples must be a positive count, got {self.max_lesion_samples}")
        if self.component_samples is not None:
            if self.component_samples < 1 or self.max_repeat < 1:
                raise BuildError(
                    f"--component-samples and --max-repeat must be positive counts, "
                    f"got {self.component_samples} and {self.max_repeat}"
                )
            if self.mode != "balanced" or self.max_lesion_samples is not None or self.lesion_rate != 1:
                raise BuildError(
                    "--component-samples sets every lesion's draws itself: it is for balanced builds, "
                    "without --max-lesion-samples or a --lesion-rate"
                )
        if not 0 <= self.hard_share <= 1:
            raise BuildError(f"--hard-share must be in [0, 1], got {self.hard_share}")
        if (
            self.samples_per_record < 1
            or self.shard_size_mb <= 0
            or (self.num_shards is not None and self.num_shards < 1)
        ):
            raise BuildError("--samples-per-record, --shard-size-mb and --num-shards must be positive")


def make_plan(
    config: BuildConfig, scans: list[str], counts: list[dict], subjects: dict[str, str], notes: list[str] = ()
) -> dict:
    """Sampling rates, per-scan sample counts, shard count and offsets (pure, deterministic)."""
    notes = list(notes)
    lesion_rate, background_rate = config.lesion_rate, config.background_rate
    if config.mode == "natural":
        lesion_rate = background_rate = config.natural_rate
    elif config.target_lesion_fraction is not None:
        f = config.target_lesion_fraction
        total_l = lesion_rate * sum(c["lesion"] for c in counts)
        if config.max_lesion_samples is not None or config.component_samples is not None:
            total_l = sum(_lesion_draws(config, lesion_rate, c) for c in counts)
        total_b = sum(c["background"] for c in counts)
        background_rate = total_l * (1 - f) / (f * total_b) if total_b else 0.0
        if background_rate > 1:
            notes.append(
                f"target lesion fraction {f} is not reachable: there are too few background voxels; "
                "keeping every background voxel"
            )
            background_rate = 1.0
    entries, offset = [], 0
    for scan_id, c in zip(scans, counts):
        if config.mode == "natural":
            n_les, n_bg, n = 0, 0, int(round(config.natural_rate * c["natural"]))
        else:
            n_les, n_bg = _lesion_draws(config, lesion_rate, c), int(round(background_rate * c["background"]))
            n = n_les + n_bg
        entries.append(
            {
                "scan_id": scan_id,
                "subject_id": subjects[scan_id],
                "lesion_voxels": c["lesion"],
                "background_voxels": c["background"],
                "candidate_voxels": c["natural"] if config.mode == "natural" else c["lesion"] + c["background"],
                "samples": n,
                "lesion_draws": n_les,
                "background_draws": n_bg,
                "offset": offset,
            }
        )
        if config.component_samples is not None:
            entries[-1]["lesion_components"] = len(c["components"])
        if config.hard_negatives is not None:
            entries[-1]["hard_negatives"] = "hard_problem" not in c
            if "hard_map_sha256" in c:
                entries[-1]["hard_map_sha256"] = c["hard_map_sha256"]
            if "hard_problem" in c:
                notes.append(f"scan {scan_id}: background drawn uniformly: {c['hard_problem']}")
        offset += n
    if offset == 0:
        raise BuildError("the sampling rates select no voxels at all; raise the rates")
    # The shard count, when the format knows its records before the scans are cut (blocks: how many blocks the
    # samples fall in, known once they are: ``atlas_shards.build_blocks.block_layout``).
    records = FORMATS[config.format].records_for(offset, config.samples_per_record)
    num_shards = None if records is None else shards_for(config, offset, records)
    plan = {
        "scans": entries,
        "samples": offset,
        "num_shards": num_shards,
        "lesion_rate": lesion_rate,
        "background_rate": background_rate,
        "notes": notes,
    }
    key = json.dumps({"config": asdict(config), "plan": plan}, sort_keys=True)
    plan["plan_id"] = hashlib.sha256(key.encode()).hexdigest()[:16]
    return plan


def _lesion_draws(config: BuildConfig, lesion_rate: float, counts: dict) -> int:
    """A scan's lesion samples: the lesion rate's share, at most ``max_lesion_samples``.

    With ``component_samples``, the sum of its components' draws (``component_draws``).
    """
    if config.component_samples is not None:
        return int(component_draws(config, np.asarray(counts["components"], dtype=np.int64)).sum())
    n = int(round(lesion_rate * counts["lesion"]))
    return n if config.max_lesion_samples is None else min(n, config.max_lesion_samples)


def lesion_components(lesion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, sizes) of the lesion mask's connected components.

    6-connectivity (``scipy.ndimage.label``'s default), the components the
    lesion-wise F1 counts (``evaluate.metrics``); ``sizes[k - 1]`` is label k's.
    """
    from scipy import ndimage  # not at import: the CLI's --help stays instant (tests/test_cli.py)

    labels, n = ndimage.label(lesion)
    return labels, np.bincount(labels.ravel(), minlength=n + 1)[1:]


def component_draws(config: BuildConfig, sizes: np.ndarray) -> np.ndarray:
    """Each lesion component's samples: ``component_samples``, at most ``max_repeat`` x its size."""
    return np.minimum(config.component_samples, config.max_repeat * sizes)


def _draw_lesions(lesion: np.ndarray, config: BuildConfig, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of the lesion draws, component by component.

    A component larger than its draws gives them without replacement; a
    smaller one gives every voxel as often as it fits, the remainder without
    replacement, so its voxels are drawn equally often (within one).
    """
    labels, sizes = lesion_components(lesion)
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)]) + int((flat == 0).sum())
    out = []
    for k, d in enumerate(component_draws(config, sizes)):
        voxels = order[starts[k] : starts[k + 1]]
        whole, rest = divmod(int(d), len(voxels))
        out += [np.tile(voxels, whole), rng.choice(voxels, rest, replace=False)]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def shards_for(config: BuildConfig, samples: int, records: int) -> int:
    """How many shards: ``--num-shards``, else enough for ``--shard-size-mb``.

    Never more than the format can fill (``RecordFormat.max_shards``).
    """
    size = FORMATS[config.format].estimate_bytes(samples, records, config.patch, config.block)
    wanted = config.num_shards or max(1, math.ceil(size / (config.shard_size_mb * 2**20)))
    return min(wanted, FORMATS[config.format].max_shards(samples, records))


def draw_voxels(
    lesion: np.ndarray,
    brain: np.ndarray,
    scan_id: str,
    entry: dict,
    config: BuildConfig,
    hardness: np.ndarray | None = None,
) -> np.ndarray:
    """Flat indices of one scan's samples, in sample order.

    The one place that decides which voxels are sampled: a function of the
    scan's masks, its plan entry, the seed and, for hard negatives, the
    prior model's probability map ``hardness``, whatever the format.
    """
    rng = np.random.default_rng([config.seed, zlib.crc32(scan_id.encode())])
    if config.mode == "natural":
        chosen = rng.choice(np.flatnonzero(brain | lesion), entry["samples"], replace=False)
    else:
        if config.component_samples is None:
            lesions = rng.choice(np.flatnonzero(lesion), entry["lesion_draws"], replace=False)
        else:
            lesions = _draw_lesions(lesion, config, rng)
        background = np.flatnonzero(brain & ~lesion)
        if hardness is None:
            background = rng.choice(background, entry["background_draws"], replace=False)
        else:
            background = draw_background(background, entry["background_draws"], hardness, config.hard_share, rng)
        chosen = np.concatenate([lesions, background])
    return chosen[rng.permutation(entry["samples"])]


def scan_hardness(config: BuildConfig, entry: dict, shape: tuple[int, ...]) -> np.ndarray | None:
    """The probability map a scan's background draws follow, if the plan gave it one."""
    if config.hard_negatives is None or not entry.get("hard_negatives"):
        return None
    return load_map(config.hard_negatives, entry["scan_id"], shape)


def describe_plan(plan: dict, config: BuildConfig, out_dir: Path, blocks: int | None = None) -> str:
    """What the build will do. ``blocks``: how many blocks the samples fall in, when counted (dry run)."""
    n = plan["samples"]
    shards = plan["num_shards"] or "a number of"
    lines = [
        f"build {config.split} ({config.mode}, norm {config.norm}, seed {config.seed}, {config.format}) -> {out_dir}",
        f"  {len(plan['scans'])} scans; lesion rate {plan['lesion_rate']:.4g}, "
        f"background rate {plan['background_rate']:.4g}",
        f"  {n} samples in {shards} shards",
    ]
    if config.hard_negatives is not None:
        hard = sum(bool(s.get("hard_negatives")) for s in plan["scans"])
        lines.append(
            f"  hard negatives: {100 * config.hard_share:.0f}% of the background draws follow the probability "
            f"maps in {config.hard_negatives} ({hard} of {len(plan['scans'])} scans)"
        )
    if config.component_samples is not None:
        parts = sum(s["lesion_components"] for s in plan["scans"])
        lines.append(
            f"  lesions sampled by component: {parts} components, {config.component_samples} draws each "
            f"(at most {config.max_repeat}x a component's voxels)"
        )
    pairs = FORMATS["pairs"].estimate_bytes(n, math.ceil(n / config.samples_per_record), config.patch, config.block)
    lines.append(f"  as pairs: about {pairs / 2**30:.2f} GiB, {pairs / max(n, 1):,.0f} bytes/sample")
    if blocks is not None:
        size = FORMATS["blocks"].estimate_bytes(n, blocks, config.patch, config.block)
        lines.append(
            f"  as blocks of {config.block}^3: {blocks} blocks, about {size / 2**30:.2f} GiB, "
            f"{size / max(n, 1):,.0f} bytes/sample ({pairs / max(size, 1):.1f}x fewer bytes)"
        )
    lines.append("  (and as much again while building)")
    if config.mode == "balanced":
        les = sum(s["lesion_draws"] for s in plan["scans"])
        lines.append(f"  expected lesion fraction {les / plan['samples']:.4f}")
    return "\n".join(lines + [f"  note: {n}" for n in plan["notes"]])
