"""The one place a ``--device`` name becomes a ``torch.device``, with a clear error before any work."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is a GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ValueError: not a device name, or a GPU this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no CUDA GPU (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return device


BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that make bf16 autocast pay on the CPU (Linux names)


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 instructions (``BF16_FLAGS``; ``bf16`` on ARM). Without them ``--amp`` on
    the CPU emulates bf16: about 10x slower than float32 on an AVX2-only AMD EPYC (issue 29's measurement)."""
    try:
        with open(cpuinfo) as f:
            flags = {w for line in f if line.lower().startswith(("flags", "features")) for w in line.split()}
    except OSError:  # not Linux: unknown; assume the user knows their CPU
        return True
    return bool(flags & {*BF16_FLAGS, "bf16"})
