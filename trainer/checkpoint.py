"""Checkpoints: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain values only: ``format``,
``version``, ``model`` (state dict, no DDP/compile prefixes), ``optimizer``,
``step``, ``epoch``, ``rng`` (torch, numpy and Python states as tensors/lists),
``model_config``, ``preprocessing`` (the shard manifest's normalisation and
build config) and ``train_config``. Anything needing pickle is refused.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from shards.common.atomic import atomic_path

FORMAT, VERSION = "atlas-train-checkpoint", 1
LAST = "last.pt"
SNAPSHOTS = "snapshots"  # fit --snapshot-every: snapshots/step-NNNNNNN.pt, read by atlas-evaluate curve


def snapshot_name(step: int) -> str:
    return f"step-{step:07d}.pt"


def snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of a run's snapshots, in step order."""
    found = sorted(Path(run_dir, SNAPSHOTS).glob("step-*.pt"))
    return [(int(p.stem.removeprefix("step-")), p) for p in found if p.stem.removeprefix("step-").isdigit()]


class CheckpointError(ValueError):
    """A checkpoint is missing, unsafe, or not one of ours."""


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": [list(random.getstate()[1]), random.getstate()[0]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    key = state["numpy"]["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, state["numpy"]["pos"], 0, 0.0))
    words, version = state["python"]
    random.setstate((version, tuple(words), None))


REQUIRED = {
    "model": dict,
    "model_config": dict,
    "preprocessing": dict,
    "optimizer": dict,
    "rng": dict,
    "step": int,
}  # what resuming and evaluating rely on


def save(path: str | os.PathLike, payload: dict) -> Path:
    """Write a checkpoint dict atomically (temporary name, then rename)."""
    path = Path(path)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
    return path


def _damaged(path: Path, exc: Exception) -> str:
    why = f"torch.load: {type(exc).__name__}"
    return f"{path}: damaged checkpoint, or not one ({why}); train again, or resume from a snapshot"


def load(path: str | os.PathLike) -> dict:
    """Read a checkpoint safely.

    Raises:
        CheckpointError: missing, contains pickled objects, or not a trainer checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:  # a real pickle of objects (not random bytes, which the unpickler also rejects)
            raise CheckpointError(
                f"{path}: refused: holds objects that only pickle can load ({found.group(1)})"
            ) from None
        raise CheckpointError(_damaged(path, exc)) from None
    except Exception as exc:
        raise CheckpointError(_damaged(path, exc)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an atlas-train checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')}, this trainer reads {VERSION}")
    missing = [k for k, kind in REQUIRED.items() if not isinstance(ckpt.get(k), kind)]
    if missing:
        raise CheckpointError(f"{path}: damaged checkpoint: {', '.join(missing)} missing")
    return ckpt
