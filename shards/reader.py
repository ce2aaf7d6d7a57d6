"""The streaming reader: shards -> shuffled batches of patch pairs as tensors.

A pipeline of small generator stages (after WebDataset's style):
``read_records`` (open each shard, parse the tar, decode and validate
records of either format, skip and count corrupt ones) -> ``batch_samples``
(``shards.pool``: a vectorised shuffle pool over records, which gathers pairs
or cuts them from blocks) -> tensors. ``ShardStream`` splits shards over DDP ranks and DataLoader workers
and, under DDP, gives every rank the same number of batches per epoch.

Usage::

    ds = ShardStream("http://host/shards/", batch_size=256, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    for epoch in range(n):
        ds.set_epoch(epoch)
        for batch in loader:   # x (B,2,25,25,25) uint8, y (B,) int64, loc (B,3), scan [B]
            ...
"""

from __future__ import annotations

import http.client
import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from shards.block_batches import batch_blocks
from shards.pool import batch_samples
from shards.formats import decode_any, format_of, store_for
from shards.schema import RecordError
from shards.sources import NoReadableRecords, Shard, ShardSourceError, open_shard, resolve
from shards.tario import iter_grouped

log = logging.getLogger("shards")
Handler = Callable[[Exception, str], None]
# What a damaged shard or a dropped connection raises while being read.
STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, http.client.HTTPException, RecordError)


# Error policies of ShardStream, ``policy(exc, where)``: named apart from webdataset's handlers on purpose,
# whose contract is ``handler(exn) -> bool`` (``shards.stages`` takes those).
def warn_and_skip_shard(exc: Exception, where: str) -> None:
    """Error policy: log one warning naming the shard, skip the rest of it, go on."""
    log.warning("%s: skipped (%s: %s)", where, type(exc).__name__, exc)


def stop_at_damage(exc: Exception, where: str) -> None:
    """Error policy: stop at the first damaged record."""
    raise ShardSourceError(f"{where}: {type(exc).__name__}: {exc}") from exc


def rank_world() -> tuple[int, int]:
    """(rank, world size): torchrun's environment first, then torch.distributed."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def worker_split() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker, (0, 1) outside one."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShortShard(EOFError):
    """A shard that ends, cleanly, before the records or samples its manifest lists: damage, not a shorter epoch."""


@dataclass
class Stats:
    """Counters a stage updates while the stream runs."""

    records: int = 0
    skipped: int = 0


def read_records(
    shards: Iterable[Shard],
    keep: tuple[int, int] | None = None,
    handler: Handler = warn_and_skip_shard,
    stats: Stats | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    patch: int | None = None,
    fmt: str | None = None,
) -> Iterator[dict]:
    """Decoded records of each shard in turn; corrupt ones are skipped and counted.

    Args:
        keep: ``(i, n)`` keeps only records whose index in the shard is i mod n
            (used when there are fewer shards than readers).
        handler: called once per damaged shard; raise in it to stop.
        patch, fmt: the manifest's patch size and format, when known: a record
            that disagrees is damaged. Without ``fmt`` the first record sets it.

    Raises:
        ShardSourceError: a shard cannot be opened at all (bounded time).
    """
    stats = stats if stats is not None else Stats()
    for shard in shards:
        index, seen, samples, warned = -1, 0, 0, False
        expected = _kept(shard.records, keep)
        stream = open_shard(shard.url, timeout=timeout, retries=retries)
        try:
            for key, fields in iter_grouped(stream):
                index += 1
                if keep is not None and index % keep[1] != keep[0]:
                    continue
                seen += 1
                try:
                    record = decode_any(fields, patch, fmt)
                    fmt = fmt or format_of(fields).name
                except RecordError as exc:
                    stats.skipped += 1
                    if not warned:
                        handler(exc, f"{shard.url} (record {key})")
                        warned = True
                    continue
                stats.records += 1
                samples += len(record["y"])
                yield record
        except STREAM_ERRORS as exc:
            stats.skipped += max(1, expected - seen) if expected is not None else 1
            handler(exc, f"{shard.url} (truncated or unreadable after {index + 1} records)")
        else:
            short = _short(shard, expected, seen, samples, keep is None and not warned)
            if short:
                stats.skipped += max(1, (expected or 0) - seen)
                handler(ShortShard(short), f"{shard.url} (shorter than its manifest)")
        finally:
            stream.close()


def _short(shard: Shard, expected: int | None, seen: int, samples: int, whole: bool) -> str | None:
    """Why a shard that ended cleanly is short of its manifest, or None. ``whole``: every record was read and
    decoded, so its samples can be counted against the manifest's too."""
    if expected is not None and seen < expected:
        return f"{seen} of its {expected} records"
    if whole and shard.samples is not None and samples < shard.samples:
        return f"{samples} of its {shard.samples} samples"
    return None


