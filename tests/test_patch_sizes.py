"""A patch the dense form cannot tile (27, 31, ...: the 3D CNNs' dense form needs 4k + 1) is said at ``fit`` and
evaluated patch by patch, never refused or scored wrong; the dense form's probe runs where the model is."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny_shards
from trainer.config import ModelConfig
from trainer.dense import DenseCNN
from trainer.models import build_model
from trainer.registry import ModelError


@pytest.mark.parametrize("patch, tiles", [(25, True), (27, False), (29, True), (31, False)])
def test_which_patches_the_dense_form_tiles(patch, tiles):
    model = build_model(ModelConfig(name="cnn3d-sym", patch=patch))
    if tiles:
        DenseCNN(model)
    else:
        with pytest.raises(ModelError, match="does not tile"):
            DenseCNN(model)


def test_the_dense_forms_probe_runs_on_the_models_device(monkeypatch):
    """A model on another device (a GPU's) gets its dense form: the probe that checks the tiling is made on the
    model's device. Here the other device is the shape-only ``meta`` one, and a convolution of tensors on two
    devices fails as it does on CUDA (a CPU probe against GPU weights made every GPU model "untileable")."""
    conv3d = torch.nn.functional.conv3d

    def one_device(x, weight, *args, **kwargs):
        if x.device != weight.device:
            raise RuntimeError(f"input on {x.device}, weights on {weight.device}")
        return conv3d(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv3d", one_device)
    model = build_model(ModelConfig(name="cnn3d-sym", patch=25)).to("meta")
    dense = DenseCNN(model)
    assert dense(torch.zeros(1, 2, 40, 40, 40, device="meta")).shape == (1, 2, 16, 16, 16)
    with pytest.raises(ModelError, match="does not tile"):  # and the check still bites there
        DenseCNN(build_model(ModelConfig(name="cnn3d-sym", patch=27)).to("meta"))


@pytest.mark.slow
def test_a_patch_without_a_dense_form_is_said_at_fit_and_evaluated_patch_by_patch(tmp_path_factory, tmp_path):
    from tests.conftest import write_tiny_store
    from evaluate.split import evaluate_split
    from trainer.fit import TrainConfig, fit

    store = write_tiny_store(tmp_path_factory.mktemp("p27") / "store.zarr", n_scans=6)
    shards = tiny_shards(store, tmp_path_factory, "p27", num_shards=1, patch=27, samples_per_record=32)
    said = []
    cfg = TrainConfig(shards=str(shards), out=str(tmp_path / "run"), batch_size=8, workers=0, steps_per_epoch=2)
    fit(cfg, ModelConfig(), progress=False, log=said.append)
    notes = [m for m in said if m.startswith("note: patch 27")]
    assert len(notes) == 1 and "patch by patch" in notes[0] and "25 or 29" in notes[0], said
    metrics = evaluate_split(tmp_path / "run", store, "test", tmp_path / "rep", progress=False, log=lambda m: None)
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved["inference"] == "patch by patch" and metrics["n_subjects"] == 1
    assert 0.0 <= saved["mean_dice"] <= 1.0

    said.clear()  # a patch the dense form tiles says nothing
    fit(
        TrainConfig(
            shards=str(tiny_shards(store, tmp_path_factory, "p25", num_shards=1, samples_per_record=32)),
            out=str(tmp_path / "run25"),
            batch_size=8,
            workers=0,
            steps_per_epoch=1,
        ),
        ModelConfig(),
        progress=False,
        log=said.append,
    )
    assert not [m for m in said if m.startswith("note: patch")]
