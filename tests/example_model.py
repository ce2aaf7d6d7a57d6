"""The worked example of docs/adding-a-model.md: a model in its own module (tests/test_registry.py registers it)."""

from __future__ import annotations

import torch
from torch import nn

from shards.common.views import dequantise


class PairMLP(nn.Module):
    """A 2-layer perceptron on both cubes, flattened: ``(B, 2, P, P, P) uint8`` -> logits ``(B, 2)``."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.net = nn.Sequential(nn.Linear(2 * cfg.patch**3, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 2))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The stored pair, dequantised with the shards' normalisation, as one vector a sample."""
        return dequantise(x, self.cfg.norm).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
