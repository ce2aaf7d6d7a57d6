"""Shared phantom releases and stores (session-scoped: built once per run)."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

from atlas_shards.ingest import ingest
from atlas_shards.synth import TRUTH_FILE, synthesize_release

# torch.compile's kernel cache does not tell kernels built with the dispatch capped (make test-isa) from the
# others, and one built under the cap crashed a run without it: a cache for each setting.
_DISPATCH = "-".join(os.environ.get(k, "native") for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor-{_DISPATCH}"))


def _ingested(tmp_path_factory, layout: str, subjects: int, workers: int = 2, **defects):
    """(release, truth, store, summary) for a freshly synthesised phantom."""
    out = tmp_path_factory.mktemp(layout.replace(".", ""))
    release, store = out / "release", out / "store.zarr"
    synthesize_release(release, layout, subjects, seed=3, workers=2, progress=False, **defects)
    truth = json.loads((release / TRUTH_FILE).read_text())
    return release, truth, store, ingest(release, store, workers=workers, progress=False)


@pytest.fixture(scope="session")
def r11(tmp_path_factory):
    """R1.1 phantom with one scan of each planted defect, ingested."""
    return _ingested(tmp_path_factory, "r1.1", 5, mismatched_masks=1, truncated=1, empty_masks=1)


@pytest.fixture(scope="session")
def native(tmp_path_factory):
    """Native-space phantom covering every native protocol (orientation), ingested."""
    return _ingested(tmp_path_factory, "native", 5)


@pytest.fixture(scope="session")
def r20(tmp_path_factory):
    """ATLAS v2.0 phantom (Training, Testing, macOS debris, metadata CSV), ingested in one process."""
    return _ingested(tmp_path_factory, "r2.0", 5, workers=1)


def write_tiny_store(
    path,
    n_scans: int = 6,
    shape=(31, 28, 24),
    symmetric: bool = False,
    seed: int = 0,
    split: dict | None = None,
    specks: bool = False,
):
    """A small store written through the store API: ellipsoid brains, one-sided lesions.

    With ``specks`` every lesion mask also holds two small separate components:
    one voxel at (10, 14, 12) and four at (10-11, 17-18, 12).

    The mirror plane is the centre of the first axis (mirror_index (X-1)/2). With
    ``symmetric`` every T1 is exactly left-right symmetric about it.
    """
    import numpy as np

    from atlas_shards import store

    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    r = ((grid - centre[:, None, None, None]) / (np.array(shape)[:, None, None, None] * 0.42)) ** 2
    brain = (r.sum(0) <= 1).astype(np.uint8)
    root = store.open_store(path, "a")
    scans = {}
    for i in range(n_scans):
        t1 = rng.normal(100, 20, shape).astype(np.float32) + 50 * brain
        if symmetric:
            t1 = (t1 + t1[::-1]) / 2
        lesion = np.zeros(shape, np.uint8)
        cx = int(centre[0] + 4 + i % 3)
        lesion[cx - 2 : cx + 2 + i % 2, 10:15, 9:13] = 1
        if specks:
            lesion[10, 14, 12] = lesion[10:12, 17:19, 12] = 1
        lesion &= brain
        if not symmetric:
            t1 -= 60 * lesion  # lesions are dark on T1, as in the real data (learnable)
        scan_id = f"sub-{i:03d}_ses-1"
        scans[scan_id] = f"sub-{i:03d}"
        attrs = {
            "scan_id": scan_id,
            "subject_id": f"sub-{i:03d}",
            "mirror_index": float(centre[0]),
            "lesion_voxels": int(lesion.sum()),
            "brain_voxels": int(brain.sum()),
            "labelled": True,
            "complete": True,
            "hemisphere": "right",
            "voxel_size_mm": [1.0, 1.0, 1.0],
            "canonical_transform": [[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]],
            "original_shape": list(shape),
            "original_affine": np.eye(4).tolist(),
        }
        store.write_scan(path, scan_id, {"t1": t1, "lesion": lesion, "brain": brain}, attrs)
    subjects = sorted(scans.values())
    split = split or {
        "train": subjects[: n_scans - 2],
        "val": subjects[n_scans - 2 : n_scans - 1],
        "test": subjects[n_scans - 1 :],
        "unassigned": [],
    }
    root.attrs.update({"scans": scans, "subjects": subjects, "split": split, "layout": "tiny", "space": ["mni"]})
    return path


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    return write_tiny_store(tmp_path_factory.mktemp("tiny") / "store.zarr")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(store, run directory): a cnn3d-sym run trained briefly on a tiny store (for the evaluator's tests)."""
    from trainer.fit import TrainConfig, fit
    from trainer.models import ModelConfig

    base = tmp_path_factory.mktemp("eval")
    store = write_tiny_store(base / "store.zarr", n_scans=6)
    build_quietly(store, base / "train", split="train", num_shards=2, samples_per_record=32)
    fit(
        TrainConfig(
            shards=str(base / "train"),
            out=str(base / "run"),
            batch_size=32,
            lr=3e-3,
            workers=0,
            steps_per_epoch=60,
            log_every=10,
        ),
        ModelConfig(batch_norm=False),  # the modern recipe's other settings, without its batch norm
        progress=False,
        log=lambda m: None,
    )
    return store, base / "run"


def build_quietly(store, out, **config):
    """``atlas_shards.build.build`` with a BuildConfig from keywords (blocks of 8^3 by default), quietly."""
    from atlas_shards.build import BuildConfig, build

    config.setdefault("block", 8)  # tiny test volumes: many blocks per scan, as real scans have at 32
    return build(store, out, BuildConfig(**config), progress=False, log=lambda message: None)


