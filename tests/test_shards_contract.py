"""The shards contract: schema encoding, normalisation, pair cutting, tar I/O."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from shards.norm import dequantisation, normalise
from shards.patches import PairCutter, extract_pairs, mirrored_volume
from shards.pairs import decode_record, encode_record
from shards.schema import RecordError, decode_npy, encode_npy
from shards.tario import iter_grouped, iter_members, sha256_file, write_shard


def _record(k=3, p=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (k, 2, p, p, p), dtype=np.uint8)
    y = (rng.random(k) < 0.5).astype(np.uint8)
    loc = rng.integers(0, 100, (k, 3)).astype(np.int16)
    return x, y, loc, [f"s{i}" for i in range(k)]


def test_record_round_trip():
    x, y, loc, scans = _record()
    rec = decode_record(encode_record(x, y, loc, scans))
    np.testing.assert_array_equal(rec["x"], x)
    np.testing.assert_array_equal(rec["y"], y)
    np.testing.assert_array_equal(rec["loc"], loc)
    assert rec["scan"] == scans


def test_decode_refuses_pickle_and_bad_shapes():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(RecordError, match="object"):
        decode_npy(buf.getvalue())
    x, y, loc, scans = _record()
    fields = encode_record(x, y, loc, scans)
    with pytest.raises(RecordError, match="missing"):
        decode_record({k: v for k, v in fields.items() if k != "y.npy"})
    with pytest.raises(RecordError, match="y is"):
        decode_record({**fields, "y.npy": encode_npy(y.astype(np.int64))})
    with pytest.raises(RecordError, match="payload"):
        decode_record({**fields, "x.npy": fields["x.npy"][:-7]})
    with pytest.raises(RecordError, match="scan.json"):
        decode_record({**fields, "scan.json": b'["only-one"]'})


def test_histeq_is_uint8_and_flat_over_the_brain():
    rng = np.random.default_rng(1)
    vol = rng.gamma(2.0, 50.0, (30, 30, 30)).astype(np.float32)
    brain = np.zeros(vol.shape, bool)
    brain[5:25, 5:25, 5:25] = True
    q = normalise(vol, brain, "histeq")
    assert q.dtype == np.uint8
    counts = np.bincount(q[brain], minlength=256)
    assert counts.min() > 0.8 * brain.sum() / 256 and counts.max() < 1.2 * brain.sum() / 256
    order = np.argsort(vol, axis=None)  # monotone: brighter never maps lower
    assert (np.diff(q.ravel()[order].astype(int)) >= 0).all()


def test_zscore_quantisation_error_is_documented_bound():
    rng = np.random.default_rng(2)
    vol = rng.normal(300, 40, (20, 20, 20)).astype(np.float32)
    brain = np.ones(vol.shape, bool)
    q = normalise(vol, brain, "zscore")
    d = dequantisation("zscore")
    z = (vol - vol.mean(dtype=np.float64)) / vol.std(dtype=np.float64)
    inside = np.abs(z) < 5.2
    err = np.abs((q.astype(float) - d["offset"]) * d["scale"] - z)[inside]
    assert err.max() <= 1 / 48 + 1e-4


def test_pairs_on_a_symmetric_volume_are_identical():
    rng = np.random.default_rng(3)
    vol = rng.integers(0, 256, (21, 12, 10), dtype=np.uint8)
    vol = np.where(np.arange(21)[:, None, None] > 10, vol[::-1], vol)  # symmetric about x = 10
    centres = np.stack(np.meshgrid(range(21), range(12), range(10), indexing="ij"), -1).reshape(-1, 3)
    pairs = extract_pairs(vol, 10.0, centres, 7)
    np.testing.assert_array_equal(pairs[:, 0], pairs[:, 1])


@pytest.mark.parametrize("mirror", [10.0, 9.5, 12.5])
def test_cube_b_is_the_flipped_cube_at_the_mirror_voxel(mirror):
    rng = np.random.default_rng(4)
    vol = rng.integers(1, 256, (21, 12, 10), dtype=np.uint8)
    p, h = 5, 2
    padded = np.pad(vol, 30)
    r = int(round(2 * mirror))
    centres = rng.integers(0, [21, 12, 10], (200, 3))
    pairs = PairCutter(vol, mirror, p)(centres)
    for (x, y, z), pair in zip(centres, pairs):
        a = padded[x - h + 30 : x + h + 31, y - h + 30 : y + h + 31, z - h + 30 : z + h + 31]
        xm = r - x
        b = padded[xm - h + 30 : xm + h + 31, y - h + 30 : y + h + 31, z - h + 30 : z + h + 31][::-1]
        np.testing.assert_array_equal(pair[0], a)
        np.testing.assert_array_equal(pair[1], b)


def test_mirrored_volume_zero_where_the_mirror_leaves_the_grid():
    vol = np.arange(1, 11, dtype=np.uint8).reshape(10, 1, 1)
    w = mirrored_volume(vol, 6.0)  # r = 12: voxel i <- 12 - i
    assert w.ravel().tolist() == [0, 0, 0, 10, 9, 8, 7, 6, 5, 4]
    w = mirrored_volume(vol, 4.0, pad=2)  # i = -2..11 <- 8 - i
    assert w.ravel().tolist() == [0, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0]


def test_cutter_rejects_even_patches_and_outside_centres():
    with pytest.raises(ValueError):
        PairCutter(np.zeros((5, 5, 5), np.uint8), 2.0, 4)
    with pytest.raises(IndexError):
        PairCutter(np.zeros((5, 5, 5), np.uint8), 2.0, 3)(np.array([[5, 0, 0]]))


def test_tar_is_deterministic_and_streams_back(tmp_path):
    x, y, loc, scans = _record(k=4)
    recs = [(f"000000_{i:06d}", encode_record(x, y, loc, scans)) for i in range(3)]
    a = write_shard(tmp_path / "a.tar", recs)
    b = write_shard(tmp_path / "b.tar", recs)
    assert a == b == sha256_file(tmp_path / "a.tar")
    with open(tmp_path / "a.tar", "rb") as f:
        got = list(iter_grouped(f))
    assert [k for k, _ in got] == [k for k, _ in recs]
    with tarfile.open(tmp_path / "a.tar") as tar:  # a normal tar for every tool
        assert len(tar.getnames()) == 12


def test_tar_reader_honours_long_names_and_detects_truncation(tmp_path):
    path = tmp_path / "long.tar"
    long_key = "k" * 120
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(f"{long_key}.y.npy")
        data = encode_npy(np.zeros(2, np.uint8))
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        assert [(k, fld) for k, fld, _ in iter_members(f)] == [(long_key, "y.npy")]
    cut = path.read_bytes()[:1100]
    with pytest.raises(EOFError):
        list(iter_members(io.BytesIO(cut)))
