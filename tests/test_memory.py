"""fit keeps freed memory in the process (shards/common/memory.py): the buffers a training step frees and allocates
again are not faulted in and zeroed by the kernel every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

STEPS = r"""
import json, resource
import torch
from shards.common.memory import keep_freed_memory
kept = keep_freed_memory()
from trainer.models import ModelConfig, build_model
torch.set_num_threads(1)
model = build_model(ModelConfig(batch_norm=True))
opt = torch.optim.AdamW(model.parameters(), 1e-3)
x, y = torch.randint(0, 256, (64, 2, 25, 25, 25), dtype=torch.uint8), torch.randint(0, 2, (64,))
def step():
    loss = torch.nn.functional.cross_entropy(model(model.prepare(x)), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
step()
step()  # the optimiser's state made, the heap grown to a step's peak
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    step()
print(json.dumps({"kept": kept, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 6}))
"""


def _faults_a_step(malloc: str) -> dict:
    env = {**os.environ, "ATLAS_MALLOC": malloc, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", STEPS], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_training_step_reuses_freed_memory_unless_glibc_is_asked_for():
    glibc, kept = _faults_a_step("glibc"), _faults_a_step("keep")
    assert kept["kept"] and not glibc["kept"]
    # glibc returns a step's large buffers to the kernel and maps them afresh the next step: ~80,000 pages faulted
    # in a step of 64 pairs (measured, 4 runs); kept, the step reuses them (under 4,000 a step, same runs)
    assert glibc["faults"] > 20_000 and kept["faults"] < glibc["faults"] / 5, (glibc, kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_fit_records_its_allocator(tiny_store, tmp_path_factory, tmp_path):
    from click.testing import CliRunner

    from conftest import tiny_shards
    from trainer.cli import main

    shards = tiny_shards(tiny_store, tmp_path_factory, "memory", num_shards=2)
    args = ["fit", "--shards", str(shards), "--out", str(tmp_path / "run"), "--steps-per-epoch", "1", "--workers", "0"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["allocator"] == "glibc, freed memory kept"
