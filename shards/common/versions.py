"""What software made a result: the project's version (and commit, in a checkout) and the libraries'.

Recorded in a run's ``config.json`` and a report's ``metrics.json`` so that a number can be traced to the
code that produced it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from pathlib import Path

PROJECT = "atlas-lesion-shards"  # setup.cfg's name


@functools.lru_cache(maxsize=1)
def software() -> dict:
    """``{"project", "commit", "python", "numpy", "torch", "cuda"}`` (None for what is not there)."""
    import numpy

    try:
        project = importlib.metadata.version(PROJECT)
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without an install
        project = None
    try:
        import torch

        torch_version, cuda = torch.__version__, torch.version.cuda
    except ImportError:
        torch_version = cuda = None
    return {
        "project": project,
        "commit": _commit(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch_version,
        "cuda": cuda,
    }


def _commit() -> str | None:
    """The checkout's commit (with ``+dirty`` for uncommitted changes), or None outside a git checkout."""
    here = Path(__file__).resolve().parents[2]
    if not (here / ".git").exists():
        return None
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", "-C", str(here), *a], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        return run("rev-parse", "--short=12", "HEAD") + ("+dirty" if run("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.SubprocessError):
        return None
