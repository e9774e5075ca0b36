"""DreamBench++ human alignment: keys, files, correlations, the sample-release tree and the
``nearid-dreambench`` command, on synthetic data (tiny random models, no network)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nearid_metric import dreambench as db
from nearid_metric import dreambench_data as dbdata
from nearid_metric.cli.dreambench import main as dreambench_main

scipy_stats = pytest.importorskip("scipy.stats")


# --- helpers ----------------------------------------------------------------------------------------


def human_keys(category: str, concepts: int = 3, prompts: int = 4) -> list[str]:
    """Human-style keys ``<category>_<NN>_thing-<prompt>`` (no image index)."""
    return [f"{category}_{c:02d}_thing-{p}" for c in range(concepts) for p in range(prompts)]


def with_correlation(x: np.ndarray, r: float, seed: int) -> np.ndarray:
    """A vector whose Pearson r with ``x`` is exactly ``r`` (up to float64 rounding)."""
    rng = np.random.default_rng(seed)
    u = (x - x.mean()) / np.linalg.norm(x - x.mean())
    z = rng.normal(size=len(x))
    z -= z.mean()
    z -= (z @ u) * u
    z /= np.linalg.norm(z)
    return 3.0 + 2.0 * (r * u + math.sqrt(1 - r * r) * z)


def metric_keys(keys: list[str]) -> list[str]:
    """The metric-file spelling of human keys: image index appended, object 20 as rubik's_cube."""
    return [k.replace("magic_cube", "rubik's_cube") + "_0" for k in keys]


def reference_mh(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
    """MH by the definition, with scipy and numpy: per method (round(r1, 4) + round(r2, 4)) / 2, Fisher z."""
    rs = [(round(float(scipy_stats.pearsonr(s, g1)[0]), 4) + round(float(scipy_stats.pearsonr(s, g2)[0]), 4)) / 2
          for s, g1, g2 in pairs]
    return float(np.tanh(np.mean(np.arctanh(np.clip(rs, -0.9999, 0.9999)))))


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


# --- keys ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, expected", [
    ("live_subject_animal_00_kitten-0_0", ("live_subject_animal", "00_kitten", 0, 0)),
    ("live_subject_animal_00_kitten-0", ("live_subject_animal", "00_kitten", 0, None)),
    ("object_20_magic_cube-3", ("object", "20_magic_cube", 3, None)),
    ("object_20_rubik's_cube-3_1", ("object", "20_rubik's_cube", 3, 1)),
    ("live_subject_animal_26_cotton-top_tamarin-8_0", ("live_subject_animal", "26_cotton-top_tamarin", 8, 0)),
    ("style_10_ukiyo-e-2", ("style", "10_ukiyo-e", 2, None)),
    ("live_subject_human_05_person-1_12", ("live_subject_human", "05_person", 1, 12)),
])
def test_parse_key(key, expected):
    assert db.parse_key(key) == db.DreamBenchKey(*expected)


@pytest.mark.parametrize("key", ["animal_00_kitten-0", "objects_00_cup-0", "live_subject_00_kitten-0", ""])
def test_parse_key_unknown_category_names_the_key(key):
    with pytest.raises(ValueError, match="does not start with a known category") as e:
        db.parse_key(key)
    assert repr(key) in str(e.value)


@pytest.mark.parametrize("key", ["object_00_cup", "object_00_cup-x", "object_-3"])
def test_parse_key_malformed(key):
    with pytest.raises(ValueError, match=r"is not <category>_<concept>-<prompt>") as e:
        db.parse_key(key)
    assert repr(key) in str(e.value)


@pytest.mark.parametrize("key, canonical", [
    ("live_subject_animal_00_kitten-0_0", "live_subject_animal_00_kitten-0"),
    ("live_subject_animal_00_kitten-0", "live_subject_animal_00_kitten-0"),  # no image index: unchanged
    ("object_20_rubik's_cube-3_0", "object_20_magic_cube-3"),
    ("object_20_rubik's_cube-3", "object_20_magic_cube-3"),
    ("object_20_magic_cube-3_7", "object_20_magic_cube-3"),
    ("style_10_ukiyo-e-2_15", "style_10_ukiyo-e-2"),
    ("live_subject_animal_26_cotton-top_tamarin-8", "live_subject_animal_26_cotton-top_tamarin-8"),
])
def test_canonical_key(key, canonical):
    assert db.canonical_key(key) == canonical


def test_select_category_keeps_order_and_covers_every_category():
    keys = [k for c in reversed(db.CATEGORIES) for k in human_keys(c, 2, 2)]
    values = {k: i for i, k in enumerate(keys)}
    for category in db.CATEGORIES:
        picked = db.select_category(values, category)
        assert list(picked) == [k for k in keys if k.startswith(category + "_")]
        assert len(picked) == 4
    assert db.select_category(values, None) == values
    # 'live_subject_animal' must not pick up 'live_subject_human' keys and vice versa
    assert all("animal" in k for k in db.select_category(values, "live_subject_animal"))


def test_select_category_rejects_unknown_category_and_keys():
    with pytest.raises(ValueError, match="unknown DreamBench\\+\\+ category 'animal'"):
        db.select_category({}, "animal")
    with pytest.raises(ValueError, match="'scene_00_beach-0'"):
        db.select_category({"object_00_cup-0": 1.0, "scene_00_beach-0": 2.0}, "object")


# --- correlations -------------------------------------------------------------------------------------


def test_scores_equal_to_ratings_give_the_clip_value():
    keys = human_keys("object", concepts=21)  # includes object_20, spelled rubik's_cube in the scores
    keys[-1] = "object_20_magic_cube-3"
    rng = np.random.default_rng(0)
    ratings, scores = {}, {}
    for method in db.METHODS:
        values = rng.integers(0, 5, len(keys)).astype(float)
        group = dict(zip(keys, values))
        ratings[method] = (group, dict(group))
        scores[method] = dict(zip(metric_keys(keys), values))
    result = db.human_alignment(scores, ratings, "object")
    assert result.value == pytest.approx(math.tanh(math.atanh(0.9999)), abs=1e-12)
    assert result.value == pytest.approx(0.9999, abs=1e-12)
    assert result.undefined == ()
    assert [row.method for row in result.methods] == list(db.METHODS)
    assert all(row.r1 == row.r2 == row.r == 1.0 and row.n == len(keys) for row in result.methods)