def _kept(records: int | None, keep: tuple[int, int] | None) -> int | None:
    if records is None or keep is None:
        return records
    i, n = keep
    return len(range(i, records, n))


def to_tensors(batch: dict) -> dict:
    """numpy batch -> ``x (B,2,P,P,P) uint8``, ``y (B,) int64``, ``loc (B,3) int64`` tensors, ``scan`` list.

    A device-cut batch has ``blocks``, ``block_slots``, ``slot`` and ``off`` tensors instead of ``x``; a batch of
    whole blocks (``unit="blocks"``) has ``block``, ``labels``, ``off``, ``owner`` and, from version-4 records,
    ``draws`` (``shards.block_batches``).
    """
    out = {
        "y": torch.from_numpy(batch["y"].astype(np.int64)),
        "loc": torch.from_numpy(batch["loc"].astype(np.int64)),
        "scan": list(batch["scan"]),
    }
    for key in ("x", "blocks", "block_slots", "slot", "off", "block", "labels", "owner", "draws"):
        if key in batch:
            out[key] = torch.from_numpy(np.ascontiguousarray(batch[key]))
    return out


class ShardStream(torch.utils.data.IterableDataset):
    """Batches streamed from shards, split over DDP ranks and DataLoader workers.

    Args:
        source: a shard spec (see ``shards.sources``).
        batch_size: samples per batch; use ``DataLoader(..., batch_size=None)``.
        shuffle: shuffle pool size in samples (0: stream order). Shards are
            already shuffled at build time; the pool mixes records further.
        seed: seeds shard order (same on every rank) and the pools.
        batches_per_epoch: per rank. By default, under DDP (world size > 1)
            it is ``total samples // (world * batch_size)`` from the manifest:
            every rank yields exactly that many full batches, cycling over its
            shards when they run short (no DDP hang). In one process the
            default is one pass over the data, the last batch possibly short
            unless ``drop_last``.
        rank, world_size: override the detection (tests, custom launchers).
        handler: error policy for damaged shards (``warn_and_skip_shard``, ``stop_at_damage``).
        timeout, retries: per HTTP connection; an unreachable shard raises
            ``ShardSourceError`` within about ``retries * (timeout + 2)`` s.
        pool_blocks: with blocks shards and ``shuffle`` > 0, the pool also
            holds at least this many blocks (~350 KB each at 32^3), so that a
            batch mixes many blocks and scans.
        device_cut: with blocks shards, leave the cut to the consumer: batches
            carry new blocks and per-sample (slot, offset) instead of ``x``;
            ``shards.blocks.DeviceCutter`` cuts them on the training device.
        unit: ``"samples"`` (batches of patch pairs) or ``"blocks"``: batches
            of ``batch_size`` whole blocks with their voxel labels, for dense
            training (``shards.block_batches``; blocks shards of schema version
            3); ``shuffle`` then counts blocks, and the epoch's length comes
            from the manifest's record counts.
        heavy_repeat: blocks with expected draws (version 4): a block weighing
            k times the mean is streamed up to this many times (``round(k)``),
            its weights divided alike (``shards.block_batches.batch_blocks``).

    Each batch also carries ``skipped``: records skipped by this reader since
    its previous batch (sum them for the run's total), and ``worker``: the
    DataLoader worker that made it.
    """

    def __init__(
        self,
        source,
        batch_size: int,
        shuffle: int = 1024,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        handler: Handler = warn_and_skip_shard,
        timeout: float = 30.0,
        retries: int = 3,
        pool_blocks: int = 128,
        device_cut: bool = False,
        unit: str = "samples",
        heavy_repeat: int = 1,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        if unit not in ("samples", "blocks"):
            raise ValueError(f"unit is samples or blocks, got {unit!r}")
        self.shards, self.manifest = resolve(source, timeout=min(timeout, 10.0))
        if not self.shards:
            raise ShardSourceError(f"{source}: no shards")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_last, self.handler, self.timeout, self.retries = drop_last, handler, timeout, retries
        self._rank, self._world = rank, world_size
        self.pool_blocks, self.device_cut, self.unit = pool_blocks, device_cut, unit
        self.heavy = None  # blocks: (most repeats, mean expected draws of a block), ``batch_blocks``
        if unit == "blocks" and heavy_repeat > 1 and self.manifest and "draws" in self.manifest.get("totals", {}):
            totals = self.manifest["totals"]
            self.heavy = (heavy_repeat, sum(totals["draws"].values()) / max(1, totals["records"]))
        config = (self.manifest or {}).get("config", {})
        self.patch, self.format = config.get("patch"), (config.get("format", "pairs") if self.manifest else None)
        self.epoch = 0
        _, world = self.rank_world()
        if batches_per_epoch is None and world > 1:
            total = self.total_units
            if total is None:
                raise ShardSourceError(
                    f"{source}: shard {unit} counts are unknown (no manifest beside the shards); "
                    "give batches_per_epoch so every rank runs the same number of steps"
                )
            batches_per_epoch = total // (world * batch_size)
            if batches_per_epoch == 0:
                raise ShardSourceError(f"{source}: {total} {unit} are fewer than one batch per rank")
        self.batches_per_epoch = batches_per_epoch

    @property
    def total_samples(self) -> int | None:
        counts = [s.samples for s in self.shards]
        return None if any(c is None for c in counts) else sum(counts)

    @property
    def total_units(self) -> int | None:
        """What a batch counts, over all shards: samples, or (``unit="blocks"``) records."""
        if self.unit == "samples":
            return self.total_samples
        counts = [s.records for s in self.shards]
        return None if any(c is None for c in counts) else sum(counts)

    def rank_world(self) -> tuple[int, int]:
        if self._rank is not None and self._world is not None:
            return self._rank, self._world
        return rank_world()

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the shard order for a new epoch (call it before iterating)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        total = self.total_units
        if total is None:
            raise TypeError("length unknown: no manifest")
        full, rest = divmod(total, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def assignment(
        self, rank: int, world: int, worker: int, workers: int
    ) -> tuple[list[Shard], tuple[int, int] | None, int | None]:
        """This reader's shards, record filter and batch quota (pure: tested directly)."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        shards = [self.shards[i] for i in order]
        group, members = 0, 1  # readers that share the same shards, split by record
        if len(shards) >= world:
            shards = shards[rank::world]
        else:
            group, members = rank, world
        if len(shards) >= workers:
            shards = shards[worker::workers]
        else:
            group, members = group * workers + worker, members * workers
        quota = None
        if self.batches_per_epoch is not None:
            quota = self.batches_per_epoch // workers + (worker < self.batches_per_epoch % workers)
        return shards, ((group, members) if members > 1 else None), quota

    def __iter__(self) -> Iterator[dict]:
        rank, world = self.rank_world()
        worker, workers = worker_split()
        shards, keep, quota = self.assignment(rank, world, worker, workers)
        stats = Stats()
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker])
        records = self._cycle(shards, keep, stats, rng) if quota is not None else self._read(shards, keep, stats)
        drop_last = self.drop_last or quota is not None
        if self.unit == "blocks":
            batches = batch_blocks(records, self.batch_size, self.shuffle, rng, drop_last, self.heavy)
        else:
            kw = {"store_for": store_for}
            batches = batch_samples(
                records, self.batch_size, self.shuffle, rng, drop_last, self.pool_blocks, self.device_cut, **kw
            )
        reported, held = 0, None

        def handed(batch: dict) -> dict:  # damage counted so far rides on the batch handed out
            nonlocal reported
            out = to_tensors(batch)
            out["skipped"], reported = stats.skipped - reported, stats.skipped
            out["worker"] = worker
            return out

        for i, batch in enumerate(batches):
            if quota is not None:  # the shards cycle: damage found rides on the next batch
                if i >= quota:
                    return
                yield handed(batch)
                continue
            if held is not None:  # one batch ahead: the last one is handed out after the shards end, so it
                yield handed(held)  # carries the damage found at their end too
            held = batch
        if held is not None:
            yield handed(held)

    def _read(self, shards: list[Shard], keep, stats: Stats) -> Iterator[dict]:
        return read_records(shards, keep, self.handler, stats, self.timeout, self.retries, self.patch, self.format)

    def _cycle(self, shards: list[Shard], keep, stats: Stats, rng: np.random.Generator) -> Iterator[dict]:
        """Pass over ``shards`` again and again (reshuffled) until the consumer stops."""
        if not shards:
            return
        while True:
            before = stats.records
            yield from self._read(shards, keep, stats)
            if stats.records == before:
                raise NoReadableRecords(
                    f"no readable records in {len(shards)} shard(s), e.g. {shards[0].url} (damaged, or not shards: "
                    "see the warnings above; atlas-shards verify names each)"
                )
            shards = [shards[i] for i in rng.permutation(len(shards))]
