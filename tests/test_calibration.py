"""Calibrated scores (floor and ceiling per subject), copy detection and the masks of nearid-score's pairs."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from conftest import random_image
from PIL import Image

from nearid_metric.calibration import (
    HASH_DISTANCE,
    calibrate,
    calibrate_column,
    ceiling_pairs,
    difference_hash,
    find_copies,
    floor_pairs,
    hash_distance,
)
from nearid_metric.masking import MaskedImage, find_mask, masked_pairs
from nearid_metric.stats import bootstrap_ci


def test_ceiling_pairs_are_ordered_pairs_of_different_references():
    pairs = ceiling_pairs({"dog": ["a", "b", "c"], "cat": ["x"]})
    assert sorted(pairs) == sorted([("dog", r, s) for r in "abc" for s in "abc" if r != s])
    assert len(pairs) == 6 and not any(a == b for _, a, b in pairs)  # no self-pairs; one photo: no ceiling


def test_floor_pairs_use_other_subjects_only():
    refs = {"dog": ["d1", "d2"], "cat": ["c1"], "owl": ["o1"]}
    gens = {"dog": ["g1", "g2"], "cat": ["h1"]}
    pairs = floor_pairs(refs, gens, max_pairs=100)
    assert sorted(p for p in pairs if p[0] == "dog") == sorted(("dog", r, g) for r in ("c1", "o1") for g in ("g1", "g2"))
    assert sorted(p for p in pairs if p[0] == "cat") == [("cat", r, "h1") for r in ("d1", "d2", "o1")]
    sampled = floor_pairs(refs, gens, max_pairs=2, seed=5)
    assert sum(p[0] == "dog" for p in sampled) == 2 and sampled == floor_pairs(refs, gens, max_pairs=2, seed=5)
    assert all(r not in refs[s] for s, r, _ in sampled)
    with pytest.raises(ValueError, match="at least 1"):
        floor_pairs(refs, gens, max_pairs=0)


def test_calibrated_scores_by_hand():
    scores = {"dog": [0.6, 0.8], "cat": [0.5, 0.7, 0.9], "owl": [0.4]}
    ceilings = {"dog": [0.9, 0.9], "cat": [0.8, 1.0], "owl": []}  # owl: one reference photo
    floors = {"dog": [0.5], "cat": [0.3, 0.5], "owl": [0.2]}
    result = calibrate(scores, ceilings, floors, resamples=500, seed=1)
    dog, cat, owl = (result["subjects"][s] for s in ("dog", "cat", "owl"))
    assert dog["calibrated"] == pytest.approx((0.7 - 0.5) / (0.9 - 0.5))  # 0.5
    assert cat["calibrated"] == pytest.approx((0.7 - 0.4) / (0.9 - 0.4))  # 0.6
    assert owl["calibrated"] is None and math.isnan(owl["ceiling"])
    assert result["macro"]["calibrated"] == pytest.approx(0.55) and result["macro"]["n"] == 2
    low, high = bootstrap_ci([0.5, 0.7, 0.9], resamples=500, seed=1)
    assert cat["ci95"] == pytest.approx([(low - 0.4) / 0.5, (high - 0.4) / 0.5])
    flat = calibrate({"x": [0.5]}, {"x": [0.4]}, {"x": [0.6]}, resamples=None)  # ceiling below floor
    assert flat["subjects"]["x"]["calibrated"] is None and flat["macro"]["calibrated"] is None


def jpeg(image: Image.Image, quality: int = 80) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(buffer)


def other_photo(seed: int) -> tuple[Image.Image, Image.Image]:
    """Two photos of one 'object' (a patch) on different backgrounds, at different places."""
    thing = random_image(1000 + seed, (40, 40))
    first, second = random_image(2000 + seed, (120, 96)), random_image(3000 + seed, (120, 96))
    first.paste(thing, (10, 10))
    second.paste(thing, (60, 40))
    return first, second


def test_difference_hash_tells_copies_from_other_photos():
    for seed in range(20):
        original = random_image(seed, (120, 96))
        assert hash_distance(difference_hash(original), difference_hash(original.copy())) == 0
        copy = jpeg(original.resize((84, 67), Image.Resampling.BICUBIC))
        assert hash_distance(difference_hash(original), difference_hash(copy)) <= HASH_DISTANCE
        first, second = other_photo(seed)
        assert hash_distance(difference_hash(first), difference_hash(second)) > HASH_DISTANCE


def test_find_copies():
    first, second = other_photo(0)
    copy = jpeg(first.resize((90, 72), Image.Resampling.BICUBIC))
    hashes = {"ref": difference_hash(first), "exact": difference_hash(first), "resized": difference_hash(copy),
              "other": difference_hash(second)}
    pairs = [("dog", "ref", "exact", 1.0), ("dog", "ref", "resized", 0.85), ("dog", "ref", "other", 0.86),
             ("dog", "ref2", "fine", 0.80), ("cat", "c", "close", 0.97)]
    found = {c["gen"]: c for c in find_copies(pairs, {"dog": 0.9, "cat": 0.95}, hashes=hashes)}
    assert set(found) == {"exact", "resized", "close"}  # not a different photo of the same object
    assert found["exact"]["reason"] == "pixels" and found["exact"]["hash_distance"] == 0
    assert found["resized"]["reason"] == "pixels" and found["resized"]["ref"] == "ref"
    assert found["close"]["reason"] == "score" and found["close"]["real_max"] == 0.95
    assert {c["gen"] for c in find_copies(pairs, {"dog": 0.9, "cat": 0.95}, margin=0.05)} == {"exact"}
    assert find_copies(pairs, {}) == []  # no real-vs-real maximum and no hashes: nothing to judge by


def test_calibrate_column_judges_copies_by_the_highest_real_pair():
    """A generation is a copy when it beats the subject's *highest* real-vs-real score (+ margin), not its mean."""
    real = [("dog", "d1", "d2", 0.5), ("dog", "d2", "d1", 0.9), ("cat", "c1", "c2", 0.6), ("cat", "c2", "c1", 0.6)]
    floor = [("dog", "c1", "g1", 0.1), ("cat", "d1", "h1", 0.2)]
    values = [0.8, 0.95, 0.62, 0.4]
    subjects = ["dog", "dog", "cat", "cat"]
    pairs = [("d1", "g1"), ("d2", "g2"), ("c1", "h1"), ("c2", "h2")]
    out = calibrate_column(values, subjects, pairs, real=real, floor=floor, resamples=None)
    copies = {c["gen"]: c for c in out["copies"]}
    assert set(copies) == {"g2", "h1"}  # 0.8 < 0.9 (the mean 0.7 would flag it); 0.95 > 0.9; 0.62 > 0.6
    assert copies["g2"]["real_max"] == pytest.approx(0.9) and copies["g2"]["reason"] == "score"
    assert {c["gen"] for c in calibrate_column(values, subjects, pairs, real=real, margin=0.03, calibrated=False,
                                               resamples=None)["copies"]} == {"g2"}  # 0.62 <= 0.6 + 0.03; 0.95 > 0.9 + 0.03
    dog = out["calibration"]["subjects"]["dog"]
    assert dog["ceiling"] == pytest.approx(0.7) and dog["floor"] == pytest.approx(0.1)
    assert dog["calibrated"] == pytest.approx((0.875 - 0.1) / (0.7 - 0.1))