def test_constructed_correlations_match_scipy_and_numpy():
    keys = human_keys("live_subject_animal", concepts=5, prompts=9)
    g1 = np.random.default_rng(1).integers(0, 5, len(keys)).astype(float)
    targets = [(0.1, 0.3), (0.25, 0.2), (0.5, 0.45), (0.6, 0.7), (0.05, -0.1), (0.4, 0.35), (0.33, 0.3)]
    ratings, scores, pairs = {}, {}, []
    for i, (method, (r1, r2)) in enumerate(zip(db.METHODS, targets)):
        s = with_correlation(g1, r1, seed=10 + i) * 30
        # group 2: fixed correlation with the scores (its relation to group 1 is irrelevant here)
        g2 = with_correlation(s, r2, seed=20 + i)
        ratings[method] = (dict(zip(keys, g1)), dict(zip(keys, g2)))
        scores[method] = dict(zip(metric_keys(keys), s))
        pairs.append((s, g1, g2))
    result = db.human_alignment(scores, ratings, "live_subject_animal")
    expected = float(np.tanh(np.mean(np.arctanh([(a + b) / 2 for a, b in targets]))))
    assert result.value == pytest.approx(expected, abs=1e-12)
    assert result.value == pytest.approx(reference_mh(pairs), abs=1e-12)
    for row, (r1, r2) in zip(result.methods, targets):
        assert (row.r1, row.r2, row.r) == pytest.approx((r1, r2, (r1 + r2) / 2), abs=1e-12)


def test_random_data_matches_scipy_and_numpy():
    rng = np.random.default_rng(2)
    keys = human_keys("style", concepts=4, prompts=9)
    ratings, scores, pairs = {}, {}, []
    for k, method in enumerate(db.METHODS):
        g1 = rng.integers(0, 5, len(keys)).astype(float)
        g2 = np.clip(g1 + rng.integers(-1, 2, len(keys)), 0, 4)
        s = 60 + 5 * g1 + rng.normal(0, 3 + k, len(keys))
        ratings[method] = (dict(zip(keys, g1)), dict(zip(keys, g2)))
        scores[method] = dict(zip(metric_keys(keys), s))
        pairs.append((s, g1, g2))
    assert db.human_alignment(scores, ratings, "style").value == pytest.approx(reference_mh(pairs), abs=1e-12)


def test_rounding_to_4_decimals_is_applied():
    keys = human_keys("object", concepts=5, prompts=9)
    g = np.random.default_rng(3).integers(0, 5, len(keys)).astype(float)
    s = with_correlation(g, 0.123449, seed=4)  # rounds to 0.1234; unrounded differs by 4.9e-5
    assert scipy_stats.pearsonr(s, g)[0] == pytest.approx(0.123449, abs=1e-12)
    ratings = {"m": (dict(zip(keys, g)), dict(zip(keys, g)))}
    result = db.human_alignment({"m": dict(zip(keys, s))}, ratings, "object")
    assert result.methods[0].r1 == result.methods[0].r2 == 0.1234
    assert result.value == pytest.approx(0.1234, abs=1e-12)
    assert abs(result.value - 0.123449) > 4e-5


def test_human_human_on_hand_made_data():
    keys = ["object_00_cup-0", "object_00_cup-1", "object_01_bag-0", "object_01_bag-1", "object_01_bag-2",
            "style_00_sketch-0"]
    data = {
        "a": ([0, 1, 2, 3, 4, 2], [1, 1, 2, 4, 3, 0]),
        "b": ([4, 4, 3, 0, 1, 0], [3, 4, 4, 1, 0, 4]),
        "c": ([2, 0, 1, 1, 3, 1], [2, 1, 0, 1, 4, 3]),
    }
    ratings = {m: (dict(zip(keys, g1)), dict(zip(keys, g2))) for m, (g1, g2) in data.items()}
    result = db.human_human_alignment(ratings, "object")
    rs = [round(float(scipy_stats.pearsonr(g1[:5], g2[:5])[0]), 4) for g1, g2 in data.values()]
    assert [row.r for row in result.methods] == rs
    assert all(row.n == 5 and row.r1 is None and row.r2 is None for row in result.methods)
    assert result.value == pytest.approx(float(np.tanh(np.mean(np.arctanh(rs)))), abs=1e-12)


def test_misaligned_keys_are_refused_naming_the_differences():
    keys = human_keys("object")
    ratings = {"emu2": (dict.fromkeys(keys, 1.0), dict.fromkeys(keys, 2.0))}
    scores = {"emu2": dict.fromkeys(metric_keys(keys[:-1]) + ["object_07_other-0_0"], 50.0)}
    with pytest.raises(ValueError) as e:
        db.human_alignment(scores, ratings, "object")
    message = str(e.value)
    assert "'emu2'" in message and "1 only in scores: object_07_other-0" in message
    assert f"1 only in ratings group 1: {keys[-1]}" in message


def test_groups_with_different_keys_are_refused():
    keys = human_keys("object")
    ratings = {"blip_diffusion": (dict.fromkeys(keys, 1.0), dict.fromkeys(keys[1:], 2.0))}
    with pytest.raises(ValueError, match=rf"'blip_diffusion'.*1 only in ratings group 1: {keys[0]}"):
        db.human_human_alignment(ratings, "object")


def test_duplicate_canonical_keys_in_scores_are_refused():
    keys = human_keys("object")
    ratings = {"m": (dict.fromkeys(keys, 1.0), dict.fromkeys(keys, 2.0))}
    scores = {"m": {**dict.fromkeys(metric_keys(keys), 1.0), keys[0] + "_1": 2.0}}
    with pytest.raises(ValueError, match=rf"scores of 'm'.*both have the canonical key '{keys[0]}'"):
        db.human_alignment(scores, ratings, "object")


