"""The shard contract shared by the sharder, the trainer and the evaluator.

- ``shards.schema``: record keys, dtypes, shapes and schema version of both
  formats (blocks, pairs);
- ``shards.norm`` and ``shards.patches``: the normalisation and pair cutting
  that the build and the evaluator both use;
- ``shards.blocks``: blocks of the grid, and pairs cut from them (numpy on
  the CPU, torch on any device: ``DeviceCutter``);
- ``shards.manifest``: ``manifest.json`` read/write/verify;
- ``shards.sources``, ``shards.pool`` and ``shards.reader``: the streaming
  reader (sources, the shuffle pool, the stream);
- ``shards.remote`` and ``shards.stages``: where bytes come from (local,
  http(s), object storage through fsspec, ``pipe:``) and the reader's stages
  in webdataset's form.

What the packages share that is not about shards (atomic output and figures,
the command lines' plumbing, CSV tables, voxel scores, model input views)
lives in ``shards.common``. This package imports none of ``atlas_shards``,
``trainer`` or ``evaluate``.
Heavy modules (the reader needs torch) are imported from their submodules.
"""
