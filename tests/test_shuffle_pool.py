"""The shuffle pool mixes blocks: a wide pool keeps one block's samples from filling a batch, and ``fit --shuffle``
sets it (issue 27, item 6: per-sample training's loss spikes were batches made of one small lesion's block)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import build_quietly
from shards.reader import ShardStream

BLOCK = 8  # build_quietly's blocks: the samples of one 8^3 tile of one scan are one record's


@pytest.fixture(scope="module")
def heavy(tiny_store, tmp_path_factory):
    """Sampled by lesion component: each lesion's 270 draws sit in the few blocks it touches (heavy blocks)."""
    out = tmp_path_factory.mktemp("pool") / "train"
    return out, build_quietly(tiny_store, out, split="train", num_shards=2, component_samples=270, max_repeat=3)


def one_block_shares(batches) -> np.ndarray:
    """Per batch, the largest share of its samples that come from one block of one scan."""
    shares = []
    for b in batches:
        _, scan = np.unique(np.asarray(b["scan"]), return_inverse=True)
        tile = np.concatenate([scan[:, None], np.asarray(b["loc"]) // BLOCK], axis=1)
        shares.append(np.unique(tile, axis=0, return_counts=True)[1].max() / len(tile))
    return np.array(shares)


def test_a_wide_pool_keeps_one_blocks_samples_from_filling_batches(heavy):
    shards, manifest = heavy
    total = manifest["totals"]["samples"]
    narrow = list(ShardStream(str(shards), batch_size=16, shuffle=16, pool_blocks=1, seed=0))
    wide = list(ShardStream(str(shards), batch_size=16, shuffle=total, seed=0))
    # every sample once either way: the pool changes the order, never what an epoch holds
    ids = lambda batches: sorted(  # noqa: E731
        (s, *map(int, loc)) for b in batches for s, loc in zip(b["scan"], np.asarray(b["loc"]))
    )
    assert len(ids(narrow)) == len(ids(wide)) == total and ids(narrow) == ids(wide)
    narrow_share, wide_share = one_block_shares(narrow).mean(), one_block_shares(wide).mean()
    # a pool of one block yields its samples together (batches mostly one block's); a pool of the whole epoch
    # draws each batch from all of its blocks
    assert narrow_share > 0.5 and wide_share < 0.3, (narrow_share, wide_share)


def test_fit_shuffle_sets_the_pool_and_a_resume_keeps_it(heavy, tmp_path):
    from trainer.cli import main

    shards, _ = heavy
    out = tmp_path / "run"
    args = ["fit", "--shards", str(shards), "--out", str(out), "--steps-per-epoch", "2", "--batch-size", "8"]
    r = CliRunner().invoke(main, args + ["--workers", "0", "--shuffle", "4096"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["train"]["shuffle"] == 4096
    r = CliRunner().invoke(main, args + ["--workers", "0", "--shuffle", "64", "--resume", "--epochs", "2"])
    assert r.exit_code == 1 and "shuffle 4096 -> 64" in r.output  # another pool is another run's batches