def test_constant_scores_are_reported_and_left_out(caplog):
    keys = human_keys("live_subject_human", concepts=4, prompts=5)
    rng = np.random.default_rng(5)
    ratings, scores, pairs = {}, {}, []
    for method in ("a", "b", "c"):
        g1, g2 = rng.integers(0, 5, (2, len(keys))).astype(float)
        s = g1 + rng.normal(0, 1, len(keys))
        ratings[method] = (dict(zip(keys, g1)), dict(zip(keys, g2)))
        scores[method] = dict(zip(keys, s))
        pairs.append((s, g1, g2))
    scores["b"] = dict.fromkeys(keys, 71.5)
    with caplog.at_level(logging.WARNING, logger="nearid_metric.dreambench"):
        result = db.human_alignment(scores, ratings, "live_subject_human")
    assert result.undefined == ("b",)
    row_b = result.methods[1]
    assert row_b.method == "b" and math.isnan(row_b.r1) and math.isnan(row_b.r2) and math.isnan(row_b.r)
    assert result.value == pytest.approx(reference_mh([pairs[0], pairs[2]]), abs=1e-12)
    assert "method b" in caplog.text and "scores constant" in caplog.text and "left out" in caplog.text


def test_all_methods_undefined_give_nan():
    keys = human_keys("object")
    ratings = {"m": (dict.fromkeys(keys, 2.0), dict.fromkeys(keys, 3.0))}
    result = db.human_human_alignment(ratings, "object")
    assert math.isnan(result.value) and result.undefined == ("m",)


def test_method_sets_must_match_unless_chosen():
    keys = human_keys("object")
    group = dict(zip(keys, np.arange(len(keys)) % 5))
    ratings = {m: (group, group) for m in ("a", "b")}
    scores = {m: dict(zip(keys, np.arange(len(keys), dtype=float))) for m in ("a", "c")}
    with pytest.raises(ValueError, match=r"only in scores \['c'\], only in ratings \['b'\]"):
        db.human_alignment(scores, ratings, "object")
    result = db.human_alignment(scores, ratings, "object", methods=["a"])
    assert [row.method for row in result.methods] == ["a"]
    with pytest.raises(ValueError, match=r"\['b'\] are not in both"):
        db.human_alignment(scores, ratings, "object", methods=["a", "b"])


def test_category_without_keys_is_refused():
    keys = human_keys("object")
    ratings = {"m": (dict.fromkeys(keys, 1.0), dict.fromkeys(keys, 2.0))}
    with pytest.raises(ValueError, match="'m' has no keys in category 'style'"):
        db.human_human_alignment(ratings, "style")


def test_pooled_pearson_differs_from_per_category_figure():
    # each category is perfectly ordered within itself, but categories sit on different scales
    ratings, scores = {}, {}
    rng = np.random.default_rng(6)
    g = {c: rng.integers(0, 5, 12).astype(float) for c in db.CATEGORIES}
    s = {c: with_correlation(g[c], 0.6, seed=i) + 40 * i for i, c in enumerate(db.CATEGORIES)}
    keys = {c: human_keys(c) for c in db.CATEGORIES}
    group = {k: v for c in db.CATEGORIES for k, v in zip(keys[c], g[c])}
    ratings["m"] = (group, group)
    scores["m"] = {k: v for c in db.CATEGORIES for k, v in zip(keys[c], s[c])}
    per_category = {c: db.human_alignment(scores, ratings, c).value for c in db.CATEGORIES}
    assert per_category == pytest.approx(dict.fromkeys(db.CATEGORIES, 0.6), abs=1e-12)
    assert db.combine_categories(per_category) == pytest.approx(0.6, abs=1e-12)
    pooled = db.human_alignment(scores, ratings, None)
    assert pooled.methods[0].n == 48 and abs(pooled.value - 0.6) > 0.05


def test_combine_categories():
    values = {"object": 0.545, "live_subject_animal": 0.435, "live_subject_human": 0.440, "style": 0.350}
    expected = float(np.tanh(np.mean(np.arctanh(list(values.values())))))
    assert db.combine_categories(values) == pytest.approx(expected, abs=1e-12)
    assert round(db.combine_categories(values), 3) == 0.445  # the paper's 4-category NearID figure
    with pytest.raises(ValueError, match="exactly the categories"):
        db.combine_categories({"object": 0.5})
    with pytest.raises(ValueError, match="categories: style"):
        db.combine_categories({**values, "style": float("nan")})


# --- rating and score files ---------------------------------------------------------------------------


def test_load_ratings_keeps_order(tmp_path):
    data = {"style_00_a-0": 4, "object_00_cup-1": 0, "object_00_cup-0": 2.5}
    ratings = dbdata.load_ratings(write_json(tmp_path / "m-cp.json", data))
    assert list(ratings.items()) == [("style_00_a-0", 4.0), ("object_00_cup-1", 0.0), ("object_00_cup-0", 2.5)]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a valid UTF-8 JSON file"),
    ("[1, 2]", "expected a JSON object key -> rating, got list"),
    ("{}", "no ratings"),
    ('{"object_00_cup-0": "3"}', "rating for 'object_00_cup-0' is '3', not a finite number"),
    ('{"object_00_cup-0": true}', "is True, not a finite number"),
    ('{"object_00_cup-0": null}', "is None, not a finite number"),
    ('{"object_00_cup-0": NaN}', "is nan, not a finite number"),
    ('{"object_00_cup-0": 5}', r"rating 5.0 for 'object_00_cup-0' is outside \[0, 4\]"),
    ('{"object_00_cup-0": 1, "object_00_cup-0": 2}', "key 'object_00_cup-0' appears more than once"),
    ('{"object_20_magic_cube-0": 1, "object_20_rubik\'s_cube-0": 2}', "both have the canonical key"),
])
def test_malformed_rating_files_name_the_file(tmp_path, content, message):
    path = write_json(tmp_path / "emu2-cp.json", content)
    with pytest.raises(ValueError, match=message) as e:
        dbdata.load_ratings(path)
    assert str(e.value).startswith(str(path))


def test_non_utf8_rating_file(tmp_path):
    path = tmp_path / "bad-cp.json"
    path.write_bytes(b'{"object_00_cup-0": 1, "\xff": 2}')
    with pytest.raises(ValueError, match="not a valid UTF-8 JSON file") as e:
        dbdata.load_ratings(path)
    assert str(path) in str(e.value)


