"""Per-subject scoring: subject pairing, macro / micro aggregation, the real-vs-real ceiling, prompts and the
benchmarks' scalings, against hand-computed answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from nearid_metric.calibration import ceiling_pairs
from nearid_metric.pairing import pair_by_subject, pair_from_manifest, pair_subjects_from_manifest
from nearid_metric.prompts import lookup_prompts, read_prompts, text_folder_prompts
from nearid_metric.protocols import PROTOCOLS, protocol_inputs, scale_scores
from nearid_metric.runs import RunScores, run_summary
from nearid_metric.subjects import format_subject_table, subject_summary


def touch_image(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)
    return path


@pytest.fixture
def subject_tree(tmp_path):
    ref, gen = tmp_path / "dataset", tmp_path / "gens"
    for name in ("a/00.jpg", "a/01.jpg", "b/00.jpg", "loose.jpg"):
        touch_image(ref / name)
    (ref / "c").mkdir()  # an empty subject folder (and no generations for it)
    (ref / "e").mkdir()
    for name in ("a/p0-0.png", "a/p0-1.png", "a/p1-0.png", "b/x.png", "b/y.png", "d/z.png", "e/w.png"):
        touch_image(gen / name)
    return ref, gen


def test_subject_pairing_crosses_each_subject_and_reports_the_rest(subject_tree):
    ref, gen = subject_tree
    pairing = pair_by_subject(ref, gen)
    expected = [(ref / r, gen / g) for g in ("a/p0-0.png", "a/p0-1.png", "a/p1-0.png") for r in ("a/00.jpg", "a/01.jpg")]
    expected += [(ref / "b/00.jpg", gen / g) for g in ("b/x.png", "b/y.png")]
    assert pairing.pairs == expected
    assert pairing.subjects == ["a"] * 6 + ["b"] * 2
    assert pairing.subject_refs == {"a": [ref / "a/00.jpg", ref / "a/01.jpg"], "b": [ref / "b/00.jpg"]}
    problems = "\n".join(pairing.subject_problems)
    assert "subject 'c'" in problems and "not in" in problems  # only on the reference side (and empty)
    assert "subject 'd'" in problems  # only on the generated side
    assert "subject 'e' has no images in" in problems and str(ref) in problems
    assert str(ref / "loose.jpg") in problems  # a file outside every subject folder
    assert gen / "d/z.png" in pairing.unmatched_gens and gen / "e/w.png" in pairing.unmatched_gens


def test_subject_pairing_from_a_manifest(tmp_path):
    manifest = tmp_path / "subjects.csv"
    manifest.write_text("subject,ref,gen\ncat,r1.png,\ncat,r2.png,g1.png\ndog,,g2.png\n", encoding="utf-8")
    pairing = pair_subjects_from_manifest(manifest, tmp_path / "R", tmp_path / "G")
    R, G = tmp_path / "R", tmp_path / "G"
    assert pairing.pairs == [(R / "r1.png", G / "g1.png"), (R / "r2.png", G / "g1.png")]
    assert pairing.subjects == ["cat", "cat"]
    assert any("subject 'dog'" in p for p in pairing.subject_problems)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("ref,gen,subject\nr1.png,g1.png,cat\nr2.png,g2.png,dog\n", encoding="utf-8")
    listed = pair_from_manifest(pairs, R, G)
    assert listed.subjects == ["cat", "dog"] and listed.subject_refs == {"cat": [R / "r1.png"], "dog": [R / "r2.png"]}


def test_macro_and_micro_by_hand():
    values = [0.2, 0.4, 0.6, 1.0, 0.5, 0.3]
    subjects = ["a", "a", "a", "b", "c", "c"]
    out = subject_summary(values, subjects, resamples=200, seed=0, ceilings={"a": [0.9, 0.7], "b": []})
    assert out["subjects"]["a"]["mean"] == pytest.approx(0.4) and out["subjects"]["a"]["n"] == 3
    assert out["subjects"]["c"]["mean"] == pytest.approx(0.4)
    assert out["macro"]["mean"] == pytest.approx((0.4 + 1.0 + 0.4) / 3)
    assert out["micro"]["mean"] == pytest.approx(3.0 / 6)
    assert out["macro"]["n_subjects"] == 3 and out["micro"]["n"] == 6
    assert out["subjects"]["a"]["ceiling"] == pytest.approx(0.8)
    assert out["subjects"]["b"]["ceiling"] is None and out["subjects"]["b"]["ci95"] is None  # one pair: no spread
    assert out["macro"]["ceiling"] == pytest.approx(0.8) and out["micro"]["ceiling"] == pytest.approx(0.8)
    low, high = out["macro"]["ci95"]
    assert 0.4 <= low <= out["macro"]["mean"] <= high <= 1.0  # resampled subject means lie in [0.4, 1.0]


def test_macro_interval_resamples_subjects_not_pairs():
    rng = np.random.default_rng(0)
    # two subjects: many tightly clustered pairs each, far apart: the pair-level interval is narrow,
    # the subject-level one spans the two subject means
    values = np.concatenate([0.2 + 0.001 * rng.standard_normal(200), 0.8 + 0.001 * rng.standard_normal(200)])
    subjects = ["a"] * 200 + ["b"] * 200
    out = subject_summary(values, subjects, resamples=500, seed=1)
    micro_width = out["micro"]["ci95"][1] - out["micro"]["ci95"][0]
    macro_width = out["macro"]["ci95"][1] - out["macro"]["ci95"][0]
    assert micro_width < 0.1 and macro_width > 0.5


def test_ceiling_pairs_are_ordered_and_never_self_pairs():
    pairs = ceiling_pairs({"a": ["r1", "r2", "r3"], "b": ["s1"]})
    assert len(pairs) == 6 and all(x != y for _, x, y in pairs)
    assert {(x, y) for _, x, y in pairs} == {(x, y) for x in ("r1", "r2", "r3") for y in ("r1", "r2", "r3") if x != y}


def test_scalings():
    cos = np.array([-0.2, 0.0, 0.3, math.nan])
    np.testing.assert_allclose(scale_scores(cos, "100x"), [-20.0, 0.0, 30.0, math.nan])
    np.testing.assert_allclose(scale_scores(cos, "clipscore"), [0.0, 0.0, 0.75, math.nan])
    np.testing.assert_array_equal(scale_scores(cos, "cosine"), cos)
    with pytest.raises(ValueError, match="unknown scale"):
        scale_scores(cos, "10x")


def test_prompt_files(tmp_path):
    csv_file = tmp_path / "prompts.csv"
    csv_file.write_text('gen,prompt\na/p0,"a dog, on the beach"\nb/x.png,a cat\n', encoding="utf-8")
    json_file = tmp_path / "prompts.json"
    json_file.write_text(json.dumps({"p0": "une tête", "x": "émoji 🐶"}), encoding="utf-8")
    gens = tmp_path / "gens"
    files = [touch_image(gens / name) for name in ("a/p0.png", "b/x.png", "b/y.png")]
    assert lookup_prompts(files, gens, read_prompts(csv_file)) == ["a dog, on the beach", "a cat", None]
    flat = [touch_image(gens / name) for name in ("p0.jpg", "x.png")]
    assert lookup_prompts(flat, gens, read_prompts(json_file)) == ["une tête", "émoji 🐶"]
    (tmp_path / "bad.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        read_prompts(tmp_path / "bad.json")
    (tmp_path / "cols.csv").write_text("image,text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'gen' and 'prompt'"):
        read_prompts(tmp_path / "cols.csv")


def test_text_folder_prompts(tmp_path):
    tgt, text = tmp_path / "tgt_image", tmp_path / "text"
    (text / "object").mkdir(parents=True)
    tgt.mkdir()
    (text / "object" / "a_0.txt").write_text("a photo  of\nit", encoding="utf-8")
    assert text_folder_prompts([tgt / "object/a_0.png", tgt / "object/b.png"], tgt, text) == ["a photo  of\nit", None]


def test_run_summary_counts_a_text_column_once_per_generation():
    # 2 generations x 2 references of one subject; clip-t depends on the generation only
    scores = {"img": np.array([0.1, 0.3, 0.5, 0.7]), "txt": np.array([0.2, 0.2, 0.6, 0.6])}
    result = RunScores(scores, np.ones(4, dtype=bool), {})
    out = run_summary(result, text_columns=["txt"], gens=["g1", "g1", "g2", "g2"], subjects=["s"] * 4,
                      resamples=None)
    assert out["models"]["txt"]["count"] == 2 and out["models"]["txt"]["mean"] == pytest.approx(0.4)
    assert out["models"]["img"]["count"] == 4 and out["subjects"]["s"]["img"]["n"] == 4
    assert out["subjects"]["s"]["txt"]["n"] == 2


def test_dreambench_layout_reads_pairs_prompts_and_categories(tmp_path):
    run = tmp_path / "run"
    for key in ("object_backpack-0_0", "live_subject_animal_cat-1_0"):
        touch_image(run / "src_image" / f"{key}.jpg")
        touch_image(run / "tgt_image" / f"{key}.png")
    (run / "text").mkdir()
    (run / "text" / "object_backpack-0_0.txt").write_text("a backpack", encoding="utf-8")
    inputs = protocol_inputs(PROTOCOLS["dreambench"], run, None)
    assert [g.name for _, g in inputs.pairing.pairs] == ["live_subject_animal_cat-1_0.png", "object_backpack-0_0.png"]
    assert inputs.prompts == [None, "a backpack"]  # the missing prompt is None, reported by the command
    assert inputs.categories == ["live_subject_animal", "object"]
    with pytest.raises(ValueError, match="text/"):
        protocol_inputs(PROTOCOLS["dreambench"], run / "src_image", None)


def test_customconcept101_layout(tmp_path):
    targets = [tmp_path / "cat", tmp_path / "chair"]
    for t in targets:
        touch_image(t / "0.jpg")
        touch_image(t / "1.JPG")
        touch_image(t / "sub" / "deep.jpg")  # evaluate.py reads the top level only
    root = tmp_path / "run"
    for name in ("s0.png", "s1.png"):
        touch_image(root / "samples" / name)
    (root / "prompts.json").write_text(json.dumps({"s0": "a cat on a chair"}), encoding="utf-8")
    inputs = protocol_inputs(PROTOCOLS["customconcept101"], "+".join(map(str, targets)), root)
    assert len(inputs.pairing.pairs) == 2 * 2 * 2  # samples x target images x concepts
    assert inputs.pairing.subjects == ["cat"] * 4 + ["chair"] * 4
    assert inputs.prompts.count("a cat on a chair") == 4 and inputs.prompts.count(None) == 4
    assert targets[0] / "sub" / "deep.jpg" in inputs.pairing.ignored
    with pytest.raises(ValueError, match="prompts.json"):
        (root / "prompts.json").unlink()
        protocol_inputs(PROTOCOLS["customconcept101"], str(targets[0]), root)


def test_micro_ceiling_pools_the_pairs_of_the_scored_subjects():
    # a: 2 references (2 ordered pairs, mean 0.8), c: 3 references (6 pairs, mean 0.1); z has ceiling pairs but no
    # scored pair (e.g. every generation unreadable): it is in neither ceiling
    ceilings = {"a": [0.9, 0.7], "c": [0.1] * 6, "z": [0.0, 0.0]}
    out = subject_summary([0.5, 0.6, 0.2], ["a", "a", "c"], resamples=None, ceilings=ceilings)
    assert out["macro"]["ceiling"] == pytest.approx((0.8 + 0.1) / 2)  # mean of the subjects' ceilings
    assert out["micro"]["ceiling"] == pytest.approx((0.9 + 0.7 + 6 * 0.1) / 8)  # mean over the pooled pairs
    assert out["subjects"]["c"]["ceiling_n"] == 6 and "z" not in out["subjects"]


def test_format_subject_table_by_hand():
    subjects = {"cat": {"nearid": {"mean": 0.5, "n": 6, "ceiling": 0.75}, "clip-t": {"mean": 0.3125, "n": 2}},
                "dog": {"nearid": {"mean": 0.25, "n": 2, "ceiling": None}}}
    lines = format_subject_table(subjects, ["nearid", "clip-t"]).splitlines()
    assert [line.split() for line in lines] == [["subject", "n", "nearid", "clip-t"],
                                                 ["cat", "6", "0.5000/0.7500", "0.3125"],
                                                 ["dog", "2", "0.2500", "-"]]
    assert lines[0].index("nearid") == lines[1].index("0.5000") == lines[2].index("0.2500")  # aligned columns
    assert lines[0].index("clip-t") == lines[1].index("0.3125") == lines[2].index("-")


def test_subject_is_the_first_folder_level_of_nested_trees(tmp_path):
    ref, gen = tmp_path / "dataset", tmp_path / "gens"
    touch_image(ref / "dog" / "00.jpg")
    touch_image(gen / "dog" / "prompt-1" / "0.png")  # GEN/<subject>/<prompt>/<image>
    touch_image(gen / "dog" / "prompt-2" / "0.png")
    pairing = pair_by_subject(ref, gen)
    assert pairing.subjects == ["dog", "dog"] and not pairing.subject_problems
    assert pairing.pairs == [(ref / "dog/00.jpg", gen / "dog/prompt-1/0.png"), (ref / "dog/00.jpg", gen / "dog/prompt-2/0.png")]


def test_manifests_list_each_reference_of_a_subject_once(tmp_path):
    """A manifest names a reference on every row it is paired on: listed once per subject, so the ceiling has no
    self-pairs (a duplicate would be a real-vs-real pair of a photo with itself, cosine 1) and pairs are not doubled."""
    R, G = tmp_path / "R", tmp_path / "G"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("ref,gen,subject\nr1.png,g1.png,cat\nr1.png,g2.png,cat\nr2.png,g1.png,cat\n", encoding="utf-8")
    listed = pair_from_manifest(pairs, R, G)
    assert listed.subject_refs == {"cat": [R / "r1.png", R / "r2.png"]}
    assert len(ceiling_pairs(listed.subject_refs)) == 2
    subjects = tmp_path / "subjects.csv"
    subjects.write_text("subject,ref,gen\ncat,r1.png,g1.png\ncat,r1.png,g2.png\ncat,r2.png,g1.png\n", encoding="utf-8")
    crossed = pair_subjects_from_manifest(subjects, R, G)
    assert crossed.pairs == [(R / r, G / g) for g in ("g1.png", "g2.png") for r in ("r1.png", "r2.png")]
    assert crossed.subject_refs == {"cat": [R / "r1.png", R / "r2.png"]}


def test_dreambench_layout_refuses_prompts_and_a_second_folder(tmp_path):
    run = tmp_path / "run"
    touch_image(run / "src_image" / "object_backpack-0_0.jpg")
    touch_image(run / "tgt_image" / "object_backpack-0_0.png")
    (run / "text").mkdir()
    (tmp_path / "p.csv").write_text("gen,prompt\nobject_backpack-0_0,a dog\n", encoding="utf-8")
    with pytest.raises(ValueError, match="drop --prompts"):  # never silently ignored
        protocol_inputs(PROTOCOLS["dreambench"], run, None, prompts_file=tmp_path / "p.csv")
    with pytest.raises(ValueError, match="give it as REF only"):
        protocol_inputs(PROTOCOLS["dreambench"], run, run / "tgt_image")
    assert len(protocol_inputs(PROTOCOLS["dreambench"], run, run).pairing.pairs) == 1  # GEN = the run folder: fine


def test_customconcept101_reads_evaluate_py_extensions_only_and_keeps_same_named_concepts_apart(tmp_path):
    targets = [tmp_path / "a" / "cat", tmp_path / "b" / "cat"]  # two concepts, one folder name
    touch_image(targets[0] / "0.jpg")
    touch_image(targets[0] / "1.PNG")  # evaluate.py's endings are case-sensitive: .JPG is read, .PNG is not
    touch_image(targets[1] / "0.JPG")
    touch_image(targets[1] / "1.webp")
    root = tmp_path / "run"
    touch_image(root / "samples" / "s0.png")
    (root / "prompts.json").write_text(json.dumps({"s0": "a cat"}), encoding="utf-8")
    inputs = protocol_inputs(PROTOCOLS["customconcept101"], "+".join(map(str, targets)), root)
    assert inputs.pairing.subjects == [str(targets[0]), str(targets[1])]  # named by path, neither lost
    assert [r for r, _ in inputs.pairing.pairs] == [targets[0] / "0.jpg", targets[1] / "0.JPG"]
    assert {targets[0] / "1.PNG", targets[1] / "1.webp"} <= set(inputs.pairing.ignored)
