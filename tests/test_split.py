from __future__ import annotations

import numpy as np
import pytest

from atlas_shards.split import SplitError, make_split, split_sizes


def volumes(n, seed=0):
    rng = np.random.default_rng(seed)
    return {f"sub{i:03d}": float(v) for i, v in enumerate(rng.lognormal(8.5, 2.0, size=n))}


def test_paper_default_on_150_subjects_gives_100_25_25():
    s = make_split(volumes(150), seed=1)
    assert [len(s[k]) for k in ("train", "val", "test", "unassigned")] == [100, 25, 25, 0]


def test_exact_counts_leave_the_rest_unassigned_and_refuse_too_few():
    s = make_split(volumes(200), seed=1, counts=(100, 25, 25))
    assert [len(s[k]) for k in ("train", "val", "test", "unassigned")] == [100, 25, 25, 50]
    with pytest.raises(SplitError, match="split-fractions"):
        make_split(volumes(100), seed=1, counts=(100, 25, 25))


def test_fractions_and_small_releases():
    assert split_sizes(20, None, (0.6, 0.2, 0.2)) == {"train": 12, "val": 4, "test": 4, "unassigned": 0}
    assert split_sizes(3, None, None) == {"train": 1, "val": 1, "test": 1, "unassigned": 0}


def test_deterministic_disjoint_complete():
    v = volumes(60)
    a, b = make_split(v, seed=5), make_split(v, seed=5)
    assert a == b
    assert make_split(v, seed=6) != a
    every = [s for k in a for s in a[k]]
    assert sorted(every) == sorted(v) and len(every) == len(set(every))


def test_stratified_by_lesion_size():
    v = volumes(150, seed=2)
    s = make_split(v, seed=0)
    order = sorted(v, key=v.get)
    rank = {sub: i for i, sub in enumerate(order)}
    for name in ("val", "test"):
        ranks = sorted(rank[x] for x in s[name])
        # every size sextile holds some of this split
        assert len({r * 6 // 150 for r in ranks}) == 6
