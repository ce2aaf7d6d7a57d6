"""Stores and shards on object storage (a real S3 server: moto's, on 127.0.0.1), and webdataset composability."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from atlas_shards.cli import main as shards_cli
from atlas_shards.serve import free_port
from conftest import assert_stopped_unreachable, build_quietly, fit_argv, start_training
from evaluate.cli import main as evaluate_cli
from trainer import checkpoint as ckpt_io
from trainer.cli import main as train_cli

BIN = Path(sys.executable).parent
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3:
    """A moto S3 server on 127.0.0.1, reached the standard way (AWS_ENDPOINT_URL and keys in the environment)."""

    def __init__(self, bucket: str = "atlas"):
        from moto.server import ThreadedMotoServer

        self.bucket = bucket  # moto keeps buckets per process, whichever server: one name per test
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", **CREDENTIALS}

    def __enter__(self):
        import s3fs

        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        self.server.start()
        s3fs.S3FileSystem.clear_instance_cache()
        self.fs = s3fs.S3FileSystem()
        self.fs.mkdir(self.bucket)
        return self

    def stop(self):
        self.server.stop()

    def __exit__(self, *exc):
        self.server.stop()
        for k, v in self.saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("s3fs")
    with S3() as server:
        yield server


def _shas(manifest_dir) -> dict:
    import json

    return {s["name"]: s["sha256"] for s in json.loads((Path(manifest_dir) / "manifest.json").read_text())["shards"]}


def test_a_store_and_shards_on_s3_build_train_score_and_evaluate(trained, s3, tmp_path):
    import hashlib

    store, run_dir = trained
    s3.fs.put(str(store), "atlas/store.zarr", recursive=True)
    args = ["--split", "train", "--block", "8", "--num-shards", "3"]

    # the same bytes from a store on S3 as from the local copy
    for source, out in ((str(store), tmp_path / "local"), ("s3://atlas/store.zarr", tmp_path / "from-s3")):
        r = CliRunner().invoke(shards_cli, ["build", source, str(out), *args])
        assert r.exit_code == 0, r.output
    assert _shas(tmp_path / "local") == _shas(tmp_path / "from-s3")
    r = CliRunner().invoke(shards_cli, ["verify", "s3://atlas/store.zarr"])
    assert r.exit_code == 0 and r.output.count(": ok") == 6, r.output

    # shards built into S3: every shard, then the manifest; the same bytes again
    r = CliRunner().invoke(shards_cli, ["build", str(store), "s3://atlas/shards/train", *args])
    assert r.exit_code == 0, r.output
    assert r.output.index("uploaded train-000002.tar") < r.output.index("manifest.json in place")
    for name, sha in _shas(tmp_path / "local").items():
        assert hashlib.sha256(s3.fs.cat(f"atlas/shards/train/{name}")).hexdigest() == sha
    r = CliRunner().invoke(shards_cli, ["inspect", "s3://atlas/shards/train", "--verify"])
    assert r.exit_code == 0 and "every shard matches the manifest" in r.output, r.output
    r = CliRunner().invoke(shards_cli, ["build", str(store), "s3://atlas/shards/train", *args])  # a rerun: a no-op
    assert r.exit_code == 0 and "uploaded train" not in r.output, r.output

    # training (with a DataLoader worker), the forest, stream scores and whole-volume evaluation, all from S3
    out = tmp_path / "run"
    r = CliRunner().invoke(
        train_cli,
        [
            "fit",
            "--shards",
            "s3://atlas/shards/train",
            "--out",
            str(out),
            "--steps-per-epoch",
            "8",
            "--batch-size",
            "16",
            "--workers",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    assert ckpt_io.load(out)["step"] == 8
    r = CliRunner().invoke(
        train_cli, ["rf", "--shards", "s3://atlas/shards/train/", "--out", str(tmp_path / "rf"), "--max-samples", "200"]
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        evaluate_cli,
        ["stream", "--model", str(out), "--shards", "s3://atlas/shards/train/", "--out", str(tmp_path / "stream")],
    )
    assert r.exit_code == 0 and "Dice" in r.output, r.output
    r = CliRunner().invoke(
        evaluate_cli,
        [
            "run",
            "--model",
            str(run_dir),
            "--store",
            "s3://atlas/store.zarr",
            "--split",
            "val",
            "--out",
            str(tmp_path / "eval"),
        ],
    )
    assert r.exit_code == 0, r.output
    with open(tmp_path / "eval" / "subjects.csv") as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["ok"]


@pytest.mark.slow
def test_a_bucket_gone_mid_epoch_leaves_a_checkpoint_and_one_line(tiny_store, tmp_path):
    """As a shard server that goes away: the stream meets the dead endpoint, saves, says so in one line."""
    pytest.importorskip("s3fs")
    build_quietly(tiny_store, tmp_path / "train", split="train", num_shards=5, samples_per_record=16)
    out = tmp_path / "run"
    with S3("gone") as s3:
        s3.fs.put(str(tmp_path / "train"), "gone/train", recursive=True)
        extra = "--timeout 1 --retries 2 --checkpoint-every 100000".split()
        cmd = [str(BIN / "atlas-train"), *fit_argv("s3://gone/train/", out, 5000, *extra)]
        proc = start_training(cmd, out)
    assert_stopped_unreachable(proc, out, 5000)


def _samples(batches) -> list:
    rows = []
    for b in batches:
        for i in range(len(b["y"])):
            rows.append((b["scan"][i], tuple(b["loc"][i].tolist()), int(b["y"][i]), b["x"][i].numpy().tobytes()))
    return sorted(rows)


def test_our_stages_inside_a_webdataset_pipeline_give_the_same_samples(tiny_store, tmp_path):
    import webdataset as wds

    from shards import stages
    from shards.reader import ShardStream

    build_quietly(tiny_store, tmp_path / "b", split="train", num_shards=3)
    urls = sorted(str(p) for p in (tmp_path / "b").glob("*.tar"))
    ours = _samples(ShardStream(str(tmp_path / "b"), batch_size=16, shuffle=0))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        stages.decode(patch=25, fmt="blocks"),
        stages.batched(16, shuffle=64, seed=1),
    )
    batches = list(pipeline)
    assert {tuple(b["x"].shape[1:]) for b in batches} == {(2, 25, 25, 25)}
    assert _samples(batches) == ours and len(ours) > 100
    # webdataset's pipe: URLs are shard sources too
    assert _samples(ShardStream([f"pipe:cat {u}" for u in urls], batch_size=16, shuffle=0)) == ours
    # a damaged record goes to a webdataset-style handler
    seen = []
    decode = stages.decode(patch=21, fmt="blocks", handler=lambda exn: seen.append(exn) or True)
    assert list(decode(wds.tarfile_to_samples()(iter([{"url": urls[0]}])))) == [] and seen
    assert np.all([urls[0] in str(e) for e in seen])