def build_killed_after_one_shard(monkeypatch, fmt: str, store, out, config) -> None:
    """Run a build whose shard writer (format ``fmt``'s, ``atlas_shards.formats``) dies after one shard."""
    from dataclasses import replace

    from atlas_shards import build as build_mod
    from atlas_shards.formats import FORMATS

    real, calls = FORMATS[fmt], []

    def dies_after_one(job):
        if calls:
            raise KeyboardInterrupt
        calls.append(job.k)
        real.write(job)

    monkeypatch.setitem(FORMATS, fmt, replace(real, write=dies_after_one))
    with pytest.raises(KeyboardInterrupt):
        build_mod.build(store, out, config, progress=False, log=lambda m: None)
    monkeypatch.setitem(FORMATS, fmt, real)


def sample_ids(batches) -> list[tuple]:
    """(scan, i, j, k) of every sample of reader batches, in order."""
    return [(s, *loc) for b in batches for s, loc in zip(b["scan"], b["loc"].tolist())]


def need_nginx() -> None:
    """Skip without Debian's nginx on a developer's machine; fail in CI (``CI`` set), which must run the real server."""
    import os

    from atlas_shards.serve import find_nginx

    if not find_nginx():
        message = "nginx not installed (CI installs Debian's nginx)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)


def heavy_modules_after_import(module: str, heavy: tuple[str, ...]) -> list[str]:
    """Which of ``heavy`` a fresh interpreter has loaded after importing ``module`` (for instant --help)."""
    import subprocess
    import sys

    code = f"import sys, {module}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def start_training(cmd: list[str], out):
    """Start ``atlas-train fit`` (``cmd``) and return once it has logged its first steps (metrics.csv)."""
    import os
    import subprocess
    import time

    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.csv").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    return proc


def assert_stopped_unreachable(proc, out, steps: int) -> None:
    """The shards went away mid-run: exit 1, one "unreachable" error line, a checkpoint at the step it reached."""
    from trainer import checkpoint as ckpt_io

    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 1, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "unreachable" in errors[0] and "Traceback" not in stderr, stderr[-2000:]
    step = ckpt_io.load(out)["step"]  # only the save on failure writes one (--checkpoint-every is out of reach)
    assert 5 <= step < steps and f"shards unreachable at step {step}" in stdout


def fit_argv(shards, out, steps: int, *extra: str) -> list[str]:
    """``atlas-train fit`` arguments of a short test run: batches of 16, no DataLoader worker, a row every 5 steps."""
    short = "--batch-size 16 --workers 0 --log-every 5".split()
    return ["fit", "--shards", str(shards), "--out", str(out), "--steps-per-epoch", str(steps), *short, *extra]


def tiny_shards(store, tmp_path_factory, name: str, **build):
    """Training shards of ``store`` built once for a test module (``build``: BuildConfig fields)."""
    out = tmp_path_factory.mktemp(name) / "train"
    build_quietly(store, out, split="train", **build)
    return out


def random_cnn_predictor(seed: int, background_rate: float = 0.01, norm: str = "histeq", layout: str = "channels"):
    """An untrained cnn3d-sym as a ``TorchPredictor`` (with its dense twin for the channels layout)."""
    import torch

    from evaluate.predictors import TorchPredictor
    from trainer.dense import DenseCNN
    from trainer.models import ModelConfig, build_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="cnn3d-sym", layout=layout)).eval()
    for p in model.parameters():  # livelier than the default init, so predictors differ visibly
        p.data.mul_(3)
    pre = {
        "norm": {"method": norm, "offset": 0.0, "scale": 1 / 255},
        "build": {"patch": 25, "lesion_rate": 1.0, "background_rate": background_rate},
    }
    dense = DenseCNN(model).eval() if layout == "channels" else None
    return TorchPredictor("cnn3d-sym", None, model.cfg.to_dict(), pre, model=model, dense=dense)


def random_volume():
    """``(t1, brain)``: noise in a 28x26x27 grid, the brain a box inside it."""
    import numpy as np

    rng = np.random.default_rng(3)
    t1 = rng.normal(100, 25, (28, 26, 27)).astype(np.float32)
    brain = np.zeros(t1.shape, np.uint8)
    brain[2:26, 3:24, 1:25] = 1
    return t1, brain


def interrupt_training_at(monkeypatch, step: int):
    """Make ``trainer.fit`` raise KeyboardInterrupt (as a Ctrl-C would) when it logs ``step``; returns the undo."""
    import trainer.fit as fit_mod

    real = fit_mod._log_row

    def interrupt(window, at, *args):
        if at == step:
            raise KeyboardInterrupt
        return real(window, at, *args)

    monkeypatch.setattr(fit_mod, "_log_row", interrupt)
    return lambda: monkeypatch.setattr(fit_mod, "_log_row", real)


def replay_ranks(ckpt: dict, per_rank: list[list[dict]], lr: float, loss_of) -> tuple[dict, dict, dict]:
    """A DDP run's oracle: the ranks' batches replayed in one process, with SGD from the run's initial weights
    (seed 0). Returns the initial weights, the weights after both ranks' batches (step by step, the loss of a
    step being ``loss_of(model, batches)`` over one batch a rank) and after rank 0's batches alone (the control).
    """
    import torch

    from trainer.models import ModelConfig, build_model
    from trainer.optim import make_optimizer

    def replay(steps) -> dict:
        torch.manual_seed(0)
        model = build_model(ModelConfig.from_dict(ckpt["model_config"]))
        opt = make_optimizer("sgd", list(model.parameters()), lr, 0.0)
        for batches in steps:
            loss = loss_of(model, batches)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.state_dict()

    torch.manual_seed(0)
    init = build_model(ModelConfig.from_dict(ckpt["model_config"])).state_dict()
    return init, replay(zip(*per_rank)), replay([(b,) for b in per_rank[0]])
