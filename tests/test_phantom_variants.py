"""Held-out phantom variants (``synth --lesion-scale --locations --lesion-level``): lesions of other sizes, across
the midline, of another contrast; the default variant draws what the generator always drew."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from atlas_shards import phantom
from atlas_shards.cli import main


def test_the_default_variant_draws_what_the_generator_always_drew():
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(200):
        assert phantom.plan_lesions(a) == phantom.plan_lesions(b, variant=phantom.Variant())
    default = main.commands["synth"].params
    assert {p.name: p.default for p in default}["lesion_level"] == phantom.LESION_LEVEL
    assert tuple({p.name: p.default for p in default}["locations"].split(",")) == phantom.CATEGORIES


def test_a_lesion_scale_scales_the_volumes():
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    base = np.array([phantom.draw_lesion_volume(a) for _ in range(2000)])
    small = np.array([phantom.draw_lesion_volume(b, 0.2) for _ in range(2000)])
    inside = (base * 0.2 > phantom.LESION_MIN_MM3) & (base < phantom.LESION_MAX_MM3)
    assert np.allclose(small[inside], 0.2 * base[inside]) and small.min() >= phantom.LESION_MIN_MM3
    assert np.median(small) < 0.25 * np.median(base)


def test_locations_are_drawn_from_the_ones_asked_for():
    rng = np.random.default_rng(2)
    variant = phantom.Variant(locations=("midline", "bilateral"))
    cats = [phantom.plan_lesions(rng, variant=variant)[0] for _ in range(400)]
    assert set(cats) == {"midline", "bilateral"} and 150 < cats.count("midline") < 250  # 0.09 : 0.09
    with pytest.raises(ValueError, match="unknown lesion location"):
        phantom.Variant(locations=("left", "centre"))


@pytest.mark.slow
def test_a_midline_lesion_crosses_x_0_and_a_higher_level_is_less_dark():
    anatomy = phantom.load_anatomy()
    rng = np.random.default_rng(4)
    labels = phantom.paint_lesions(rng, anatomy, [phantom.Lesion("midline", 4000)])
    xs = np.nonzero(labels)[0]
    mid = anatomy.midline_index
    assert labels.sum() == 4000 and (xs < mid).any() and (xs > mid).any()  # on both sides of the mirror plane
    darkness = []
    for level in (phantom.LESION_LEVEL, 0.45):
        image, warped = phantom.render_subject(anatomy, labels, np.random.default_rng(9), lesion_level=level)
        tissue = anatomy.parenchyma & (warped == 0)
        darkness.append(image[warped > 0].mean() / image[tissue].mean())
    assert darkness[0] < 0.5 and darkness[1] > darkness[0] + 0.2  # the same lesion, less contrast


@pytest.mark.slow
def test_synth_records_its_variant_and_refuses_another_in_the_same_folder(tmp_path):
    out = tmp_path / "rel"
    argv = ["synth", str(out), "--subjects", "1", "--seed", "3", "--locations", "midline", "--lesion-scale", "0.5"]
    done = CliRunner().invoke(main, argv)
    assert done.exit_code == 0, done.output
    truth = json.loads((out / "phantom-truth.json").read_text())
    assert truth["variant"] == {"lesion_scale": 0.5, "locations": ["midline"], "lesion_level": 0.18}
    assert truth["scans"][0]["truth"]["category"] == "midline"
    again = CliRunner().invoke(main, [*argv[:-1], "0.25"])
    assert again.exit_code == 1 and "not this phantom" in again.output and "variant" in again.output
    bad = CliRunner().invoke(main, ["synth", str(tmp_path / "x"), "--locations", "left,centre"])
    assert bad.exit_code == 1 and "centre" in bad.output and len(bad.output.strip().splitlines()) == 1
