"""Blocks shards: the same samples as pairs in fewer bytes, cut exactly, read like pairs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from atlas_shards import build_blocks
from atlas_shards import store as zstore
from atlas_shards.build import BuildConfig, build
from conftest import build_killed_after_one_shard, build_quietly, sample_ids
from shards.blocks import BlockCutter, DeviceCutter, cut_pairs, cut_pairs_torch, group_by_block
from shards.manifest import read_manifest, verify
from shards.norm import normalise
from shards.patches import extract_pairs
from shards.reader import ShardStream, read_records
from shards.block_records import decode_block_record, encode_block_record
from shards.schema import decode_npy, encode_npy
from shards.sources import resolve
from shards.tario import iter_grouped, write_shard

CONFIG = dict(split="train", num_shards=3, block=8)


@pytest.fixture(scope="module")
def both(tiny_store, tmp_path_factory):
    """The same configuration built in both formats."""
    base = tmp_path_factory.mktemp("formats")  # blocks of 8^3: tiny volumes, many blocks a scan
    blocks = build_quietly(tiny_store, base / "blocks", **CONFIG)
    pairs = build_quietly(tiny_store, base / "pairs", format="pairs", samples_per_record=16, **CONFIG)
    return base, blocks, pairs


def _samples(records) -> list[tuple]:
    """(scan, i, j, k, label, pair bytes) of every sample of pairs or blocks records."""
    out = []
    for rec in records:
        if "block" in rec:
            x = cut_pairs(rec["block"][None], np.zeros(len(rec["y"]), int), rec["off"], rec["patch"])
            scans = [rec["scan"]] * len(rec["y"])
        else:
            x, scans = rec["x"], rec["scan"]
        out += [(s, *loc, int(y), xi.tobytes()) for s, loc, y, xi in zip(scans, rec["loc"].tolist(), rec["y"], x)]
    return out


def _records(out_dir):
    return list(read_records(resolve(str(out_dir))[0]))


def test_both_formats_carry_the_same_samples_and_the_stores_cubes(tiny_store, both):
    base, blocks, pairs = both
    a, b = _samples(_records(base / "blocks")), _samples(_records(base / "pairs"))
    assert len(a) == len(set(a)) == blocks["totals"]["samples"] == pairs["totals"]["samples"] > 0
    assert sorted(a) == sorted(b)  # the same multiset of (scan, voxel, label, pair bytes)
    # ...and each pair equals an independent cut from the store's whole volume
    root = zstore.open_store(tiny_store)
    for scan, *loc, y, x in a[::7]:
        data = zstore.read_scan(root, scan)
        vol = normalise(data["t1"], data["brain"], "histeq")
        assert x == extract_pairs(vol, root[scan].attrs["mirror_index"], np.array([loc]), 25)[0].tobytes()
        assert y == data["lesion"][tuple(loc)]


def test_every_sample_in_one_record_every_shard_mixes_every_scan(both):
    base, blocks, _ = both
    seen, origins = set(), set()
    for shard in resolve(str(base / "blocks"))[0]:
        recs = list(read_records([shard]))
        assert {r["scan"] for r in recs} == {s["scan_id"] for s in blocks["scans"]}
        for r in recs:
            assert (r["scan"], *r["origin"].tolist()) not in origins  # one record a block
            origins.add((r["scan"], *r["origin"].tolist()))
            assert np.all(r["origin"] % 8 == 0) and np.all((r["off"] >= 0) & (r["off"] < 8))
            ids = {(r["scan"], *loc) for loc in r["loc"].tolist()}
            assert not ids & seen
            seen |= ids
    assert len(seen) == blocks["totals"]["samples"]


def test_every_voxel_label_of_a_block_equals_the_stores_masks(tiny_store, both):
    base, blocks, _ = both
    root, n = zstore.open_store(tiny_store), blocks["config"]["block"]
    pad = ((0, n), (0, n), (0, n))
    masks = {s["scan_id"]: zstore.read_scan(root, s["scan_id"], ("lesion", "brain")) for s in blocks["scans"]}
    totals = np.zeros(2, np.int64)
    for rec in _records(base / "blocks"):
        data, (i, j, k) = masks[rec["scan"]], rec["origin"].tolist()
        lesion, brain = (np.pad(data[m] > 0, pad)[i : i + n, j : j + n, k : k + n] for m in ("lesion", "brain"))
        assert rec["labels"].shape == (2, n, n, n) and rec["labels"].dtype == np.uint8
        assert np.array_equal(rec["labels"][0], lesion) and np.array_equal(rec["labels"][1], brain)
        totals += int(lesion.sum()), int((brain & ~lesion).sum())
    assert blocks["totals"]["voxels"] == {"lesion": int(totals[0]), "background": int(totals[1])}
    # every lesion voxel is sampled (rate 1), so every one lies in a stored block's core
    assert totals[0] == sum(s["lesion_voxels"] for s in blocks["scans"]) > 0
    assert blocks["totals"]["voxels"] == {
        k: sum(s["voxels"][k] for s in blocks["shards"]) for k in ("lesion", "background")
    }


def test_manifest_records_format_block_and_bytes(both):
    base, blocks, pairs = both
    assert read_manifest(base / "blocks") == blocks
    assert blocks["format"] == blocks["config"]["format"] == "blocks" and blocks["config"]["block"] == 8
    assert pairs["format"] == "pairs" and blocks["schema_version"] == 4
    assert blocks["totals"]["records"] == sum(s["records"] for s in blocks["shards"])
    assert blocks["totals"]["bytes"] == sum((base / "blocks" / s["name"]).stat().st_size for s in blocks["shards"])
    assert blocks["totals"]["bytes_per_sample"] < pairs["totals"]["bytes_per_sample"] / 3
    assert verify(base / "blocks") == [] and verify(base / "pairs") == []


def test_a_version_1_manifest_reads_as_pairs(both, tmp_path):
    base, _, pairs = both
    shutil.copytree(base / "pairs", tmp_path / "old")
    old = json.loads((tmp_path / "old" / "manifest.json").read_text())
    old["schema_version"] = 1
    for key in ("format",):
        old.pop(key)
    old["config"].pop("format")
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(old))
    assert read_manifest(tmp_path / "old")["format"] == "pairs"
    assert len(sample_ids(ShardStream(str(tmp_path / "old"), batch_size=64))) == pairs["totals"]["samples"]


@pytest.mark.parametrize(
    "shape,mirror", [((20, 18, 17), 9.5), ((21, 18, 17), 10.0), ((21, 18, 17), 7.5), ((20, 18, 17), 11.0)]
)
def test_cuts_at_the_edges_and_both_mirror_parities(shape, mirror):
    rng = np.random.default_rng(int(mirror * 10))
    vol = rng.integers(0, 256, shape, dtype=np.uint8)
    patch, block = 7, 4
    edges = [np.array([0, 1, n // 2, n - 2, n - 1]) for n in shape]
    locs = np.stack(np.meshgrid(*edges, indexing="ij"), -1).reshape(-1, 3)
    cutter = BlockCutter(vol, mirror, patch, block)
    order, starts = group_by_block(locs, shape, block)
    got = np.empty((len(locs), 2, patch, patch, patch), np.uint8)
    for b in range(len(starts) - 1):
        members = order[starts[b] : starts[b + 1]]
        origin = locs[members[0]] // block * block
        assert np.all(locs[members] // block * block == origin)
        got[members] = cut_pairs(cutter(origin)[None], np.zeros(len(members), int), locs[members] - origin, patch)
    np.testing.assert_array_equal(got, extract_pairs(vol, mirror, locs, patch))


def test_device_cut_equals_the_numpy_cut():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (6, 2, 12, 12, 12), dtype=np.uint8)
    slot, off = rng.integers(0, 6, 50), rng.integers(0, 6, (50, 3))
    want = cut_pairs(blocks, slot, off, 7)
    got = cut_pairs_torch(torch.from_numpy(blocks), torch.from_numpy(slot), torch.from_numpy(off), 7)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("workers", [0, 2])
def test_device_path_gives_the_cpu_paths_batches(both, workers):
    base = both[0]

    def batches(device_cut):
        ds = ShardStream(str(base / "blocks"), batch_size=40, shuffle=200, seed=4, device_cut=device_cut)
        return list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))

    cut = DeviceCutter("cpu", 25)
    cpu, dev = batches(False), batches(True)
    assert len(cpu) == len(dev) > 3
    for a, b in zip(cpu, dev):
        assert "x" not in b and b["off"].shape == (len(b["y"]), 3)
        assert torch.equal(a["x"], cut(b)) and torch.equal(a["y"], b["y"]) and a["scan"] == b["scan"]
    # blocks cross once: the device batches carry each block exactly once over the epoch
    assert sum(len(b["block_slots"]) for b in dev) == read_manifest(base / "blocks")["totals"]["records"]


def test_a_batch_mixes_many_blocks_and_scans(both):
    base, blocks, _ = both
    first = next(iter(ShardStream(str(base / "blocks"), batch_size=64, shuffle=64, seed=0)))
    assert len(set(first["scan"])) == len(blocks["scans"])
    blocks_hit = {(s, *loc) for s, loc in zip(first["scan"], (first["loc"] // 8).tolist())}
    assert len(blocks_hit) > 8


def test_ranks_get_equal_steps_and_disjoint_samples(both):
    base, blocks, _ = both
    per_rank = [list(ShardStream(str(base / "blocks"), batch_size=16, seed=2, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == blocks["totals"]["samples"] // 32
    ids = [set(sample_ids(b)) for b in per_rank]
    assert not ids[0] & ids[1]


def test_a_damaged_block_record_is_skipped_and_counted(both, tmp_path):
    base, blocks, _ = both
    shutil.copytree(base / "blocks", tmp_path / "b")
    victim = tmp_path / "b" / blocks["shards"][0]["name"]
    with open(victim, "rb") as f:
        records = list(iter_grouped(f))
    lost = sum(len(decode_npy(records[i][1]["y.npy"])) for i in (1, 2))
    meta = json.loads(records[1][1]["meta.json"])
    records[1][1]["meta.json"] = json.dumps({**meta, "patch": 21}).encode()  # a record of another patch size
    records[2][1]["block.npy"] = records[2][1]["block.npy"][:-100]  # a truncated block
    write_shard(victim, records)
    batches = list(ShardStream(str(tmp_path / "b"), batch_size=32, shuffle=0))
    assert sum(int(b["skipped"]) for b in batches) == 2
    assert len(sample_ids(batches)) == blocks["totals"]["samples"] - lost


def test_block_records_round_trip_and_refuse_bad_offsets():
    block = np.zeros((2, 10, 10, 10), np.uint8)
    off, y = np.array([[0, 1, 2], [3, 3, 3]], np.int16), np.array([1, 0], np.uint8)
    rec = decode_block_record(encode_block_record(block, off, y, "s", (16, 0, 32), 7))
    assert rec["scan"] == "s" and rec["loc"].tolist() == [[16, 1, 34], [19, 3, 35]] and rec["patch"] == 7
    with pytest.raises(ValueError, match="off"):
        encode_block_record(block, np.array([[0, 0, 4]], np.int16), y[:1], "s", (0, 0, 0), 7)
    assert "labels" not in rec  # a version-2 record: read, without voxel labels
    labels = np.zeros((2, 4, 4, 4), np.uint8)
    labels[0, 0, 1, 2] = labels[1, 0, 1, 2] = labels[1, 3, 3, 3] = 1
    rec = decode_block_record(encode_block_record(block, off, y, "s", (16, 0, 32), 7, labels=labels))
    assert np.array_equal(rec["labels"], labels)
    with pytest.raises(ValueError, match="disagree"):
        encode_block_record(block, off, 1 - y, "s", (16, 0, 32), 7, labels=labels)
    fields = encode_block_record(block, off, y, "s", (16, 0, 32), 7, labels=labels)
    with pytest.raises(ValueError, match="labels are"):
        decode_block_record({**fields, "labels.npy": encode_npy(np.zeros((2, 7), np.uint8))})
    assert "draws" not in decode_block_record(fields)  # a version-3 record
    fields = encode_block_record(block, off, y, "s", (16, 0, 32), 7, labels=labels, draws=([2.5], 0.01))
    rec = decode_block_record(fields)
    assert rec["draws"].tolist() == [2.5] and rec["background_draws"] == 0.01
    for bad in ([1.0, 2.0], [np.nan], [-1.0]):  # one a lesion voxel (there is one), finite, not negative
        with pytest.raises(ValueError, match="draws are"):
            decode_block_record({**fields, "draws.npy": encode_npy(np.array(bad, np.float32))})
        with pytest.raises(ValueError, match="draws are"):
            encode_block_record(block, off, y, "s", (16, 0, 32), 7, labels=labels, draws=(bad, 0.01))
    meta = json.loads(fields["meta.json"])
    for bad in (-0.5, "0.1", True, None):
        with pytest.raises(ValueError, match="background_draws"):
            decode_block_record({**fields, "meta.json": json.dumps({**meta, "background_draws": bad}).encode()})
    with pytest.raises(ValueError, match="draws.npy without labels.npy"):
        decode_block_record({k: v for k, v in fields.items() if k != "labels.npy"})


def test_resume_workers_and_reruns_give_the_same_bytes(tiny_store, both, tmp_path, monkeypatch):
    _, reference, _ = both
    build_killed_after_one_shard(monkeypatch, "blocks", tiny_store, tmp_path / "r", BuildConfig(**CONFIG))
    assert len(list((tmp_path / "r").glob("*.tar"))) == 1 and not (tmp_path / "r" / "manifest.json").exists()
    again = build(tiny_store, tmp_path / "r", BuildConfig(**CONFIG), progress=False, log=lambda m: None)
    two = build(tiny_store, tmp_path / "w", BuildConfig(**CONFIG), workers=2, progress=False, log=lambda m: None)
    sha = [s["sha256"] for s in reference["shards"]]
    assert [s["sha256"] for s in again["shards"]] == sha == [s["sha256"] for s in two["shards"]]


def test_dry_run_gives_both_formats_bytes(tiny_store, both, tmp_path):
    _, blocks, _ = both
    lines = []
    plan = build(tiny_store, tmp_path / "dry", BuildConfig(**CONFIG), dry_run=True, progress=False, log=lines.append)
    assert plan["blocks"] == blocks["totals"]["records"] and not (tmp_path / "dry").exists()
    text = "\n".join(lines)
    assert "as pairs: about" in text and f"as blocks of 8^3: {plan['blocks']} blocks" in text


def test_any_block_size(tiny_store, both, tmp_path):
    _, blocks, _ = both
    for n in (1, 5, 40):
        manifest = build_quietly(tiny_store, tmp_path / f"b{n}", **{**CONFIG, "block": n})
        assert manifest["totals"]["samples"] == blocks["totals"]["samples"]
        assert manifest["sample"]["stored_as"]["block"]["shape"] == [2] + [n + 24] * 3
        assert verify(tmp_path / f"b{n}") == []


@pytest.mark.parametrize("blocks,shards,offset", [(10, 3, 0), (10, 3, 2), (7, 7, 3), (2, 5, 1), (130, 13, 5)])
def test_snake_deal_places_every_block_once_and_evens_the_shards(blocks, shards, offset):
    mine = [build_blocks.shard_blocks(k, offset, blocks, shards) for k in range(shards)]
    assert sorted(np.concatenate(mine).tolist()) == list(range(blocks))
    assert max(map(len, mine)) - min(map(len, mine)) <= 1
    weights = np.arange(blocks, 0, -1) ** 2  # blocks come heaviest first
    full = [k for k in range(shards) if len(mine[k]) == blocks // shards]
    snake = [weights[mine[k]].sum() for k in full]
    plain = [weights[(k - offset) % shards :: shards].sum() for k in full]  # round robin, for comparison
    assert max(snake) - min(snake) <= max(plain) - min(plain)
    if blocks >= 2 * shards:  # whole rounds to even out: strictly better than plain round robin
        assert max(snake) - min(snake) < max(plain) - min(plain)


def test_sample_pool_draws_each_sample_once_and_reuses_freed_slots():
    from shards.pool import SamplePool

    rng, pool, seen = np.random.default_rng(0), SamplePool(), []
    for r in range(40):  # records of 10 samples in, batches of 7 out, the pool kept at >= 25 samples
        slot = pool.add({"y": np.zeros(10, np.uint8), "id": np.arange(r * 10, r * 10 + 10)})
        assert slot < 12  # spent records free their slot: without that, slots would reach 40
        while pool.available >= 25:
            taken = pool.draw(7, rng)
            assert np.all(np.diff(taken["slot"]) >= 0)  # grouped by record
            seen += taken["id"].tolist()
    seen += pool.draw(pool.available, rng)["id"].tolist()
    assert sorted(seen) == list(range(400)) and seen != sorted(seen)
    fifo = SamplePool()
    for r in range(3):
        fifo.add({"y": np.zeros(4, np.uint8), "id": np.arange(r * 4, r * 4 + 4)})
    assert [fifo.draw(5, None)["id"].tolist() for _ in range(2)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
