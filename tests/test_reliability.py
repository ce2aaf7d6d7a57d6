"""Bad inputs and faults (issue: reliability): outputs never destroy inputs, damaged data is refused by name."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import build_quietly


def _tree(path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_predict_refuses_to_write_over_its_input_and_follows_the_extension(trained, tmp_path):
    from evaluate.cli import main

    _, run_dir = trained
    t1 = np.random.default_rng(0).normal(100, 20, (31, 28, 24)).astype(np.float32)
    nib.save(nib.Nifti1Image(t1, np.eye(4)), tmp_path / "t1.nii.gz")
    before = _tree(tmp_path)
    for out in (tmp_path / "t1.nii.gz", tmp_path / "sub" / ".." / "t1.nii.gz"):
        r = CliRunner().invoke(
            main, ["predict", "--model", str(run_dir), str(tmp_path / "t1.nii.gz"), str(out), "--space", "native"]
        )
        assert r.exit_code == 1 and "is an input" in r.output and "Traceback" not in r.output, r.output
        assert _tree(tmp_path) == before
    r = CliRunner().invoke(
        main,
        [
            "predict",
            "--model",
            str(run_dir),
            str(tmp_path / "t1.nii.gz"),
            str(tmp_path / "mask.nii"),
            "--space",
            "native",
            "--probabilities",
            str(tmp_path / "p.nii.gz"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "mask.nii").read_bytes()[:2] != b"\x1f\x8b"  # .nii: not gzip
    gzip.decompress((tmp_path / "p.nii.gz").read_bytes())  # .nii.gz: gzip
    assert nib.load(tmp_path / "mask.nii").shape == t1.shape


def test_build_never_removes_shard_files_it_did_not_make(tiny_store, tmp_path):
    from atlas_shards.build import BuildError

    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"someone else's data")
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    with pytest.raises(BuildError, match="did not make"):
        build_quietly(tiny_store, out, split="train", num_shards=2)
    assert _tree(out) == before


def test_synth_refuses_a_directory_that_holds_something_else(tmp_path):
    from atlas_shards.cli import main

    release = tmp_path / "release"
    release.mkdir()
    (release / "mine.nii.gz").write_bytes(b"not yours")
    r = CliRunner().invoke(main, ["synth", str(release), "--subjects", "1"])
    assert r.exit_code == 1 and "not empty" in r.output and "Traceback" not in r.output
    assert (
        list(release.iterdir()) == [release / "mine.nii.gz"] and (release / "mine.nii.gz").read_bytes() == b"not yours"
    )
    (tmp_path / "file").write_text("x")
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "file"), "--subjects", "1"])
    assert r.exit_code != 0 and "file" in r.output and "Traceback" not in r.output
    assert (tmp_path / "file").read_text() == "x"


def test_a_mostly_infinite_t1_is_refused_not_repaired(tmp_path):
    from atlas_shards.discover import ScanSource
    from atlas_shards.scan import ScanError, prepare_scan

    t1 = np.full((20, 20, 20), np.inf, np.float32)
    t1[:3] = 100.0  # 85% infinite
    nib.save(nib.Nifti1Image(t1, np.eye(4)), tmp_path / "t1.nii.gz")
    source = ScanSource(
        scan_id="s",
        subject_id="s",
        session="",
        cohort="",
        layout="generic",
        space="native",
        t1="t1.nii.gz",
        labelled=False,
    )
    with pytest.raises(ScanError, match=r"t1.nii.gz has 85.0% NaN/inf voxels"):
        prepare_scan(tmp_path, source)


def test_a_non_finite_loss_stops_training_with_the_last_finite_weights(tiny_store, tmp_path):
    from trainer import checkpoint as ckpt_io
    from trainer.fit import TrainConfig, TrainError, fit
    from trainer.models import ModelConfig

    build_quietly(tiny_store, tmp_path / "train", split="train", num_shards=2)
    cfg = TrainConfig(
        shards=str(tmp_path / "train"),
        out=str(tmp_path / "run"),
        batch_size=16,
        lr=1e12,
        workers=0,
        steps_per_epoch=40,
        log_every=5,
        checkpoint_every=1,
    )
    with pytest.raises(TrainError, match=r"step \d+: the loss is not finite") as info:
        fit(cfg, ModelConfig(batch_norm=False), progress=False, log=lambda m: None)  # batch norm would tame lr 1e12
    ckpt = ckpt_io.load(tmp_path / "run")
    assert f"(step {ckpt['step']})" in str(info.value)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_synth_may_rewrite_the_same_phantom(tmp_path):
    import json

    from atlas_shards.synth import TRUTH_FILE, _check_output

    params = {
        "layout": "r2.0",
        "seed": 0,
        "subjects": 3,
        "defects": {"mismatched_masks": 0, "truncated": 0, "empty_masks": 0},
    }
    (tmp_path / TRUTH_FILE).write_text(json.dumps({"layout": "r2.0", "seed": 0, "subjects": 3, "scans": []}))
    _check_output(tmp_path, params)  # the same phantom (a truth file from before defects were recorded): allowed
    with pytest.raises(ValueError, match="not empty"):
        _check_output(tmp_path, {**params, "seed": 1})


@pytest.fixture(scope="module")
def inputs(trained, tmp_path_factory):
    """A store, a run, histeq train shards and zscore validation shards (another normalisation)."""
    store, run_dir = trained
    base = tmp_path_factory.mktemp("bad")
    build_quietly(store, base / "train", split="train", num_shards=2)
    build_quietly(
        store, base / "zval", split="val", norm="zscore", mode="natural", natural_rate=0.3, target_lesion_fraction=None
    )
    return {"store": store, "run": run_dir, "train": base / "train", "zval": base / "zval"}


BAD = [
    ("shards", ["build", "{store}", "{out}", "--split", "train", "--shard-size-mb", "nan"], "--shard-size-mb"),
    ("shards", ["build", "{store}", "{out}", "--split", "train", "--seed", "-1"], "--seed"),
    ("shards", ["build", "{store}", "{out}", "--split", "train", "--lesion-rate", "inf"], "--lesion-rate"),
    ("shards", ["ingest", "{out}", "{out2}", "--split-fractions", "nan,1,1"], "--split-fractions"),
    ("shards", ["ingest", "{out}", "{out2}", "--split", "3,1"], "--split"),
    ("train", ["fit", "--shards", "{train}", "--out", "{out}", "--lr", "-1"], "--lr"),
    ("train", ["fit", "--shards", "{train}", "--out", "{out}", "--lr", "nan"], "--lr"),
    ("train", ["fit", "--shards", "{train}", "--out", "{out}", "--device", "banana"], "not a device"),
    ("train", ["fit", "--shards", "{train}", "--out", "{out}", "--class-weights", "nan,1"], "class weights"),
    ("train", ["fit", "--shards", "{train}", "--out", "{out}", "--val-shards", "{zval}"], "preprocessed differently"),
    (
        "train",
        ["fit", "--shards", "{train}", "--out", "{run}", "--resume", "--widths", "8,8,8,8,8"],
        "trained with widths",
    ),
    ("train", ["fit", "--shards", "{zval}", "--out", "{run}", "--resume"], "preprocessed differently"),
    ("evaluate", ["stream", "--model", "{run}", "--shards", "{zval}", "--out", "{out}"], "preprocessed differently"),
    ("evaluate", ["run", "--model", "{run}", "--store", "{store}", "--out", "{out}", "--device", "cuda:7"], "cuda"),
    # an output path under a file: refused by name before any work
    ("shards", ["build", "{store}", "{file}/out", "--split", "train"], "file is a file"),
    ("shards", ["ingest", "{out}", "{file}/store"], "file is a file"),
    ("shards", ["eda", "{store}", "{file}/eda"], "file is a file"),
    ("train", ["fit", "--shards", "{train}", "--out", "{file}/run"], "file is a file"),
    ("evaluate", ["run", "--model", "{run}", "--store", "{store}", "--out", "{file}/ev"], "file is a file"),
    ("evaluate", ["stream", "--model", "{run}", "--shards", "{train}", "--out", "{file}/st"], "file is a file"),
]
if not torch.cuda.is_available():
    BAD.append(("train", ["fit", "--shards", "{train}", "--out", "{out}", "--device", "cuda"], "no CUDA GPU"))


@pytest.mark.parametrize("cli, args, message", BAD, ids=[" ".join(a[:1] + a[-2:]) for _, a, _ in BAD])
def test_bad_arguments_fail_in_one_line_before_any_work(inputs, tmp_path, cli, args, message):
    from atlas_shards.cli import main as shards_cli
    from evaluate.cli import main as evaluate_cli
    from trainer.cli import main as train_cli

    main = {"shards": shards_cli, "train": train_cli, "evaluate": evaluate_cli}[cli]
    fill = {
        **{k: str(v) for k, v in inputs.items()},
        "out": str(tmp_path / "out"),
        "out2": str(tmp_path / "out2"),
        "file": str(tmp_path / "file"),
    }
    (tmp_path / "file").write_text("not a directory")
    before = {k: _tree(v) for k, v in inputs.items()}
    r = CliRunner().invoke(main, [a.format(**fill) for a in args])
    assert r.exit_code != 0, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in r.output, r.output
    assert {k: _tree(v) for k, v in inputs.items()} == before  # every input byte-identical
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
    assert (tmp_path / "file").read_text() == "not a directory"


def test_a_shard_of_another_patch_size_is_skipped_and_counted(tiny_store, tmp_path):
    import shutil

    from shards.reader import ShardStream

    build_quietly(tiny_store, tmp_path / "p25", split="train", num_shards=2, format="pairs", samples_per_record=16)
    build_quietly(
        tiny_store, tmp_path / "p21", split="train", num_shards=2, format="pairs", samples_per_record=16, patch=21
    )
    shutil.copy(tmp_path / "p21" / "train-000000.tar", tmp_path / "p25" / "train-000009.tar")  # mixed in by mistake
    spec = [str(tmp_path / "p25" / "train-000000.tar"), str(tmp_path / "p25" / "train-000009.tar")]
    batches = list(ShardStream(spec, batch_size=16, shuffle=0))
    assert {tuple(b["x"].shape[2:]) for b in batches} == {(25, 25, 25)}
    assert sum(int(b["skipped"]) for b in batches) > 0


@pytest.mark.parametrize("damage", ["config", "shards", "norm"])
def test_a_manifest_with_keys_missing_is_one_line(inputs, tmp_path, damage):
    import json
    import shutil

    from trainer.cli import main

    shutil.copytree(inputs["train"], tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    del manifest[damage]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    r = CliRunner().invoke(main, ["fit", "--shards", str(tmp_path / "s"), "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and f"damaged manifest: {damage}" in r.output and "Traceback" not in r.output, r.output


def test_a_checkpoint_with_keys_missing_is_one_line(trained, tmp_path):
    import shutil

    from evaluate.cli import main

    _, run_dir = trained
    shutil.copytree(run_dir, tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    del ckpt["preprocessing"]
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    r = CliRunner().invoke(
        main, ["stream", "--model", str(tmp_path / "run"), "--shards", str(tmp_path), "--out", str(tmp_path / "rep")]
    )
    assert r.exit_code == 1 and "damaged checkpoint: preprocessing missing" in r.output and "Traceback" not in r.output


def _chunk_files(store, scan_id: str, array: str) -> list:
    return sorted(p for p in (store / scan_id / array / "c").rglob("*") if p.is_file())


def test_a_damaged_store_is_found_by_name_and_never_used_silently(trained, tmp_path):
    """A chunk gone (zarr reads zeros), a byte flipped (crc32c), an array rewritten: verify, build, evaluate."""
    import csv
    import json

    import zarr

    from atlas_shards.cli import main as shards_cli
    from conftest import write_tiny_store
    from evaluate.cli import main as evaluate_cli

    _, run_dir = trained
    subjects = [f"sub-{i:03d}" for i in range(8)]
    store = write_tiny_store(
        tmp_path / "store.zarr",
        n_scans=8,
        split={"train": subjects[:4], "val": subjects[4:6], "test": subjects[6:], "unassigned": []},
    )
    _chunk_files(store, "sub-000_ses-1", "lesion")[0].unlink()
    zarr.open_group(store, mode="a")["sub-001_ses-1"]["t1"][5, 5, 5] = 0.5  # valid chunks, other content
    chunk = _chunk_files(store, "sub-004_ses-1", "t1")[0]
    damaged = bytearray(chunk.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    chunk.write_bytes(bytes(damaged))
    before = _tree(store)

    r = CliRunner().invoke(shards_cli, ["verify", str(store)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "sub-000_ses-1: lesion has 0 nonzero voxels, 80 at ingest (a chunk is missing" in r.output
    assert "sub-001_ses-1: t1 differs from what ingest wrote (crc32" in r.output
    assert "sub-004_ses-1: t1 cannot be read (a chunk fails its crc32c checksum)" in r.output
    assert r.output.count(": ok") == 5
    assert [line for line in r.output.splitlines() if line.startswith("Error")] == [
        f"Error: {store}: 3 problem(s) found in the store"
    ]

    r = CliRunner().invoke(
        shards_cli, ["build", str(store), str(tmp_path / "shards"), "--split", "train", "--patch", "9", "--block", "8"]
    )
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert {s["scan_id"] for s in manifest["scans"]} == {"sub-002_ses-1", "sub-003_ses-1"}
    notes = " | ".join(manifest["notes"])
    assert "scan sub-000_ses-1 skipped: damaged: lesion has 0 nonzero voxels" in notes
    assert "scan sub-001_ses-1 skipped: damaged: t1 differs" in notes

    r = CliRunner().invoke(
        evaluate_cli,
        ["run", "--model", str(run_dir), "--store", str(store), "--split", "val", "--out", str(tmp_path / "eval")],
    )
    assert r.exit_code == 0, r.output
    with open(tmp_path / "eval" / "subjects.csv") as f:
        status = {row["scan_id"]: row["status"] for row in csv.DictReader(f)}
    assert status == {
        "sub-004_ses-1": "damaged: t1 cannot be read (a chunk fails its crc32c checksum)",
        "sub-005_ses-1": "ok",
    }
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["failed"] == ["sub-004_ses-1"]
    assert _tree(store) == before  # read only, whatever it found


def _cli(*args, env=None):
    import os
    import subprocess
    import sys

    code = "import sys; from atlas_shards.cli import main; sys.argv[0] = 'atlas-shards'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_a_traceback_only_when_asked_for(tiny_store, tmp_path):
    (tmp_path / "file").write_text("x")
    args = ["build", str(tiny_store), str(tmp_path / "file" / "out"), "--split", "train"]
    plain = _cli(*args, env={"ATLAS_DEBUG": ""})
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'file' / 'out'}: cannot be an output directory: {tmp_path / 'file'} is a file"
    ]
    for asked in (_cli("--debug", *args), _cli(*args, env={"ATLAS_DEBUG": "1"})):
        assert asked.returncode == 1 and "Traceback" in asked.stderr and "NotADirectoryError" in asked.stderr
    # an expected error (raised by the command as one line) shows its cause when asked for
    asked = _cli("--debug", "build", str(tmp_path / "file"), str(tmp_path / "out"), "--split", "train")
    assert asked.returncode == 1 and "Traceback" in asked.stderr and "BuildError: " in asked.stderr
    assert asked.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_same_command_finishes_after(tiny_store, tmp_path):
    """A real full disk: a 64 KiB tmpfs in a private mount namespace (unshare), grown to 64 MiB for the rerun."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("unshare"):
        pytest.skip("needs util-linux unshare for a private tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    build = f"{sys.executable} -m atlas_shards.cli build {tiny_store} {disk}/out --split train --patch 9 --block 8"
    script = f"""
        mount -t tmpfs -o size=64k tmpfs {disk} || exit 97
        {build} >/dev/null 2>{tmp_path}/err1; echo "first=$?"
        find {disk}/out -name '*.tmp*' | sed 's/^/temp /'
        mount -o remount,size=64m {disk}
        {build} >/dev/null 2>&1; echo "second=$?"
        {sys.executable} -m atlas_shards.cli verify {disk}/out >/dev/null 2>&1; echo "verify=$?"
    """
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if done.returncode == 97 or "first=" not in done.stdout:
        pytest.skip(f"no private tmpfs here (unshare -rm, mount): {done.stderr.strip()[-200:]}")
    lines = done.stdout.split()
    assert "first=1" in lines and "second=0" in lines and "verify=0" in lines, done.stdout + done.stderr
    assert not [line for line in done.stdout.splitlines() if line.startswith("temp ")]  # no temporary left behind
    err = [line for line in (tmp_path / "err1").read_text().splitlines() if line.startswith("Error")]
    assert len(err) == 1 and f"{disk}/out/" in err[0] and "No space left on device" in err[0], err
    assert "the disk is full" in err[0]
    assert "Traceback" not in (tmp_path / "err1").read_text()
