"""The one process pool of the sharder (synth, ingest, build): spawned workers, results in job order.

Spawn, never fork: zarr runs an I/O thread once a store is open, and a fork
taken while it holds a lock deadlocks the child. With one worker (or one
job) nothing is started and the jobs run in this process, which is also what
lets tests patch the functions they run.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor


class Workers:
    """A spawn-context process pool started once for all passes (or none for one worker).

    Usage::

        with Workers(4) as pool:
            counts = list(pool.map(count_scan, jobs))   # fn must be importable (a module-level function)
    """

    def __init__(self, workers: int):
        self.workers, self._pool = workers, None

    def __enter__(self) -> Workers:
        if self.workers > 1:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def map(self, fn: Callable, jobs: list) -> Iterable | Iterator:
        """``fn(job)`` for every job; results in job order, each as soon as it and those before it are done."""
        if self._pool is None or len(jobs) < 2:
            return map(fn, jobs)
        return self._pool.map(fn, jobs)
