"""The blocks format's two build passes (``atlas-shards build --format blocks``).

*spill* (per scan): draw the scan's samples (``plan.draw_voxels``, the same
samples a pairs build takes), group them by the ``block``^3 tile of the grid
they fall in, order the blocks heaviest first (seeded among equals), and
write each block pair (``shards.blocks.BlockCutter``) with its samples,
its core's lesion and brain masks (bit-packed) and its lesion voxels'
expected draws (``expected_draws``) to ``.build/spill/``.

*shard* (per shard): the blocks of scan i, heaviest first, are dealt over
the S shards in a snake from shard offset_i on (``shard_blocks``), offset_i
being the number of blocks of the scans before it, so every shard holds
blocks of every scan (a scan has about a hundred blocks at 32^3), block
counts differ by at most one, and sample counts stay close. The shard's blocks are shuffled (seeded per
shard) and written one record a block.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from atlas_shards import store as zstore
from atlas_shards.build_jobs import ShardJob, SpillJob
from atlas_shards.plan import BuildConfig, component_draws, draw_voxels, lesion_components, scan_hardness, shards_for
from atlas_shards.spill import write_spill
from shards.common.atomic import atomic_write_text
from shards.blocks import BlockCutter, block_size, group_by_block
from shards.norm import normalise
from shards.block_records import encode_block_record, pack_labels, unpack_labels
from shards.schema import LOC_DTYPE, record_key
from shards.tario import write_shard


def _blocks_of(store_path: str, entry: dict, config: BuildConfig, with_t1: bool):
    """(scan data, labels, locs, order, starts) of one scan's samples grouped by block."""
    scan_id = entry["scan_id"]
    root = zstore.open_store(store_path, "r")
    data = zstore.read_scan(root, scan_id, zstore.ARRAYS if with_t1 else ("lesion", "brain"))
    lesion, brain = data["lesion"] > 0, data["brain"] > 0
    chosen = draw_voxels(lesion, brain, scan_id, entry, config, scan_hardness(config, entry, lesion.shape))
    labels = lesion.ravel()[chosen].astype(np.uint8)
    locs = np.stack(np.unravel_index(chosen, lesion.shape), axis=1).astype(LOC_DTYPE)
    order, starts = group_by_block(locs, lesion.shape, config.block)
    return root, data, labels, locs, order, starts


def count_blocks(job: SpillJob) -> int:
    """Worker (dry run): how many blocks one scan's samples fall in."""
    return len(_blocks_of(job.store, job.entry, job.config, with_t1=False)[5]) - 1


