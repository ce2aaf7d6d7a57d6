"""The streaming reader: batches, shuffling, rank/worker splits, damaged shards, sources."""

from __future__ import annotations

import json
import logging
import shutil
import time

import numpy as np
import pytest
import torch

from atlas_shards.serve import free_port
from conftest import build_quietly, sample_ids
from shards.formats import store_for
from shards.reader import ShardStream, batch_samples, read_records, stop_at_damage
from shards.sources import Shard, ShardSourceError, resolve
from shards.common.views import axial_slice, concat_pair, dequantise, single_cube


@pytest.fixture(scope="module")
def pairs_dir(tiny_store, tmp_path_factory):
    """5 pairs shards (odd, to exercise uneven rank splits) of 16-sample records."""
    out = tmp_path_factory.mktemp("reader") / "train"
    build_quietly(tiny_store, out, split="train", format="pairs", num_shards=5, samples_per_record=16)
    return out


@pytest.fixture(scope="module")
def blocks_dir(tiny_store, tmp_path_factory):
    """5 blocks shards."""
    out = tmp_path_factory.mktemp("reader") / "train"
    build_quietly(tiny_store, out, split="train", format="blocks", block=8, num_shards=5)
    return out


@pytest.fixture(params=["pairs", "blocks"])
def shard_dir(request):
    """Either format: the reader behaves the same on both."""
    return request.getfixturevalue(f"{request.param}_dir")


def test_one_pass_yields_every_sample_once_as_tensors(shard_dir):
    ds = ShardStream(str(shard_dir), batch_size=50, shuffle=100, seed=1)
    batches = list(ds)
    total = ds.manifest["totals"]["samples"]
    assert len(batches) == len(ds) == -(-total // 50)
    ids = sample_ids(batches)
    assert len(ids) == len(set(ids)) == total
    b = batches[0]
    assert b["x"].dtype == torch.uint8 and b["x"].shape == (50, 2, 25, 25, 25)
    assert b["y"].dtype == torch.int64 and b["loc"].shape == (50, 3) and len(b["scan"]) == 50
    assert sum(int(b["y"].sum()) for b in batches) == ds.manifest["totals"]["lesion_samples"]
    assert all(b["skipped"] == 0 for b in batches)


def test_shuffle_is_seeded_and_changes_with_the_epoch(shard_dir):
    a = sample_ids(ShardStream(str(shard_dir), batch_size=32, seed=3))
    assert a == sample_ids(ShardStream(str(shard_dir), batch_size=32, seed=3))
    ds = ShardStream(str(shard_dir), batch_size=32, seed=3)
    ds.set_epoch(1)
    b = sample_ids(ds)
    assert a != b and sorted(a) == sorted(b)
    assert a != sample_ids(ShardStream(str(shard_dir), batch_size=32, seed=3, shuffle=0))


def test_pool_batches_are_a_permutation_of_the_stream():
    recs = [
        {
            "x": np.arange(i * 10, i * 10 + 10, dtype=np.uint8).reshape(10, 1),
            "y": np.zeros(10, np.uint8),
            "loc": np.zeros((10, 3), np.int16),
            "scan": ["s"] * 10,
        }
        for i in range(7)
    ]
    out = list(batch_samples(recs, 8, 20, np.random.default_rng(0), drop_last=False, store_for=store_for))
    values = np.concatenate([b["x"].ravel() for b in out])
    assert sorted(values.tolist()) == list(range(70)) and values.tolist() != list(range(70))
    assert [len(b["y"]) for b in out] == [8] * 8 + [6]
    dropped = list(batch_samples(recs, 8, 0, np.random.default_rng(0), drop_last=True, store_for=store_for))
    assert np.concatenate([b["x"].ravel() for b in dropped]).tolist() == list(range(64))


@pytest.mark.parametrize("world", [2, 3, 7])
def test_ranks_get_disjoint_data_and_equal_batch_counts(shard_dir, world):
    streams = [ShardStream(str(shard_dir), batch_size=20, rank=r, world_size=world) for r in range(world)]
    per_rank = [list(s) for s in streams]
    expected = streams[0].manifest["totals"]["samples"] // (world * 20)
    assert [len(b) for b in per_rank] == [expected] * world
    assert all(len(b["y"]) == 20 for batches in per_rank for b in batches)
    seen = [set(sample_ids(batches)) for batches in per_rank]  # what each rank actually yielded
    assert all(not (seen[i] & seen[j]) for i in range(world) for j in range(i))
    assert sum(map(len, seen)) >= world * expected * 20 * 0.5  # and not by yielding next to nothing


def test_dataloader_workers_split_the_shards(shard_dir):
    ds = ShardStream(str(shard_dir), batch_size=25, seed=0)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    ids = sample_ids(batches)
    assert len(ids) == len(set(ids)) == ds.manifest["totals"]["samples"]
    quota = ShardStream(str(shard_dir), batch_size=25, batches_per_epoch=11)
    assert len(list(torch.utils.data.DataLoader(quota, batch_size=None, num_workers=2))) == 11


def _damaged_copy(shard_dir, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(shard_dir, copy)
    names = sorted(p.name for p in copy.glob("*.tar"))
    truncated, corrupt = copy / names[1], copy / names[3]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2 + 123])
    data = bytearray(corrupt.read_bytes())
    at = data.index(b"\x93NUMPY")  # first x.npy header: damage its magic
    data[at : at + 6] = b"GARBAG"
    corrupt.write_bytes(bytes(data))
    return copy, names


