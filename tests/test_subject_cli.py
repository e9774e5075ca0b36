"""`nearid-score --pairing subject [--ceiling]` end to end: per-subject figures equal the scorer's own cosines
averaged by hand, ceilings use no self-pairs, problems are reported by name (tiny random checkpoint)."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import random_image

from nearid_metric.cli.score import main


@pytest.fixture()
def dreambooth_tree(tmp_path):
    """dataset/<subject>/NN.jpg (cat: 3, dog: 2, bird: only here) and gens/<subject>/*.png (cat: 2, dog: 1, fox)."""
    ref, gen = tmp_path / "dataset", tmp_path / "gens"
    layout = {ref / "cat": 3, ref / "dog": 2, ref / "bird": 1, gen / "cat": 2, gen / "dog": 1, gen / "fox": 1}
    seed = 0
    for folder, count in layout.items():
        folder.mkdir(parents=True)
        for i in range(count):
            random_image(seed, (70 + 3 * seed, 50 + seed)).save(folder / f"{i:02d}{'.jpg' if 'dataset' in str(folder) else '.png'}")
            seed += 1
    return ref, gen


def test_subject_pairing_macro_micro_and_ceiling(dreambooth_tree, checkpoint_dir, scorer, tmp_path, capsys):
    ref, gen = dreambooth_tree
    out = tmp_path / "out"
    code = main([str(ref), str(gen), "--model", str(checkpoint_dir), "--pairing", "subject", "--ceiling",
                 "--out", str(out), "--num-workers", "0", "--no-progress", "--ci-resamples", "200"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = list(csv.DictReader(open(out / "scores.csv", newline="")))
    assert [r["subject"] for r in rows] == ["cat"] * 6 + ["dog"] * 2

    def cos(a, b):
        return float(scorer.score([a], [b])[0])

    expected = {}
    for subject in ("cat", "dog"):
        refs, gens = sorted((ref / subject).iterdir()), sorted((gen / subject).iterdir())
        values = [cos(r, g) for g in gens for r in refs]
        real = [cos(a, b) for a in refs for b in refs if a != b]
        expected[subject] = (sum(values) / len(values), len(values), sum(real) / len(real))
    for subject, (mean, n, ceiling) in expected.items():
        entry = summary["subjects"][subject]["nearid"]
        assert entry["mean"] == pytest.approx(mean, abs=1e-6) and entry["n"] == n
        assert entry["ceiling"] == pytest.approx(ceiling, abs=1e-6) and entry["ceiling_n"] == n_ceiling(subject)
    model = summary["models"]["nearid"]
    assert model["macro"]["mean"] == pytest.approx((expected["cat"][0] + expected["dog"][0]) / 2, abs=1e-6)
    assert model["micro"]["mean"] == pytest.approx((6 * expected["cat"][0] + 2 * expected["dog"][0]) / 8, abs=1e-6)
    assert model["macro"]["ceiling"] == pytest.approx((expected["cat"][2] + expected["dog"][2]) / 2, abs=1e-6)
    problems = " ".join(summary["subject_problems"])
    assert "'bird'" in problems and "'fox'" in problems
    printed = capsys.readouterr()
    assert "nearid: macro" in printed.out and "cat" in printed.out and "'fox'" in printed.err


def n_ceiling(subject: str) -> int:
    return {"cat": 6, "dog": 2}[subject]


def test_ceiling_needs_subjects_and_prompts_need_clip_t(dreambooth_tree, checkpoint_dir, capsys):
    ref, gen = dreambooth_tree
    with pytest.raises(SystemExit) as e:
        main([str(ref), str(gen), "--model", str(checkpoint_dir), "--ceiling"])
    assert e.value.code == 2 and "--ceiling needs subjects" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(ref), str(gen), "--model", str(checkpoint_dir), "--prompts", str(ref)])
    assert e.value.code == 2 and "clip-t" in capsys.readouterr().err


def test_ci_groups_subject(dreambooth_tree, checkpoint_dir, tmp_path):
    ref, gen = dreambooth_tree
    out = tmp_path / "o"
    assert main([str(ref), str(gen), "--model", str(checkpoint_dir), "--pairing", "subject", "--ci-groups",
                 "subject", "--out", str(out), "--num-workers", "0", "--no-progress"]) == 0
    ci = json.loads((out / "summary.json").read_text())["models"]["nearid"]["ci"]
    assert ci["unit"] == "subject" and ci["n_units"] == 2
