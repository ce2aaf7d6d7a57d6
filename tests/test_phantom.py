from __future__ import annotations

import hashlib

import numpy as np
import pytest

from atlas_shards import phantom
from atlas_shards.synth import synthesize_release


def test_lesion_volume_distribution_matches_atlas_v2():
    rng = np.random.default_rng(0)
    v = np.array([phantom.draw_lesion_volume(rng) for _ in range(20000)])
    q1, med, q3 = np.quantile(v, [0.25, 0.5, 0.75])
    assert 0.85 < med / phantom.LESION_MEDIAN_MM3 < 1.15
    assert 0.8 < q1 / phantom.LESION_Q1_MM3 < 1.2 and 0.8 < q3 / phantom.LESION_Q3_MM3 < 1.2
    assert v.min() >= 15 and v.max() <= 500000


def test_categories_and_sides():
    rng = np.random.default_rng(1)
    cats = [phantom.plan_lesions(rng)[0] for _ in range(2000)]
    left, right = cats.count("left"), cats.count("right")
    assert abs(left - right) < 0.1 * (left + right)
    assert cats.count("bilateral") > 50 and cats.count("brainstem") > 50
    for _ in range(50):
        cat, lesions = phantom.plan_lesions(rng, "bilateral")
        assert {lesion.side for lesion in lesions} == {"left", "right"}


@pytest.mark.slow
def test_lesions_are_dark_in_parenchyma_on_their_side():
    anatomy = phantom.load_anatomy()
    rng = np.random.default_rng(4)
    lesions = [phantom.Lesion("left", 3000), phantom.Lesion("right", 800)]
    labels = phantom.paint_lesions(rng, anatomy, lesions)
    mid = anatomy.midline_index
    for k, lesion in enumerate(lesions, start=1):
        xs = np.nonzero(labels == k)[0]
        assert (labels == k).sum() == lesion.voxels
        assert (xs < mid).all() if lesion.side == "left" else (xs > mid).all()
        assert anatomy.parenchyma[labels == k].all()
    image, warped = phantom.render_subject(anatomy, labels, rng)
    tissue = anatomy.parenchyma & (warped == 0)
    assert image[warped > 0].mean() < 0.5 * image[tissue].mean()


@pytest.mark.slow
def test_synth_is_deterministic(tmp_path):
    digests = []
    for run in ("a", "b"):
        synthesize_release(tmp_path / run, "r1.2", 1, seed=11, progress=False)
        files = sorted(p for p in (tmp_path / run).rglob("*.nii.gz"))
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in files])
    assert digests[0] == digests[1] and len(digests[0]) >= 2


def test_too_many_defects_refused(tmp_path):
    with pytest.raises(ValueError, match="defective"):
        synthesize_release(tmp_path, "r1.1", 2, truncated=2, empty_masks=1, progress=False)
