"""Model-specific views of a batch ``x (B, 2, P, P, P)`` (no copies where possible)."""

from __future__ import annotations

import torch


def single_cube(x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, P, P, P)``: cube A only (the paper's plain 3D CNN)."""
    return x[:, :1]


def concat_pair(x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, 2P, P, P)``: the paper's 50x25x25 input, cube of interest first."""
    b, _, p = x.shape[:3]
    return x.reshape(b, 1, 2 * p, p, p)


def axial_slice(x: torch.Tensor) -> torch.Tensor:
    """``(B, P, P)``: the axial (constant-z, canonical RAS) slice of cube A through its centre."""
    return x[:, 0, :, :, x.shape[-1] // 2]


def dequantise(x: torch.Tensor, norm: dict) -> torch.Tensor:
    """Float model input from stored uint8: ``(x - offset) * scale`` (see ``shards.norm``)."""
    return (x.float() - float(norm["offset"])) * float(norm["scale"])