def rating_tree(root: Path, methods=("emu2", "blip_diffusion"), extra_group1=()) -> Path:
    base = root / "data_human_rating" / "merged_data"
    for group, value in (("group1", 1), ("group2", 3)):
        for method in (*methods, *(extra_group1 if group == "group1" else ())):
            write_json(base / group / f"{method}-cp.json", dict.fromkeys(human_keys("object", 2, 2), value))
        write_json(base / group / "emu2-pf.json", {"object_00_thing-0": 1})  # prompt following: skipped
    return root / "data_human_rating"


@pytest.mark.parametrize("entry", ["data_human_rating", "data_human_rating/merged_data"])
def test_load_rating_tree(tmp_path, entry):
    rating_tree(tmp_path)
    ratings = dbdata.load_rating_tree(tmp_path / entry)
    assert list(ratings) == ["blip_diffusion", "emu2"]  # METHODS order
    group1, group2 = ratings["emu2"]
    assert set(group1.values()) == {1.0} and set(group2.values()) == {3.0} and len(group1) == 4


def test_load_rating_tree_folder_holding_the_groups(tmp_path):
    for group in ("group1", "group2"):
        write_json(tmp_path / "here" / group / "new_method-cp.json", {"object_00_cup-0": 2})
    assert list(dbdata.load_rating_tree(tmp_path / "here")) == ["new_method"]


def test_load_rating_tree_errors(tmp_path):
    rating_tree(tmp_path, extra_group1=("dreambooth_sd",))
    with pytest.raises(ValueError, match=r"one group only: dreambooth_sd \(only in group1\)"):
        dbdata.load_rating_tree(tmp_path / "data_human_rating")
    with pytest.raises(ValueError, match="found no group1/ and group2/ folders"):
        dbdata.load_rating_tree(tmp_path)
    (tmp_path / "empty" / "group1").mkdir(parents=True)
    (tmp_path / "empty" / "group2").mkdir()
    with pytest.raises(ValueError, match="no \\*-cp.json rating files"):
        dbdata.load_rating_tree(tmp_path / "empty")


def test_save_and_load_scores(tmp_path, caplog):
    scores = {"style_00_a-0_0": 71.25, "object_20_rubik's_cube-3_0": -3.5, "object_00_cup-0_0": np.float32(0.5)}
    path = dbdata.save_scores(tmp_path / "out", "emu2", scores, "nearid|sig-1")
    assert path == tmp_path / "out" / "emu2.json"
    on_disk = json.loads(path.read_text())
    assert list(on_disk.items()) == [(k, float(v)) for k, v in scores.items()]  # flat, order kept
    assert dbdata.load_scores(path) == on_disk
    assert dbdata.load_signatures(tmp_path / "out") == {"emu2": "nearid|sig-1"}
    dbdata.save_scores(tmp_path / "out", "blip_diffusion", {"object_00_cup-0_0": 1.0}, "nearid|sig-1")
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="nearid_metric.dreambench"):
        dbdata.save_scores(tmp_path / "out", "dreambooth_sd", {"object_00_cup-0_0": 1.0}, "other")
    assert "blip_diffusion, emu2 were scored with a different signature" in caplog.text
    assert dbdata.load_signatures(tmp_path / "out") == {"emu2": "nearid|sig-1", "blip_diffusion": "nearid|sig-1",
                                                    "dreambooth_sd": "other"}
    folder = dbdata.load_score_folder(tmp_path / "out")
    assert list(folder) == ["dreambooth_sd", "blip_diffusion", "emu2"]  # METHODS order, sidecar skipped
    assert folder["emu2"] == on_disk


def test_save_scores_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="not finite for 1 keys: object_00_cup-0_0"):
        dbdata.save_scores(tmp_path, "emu2", {"object_00_cup-0_0": float("nan")}, "s")
    for method in ("signatures", "a/b", ""):
        with pytest.raises(ValueError, match="cannot be a method name"):
            dbdata.save_scores(tmp_path, method, {"object_00_cup-0_0": 1.0}, "s")
    assert not list(tmp_path.iterdir())


def test_load_scores_errors_name_the_file(tmp_path):
    path = write_json(tmp_path / "emu2.json", '{"object_00_cup-0_0": "high"}')
    with pytest.raises(ValueError, match=r"emu2.json: score for 'object_00_cup-0_0' is 'high'"):
        dbdata.load_scores(path)
    with pytest.raises(ValueError, match="no <method>.json score files"):
        dbdata.load_score_folder(tmp_path / "nothing")
    write_json(tmp_path / "sig" / "signatures.json", {"emu2": 3})
    with pytest.raises(ValueError, match="signatures.json: expected a JSON object method -> signature"):
        dbdata.load_signatures(tmp_path / "sig")


def test_loaded_files_feed_the_alignment(tmp_path):
    keys = human_keys("object", 3, 3)
    rng = np.random.default_rng(7)
    pairs = []
    for method in ("emu2", "blip_diffusion"):
        g1, g2 = rng.integers(0, 5, (2, len(keys)))
        s = 50 + 4 * g1 + rng.normal(0, 2, len(keys))
        for group, g in (("group1", g1), ("group2", g2)):
            write_json(tmp_path / "ratings" / group / f"{method}-cp.json", dict(zip(keys, g.tolist())))
        dbdata.save_scores(tmp_path / "scores", method, dict(zip(metric_keys(keys), s)), "sig")
        pairs.append((s, g1, g2))
    result = db.human_alignment(dbdata.load_score_folder(tmp_path / "scores"),
                                dbdata.load_rating_tree(tmp_path / "ratings"), "object")
    assert result.value == pytest.approx(reference_mh(pairs[::-1]), abs=1e-12)


# --- generated-image tree -----------------------------------------------------------------------------


