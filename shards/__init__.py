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
- ``shards.views``: model-specific views of a batch;
- ``shards.atomic``: output written to a temporary name, renamed into place;
- ``shards.params`` and ``shards.cli_errors``: what the three command lines
  share (validated argument types; one-line errors, ``--debug``);
- ``shards.scores``: confusion counts and voxel Dice/precision/recall, the one
  formula of the training curve, stream scores and whole-volume metrics;
- ``shards.tables``: small CSV tables written atomically;
- ``shards.remote`` and ``shards.stages``: where bytes come from (local,
  http(s), object storage through fsspec, ``pipe:``) and the reader's stages
  in webdataset's form.

This package imports none of ``atlas_shards``, ``trainer`` or ``evaluate``.
Heavy modules (the reader needs torch) are imported from their submodules.
"""

from shards.atomic import atomic_path, atomic_write_bytes, atomic_write_text, check_output_dir, save_figure

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "check_output_dir", "save_figure"]
