"""The shard contract's two record formats, one object each: ``FORMATS["pairs"]``, ``FORMATS["blocks"]``.

A format owns how its records are told apart (the tar member only they have),
decoded and validated (``shards.schema``), sampled by the reader's shuffle
pool (its store: ``shards.pool``), how many bytes its shards take, and how the
manifest's summary describes them. The reader, the stages, the manifest and
the build's plan ask it and branch on no format's name; the build's own passes
are registered beside (``atlas_shards.formats``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shards.pool import BlockStore, PairStore
from shards.schema import (
    BLOCK,
    BLOCK_NPY,
    RecordError,
    block_bytes,
    bytes_per_sample,
    decode_block_record,
    decode_record,
)

RECORD_OVERHEAD = 3 * 1024  # tar headers, padding and .npy headers of one record (about)


@dataclass(frozen=True)
class RecordFormat:
    """``decode(fields, patch)``: a record's validated arrays. ``store(patch, device_cut)``: the shuffle pool's
    store of such records. ``estimate_bytes(samples, records, patch, block)``: shard bytes. ``describe(manifest)``:
    how the manifest's summary says the samples are stored. ``records_for(samples, samples_per_record)``: how
    many records hold them, None when that is known only once they are cut (blocks: the blocks they fall in).
    ``max_shards(samples, records)``: the most shards they can fill."""

    name: str
    decode: Callable[[dict[str, bytes], int | None], dict]
    store: Callable[[int, bool], PairStore | BlockStore]
    estimate_bytes: Callable[[int, int, int, int], int]
    describe: Callable[[dict], str]
    records_for: Callable[[int, int], int | None]
    max_shards: Callable[[int, int], int]


def _pairs_bytes(samples: int, records: int, patch: int, block: int = BLOCK) -> int:
    return samples * (bytes_per_sample(patch) + 16) + records * RECORD_OVERHEAD


def _blocks_bytes(samples: int, records: int, patch: int, block: int = BLOCK) -> int:
    return records * (block_bytes(block, patch) + RECORD_OVERHEAD) + samples * 7


def _describe_pairs(manifest: dict) -> str:
    return f"{manifest['config']['samples_per_record']} samples/record"


def _describe_blocks(manifest: dict) -> str:
    records = sum(s["records"] for s in manifest["shards"])
    samples = manifest["totals"]["samples"]
    return f"{records} blocks of {manifest['config']['block']}^3 voxels, {samples / max(records, 1):.1f} samples/block"


FORMATS = {
    "pairs": RecordFormat(
        "pairs",
        decode_record,
        lambda patch, device_cut: PairStore(),
        _pairs_bytes,
        _describe_pairs,
        records_for=lambda samples, per_record: -(-samples // per_record),
        max_shards=lambda samples, records: samples,  # the build spreads a shard's samples one by one
    ),
    "blocks": RecordFormat(
        "blocks",
        decode_block_record,
        BlockStore,
        _blocks_bytes,
        _describe_blocks,
        records_for=lambda samples, per_record: None,
        max_shards=lambda samples, records: records,  # whole blocks go to shards
    ),
}


def format_of(fields: dict[str, bytes]) -> RecordFormat:
    """The format of a record, from the members it has (only a blocks record has ``block.npy``)."""
    return FORMATS["blocks" if BLOCK_NPY in fields else "pairs"]


def decode_any(fields: dict[str, bytes], patch: int | None = None, fmt: str | None = None) -> dict:
    """A record of either format, checked against the stream's ``fmt`` when it is known."""
    kind = format_of(fields)
    if fmt is not None and kind.name != fmt:
        raise RecordError(f"a {kind.name} record in a stream of {fmt} shards")
    return kind.decode(fields, patch)


def store_for(record: dict, device_cut: bool = False) -> PairStore | BlockStore:
    """The shuffle pool's store for a stream whose first decoded record is ``record``."""
    return FORMATS["blocks" if "block" in record else "pairs"].store(record.get("patch"), device_cut)