def png(path: Path, value: int = 0) -> Path:
    """A tiny grey image at ``path`` (PNG, or the format its extension names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value, value, value)).save(path)
    return path


def make_run(root: Path, name: str, images=("live_subject_animal_00_kitten/0_0", "object_20_rubik's_cube/3_0")) -> Path:
    for i, rel in enumerate(images):
        png(root / name / "src_image" / f"{rel}.png", i)
        png(root / name / "tgt_image" / f"{rel}.png", 100 + i)
    return root / name


def test_find_runs_maps_ip_adapter_spellings(tmp_path, caplog):
    samples = tmp_path / "samples"
    make_run(samples, "ip_adapter_plus_vit_huge_sdxl_gs7_5")
    make_run(samples, "ip_adapter_vit_giant_sdxl_gs7_5")
    make_run(samples, "dreambooth_sd_lr5e-6")
    make_run(samples, "dreambooth_lora_sdxl")
    make_run(samples, "emu2")
    (samples / "notes").mkdir()
    (samples / ".cache").mkdir()
    (samples / "readme.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="nearid_metric.dreambench"):
        runs = dbdata.find_runs(samples)
    assert runs == {
        "dreambooth_sd": samples / "dreambooth_sd_lr5e-6",
        "dreambooth_lora_sdxl": samples / "dreambooth_lora_sdxl",
        "emu2": samples / "emu2",
        "ip_adapter_plus_vit_h_sdxl": samples / "ip_adapter_plus_vit_huge_sdxl_gs7_5",
        "ip_adapter_vit_g_sdxl": samples / "ip_adapter_vit_giant_sdxl_gs7_5",
    }
    assert list(runs) == [m for m in db.METHODS if m in runs]
    assert "skipped folders not named after a DreamBench++ method: notes" in caplog.text
    assert ".cache" not in caplog.text


def test_find_runs_errors(tmp_path):
    make_run(tmp_path / "a", "emu2_seed0")
    make_run(tmp_path / "a", "emu2_seed1")
    with pytest.raises(ValueError, match="two runs for method emu2"):
        dbdata.find_runs(tmp_path / "a")
    png(tmp_path / "b" / "blip_diffusion_x" / "src_image" / "object_00_cup" / "0_0.png")
    with pytest.raises(ValueError, match="run of blip_diffusion has no tgt_image/ folder"):
        dbdata.find_runs(tmp_path / "b")
    (tmp_path / "c" / "emu2x").mkdir(parents=True)  # no separator after the prefix: not a run
    with pytest.raises(ValueError, match="no run folder named after a DreamBench\\+\\+ method"):
        dbdata.find_runs(tmp_path / "c")
    with pytest.raises(ValueError, match="not a folder"):
        dbdata.find_runs(tmp_path / "missing")


def test_run_pairs_keys_and_extensions(tmp_path, caplog):
    run = make_run(tmp_path, "emu2")
    png(run / "src_image" / "style_10_ukiyo-e" / "2_0.png")
    png(run / "tgt_image" / "style_10_ukiyo-e" / "2_0.jpg")  # another extension pairs by name
    (run / "tgt_image" / "prompts.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="nearid_metric.dreambench"):
        pairs = dbdata.run_pairs(run)
    assert [key for key, _, _ in pairs] == [
        "live_subject_animal_00_kitten-0_0", "object_20_rubik's_cube-3_0", "style_10_ukiyo-e-2_0"]
    key, src, tgt = pairs[2]
    assert src == run / "src_image" / "style_10_ukiyo-e" / "2_0.png"
    assert tgt == run / "tgt_image" / "style_10_ukiyo-e" / "2_0.jpg"
    assert all(src.parent.parent.name == "src_image" and tgt.parent.parent.name == "tgt_image" for _, src, tgt in pairs)
    assert "prompts.txt" in caplog.text
    assert [db.canonical_key(k) for k, _, _ in pairs][1] == "object_20_magic_cube-3"


def test_run_pairs_reports_unmatched_files(tmp_path):
    run = make_run(tmp_path, "emu2")
    extra = png(run / "tgt_image" / "object_00_cup" / "0_1.png")
    missing = png(run / "src_image" / "object_00_cup" / "5_0.png")
    with pytest.raises(ValueError) as e:
        dbdata.run_pairs(run)
    message = str(e.value)
    assert f"1 in src_image without a generation: {missing}" in message
    assert f"1 in tgt_image without a reference: {extra}" in message


def test_run_pairs_refuses_ambiguous_and_empty_runs(tmp_path):
    run = make_run(tmp_path, "emu2")
    png(run / "tgt_image" / "live_subject_animal_00_kitten" / "0_0.jpg")
    with pytest.raises(ValueError, match="is shared by"):
        dbdata.run_pairs(run)
    (tmp_path / "empty" / "src_image").mkdir(parents=True)
    (tmp_path / "empty" / "tgt_image").mkdir()
    with pytest.raises(ValueError, match="no images"):
        dbdata.run_pairs(tmp_path / "empty")
    with pytest.raises(ValueError, match="src_image: missing"):
        dbdata.run_pairs(tmp_path)


def test_run_pairs_refuses_key_collisions(tmp_path):
    run = make_run(tmp_path, "emu2", images=("object_00_cup/a-b/0", "object_00_cup/a/b-0"))
    with pytest.raises(ValueError, match="both give the key 'object_00_cup-a-b-0'"):
        dbdata.run_pairs(run)


# --- the nearid-dreambench command, end to end on a fake DreamBench++ tree ----------------------------

CONCEPTS = {
    "object": ("00_backpack", "20_magic_cube"),
    "live_subject_animal": ("00_kitten", "26_cotton-top_tamarin"),
    "live_subject_human": ("00_person", "01_chef"),
    "style": ("00_sketch", "10_ukiyo-e"),
}
PROMPTS = 3  # 2 concepts x 3 prompts = 6 keys per category, 24 per method
RUNS = {  # method (rating-file spelling) -> run folder in the sample release
    "blip_diffusion": "blip_diffusion_gs7_5_step100_seed42_torch_float16",
    "emu2": "emu2_seed42",  # spells object 20 rubik's_cube
    "ip_adapter_plus_vit_h_sdxl": "ip_adapter_plus_vit_huge_sdxl_gs7_5",  # src_image/ is a symlink to blip's
}


@dataclass(frozen=True)
class Tree:
    samples: Path
    ratings: Path
    distinct_files: int  # image files behind all pairs, a shared src_image counted once
    distinct_images: int  # distinct contents among them (a concept's src_image copies are one image)


def rated_keys() -> list[str]:
    return [f"{c}_{concept}-{p}" for c, concepts in CONCEPTS.items() for concept in concepts for p in range(PROMPTS)]


def write_ratings(root: Path, methods, seed: int = 0) -> Path:
    """``data_human_rating/merged_data/group{1,2}/<method>-cp.json`` with shuffled key order; returns the root."""
    rng = np.random.default_rng(seed)
    keys = rated_keys()
    base = root / "data_human_rating" / "merged_data"
    for method in methods:
        order = [keys[i] for i in rng.permutation(len(keys))]  # a fixed order that is not sorted
        g1 = rng.integers(0, 5, len(keys))
        g2 = np.clip(g1 + rng.integers(-1, 2, len(keys)), 0, 4)
        for group, values in (("group1", g1), ("group2", g2)):
            write_json(base / group / f"{method}-cp.json", dict(zip(order, values.tolist())))
            write_json(base / group / f"{method}-pf.json", dict.fromkeys(order, 1))  # prompt following: unused
    return root / "data_human_rating"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Tree:
    from conftest import random_image

    root = tmp_path_factory.mktemp("dreambench")
    samples = root / "samples"
    files = 0
    for m, (method, run) in enumerate(RUNS.items()):
        for k, (category, concepts) in enumerate(CONCEPTS.items()):
            for c, concept in enumerate(concepts):
                folder = f"{category}_{concept}"
                if method == "emu2":
                    folder = folder.replace("magic_cube", "rubik's_cube")
                for p in range(PROMPTS):
                    gen = random_image(1000 * m + 100 * k + 10 * c + p, (40, 32))
                    path = samples / run / "tgt_image" / folder / f"{p}_0.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    gen.save(path)
                    files += 1
                    if method != "ip_adapter_plus_vit_h_sdxl":
                        src = samples / run / "src_image" / folder / f"{p}_0.png"  # a copy per prompt, as released
                        src.parent.mkdir(parents=True, exist_ok=True)
                        random_image(500 + 10 * k + c, (36, 44)).save(src)
                        files += 1
                    write_json(samples / run / "text" / folder / f"{p}_0.txt", "a prompt")
    (samples / RUNS["ip_adapter_plus_vit_h_sdxl"] / "src_image").symlink_to(Path("..") / RUNS["blip_diffusion"] / "src_image")
    ratings = write_ratings(root, RUNS)
    for method, (g1, g2) in dbdata.load_rating_tree(ratings).items():
        for category in db.CATEGORIES:  # every correlation in the tree is defined
            assert len(set(db.select_category(g1, category).values())) > 1
            assert len(set(db.select_category(g2, category).values())) > 1
    contents = {hashlib.sha256(path.read_bytes()).digest() for path in samples.rglob("*.png")}
    return Tree(samples, ratings, files, len(contents))


def run_dreambench(*args) -> int:
    return dreambench_main([str(a) for a in args] + ["--device", "cpu", "--num-workers", "0", "--no-progress"])


def printed_row(output: str, name: str) -> list[str]:
    return next(line.split()[1:] for line in output.splitlines() if line.split()[:1] == [name])


def table_rows(out: Path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads((out / dbdata.MH_JSON).read_text())["rows"]}


def test_images_end_to_end_two_models(tree, checkpoint_dir, clip_folder, scorer, tmp_path, monkeypatch, capsys):
    """Saved scores are 100 x score(), in rating order; the table is MH of those files; --scores gives it back."""
    import nearid_metric.loading as loading_module
    from nearid_metric import create_scorer

    opened = []
    real = loading_module.read_and_decode
    monkeypatch.setattr(loading_module, "read_and_decode", lambda p: opened.append(Path(p).resolve()) or real(p))
    out = tmp_path / "out"
    assert run_dreambench("--images", tree.samples, "--ratings", tree.ratings,
                          "--model", f"nearid={checkpoint_dir},clip-i={clip_folder}", "--out", out) == 0
    printed = capsys.readouterr().out
    # each distinct image decoded once, for both models (the per-prompt copies of a src_image once in all)
    assert len(opened) == len(set(opened)) == tree.distinct_images < tree.distinct_files
    monkeypatch.undo()

    ratings = dbdata.load_rating_tree(tree.ratings)
    clip = create_scorer("clip-i", pretrained=clip_folder, device="cpu")
    rows = table_rows(out)
    assert list(rows) == ["Human-Human", "nearid", "clip-i"]
    for column, model in (("nearid", scorer), ("clip-i", clip)):
        assert dbdata.load_signatures(out / column) == dict.fromkeys(RUNS, model.signature)
        assert rows[column]["signatures"] == dict.fromkeys(RUNS, model.signature)
        for method, run in RUNS.items():
            saved = json.loads((out / column / f"{method}.json").read_text())
            assert [db.canonical_key(k) for k in saved] == list(ratings[method][0])  # the rating file's order
            files = {key: (ref, gen) for key, ref, gen in dbdata.run_pairs(tree.samples / run)}
            assert set(saved) == set(files)  # the run's own keys (rubik's_cube for emu2, image index kept)
            expected = 100 * model.score([files[k][0] for k in saved], [files[k][1] for k in saved])
            assert np.allclose(list(saved.values()), expected.numpy(), atol=1e-4)

        folder = dbdata.load_score_folder(out / column)
        mh = {c: db.human_alignment(folder, ratings, c).value for c in db.CATEGORIES}
        for c in db.CATEGORIES:
            # the reference's way: values by position (score files follow the rating files' order)
            positional = [(np.array(list(db.select_category(folder[m], c).values())),
                           np.array(list(db.select_category(ratings[m][0], c).values())),
                           np.array(list(db.select_category(ratings[m][1], c).values()))) for m in RUNS]
            assert mh[c] == pytest.approx(reference_mh(positional), abs=1e-12)
        overall = db.combine_categories(mh)
        assert rows[column]["mh"] == {**mh, "overall": overall}
        assert printed_row(printed, column) == [f"{v:.3f}" for v in (*mh.values(), overall)]
        assert [m["n"] for m in rows[column]["per_method"]["object"]] == [6, 6, 6]
    human = {c: db.human_human_alignment(ratings, c).value for c in db.CATEGORIES}
    assert rows["Human-Human"]["mh"] == {**human, "overall": db.combine_categories(human)}
    assert "over 3 methods" in printed and "overall" in printed.splitlines()[1]

    with open(out / dbdata.MH_CSV, newline="") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 3 * (4 * (3 + 1) + 1)  # rows x (categories x (methods + mean) + overall)
    mean = next(r for r in lines if (r["scorer"], r["category"], r["method"]) == ("nearid", "style", "*"))
    assert float(mean["r"]) == rows["nearid"]["mh"]["style"] and mean["n"] == "18"
    emu2 = next(r for r in lines if (r["scorer"], r["category"], r["method"]) == ("clip-i", "object", "emu2"))
    assert float(emu2["r1"]) == rows["clip-i"]["per_method"]["object"][1]["r1"]

    # saved scores alone (no model) give the identical table: scorer folders, or their parent
    assert run_dreambench("--scores", out / "nearid", out / "clip-i", "--ratings", tree.ratings,
                          "--out", tmp_path / "again") == 0
    assert capsys.readouterr().out == printed
    assert table_rows(tmp_path / "again") == rows
    assert run_dreambench("--scores", out, "--ratings", tree.ratings) == 0  # the parent: its subfolders, by name
    assert sorted(capsys.readouterr().out.splitlines()) == sorted(printed.splitlines())


def test_unreadable_image_is_an_error_unless_allowed(tree, checkpoint_dir, tmp_path, capsys):
    samples = tmp_path / "samples"
    shutil.copytree(tree.samples, samples, symlinks=True)
    bad = samples / RUNS["emu2"] / "tgt_image" / "style_10_ukiyo-e" / "1_0.png"
    bad.write_bytes(b"not a picture")
    out = tmp_path / "out"
    args = ("--images", samples, "--ratings", tree.ratings, "--model", checkpoint_dir, "--out", out)
    assert run_dreambench(*args) == 1
    err = capsys.readouterr().err
    assert f"cannot read {bad}" in err and "emu2 lack scores" in err and "--allow-missing" in err
    assert sorted(p.name for p in (out / "nearid").glob("*.json")) == [
        "blip_diffusion.json", "ip_adapter_plus_vit_h_sdxl.json", "signatures.json"]  # no emu2.json with a hole
    assert not (out / dbdata.MH_JSON).exists()

    assert run_dreambench(*args, "--allow-missing") == 0
    err = capsys.readouterr().err
    assert "nearid, emu2: 1 of 24 rated keys have no score and are left out of MH: style_10_ukiyo-e-1" in err
    saved = dbdata.load_score_folder(out / "nearid")
    assert len(saved["emu2"]) == 23 and "style_10_ukiyo-e-1_0" not in saved["emu2"]
    rows = table_rows(out)
    assert rows["nearid"]["missing_keys"] == {"emu2": ["style_10_ukiyo-e-1"]}
    assert [m["n"] for m in rows["nearid"]["per_method"]["style"]] == [6, 5, 6]
    ratings = dbdata.load_rating_tree(tree.ratings)
    dropped = {m: tuple({k: v for k, v in g.items() if m != "emu2" or k != "style_10_ukiyo-e-1"} for g in groups)
               for m, groups in ratings.items()}
    assert rows["nearid"]["mh"]["style"] == db.human_alignment(saved, dropped, "style").value
    assert [m["n"] for m in rows["Human-Human"]["per_method"]["style"]] == [6, 6, 6]  # all rated keys

    # a rated key without images in a run is refused before any model is loaded
    for side in ("src_image", "tgt_image"):
        (samples / RUNS["emu2"] / side / "object_00_backpack" / "0_0.png").unlink()
    assert run_dreambench(*args, "--model", "nearid=/nowhere") == 1  # the last --model wins; never loaded
    assert "has no images for 1 rated keys of emu2: object_00_backpack-0" in capsys.readouterr().err


def test_category_and_method_subset(tree, checkpoint_dir, tmp_path, monkeypatch, capsys):
    """--category object scores only object images; a rated method without a run needs --methods."""
    import nearid_metric.loading as loading_module

    ratings = write_ratings(tmp_path / "ratings", [*RUNS, "dreambooth_sd"])
    out = tmp_path / "out"
    args = ("--images", tree.samples, "--ratings", ratings, "--model", checkpoint_dir, "--out", out,
            "--category", "object")
    assert run_dreambench(*args) == 1
    assert "no run folder for the rated methods dreambooth_sd" in capsys.readouterr().err

    opened = []
    real = loading_module.read_and_decode
    monkeypatch.setattr(loading_module, "read_and_decode", lambda p: opened.append(p) or real(p))
    assert run_dreambench(*args, "--methods", ",".join(RUNS)) == 0
    # 6 keys x 3 gen, plus the 2 object concepts' src images (the copies per prompt and run are one content)
    assert len(opened) == 6 * 3 + 2 and all("object_" in str(p) for p in opened)
    captured = capsys.readouterr()
    assert captured.out.splitlines()[1].split() == ["scorer", "object"]  # no overall without all 4 categories
    saved = dbdata.load_score_folder(out / "nearid")
    assert list(saved) == list(RUNS) and all(len(s) == 6 for s in saved.values())
    objects = {m: tuple(db.select_category(g, "object") for g in groups)
               for m, groups in dbdata.load_rating_tree(ratings).items()}
    assert table_rows(out)["nearid"]["mh"] == {
        "object": db.human_alignment(saved, objects, "object", methods=list(RUNS)).value}
    # the object-only score files need --category object again; otherwise the other keys are missing
    assert run_dreambench("--scores", out / "nearid", "--ratings", ratings, "--methods", ",".join(RUNS)) == 1
    assert "has no score for 18 of the 24 rated keys" in capsys.readouterr().err


def vlm_folder(root: Path, ratings: Path, methods=RUNS) -> Path:
    """A VLM judge's scores: human-style keys (no image index), 0-4 integers, no signatures.json."""
    rng = np.random.default_rng(3)
    for method, (g1, _) in dbdata.load_rating_tree(ratings).items():
        if method in methods:
            values = np.clip(np.array(list(g1.values())) + rng.integers(-2, 3, len(g1)), 0, 4)
            write_json(root / "gpt4o" / f"{method}.json", dict(zip(g1, values.tolist())))
    return root / "gpt4o"