def test_masks_of_the_pairs(tmp_path):
    refs, gens, masks = tmp_path / "refs", tmp_path / "gens", tmp_path / "masks"
    for folder in (refs / "dog", gens / "dog", masks / "dog"):
        folder.mkdir(parents=True)
    for name in ("a", "b", "c"):
        random_image(1, (16, 16)).save(refs / "dog" / f"{name}.jpg")
        random_image(2, (16, 16)).save(gens / "dog" / f"{name}.png")
    Image.new("L", (16, 16), 255).save(masks / "dog" / "a.png")  # same relative name, another extension
    Image.new("L", (16, 16), 255).save(masks / "dog" / "c.png")
    Image.new("L", (16, 16), 255).save(masks / "dog" / "c.bmp")  # ambiguous
    pairs = [(refs / "dog" / f"{n}.jpg", gens / "dog" / f"{n}.png") for n in ("a", "b", "c")]
    out, problems = masked_pairs(pairs, ref_root=refs, gen_root=gens, ref_masks=masks, fill="white")
    assert out[0] == (MaskedImage(refs / "dog" / "a.jpg", masks / "dog" / "a.png", fill="white"), pairs[0][1])
    assert set(problems) == {1, 2} and "no mask" in problems[1] and "two masks" in problems[2]
    assert str(refs / "dog" / "b.jpg") in problems[1]
    both, problems = masked_pairs(pairs[:1], ref_root=refs, gen_root=gens, ref_masks=masks, gen_masks=masks)
    assert isinstance(both[0][1], MaskedImage) and both[0][1].mask == masks / "dog" / "a.png" and not problems
    assert find_mask(refs / "dog" / "a.jpg", refs / "dog" / "a.jpg", masks / "dog") == masks / "dog" / "a.png"
    assert np.array_equal(np.asarray(Image.open(masks / "dog" / "a.png")), np.full((16, 16), 255))
