"""DreamBench++ human alignment: keys, files, correlations and the sample-release tree, on synthetic data."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nearid_metric import dreambench as db

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
    ratings = db.load_ratings(write_json(tmp_path / "m-cp.json", data))
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
        db.load_ratings(path)
    assert str(e.value).startswith(str(path))


def test_non_utf8_rating_file(tmp_path):
    path = tmp_path / "bad-cp.json"
    path.write_bytes(b'{"object_00_cup-0": 1, "\xff": 2}')
    with pytest.raises(ValueError, match="not a valid UTF-8 JSON file") as e:
        db.load_ratings(path)
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
    ratings = db.load_rating_tree(tmp_path / entry)
    assert list(ratings) == ["blip_diffusion", "emu2"]  # METHODS order
    group1, group2 = ratings["emu2"]
    assert set(group1.values()) == {1.0} and set(group2.values()) == {3.0} and len(group1) == 4


def test_load_rating_tree_folder_holding_the_groups(tmp_path):
    for group in ("group1", "group2"):
        write_json(tmp_path / "here" / group / "new_method-cp.json", {"object_00_cup-0": 2})
    assert list(db.load_rating_tree(tmp_path / "here")) == ["new_method"]


def test_load_rating_tree_errors(tmp_path):
    rating_tree(tmp_path, extra_group1=("dreambooth_sd",))
    with pytest.raises(ValueError, match=r"one group only: dreambooth_sd \(only in group1\)"):
        db.load_rating_tree(tmp_path / "data_human_rating")
    with pytest.raises(ValueError, match="found no group1/ and group2/ folders"):
        db.load_rating_tree(tmp_path)
    (tmp_path / "empty" / "group1").mkdir(parents=True)
    (tmp_path / "empty" / "group2").mkdir()
    with pytest.raises(ValueError, match="no \\*-cp.json rating files"):
        db.load_rating_tree(tmp_path / "empty")


def test_save_and_load_scores(tmp_path, caplog):
    scores = {"style_00_a-0_0": 71.25, "object_20_rubik's_cube-3_0": -3.5, "object_00_cup-0_0": np.float32(0.5)}
    path = db.save_scores(tmp_path / "out", "emu2", scores, "nearid|sig-1")
    assert path == tmp_path / "out" / "emu2.json"
    on_disk = json.loads(path.read_text())
    assert list(on_disk.items()) == [(k, float(v)) for k, v in scores.items()]  # flat, order kept
    assert db.load_scores(path) == on_disk
    assert db.load_signatures(tmp_path / "out") == {"emu2": "nearid|sig-1"}
    db.save_scores(tmp_path / "out", "blip_diffusion", {"object_00_cup-0_0": 1.0}, "nearid|sig-1")
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="nearid_metric.dreambench"):
        db.save_scores(tmp_path / "out", "dreambooth_sd", {"object_00_cup-0_0": 1.0}, "other")
    assert "blip_diffusion, emu2 were scored with a different signature" in caplog.text
    assert db.load_signatures(tmp_path / "out") == {"emu2": "nearid|sig-1", "blip_diffusion": "nearid|sig-1",
                                                    "dreambooth_sd": "other"}
    folder = db.load_score_folder(tmp_path / "out")
    assert list(folder) == ["dreambooth_sd", "blip_diffusion", "emu2"]  # METHODS order, sidecar skipped
    assert folder["emu2"] == on_disk


def test_save_scores_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="not finite for 1 keys: object_00_cup-0_0"):
        db.save_scores(tmp_path, "emu2", {"object_00_cup-0_0": float("nan")}, "s")
    for method in ("signatures", "a/b", ""):
        with pytest.raises(ValueError, match="cannot be a method name"):
            db.save_scores(tmp_path, method, {"object_00_cup-0_0": 1.0}, "s")
    assert not list(tmp_path.iterdir())


def test_load_scores_errors_name_the_file(tmp_path):
    path = write_json(tmp_path / "emu2.json", '{"object_00_cup-0_0": "high"}')
    with pytest.raises(ValueError, match=r"emu2.json: score for 'object_00_cup-0_0' is 'high'"):
        db.load_scores(path)
    with pytest.raises(ValueError, match="no <method>.json score files"):
        db.load_score_folder(tmp_path / "nothing")
    write_json(tmp_path / "sig" / "signatures.json", {"emu2": 3})
    with pytest.raises(ValueError, match="signatures.json: expected a JSON object method -> signature"):
        db.load_signatures(tmp_path / "sig")


def test_loaded_files_feed_the_alignment(tmp_path):
    keys = human_keys("object", 3, 3)
    rng = np.random.default_rng(7)
    pairs = []
    for method in ("emu2", "blip_diffusion"):
        g1, g2 = rng.integers(0, 5, (2, len(keys)))
        s = 50 + 4 * g1 + rng.normal(0, 2, len(keys))
        for group, g in (("group1", g1), ("group2", g2)):
            write_json(tmp_path / "ratings" / group / f"{method}-cp.json", dict(zip(keys, g.tolist())))
        db.save_scores(tmp_path / "scores", method, dict(zip(metric_keys(keys), s)), "sig")
        pairs.append((s, g1, g2))
    result = db.human_alignment(db.load_score_folder(tmp_path / "scores"),
                                db.load_rating_tree(tmp_path / "ratings"), "object")
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
        runs = db.find_runs(samples)
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
        db.find_runs(tmp_path / "a")
    png(tmp_path / "b" / "blip_diffusion_x" / "src_image" / "object_00_cup" / "0_0.png")
    with pytest.raises(ValueError, match="run of blip_diffusion has no tgt_image/ folder"):
        db.find_runs(tmp_path / "b")
    (tmp_path / "c" / "emu2x").mkdir(parents=True)  # no separator after the prefix: not a run
    with pytest.raises(ValueError, match="no run folder named after a DreamBench\\+\\+ method"):
        db.find_runs(tmp_path / "c")
    with pytest.raises(ValueError, match="not a folder"):
        db.find_runs(tmp_path / "missing")


def test_run_pairs_keys_and_extensions(tmp_path, caplog):
    run = make_run(tmp_path, "emu2")
    png(run / "src_image" / "style_10_ukiyo-e" / "2_0.png")
    png(run / "tgt_image" / "style_10_ukiyo-e" / "2_0.jpg")  # another extension pairs by name
    (run / "tgt_image" / "prompts.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="nearid_metric.dreambench"):
        pairs = db.run_pairs(run)
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
        db.run_pairs(run)
    message = str(e.value)
    assert f"1 in src_image without a generation: {missing}" in message
    assert f"1 in tgt_image without a reference: {extra}" in message


def test_run_pairs_refuses_ambiguous_and_empty_runs(tmp_path):
    run = make_run(tmp_path, "emu2")
    png(run / "tgt_image" / "live_subject_animal_00_kitten" / "0_0.jpg")
    with pytest.raises(ValueError, match="is shared by"):
        db.run_pairs(run)
    (tmp_path / "empty" / "src_image").mkdir(parents=True)
    (tmp_path / "empty" / "tgt_image").mkdir()
    with pytest.raises(ValueError, match="no images"):
        db.run_pairs(tmp_path / "empty")
    with pytest.raises(ValueError, match="src_image: missing"):
        db.run_pairs(tmp_path)


def test_run_pairs_refuses_key_collisions(tmp_path):
    run = make_run(tmp_path, "emu2", images=("object_00_cup/a-b/0", "object_00_cup/a/b-0"))
    with pytest.raises(ValueError, match="both give the key 'object_00_cup-a-b-0'"):
        db.run_pairs(run)