def test_scores_of_a_vlm_judge(tree, tmp_path, capsys):
    vlm = vlm_folder(tmp_path, tree.ratings)
    assert run_dreambench("--scores", vlm, "--ratings", tree.ratings, "--out", tmp_path / "out") == 0
    printed = capsys.readouterr().out
    scores, ratings = dbdata.load_score_folder(vlm), dbdata.load_rating_tree(tree.ratings)
    mh = {c: db.human_alignment(scores, ratings, c).value for c in db.CATEGORIES}
    row = table_rows(tmp_path / "out")["gpt4o"]
    assert row["mh"] == {**mh, "overall": db.combine_categories(mh)}
    assert row["signatures"] == {} and row["scores"] == str(vlm)
    assert printed_row(printed, "gpt4o")[0] == f"{mh['object']:.3f}"

    # a method without a score file: error, or an explicit subset
    (vlm / "emu2.json").rename(tmp_path / "emu2.json")
    assert run_dreambench("--scores", vlm, "--ratings", tree.ratings) == 1
    assert "no score file for emu2.json" in capsys.readouterr().err
    assert run_dreambench("--scores", vlm, "--ratings", tree.ratings, "--methods", "blip_diffusion,emu2") == 1
    assert run_dreambench("--scores", vlm, "--ratings", tree.ratings,
                          "--methods", "ip_adapter_plus_vit_h_sdxl,blip_diffusion") == 0
    captured = capsys.readouterr()
    assert "over 2 methods" in captured.out
    (tmp_path / "emu2.json").rename(vlm / "emu2.json")

    # a rated key without a score: error, or left out with --allow-missing; an unrated key: always an error
    scores["emu2"].pop("object_00_backpack-2")
    write_json(vlm / "emu2.json", scores["emu2"])
    write_json(vlm / "notes.json", {"model": "gpt-4o"})
    assert run_dreambench("--scores", vlm, "--ratings", tree.ratings) == 1
    err = capsys.readouterr().err
    assert "emu2.json has no score for 1 of the 24 rated keys: object_00_backpack-2" in err
    assert "not reading notes.json" in err
    assert run_dreambench("--scores", vlm, "--ratings", tree.ratings, "--allow-missing") == 0
    assert "left out of MH: object_00_backpack-2" in capsys.readouterr().err
    write_json(vlm / "emu2.json", {**scores["emu2"], "object_00_backpack-7": 1})
    assert run_dreambench("--scores", vlm, "--ratings", tree.ratings, "--allow-missing") == 1
    assert "1 keys of 'emu2' have no rating (canonical keys): object_00_backpack-7" in capsys.readouterr().err


