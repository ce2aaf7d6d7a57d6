"""Streaming shards over HTTP from a real server on localhost: nginx running docker/nginx.conf (CI installs it)."""

from __future__ import annotations

import pytest

from conftest import build_quietly, sample_ids
from shards.manifest import read_manifest
from shards.reader import ShardStream
from shards.sources import ShardSourceError
from atlas_shards.serve import find_nginx, serving


@pytest.fixture(scope="module")
def served_dir(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("http") / "train"
    build_quietly(tiny_store, out, split="train", num_shards=3, samples_per_record=16)
    return out


@pytest.mark.parametrize("prefer", ["nginx", "python"])
def test_http_stream_equals_local_stream(served_dir, prefer):
    if prefer == "nginx" and not find_nginx():
        pytest.skip("nginx not installed (CI installs Debian's nginx)")
    local = sample_ids(ShardStream(str(served_dir), batch_size=32, seed=5))
    with serving(served_dir.parent, server=prefer) as (base, name):
        assert name.lower().startswith(prefer)
        url = f"{base}/{served_dir.name}/"
        assert read_manifest(url + "manifest.json")["totals"]["samples"] == len(local)
        assert sample_ids(ShardStream(url, batch_size=32, seed=5)) == local
        brace = ShardStream(url + "train-{000000..000002}.tar", batch_size=32, seed=5)
        assert brace.total_samples == len(local)  # counts found in the manifest beside the shards
        assert sample_ids(brace) == local
        ranks = [list(ShardStream(url, batch_size=20, rank=r, world_size=2)) for r in range(2)]
        assert len(ranks[0]) == len(ranks[1]) == len(local) // 40
        with pytest.raises(ShardSourceError, match="HTTP 404"):
            list(ShardStream(url + "train-000009.tar", batch_size=8))
