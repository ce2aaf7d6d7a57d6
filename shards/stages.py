"""The reader's stages in webdataset's form, to compose with webdataset's own.

A stage is a callable from an iterator to an iterator, as in
``webdataset.DataPipeline``; error handlers follow webdataset's contract
(``handler(exn) -> bool``: True skips and goes on, False stops, or it raises)::

    import webdataset as wds
    from shards import stages

    pipeline = wds.DataPipeline(
        wds.SimpleShardList("s3://bucket/train/train-{000000..000031}.tar"),  # or pipe:, http(s)://, paths
        wds.split_by_node, wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        stages.decode(patch=25, fmt="blocks"),      # records of either format, validated
        stages.batched(256, shuffle=4096, seed=0),  # the vectorised shuffle pool; cuts pairs from blocks
    )
    for batch in pipeline:   # x (B,2,25,25,25) uint8, y, loc, scan: as ShardStream's
        ...

``tarfile_to_samples`` yields ``{"__key__", "__url__", "block.npy": bytes, ...}``
samples; ``decode`` turns them into the records of ``shards.schema`` and
``batched`` into the batches ``ShardStream`` yields (it uses the same pool).
``ShardStream`` stays the one-call reader that also balances DDP ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from shards.pool import batch_samples
from shards.formats import decode_any, format_of, store_for
from shards.schema import RecordError

log = logging.getLogger("shards")


def warn_and_continue(exn: Exception) -> bool:
    """webdataset's handler contract: log one warning, skip the record, go on."""
    log.warning("skipped a record (%s: %s)", type(exn).__name__, exn)
    return True


def decode(
    patch: int | None = None, fmt: str | None = None, handler: Callable[[Exception], bool] = warn_and_continue
) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stage: webdataset samples -> validated records (``shards.schema``); damaged ones go to ``handler``.

    ``patch`` and ``fmt`` (the manifest's) make a record of another patch size or
    format damaged; without ``fmt`` the first record sets it.
    """

    def stage(samples: Iterable[dict]) -> Iterator[dict]:
        kind = fmt
        for sample in samples:
            fields = {k: v for k, v in sample.items() if not k.startswith("__")}
            try:
                record = decode_any(fields, patch, kind)
            except RecordError as exc:
                exc.args = (f"{sample.get('__url__')} (record {sample.get('__key__')}): {exc}",)
                if handler(exc):
                    continue
                return
            kind = kind or format_of(fields).name
            yield record

    return stage


def batched(
    batch_size: int,
    shuffle: int = 1024,
    seed: int | Iterable[int] = 0,
    drop_last: bool = False,
    pool_blocks: int = 128,
    device_cut: bool = False,
) -> Callable[[Iterable[dict]], Iterator[dict]]:
    """Stage: records -> tensor batches through the shuffle pool (pairs gathered or cut from blocks)."""
    from shards.reader import to_tensors

    def stage(records: Iterable[dict]) -> Iterator[dict]:
        rng = np.random.default_rng(seed)
        kw = {"store_for": store_for}
        for batch in batch_samples(records, batch_size, shuffle, rng, drop_last, pool_blocks, device_cut, **kw):
            yield to_tensors(batch)

    return stage
