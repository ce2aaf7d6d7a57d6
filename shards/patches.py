"""Patch pairs: cube A around a voxel and cube B around its mirror voxel.

The mirror plane is x = m along the first (left-right) canonical axis, with
m a multiple of 0.5, so the mirror of voxel i is r - i with r = round(2m).
Cube B is cut from the *mirrored volume* W[i] = V[r - i] around the same voxel
as cube A; that equals the cube around the mirror voxel, flipped left-right,
so A and B are anatomically aligned (identical on a symmetric head). The
evaluator's dense path slides over the same padded two-channel volume.
"""

from __future__ import annotations

import numpy as np


def mirror_offset(mirror_index: float) -> int:
    return int(round(2 * float(mirror_index)))


def mirrored_volume(volume: np.ndarray, mirror_index: float, pad: int = 0) -> np.ndarray:
    """``W`` with ``W[i] = V[r - i]`` for i in [-pad, X + pad) along the first axis.

    Zero where r - i falls outside the volume. The other axes are not padded.
    """
    n = volume.shape[0]
    src = mirror_offset(mirror_index) - np.arange(-pad, n + pad)
    valid = (src >= 0) & (src < n)
    out = np.zeros((n + 2 * pad,) + volume.shape[1:], dtype=volume.dtype)
    out[valid] = volume[src[valid]]
    return out


def padded_pair(volume: np.ndarray, mirror_index: float, patch: int) -> np.ndarray:
    """``(2, X+P-1, Y+P-1, Z+P-1)``: the volume and its mirrored copy, padded by P//2.

    Channel 0 is zero-padded; channel 1 is the mirrored volume computed over the
    padded range too (the mirror of a voxel just outside the grid may lie
    inside it), so a cube of channel 1 is exactly the flipped cube around the
    mirror voxel. Sliding a P^3 window over it (the dense evaluator) visits
    every voxel's pair.
    """
    if patch % 2 != 1:
        raise ValueError(f"patch must be odd, got {patch}")
    h = patch // 2
    a = np.pad(volume, h)
    b = np.pad(mirrored_volume(volume, mirror_index, pad=h), ((0, 0), (h, h), (h, h)))
    return np.stack([a, b])


class PairCutter:
    """Cuts ``(K, 2, P, P, P)`` pairs centred on voxels of one volume; zero outside it.

    The padded pair is built once, so many calls on one scan cost only the copy.
    """

    def __init__(self, volume: np.ndarray, mirror_index: float, patch: int):
        self.patch, self.shape = patch, volume.shape
        self._padded = padded_pair(volume, mirror_index, patch)
        self._windows = np.lib.stride_tricks.sliding_window_view(self._padded, (patch,) * 3, axis=(1, 2, 3))

    def __call__(self, centres: np.ndarray) -> np.ndarray:
        """``centres (K, 3)`` voxel indices -> ``(K, 2, P, P, P)``."""
        centres = np.asarray(centres, dtype=np.int64).reshape(-1, 3)
        if len(centres) and ((centres < 0).any() or (centres >= np.asarray(self.shape)).any()):
            raise IndexError("patch centre outside the volume")
        p = self.patch
        out = np.empty((len(centres), 2, p, p, p), dtype=self._padded.dtype)
        # Gathered in memory order: faster than in random order.
        order = np.lexsort(centres.T[::-1])
        cx, cy, cz = centres[order].T
        for c, win in enumerate(self._windows):
            out[order, c] = win[cx, cy, cz]
        return out


def extract_pairs(volume: np.ndarray, mirror_index: float, centres: np.ndarray, patch: int) -> np.ndarray:
    """``(K, 2, P, P, P)`` pairs of ``volume (X, Y, Z)`` centred on ``centres (K, 3)``."""
    return PairCutter(volume, mirror_index, patch)(centres)
