"""Streaming shards over HTTP from a real server on localhost: nginx with atlas_shards/nginx.conf (CI installs it)."""

from __future__ import annotations

import pytest
import torch

from conftest import need_nginx, sample_ids, tiny_shards
from shards.manifest import read_manifest
from shards.reader import ShardStream
from shards.sources import ShardSourceError
from atlas_shards.serve import serving


@pytest.fixture(scope="module")
def served_dir(tiny_store, tmp_path_factory):
    return tiny_shards(tiny_store, tmp_path_factory, "http", num_shards=3, samples_per_record=16)


@pytest.mark.parametrize("prefer", ["nginx", "python"])
def test_http_stream_equals_local_stream(served_dir, prefer):
    if prefer == "nginx":
        need_nginx()
    local_batches = list(ShardStream(str(served_dir), batch_size=32, seed=5))
    local = sample_ids(local_batches)
    with serving(served_dir.parent, server=prefer) as (base, name):
        assert name.lower().startswith(prefer)
        url = f"{base}/{served_dir.name}/"
        assert read_manifest(url + "manifest.json")["totals"]["samples"] == len(local)
        remote = list(ShardStream(url, batch_size=32, seed=5))
        assert len(remote) == len(local_batches)
        for a, b in zip(local_batches, remote):  # byte for byte: x, y, loc, scan
            assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"]) and torch.equal(a["loc"], b["loc"])
            assert a["scan"] == b["scan"]
        brace = ShardStream(url + "train-{000000..000002}.tar", batch_size=32, seed=5)
        assert brace.total_samples == len(local)  # counts found in the manifest beside the shards
        assert sample_ids(brace) == local
        ranks = [list(ShardStream(url, batch_size=20, rank=r, world_size=2)) for r in range(2)]
        assert len(ranks[0]) == len(ranks[1]) == len(local) // 40
        with pytest.raises(ShardSourceError, match="HTTP 404"):
            list(ShardStream(url + "train-000009.tar", batch_size=8))