def test_damaged_shards_are_skipped_counted_and_named_once(pairs_dir, tmp_path, caplog):
    shard_dir = pairs_dir
    copy, names = _damaged_copy(shard_dir, tmp_path)
    ds = ShardStream(str(copy), batch_size=16, shuffle=0)
    with caplog.at_level(logging.WARNING, logger="shards"):
        batches = list(ds)
    delivered = set(sample_ids(batches))
    whole = {}
    for shard in resolve(str(shard_dir))[0]:  # the pristine shards: which records came through whole
        recs = [set(sample_ids([r])) for r in read_records([shard])]
        assert all(r <= delivered or not (r & delivered) for r in recs)
        whole[shard.url.rsplit("/", 1)[1]] = sum(r <= delivered for r in recs)
    assert whole == {n: 10 if n == names[3] else 5 if n == names[1] else 11 for n in names}
    assert sum(b["skipped"] for b in batches) == 7  # 6 records cut off, 1 corrupt
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and any(names[1] in w for w in warned) and any(names[3] in w for w in warned)
    with pytest.raises(ShardSourceError, match=names[3]):
        list(ShardStream(str(copy / names[3]), batch_size=16, handler=stop_at_damage))


def test_a_shard_shorter_than_its_manifest_is_damage_not_a_shorter_epoch(shard_dir, tmp_path, caplog):
    from shards.tario import iter_grouped, write_shard

    copy = tmp_path / "short"
    shutil.copytree(shard_dir, copy)
    names = sorted(p.name for p in copy.glob("*.tar"))
    with open(copy / names[0], "rb") as f:
        records = list(iter_grouped(f))
    write_shard(copy / names[0], records[:-2])  # a whole tar, cut at a record boundary: two records gone
    (copy / names[2]).write_bytes(b"")  # a zero-byte shard
    counts = {s.url.rsplit("/", 1)[1]: s.records for s in resolve(str(shard_dir))[0]}
    with caplog.at_level(logging.WARNING, logger="shards"):
        batches = list(ShardStream(str(copy), batch_size=4, shuffle=0))
    assert sum(b["skipped"] for b in batches) == 2 + counts[names[2]]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned  # once a shard, each named
    assert any(names[0] in w and f"{len(records) - 2} of its {len(records)} records" in w for w in warned)
    assert any(names[2] in w for w in warned)
    with pytest.raises(ShardSourceError, match=f"{names[0]} .*ShortShard"):
        list(ShardStream(str(copy / names[0]), batch_size=4, handler=stop_at_damage))


def test_a_record_that_lost_samples_is_named(pairs_dir, tmp_path, caplog):
    from shards.schema import decode_npy, encode_npy
    from shards.tario import iter_grouped, write_shard

    copy = tmp_path / "fewer"
    shutil.copytree(pairs_dir, copy)
    name = sorted(p.name for p in copy.glob("*.tar"))[0]
    with open(copy / name, "rb") as f:
        records = list(iter_grouped(f))
    key, fields = records[0]
    k = len(decode_npy(fields["y.npy"])) - 1  # one sample fewer in the first record, consistently
    fields = {
        "x.npy": encode_npy(decode_npy(fields["x.npy"])[:k]),
        "y.npy": encode_npy(decode_npy(fields["y.npy"])[:k]),
        "loc.npy": encode_npy(decode_npy(fields["loc.npy"])[:k]),
        "scan.json": json.dumps(json.loads(fields["scan.json"])[:k]).encode(),
    }
    write_shard(copy / name, [(key, fields)] + records[1:])
    with caplog.at_level(logging.WARNING, logger="shards"):
        batches = list(ShardStream(str(copy / name), batch_size=4, shuffle=0))
    assert any("samples" in r.getMessage() and name in r.getMessage() for r in caplog.records)
    assert sum(b["skipped"] for b in batches) == 1


