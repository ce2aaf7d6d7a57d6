"""Messages that name the thing: a busy port, damaged shards that are not "unreachable", a bad report, an RGB
image, a damaged checkpoint; Ctrl-C exits 130 in every command."""

from __future__ import annotations

import json
import shutil
import socket

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import tiny_shards


def test_a_busy_port_is_named(tmp_path):
    from atlas_shards.serve import ServeError, serving

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for server in ("auto", "python"):
            with pytest.raises(ServeError, match=f"^port {port} on 127.0.0.1 is in use .* choose another --port"):
                with serving(tmp_path, port=port, server=server):
                    pass


def test_shards_that_are_not_shards_are_unreadable_not_unreachable(tiny_store, tmp_path_factory, tmp_path):
    from trainer.cli import main

    shards = tiny_shards(tiny_store, tmp_path_factory, "garbage", num_shards=2)
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    rng = np.random.default_rng(0)
    for tar in bad.glob("*.tar"):
        tar.write_bytes(rng.bytes(20_000))
    done = CliRunner().invoke(main, ["fit", "--shards", str(bad), "--out", str(tmp_path / "run"), "--workers", "0"])
    assert done.exit_code == 1
    assert "shards unreadable at step 0" in done.output and "unreachable" not in done.output, done.output
    assert done.output.strip().splitlines()[-1].startswith("Error: no readable records in 2 shard(s)")


@pytest.mark.parametrize(
    "content, message",
    [
        ("garbage", "not JSON"),
        ("[1, 2]", "a JSON list, not a report's object"),
        ('{"model": "cnn3d"}', "no 'n_subjects'"),
        (
            '{"model": "cnn3d", "n_subjects": 3, "mean_dice": "high", "pooled_dice": 0.5, "mean_lesion_f1": 0.4, '
            '"precision": 0.5, "recall": 0.5}',
            "'mean_dice' is \"high\", not a number",
        ),
    ],
)
def test_compare_names_the_file_and_the_key_of_a_bad_report(tmp_path, content, message):
    from evaluate.cli import main

    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "metrics.json").write_text(content)
    done = CliRunner().invoke(main, ["compare", str(tmp_path / "rep")])
    assert done.exit_code == 1 and done.output.count("\n") == 1, done.output
    assert f"{tmp_path / 'rep' / 'metrics.json'}: {message}" in done.output


def test_an_rgb_image_says_it_is_rgb(tmp_path):
    import nibabel as nib

    from atlas_shards.scan import ScanError, preprocess

    rgb = np.zeros((12, 12, 12), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "t1.nii.gz")
    with pytest.raises(ScanError, match="t1.nii.gz is an RGB image .* expected one intensity"):
        preprocess(tmp_path / "t1.nii.gz", space="native")


def test_random_bytes_in_last_pt_are_a_damaged_checkpoint(tmp_path):
    from trainer.checkpoint import CheckpointError, load

    (tmp_path / "last.pt").write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'last.pt'}: damaged checkpoint, or not one"):
        load(tmp_path)


@pytest.mark.parametrize(
    "module, argv, target",
    [
        ("atlas_shards.cli", ["inspect", "{tmp}"], "shards.manifest.read_manifest"),
        ("evaluate.cli", ["compare", "{tmp}"], "evaluate.compare.ladder"),
        ("trainer.cli", ["rf", "--shards", "{tmp}", "--out", "{tmp}/rf"], "trainer.forest.train_forest"),
    ],
)
def test_ctrl_c_exits_130_in_every_command(tmp_path, monkeypatch, module, argv, target):
    import importlib

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    where, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(where), name, interrupted)
    main = importlib.import_module(module).main
    done = CliRunner().invoke(main, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert done.exit_code == 130 and "interrupted" in done.output, done.output
    assert json.dumps(done.exit_code) == "130"
