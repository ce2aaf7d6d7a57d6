from __future__ import annotations

import itertools

import numpy as np
import pytest

from atlas_shards import orient

SIGNED_PERMUTATIONS = [
    (perm, signs) for perm in itertools.permutations(range(3)) for signs in itertools.product((1, -1), repeat=3)
]


def _affine(perm, signs, voxel=(1.0, 1.2, 0.9)):
    a = np.zeros((4, 4))
    for col, (row, sign) in enumerate(zip(perm, signs)):
        a[row, col] = sign * voxel[col]
    a[:3, 3] = [-90.0, 12.0, -40.0]
    a[3, 3] = 1
    return a


@pytest.mark.parametrize("perm,signs", SIGNED_PERMUTATIONS)
def test_canonical_round_trip_every_orientation(perm, signs):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, size=(7, 9, 11)).astype(np.float32)
    affine = _affine(perm, signs)
    canon, canon_affine, transform = orient.to_canonical(data, affine)
    assert orient.axcodes(canon_affine) == "RAS"
    # Same voxel, same place in the world, before and after.
    idx = np.array([2, 5, 7])
    world = affine @ np.append(idx, 1)
    cidx = np.round(np.linalg.inv(canon_affine) @ world)[:3].astype(int)
    assert canon[tuple(cidx)] == data[tuple(idx)]
    back = orient.from_canonical(canon, transform, data.shape)
    np.testing.assert_array_equal(back, data)


def test_mirror_from_mni_affine():
    mni = np.array([[1, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1.0]])
    assert orient.mirror_from_affine(mni, (197, 233, 189)) == 98.0


@pytest.mark.parametrize("centre", [40.0, 47.5, 52.0])
def test_estimate_mirror_on_symmetric_head_with_lesion(centre):
    shape = (100, 80, 60)
    x, y, z = np.indices(shape, dtype=np.float32)
    head = ((x - centre) / 30) ** 2 + ((y - 40) / 35) ** 2 + ((z - 30) / 25) ** 2 <= 1
    vol = np.where(head, 100.0, 0.0).astype(np.float32)
    vol[head & (x < centre - 20)] = 60.0  # symmetric detail
    vol[head & (x > centre + 20)] = 60.0
    lesion = ((x - centre - 12) ** 2 + (y - 40) ** 2 + (z - 30) ** 2) <= 8**2
    vol[lesion] = 10.0  # a big dark lesion on one side must not pull the plane
    assert orient.estimate_mirror(vol) == centre


def test_mirror_indices():
    np.testing.assert_array_equal(orient.mirror_indices(5, 2.0), [4, 3, 2, 1, 0])
    np.testing.assert_array_equal(orient.mirror_indices(4, 1.5), [3, 2, 1, 0])
