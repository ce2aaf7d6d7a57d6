"""The optimiser (``--optimizer``) and the learning-rate schedule (``--schedule``, ``--warmup``) of a run."""

from __future__ import annotations

import math

import torch


def make_optimizer(name: str, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``adam``, ``adamw``, or ``sgd``: SGD with Nesterov momentum 0.99, as nnU-Net trains. SGD's step is
    proportional to the gradient, where Adam's is about ``lr`` whatever the gradient's size."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def learning_rate(peak: float, schedule: str, warmup: float, progress: float) -> float:
    """The learning rate at ``progress`` (0 at the start, 1 at the end of the run).

    ``constant``: ``peak`` throughout. ``cosine``: linear warm-up from
    ``peak / 100`` to ``peak`` over the first ``warmup`` of the run, then
    cosine decay to ``peak / 100``.
    """
    if schedule == "constant":
        return peak
    floor, progress = peak / 100, min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return floor + (peak - floor) * progress / warmup
    rest = (progress - warmup) / max(1 - warmup, 1e-12)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * rest))