def test_scores_folders_are_named_and_found(tree, tmp_path, capsys):
    a = vlm_folder(tmp_path / "a", tree.ratings)
    b = vlm_folder(tmp_path / "b", tree.ratings)
    assert run_dreambench("--scores", a, b, "--ratings", tree.ratings) == 0
    printed = capsys.readouterr().out
    assert printed_row(printed, str(a)) == printed_row(printed, str(b))  # same folder name: full paths
    assert run_dreambench("--scores", tmp_path, "--ratings", tree.ratings) == 1
    assert "no score file for the methods" in capsys.readouterr().err
    assert run_dreambench("--scores", a, a, "--ratings", tree.ratings) == 1
    assert "more than once" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    ([], "one of the arguments --images --scores is required"),
    (["--images", "{samples}", "--scores", "{samples}"], "not allowed with argument"),
    (["--scores", "{samples}", "--model", "nearid"], "--model applies to --images"),
    (["--images", "{samples}", "--model", "clip=x"], "unknown scorer 'clip'"),
    (["--images", "{samples}", "--model", "nearid={samples}/nothing-here"], "cannot load --model"),
    (["--images", "{samples}/missing"], "no such folder"),
    (["--images", "{samples}", "--methods", "emu2,emu3"], "--methods: emu3 not rated"),
    (["--images", "{samples}", "--category", "animal"], "invalid choice: 'animal'"),
])
def test_usage_errors_exit_2(tree, args, message, capsys):
    args = [a.format(samples=tree.samples) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        run_dreambench(*args, "--ratings", tree.ratings)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_console_script(tree, tmp_path):
    vlm = vlm_folder(tmp_path, tree.ratings)
    command = [Path(sys.executable).with_name("nearid-dreambench"), "--scores", vlm, "--ratings", tree.ratings]
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    scores, ratings = dbdata.load_score_folder(vlm), dbdata.load_rating_tree(tree.ratings)
    overall = db.combine_categories({c: db.human_alignment(scores, ratings, c).value for c in db.CATEGORIES})
    assert printed_row(result.stdout, "gpt4o")[-1] == f"{overall:.3f}"


def test_score_runs_leaves_out_pairs_with_an_unreadable_reference_or_generation(tmp_path, scorer):
    """score_runs: 100 x cosine per key; a pair whose reference *or* generation cannot be read has no score."""
    from conftest import random_image

    paths = {}
    for name, seed in (("ref_a", 1), ("ref_b", 2), ("gen_a", 3), ("gen_b", 4), ("gen_c", 5)):
        paths[name] = tmp_path / f"{name}.png"
        random_image(seed, (40, 32)).save(paths[name])
    paths["ref_bad"] = tmp_path / "ref_bad.png"
    paths["ref_bad"].write_bytes(b"")
    paths["gen_bad"] = tmp_path / "gen_bad.png"
    paths["gen_bad"].write_bytes(b"not a picture")
    runs = {
        "m1": [("object_00_cup-0_0", paths["ref_a"], paths["gen_a"]),
               ("object_00_cup-1_0", paths["ref_bad"], paths["gen_b"]),
               ("object_00_cup-2_0", paths["ref_b"], paths["gen_c"])],
        "m2": [("object_00_cup-0_0", paths["ref_a"], paths["gen_bad"]),
               ("object_00_cup-1_0", paths["ref_b"], paths["gen_b"])],
    }
    scores, failures = dbdata.score_runs(runs, {"nearid": scorer})
    expected = 100 * scorer.score([paths["ref_a"], paths["ref_b"], paths["ref_b"]],
                                  [paths["gen_a"], paths["gen_c"], paths["gen_b"]])
    assert list(scores) == ["nearid"]
    assert list(scores["nearid"]["m1"]) == ["object_00_cup-0_0", "object_00_cup-2_0"]
    assert list(scores["nearid"]["m2"]) == ["object_00_cup-1_0"]
    got = [*scores["nearid"]["m1"].values(), *scores["nearid"]["m2"].values()]
    assert np.allclose(got, expected.numpy(), atol=1e-4)
    assert set(failures) == {str(paths["ref_bad"]), str(paths["gen_bad"])}