def spill_blocks(job: SpillJob) -> dict:
    """Worker: one scan's blocks and their samples, heaviest block first; returns its counts."""
    config, scan_id = job.config, job.entry["scan_id"]
    root, data, labels, locs, order, starts = _blocks_of(job.store, job.entry, config, with_t1=True)
    nb, n = len(starts) - 1, config.block
    # Heaviest blocks first (seeded order among equals): dealt in a snake over
    # the shards (``shard_blocks``), they even out the shards' sample counts.
    ties = np.random.default_rng([config.seed, zlib.crc32(scan_id.encode()), 0xB10C]).random(nb)
    perm = np.lexsort((ties, -np.diff(starts)))
    origins = (locs[order[starts[:-1]]] // n * n).astype(np.int64)[perm]
    members = [order[starts[b] : starts[b + 1]] for b in perm]
    counts = np.array([len(m) for m in members], dtype=np.int64)
    sample = np.concatenate(members) if members else np.zeros(0, np.int64)
    off = (locs[sample] - np.repeat(origins, counts, axis=0)).astype(LOC_DTYPE)
    lesion_draws, background_draws = expected_draws(data["lesion"] > 0, job.entry, config)
    packed, voxels, draws = _core_labels(data["lesion"] > 0, data["brain"] > 0, lesion_draws, origins, n)
    mirror = float(root[scan_id].attrs["mirror_index"])
    cutter = BlockCutter(normalise(data.pop("t1"), data["brain"], config.norm), mirror, config.patch, n)
    s = block_size(n, config.patch)
    return write_spill(
        Path(job.spill) / f"{job.index:06d}",
        "blocks",
        (nb, 2, s, s, s),
        (cutter(o) for o in origins),
        {
            "y": labels[sample],
            "off": off,
            "origins": origins,
            "counts": counts,
            "labels": packed,
            "voxels": voxels,
            "draws": draws,
            "background_draws": np.array([background_draws]),
        },
        {"samples": int(len(sample)), "lesion_samples": int(labels.sum()), "blocks": int(nb)},
    )


def expected_draws(lesion: np.ndarray, entry: dict, config: BuildConfig) -> tuple[np.ndarray, float]:
    """How often the plan's sampling draws each voxel, in expectation: a float32 volume for the lesion voxels
    (0 elsewhere) and one number for every background voxel (uniform draws; a hard-negative build's background
    draws follow its maps, which this number averages).

    Sampling by component gives a component of size s its ``component_draws`` d, each voxel d / s times
    (``plan._draw_lesions``); otherwise every lesion voxel of the scan is drawn alike.
    """
    out = np.zeros(lesion.shape, np.float32)
    if config.component_samples is not None:
        labels, sizes = lesion_components(lesion)
        rate = np.concatenate([[0.0], component_draws(config, sizes) / np.maximum(sizes, 1)]).astype(np.float32)
        out = rate[labels]
    elif entry["lesion_voxels"]:
        out[lesion] = entry["lesion_draws"] / entry["lesion_voxels"]
    background = entry["background_draws"] / entry["background_voxels"] if entry["background_voxels"] else 0.0
    return out, float(background)


def _core_labels(
    lesion: np.ndarray, brain: np.ndarray, lesion_draws: np.ndarray, origins: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each block's core masks, bit-packed (``(B, 2, ceil(n^3/8))``), its lesion and background voxel counts
    (``(B, 2)``; background: brain voxels that are not lesion, as the plan counts them), and its lesion voxels'
    expected draws (every block's, in block then C order: ``(sum of the lesion counts,)``)."""
    pad = ((0, n), (0, n), (0, n))  # past the volume's end: no lesion, no brain
    lesion, brain, lesion_draws = np.pad(lesion, pad), np.pad(brain, pad), np.pad(lesion_draws, pad)
    packed = np.zeros((len(origins), 2, -(-(n**3) // 8)), np.uint8)
    voxels = np.zeros((len(origins), 2), np.int64)
    draws = []
    for b, (i, j, k) in enumerate(origins):
        core = np.stack([lesion[i : i + n, j : j + n, k : k + n], brain[i : i + n, j : j + n, k : k + n]])
        packed[b] = pack_labels(core)
        voxels[b] = int(core[0].sum()), int((core[1] & ~core[0]).sum())
        draws.append(lesion_draws[i : i + n, j : j + n, k : k + n][core[0]])
    return packed, voxels, np.concatenate(draws).astype(np.float32) if draws else np.zeros(0, np.float32)


def block_layout(config: BuildConfig, plan: dict, spilled: list[dict]) -> dict:
    """Shard count and each scan's block offset, from the spilled block counts (deterministic)."""
    blocks = [s["blocks"] for s in spilled]
    samples = sum(s["samples"] for s in spilled)
    num_shards = shards_for(config, samples, max(1, sum(blocks)))
    return {"num_shards": num_shards, "offsets": [int(v) for v in np.cumsum([0] + blocks[:-1])]}


def stored_blocks(config: BuildConfig) -> dict:
    """The manifest's description of a blocks record."""
    size = block_size(config.block, config.patch)
    return {
        "block": {
            "dtype": "uint8",
            "shape": [2, size, size, size],
            "block": config.block,
            "channels": ["volume", "mirrored volume"],
            "extent": "padded pair from the block's first voxel",
        },
        "off": {"dtype": "int16", "shape": [3], "range": [0, config.block - 1]},
        "meta": {"scan": "str", "origin": "block's first voxel, store canonical RAS", "patch": config.patch},
        "labels": {
            "dtype": "uint8",
            "shape": [2, -(-(config.block**3) // 8)],
            "rows": ["lesion", "brain"],
            "extent": "the block's core: origin .. origin + block - 1, C order, numpy.packbits",
        },
    }


def shard_blocks(k: int, offset: int, blocks: int, shards: int) -> np.ndarray:
    """Which of a scan's ``blocks`` go to shard ``k``: a snake deal from shard ``offset`` on.

    Block r sits in round q = r // S at position j = r % S (reversed in odd
    rounds) and goes to shard (offset + j) mod S. With the blocks heaviest
    first, each round gives the shards that got the lighter blocks of the last
    round the heavier ones of this round.
    """
    j = (k - offset) % shards
    rounds = np.arange(-(-blocks // shards))
    r = rounds * shards + np.where(rounds % 2 == 0, j, shards - 1 - j)
    return r[r < blocks]


def write_block_shard(job: ShardJob) -> None:
    """Worker: shard k's blocks from every scan's spill, shuffled, one record a block."""
    config, plan, layout, k, work = job.config, job.plan, job.layout, job.k, job.work
    num = layout["num_shards"]
    picks = []  # (scan index, block index in the scan's spill)
    spills = {}
    for i in range(len(plan["scans"])):
        base = Path(work) / "spill" / f"{i:06d}"
        counts = np.load(f"{base}.counts.npy")
        mine = shard_blocks(k, layout["offsets"][i], len(counts), num)
        if len(mine):
            starts = np.concatenate([[0], np.cumsum(counts)])
            spills[i] = (
                np.load(f"{base}.blocks.npy", mmap_mode="r"),
                np.load(f"{base}.off.npy", mmap_mode="r"),
                np.load(f"{base}.y.npy", mmap_mode="r"),
                np.load(f"{base}.origins.npy"),
                starts,
                np.load(f"{base}.labels.npy", mmap_mode="r"),
                np.load(f"{base}.voxels.npy"),
                np.load(f"{base}.draws.npy", mmap_mode="r"),
                float(np.load(f"{base}.background_draws.npy")[0]),
            )
            picks += [(i, int(r)) for r in mine]
    perm = np.random.default_rng([config.seed, k, 0x5EED]).permutation(len(picks))
    samples = lesion = 0
    voxels = np.zeros(2, np.int64)  # the cores' lesion and background voxels
    draws = np.zeros(2, np.float64)  # and their expected draws

    def records() -> Iterable[tuple[str, dict[str, bytes]]]:
        nonlocal samples, lesion, voxels, draws
        n = config.block
        for r, j in enumerate(perm):
            i, b = picks[j]
            blocks, off, y, origins, starts, packed, counts, lesion_draws, background_draws = spills[i]
            a, z = starts[b], starts[b + 1]
            samples, lesion = samples + int(z - a), lesion + int(y[a:z].sum())
            voxels = voxels + counts[b]
            first = int(counts[:b, 0].sum())  # this block's lesion voxels' draws, in the scan's concatenation
            core_draws = np.asarray(lesion_draws[first : first + counts[b, 0]])
            draws = draws + (float(core_draws.sum(dtype=np.float64)), background_draws * int(counts[b, 1]))
            yield (
                record_key(k, r),
                encode_block_record(
                    np.asarray(blocks[b]),
                    np.asarray(off[a:z]),
                    np.asarray(y[a:z]),
                    plan["scans"][i]["scan_id"],
                    origins[b],
                    config.patch,
                    labels=unpack_labels(np.asarray(packed[b]), n),
                    draws=(core_draws, background_draws),
                ),
            )

    path = Path(job.out_dir) / job.name
    sha = write_shard(path, records())
    info = {
        "name": job.name,
        "samples": samples,
        "lesion_samples": lesion,
        "records": len(picks),
        "voxels": {"lesion": int(voxels[0]), "background": int(voxels[1])},
        "draws": {"lesion": float(draws[0]), "background": float(draws[1])},
        "bytes": path.stat().st_size,
        "sha256": sha,
    }
    atomic_write_text(Path(work) / "shards" / f"{k:06d}.json", json.dumps(info))
