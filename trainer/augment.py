"""On-the-fly augmentation of the ``modern`` recipe (its learning-rate schedule: ``trainer/optim.py``).

Augmentations keep the pair's meaning. Cube B is stored flipped left-right
so that it is aligned with cube A (``shards.patches``): flipping both cubes
along the same axis gives the pair of the same voxel in a mirrored head, so
every axis flip is applied to both cubes at once. Intensity jitter scales and
shifts both cubes of a sample by the same amount, so the comparison between
the hemispheres is unchanged. The draws come from a generator seeded by
(seed, rank, step) (``step_generator``): a function of the step, so a resumed
run augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch

CONTRAST = 0.1  # intensities scaled by U(1 - CONTRAST, 1 + CONTRAST) ...
BRIGHTNESS = 0.1  # ... then shifted by U(-BRIGHTNESS, BRIGHTNESS) (histeq puts the brain in [0, 1])


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The augmentation draws of one training step of one rank."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_000_007 + step) % 2**63)


def flip_draws(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Which of ``n`` samples are flipped along each of the three spatial axes (probability 1/2 each)."""
    return [torch.rand(n, generator=gen) < 0.5 for _ in range(3)]


def flip_pairs(x: torch.Tensor, gen: torch.Generator, labels: torch.Tensor | None = None, draws=None):
    """``x (B, 2, P, P, P)``: each sample flipped along each spatial axis with probability 1/2, both cubes alike.

    With ``labels (B, C, N, N, N)`` (a dense batch: ``x`` is a block, ``labels`` its core's voxels) the labels
    are flipped with their block, and ``(x, labels)`` is returned: the window at offset o of the flipped block
    is the flipped window at N-1-o, whose label the flipped labels hold there. ``draws``: ``flip_draws``'
    result, when the caller flips something else alike (``flip_offsets``).
    """
    draws = flip_draws(x.shape[0], gen) if draws is None else draws
    x = flip_cores(x, draws)
    return x if labels is None else (x, flip_cores(labels, draws))


def flip_cores(t: torch.Tensor, draws) -> torch.Tensor:
    """A copy of ``t (B, ..., A, A, A)`` with sample b flipped along its last three axes as ``draws`` say."""
    t = t.clone()
    for axis, chosen in zip((-3, -2, -1), draws):
        chosen = chosen.to(t.device)
        t[chosen] = t[chosen].flip(axis)
    return t


def flip_offsets(off: torch.Tensor, owner: torch.Tensor, side: int, draws) -> torch.Tensor:
    """Sampled voxels' offsets ``(K, 3)`` in blocks flipped by ``draws``: o -> side-1-o where their block flipped."""
    off = off.clone()
    for axis, chosen in enumerate(draws):
        flipped = chosen.to(off.device)[owner]
        off[flipped, axis] = side - 1 - off[flipped, axis]
    return off


def jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample contrast and brightness (one draw for every channel and voxel of a sample)."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    scale = 1 + CONTRAST * (2 * torch.rand(shape, generator=gen) - 1)
    shift = BRIGHTNESS * (2 * torch.rand(shape, generator=gen) - 1)
    return x * scale.to(x.device, x.dtype) + shift.to(x.device, x.dtype)