def test_ddp_ranks_stay_equal_when_a_shard_is_damaged(shard_dir, tmp_path):
    copy, _ = _damaged_copy(shard_dir, tmp_path)
    counts = [len(list(ShardStream(str(copy), batch_size=20, rank=r, world_size=2))) for r in range(2)]
    assert counts[0] == counts[1] > 0


def test_sources_brace_patterns_and_missing_paths(shard_dir):
    shards, manifest = resolve(str(shard_dir / "train-{000000..000004}.tar"))
    assert len(shards) == 5 and manifest is not None and all(s.samples for s in shards)
    shards, _ = resolve([str(shard_dir / "train-000000.tar"), str(shard_dir / "manifest.json")])
    assert len(shards) == 6
    with pytest.raises(ShardSourceError, match="no such shard"):
        resolve(str(shard_dir / "train-{000000..000009}.tar"))
    with pytest.raises(ShardSourceError, match="manifest"):
        resolve(str(shard_dir.parent))


def test_unreachable_url_fails_clearly_in_bounded_time():
    url = f"http://127.0.0.1:{free_port()}/train-000000.tar"
    start = time.monotonic()
    with pytest.raises(ShardSourceError, match=f"{url.rsplit('/', 1)[0]}.*unreachable"):
        list(ShardStream(url, batch_size=8, timeout=1.0, retries=2))  # the manifest beside it, first
    with pytest.raises(ShardSourceError, match="unreachable after 2 tries"):
        list(read_records([Shard(url)], timeout=1.0, retries=2))
    assert time.monotonic() - start < 60  # a guard against a hang (4 tries of about 1-3 s each), not a speed test


def test_unknown_counts_under_ddp_need_an_explicit_epoch_length(shard_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(shard_dir / "train-000000.tar", bare)
    with pytest.raises(ShardSourceError, match="batches_per_epoch"):
        ShardStream(str(bare / "train-000000.tar"), batch_size=8, rank=0, world_size=2)
    ds = ShardStream(str(bare / "train-000000.tar"), batch_size=8, rank=1, world_size=2, batches_per_epoch=3)
    assert len(list(ds)) == 3


def test_plain_webdataset_reads_the_shards(pairs_dir, blocks_dir):
    wds = pytest.importorskip("webdataset")
    sample = next(iter(wds.WebDataset(str(pairs_dir / "train-000000.tar"), shardshuffle=False).decode()))
    assert sample["x.npy"].shape == (16, 2, 25, 25, 25) and sample["x.npy"].dtype == np.uint8
    assert sample["y.npy"].shape == (16,) and sample["loc.npy"].shape == (16, 3) and len(sample["scan.json"]) == 16
    sample = next(iter(wds.WebDataset(str(blocks_dir / "train-000000.tar"), shardshuffle=False).decode()))
    k = len(sample["y.npy"])
    assert sample["block.npy"].shape == (2, 32, 32, 32) and sample["off.npy"].shape == (k, 3)
    assert set(sample["meta.json"]) == {"scan", "origin", "patch", "background_draws"}


def test_views():
    x = torch.arange(2 * 2 * 5**3, dtype=torch.int32).reshape(2, 2, 5, 5, 5).to(torch.uint8)
    assert single_cube(x).shape == (2, 1, 5, 5, 5)
    cat = concat_pair(x)
    assert cat.shape == (2, 1, 10, 5, 5)
    assert torch.equal(cat[:, 0, :5], x[:, 0]) and torch.equal(cat[:, 0, 5:], x[:, 1])
    assert torch.equal(axial_slice(x), x[:, 0, :, :, 2])
    assert dequantise(torch.tensor([0, 255], dtype=torch.uint8), {"offset": 0, "scale": 1 / 255}).tolist() == [0, 1]


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "../../outside.tar"}, 'shards\\[0\\].name "../../outside.tar" is not a file name'),
        ({"name": "/etc/hostname"}, 'shards\\[0\\].name "/etc/hostname" is not a file name'),
        ({"name": ".."}, 'shards\\[0\\].name ".." is not a file name'),
        ({"samples": -5}, "shards\\[0\\].samples is -5, not a count"),
        ({"records": "12"}, 'shards\\[0\\].records is "12", not a count'),
    ],
)
def test_manifest_shard_entries_stay_in_the_directory_and_count(pairs_dir, tmp_path, entry, message):
    import json

    from shards.manifest import ManifestError, read_manifest

    copy = tmp_path / "shards"
    shutil.copytree(pairs_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0].update(entry)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=f"^{copy}: {message}"):
        read_manifest(copy)
    with pytest.raises(ShardSourceError, match=message):  # the trainer's and evaluator's reader: the same words
        ShardStream(str(copy), batch_size=4)
