"""What a build's worker passes take (small dataclasses that cross process boundaries as they are), and the
shape of a shard format as the build sees it (``atlas_shards.formats`` registers one per format)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from atlas_shards.plan import BuildConfig


@dataclass(frozen=True)
class SpillJob:
    """Pass 2, one scan: draw its samples and cut them from the store into ``spill``."""

    store: str
    spill: str  # the build's spill directory: this scan's files are spill/{index:06d}.*
    index: int  # the scan's place in the plan
    entry: dict  # the plan's entry for the scan (its counts, offset, ...)
    num_shards: int | None  # where each sample goes, when the format knows before cutting (pairs)
    config: BuildConfig


@dataclass(frozen=True)
class ShardJob:
    """Pass 3, one shard: gather its part of every scan's spill, write the tar, record its counts."""

    out_dir: str
    work: str  # the build's working directory (spill/, shards/)
    k: int
    name: str  # the shard's file name
    plan: dict
    layout: dict  # the format's shard layout (``BuildFormat.layout``)
    config: BuildConfig


@dataclass(frozen=True)
class BuildFormat:
    """A shard format's build passes. ``spill`` and ``write`` run in worker processes (module-level functions).

    ``layout(config, plan, spilled)``: the shard count (``num_shards``) and what else its shard jobs need, once
    every scan is spilled. ``stored(config)``: the manifest's description of the format's records.
    """

    name: str
    cutting: str  # what the progress bar of pass 2 says
    spill: Callable[[SpillJob], dict]
    layout: Callable[[BuildConfig, dict, list[dict]], dict]
    write: Callable[[ShardJob], None]
    stored: Callable[[BuildConfig], dict]
