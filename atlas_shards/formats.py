"""The shard formats the build writes, one registration each: ``atlas-shards build --format NAME``.

A format is a module of its own with its two worker passes (spill a scan,
write a shard), its shard layout and its manifest description
(``build_pairs``, ``build_blocks``), registered here; ``atlas_shards.build``
calls it and branches on no format's name. The records' contract (keys,
dtypes, decoding) is ``shards.schema``.
"""

from __future__ import annotations

from atlas_shards.build_blocks import block_layout, spill_blocks, stored_blocks, write_block_shard
from atlas_shards.build_jobs import BuildFormat
from atlas_shards.build_pairs import pair_layout, spill_pairs, stored_pairs, write_pair_shard

FORMATS = {
    f.name: f
    for f in (
        BuildFormat("blocks", "cut blocks", spill_blocks, block_layout, write_block_shard, stored_blocks),
        BuildFormat("pairs", "cut pairs", spill_pairs, pair_layout, write_pair_shard, stored_pairs),
    )
}
