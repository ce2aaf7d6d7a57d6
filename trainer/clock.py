"""The training clock: ``--time-budget`` on wall or CPU time, across resumes, validation paused out."""

from __future__ import annotations

import contextlib
import time

import torch
from torch import distributed as dist


class Clock:
    """Training time against ``--time-budget`` (minutes), across resumes; validation paused out.

    ``wall``: elapsed time. ``cpu``: this process's CPU time over all its
    threads (``--workers 0`` puts the data loading in it too): a budget that
    other work on the machine does not eat into, for comparing models.

    With a budget the schedule's progress is the larger of the step share and
    the time share, so a run cut by its budget still ends its schedule. Every
    rank must stop at the same step (DDP): under torchrun the ranks agree on
    the largest clock (all-reduce max).
    """

    def __init__(self, budget_minutes: float | None, device: torch.device, kind: str = "wall"):
        self.budget = None if budget_minutes is None else 60 * budget_minutes
        self.device = device
        self.read = time.process_time if kind == "cpu" else time.perf_counter  # cpu: this process, all threads
        self.before = 0.0  # seconds trained before a resume
        self.restart()
        self.now = 0.0  # the shared clock at the last tick

    def seconds(self) -> float:
        return self.before + self.read() - self.start - self.paused_for

    def restart(self) -> None:
        self.start, self.paused_for = self.read(), 0.0

    def tick(self) -> None:
        """Read the clock, once a step (all ranks: the largest)."""
        if self.budget is None:
            return
        mine = torch.tensor([self.seconds()], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        self.now = float(mine.item())

    def spent(self) -> bool:
        return self.budget is not None and self.now >= self.budget

    def progress(self, step: int, total_steps: int) -> float:
        share = step / max(total_steps, 1)
        return share if self.budget is None else max(share, self.now / self.budget)

    @contextlib.contextmanager
    def paused(self):
        t0 = self.read()
        try:
            yield
        finally:
            self.paused_for += self.read() - t0
