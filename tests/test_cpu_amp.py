"""--amp where it pays: bf16 autocast on a CPU without bf16 instructions falls back to float32, with a note."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_shards
from trainer.devices import cpu_has_bf16


@pytest.mark.parametrize(
    "flags, has",
    [
        ("flags\t\t: fpu sse2 avx2 fma", False),  # an AMD EPYC with AVX2 only
        ("flags\t\t: fpu avx2 avx512f avx512bw", False),  # AVX-512 without bf16: emulated
        ("flags\t\t: fpu avx2 avx512f avx512_bf16", True),
        ("flags\t\t: fpu avx2 amx_tile amx_bf16", True),
        ("Features\t: fp asimd sve bf16", True),  # ARM
    ],
)
def test_bf16_instructions_are_read_from_cpuinfo(tmp_path, flags, has):
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\n{flags}\n\nprocessor\t: 1\n{flags}\n")
    assert cpu_has_bf16(str(tmp_path / "cpuinfo")) is has


def test_amp_on_a_cpu_without_bf16_trains_in_float32_and_says_so(tiny_store, tmp_path_factory, tmp_path, monkeypatch):
    import trainer.fit
    from trainer.fit import TrainConfig, fit
    from trainer.models import ModelConfig

    shards = tiny_shards(tiny_store, tmp_path_factory, "amp", num_shards=1)
    monkeypatch.setattr(trainer.fit, "cpu_has_bf16", lambda: False)
    said = []
    cfg = TrainConfig(shards=str(shards), out=str(tmp_path), batch_size=8, workers=0, steps_per_epoch=1, amp=True)
    fit(cfg, ModelConfig(), progress=False, log=said.append)
    assert any("no bf16 instructions" in m and "training in float32" in m for m in said)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["amp"] is False


@pytest.mark.parametrize(
    "recipe, bf16, amp", [("modern", True, True), ("modern", False, False), ("paper", True, False)]
)
def test_the_default_is_bf16_where_it_pays(tiny_store, tmp_path_factory, tmp_path, monkeypatch, recipe, bf16, amp):
    """fit without --amp/--no-amp (amp=None): bf16 with the modern recipe on a GPU or a CPU with bf16
    instructions, float32 otherwise and with the paper's recipe; said by nothing, recorded in config.json."""
    import trainer.fit
    from trainer.fit import TrainConfig, fit
    from trainer.models import ModelConfig

    shards = tiny_shards(tiny_store, tmp_path_factory, "amp-default", num_shards=1)
    monkeypatch.setattr(trainer.fit, "cpu_has_bf16", lambda: bf16)
    said = []
    cfg = TrainConfig(
        shards=str(shards), out=str(tmp_path), batch_size=8, workers=0, steps_per_epoch=1, recipe=recipe, amp=None
    )
    fit(cfg, ModelConfig(), progress=False, log=said.append)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["amp"] is amp
    assert not any("no bf16 instructions" in m for m in said)  # a default is not a request: no fallback note
