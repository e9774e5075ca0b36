"""`nearid-score --calibrate` and copy detection end to end on a constructed subject set (tiny random checkpoint):
floors, ceilings and calibrated values equal the scorer's own cosines combined by hand; an exact and a
resized, re-encoded copy of a reference are caught; the report shows the calibrated view."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import random_image
from PIL import Image
from test_report import chromium, needs_browser

from nearid_metric.calibration import HASH_DISTANCE, difference_hash, hash_distance
from nearid_metric.cli.score import main
from nearid_metric.images import load_image


@pytest.fixture()
def subject_set(tmp_path):
    ref, gen = tmp_path / "dataset", tmp_path / "gens"
    for subject, seeds in {"cat": (0, 1, 2), "dog": (3, 4)}.items():
        (ref / subject).mkdir(parents=True)
        for i, seed in enumerate(seeds):
            random_image(seed, (96 + 8 * i, 80)).save(ref / subject / f"{i:02d}.png")
    (gen / "cat").mkdir(parents=True)
    (gen / "dog").mkdir(parents=True)
    load_image(ref / "cat" / "00.png").save(gen / "cat" / "exact.png")  # an exact copy
    load_image(ref / "dog" / "01.png").resize((150, 125)).save(gen / "dog" / "resized.jpg", quality=90)
    random_image(20, (90, 90)).save(gen / "cat" / "other.png")  # a different picture
    random_image(21, (90, 90)).save(gen / "dog" / "other.png")
    return ref, gen


def run(ref, gen, checkpoint, out, *extra):
    return main([str(ref), str(gen), "--model", str(checkpoint), "--pairing", "subject", "--out", str(out),
                 "--num-workers", "0", "--no-progress", "--ci-resamples", "100", *map(str, extra)])


def test_calibration_by_hand(subject_set, checkpoint_dir, scorer, tmp_path):
    ref, gen = subject_set
    out = tmp_path / "out"
    assert run(ref, gen, checkpoint_dir, out, "--calibrate", "--floor-pairs", "1000") == 0
    summary = json.loads((out / "summary.json").read_text())
    calibration = summary["models"]["nearid"]["calibration"]

    def cos(a, b):
        return float(scorer.score([a], [b])[0])

    refs = {s: sorted((ref / s).iterdir()) for s in ("cat", "dog")}
    gens = {s: sorted((gen / s).iterdir()) for s in ("cat", "dog")}
    values = []
    for s in ("cat", "dog"):
        other = "dog" if s == "cat" else "cat"
        score = sum(cos(r, g) for g in gens[s] for r in refs[s]) / (len(gens[s]) * len(refs[s]))
        ceiling = sum(cos(a, b) for a in refs[s] for b in refs[s] if a != b) / (len(refs[s]) * (len(refs[s]) - 1))
        floor = sum(cos(r, g) for g in gens[s] for r in refs[other]) / (len(gens[s]) * len(refs[other]))
        entry = calibration["subjects"][s]
        assert entry["score"] == pytest.approx(score, abs=1e-6)
        assert entry["ceiling"] == pytest.approx(ceiling, abs=1e-6)
        assert entry["floor"] == pytest.approx(floor, abs=1e-6)
        if ceiling > floor:
            assert entry["calibrated"] == pytest.approx((score - floor) / (ceiling - floor), abs=1e-5)
            values.append((score - floor) / (ceiling - floor))
    if values:
        assert calibration["macro"]["calibrated"] == pytest.approx(sum(values) / len(values), abs=1e-5)


def test_copies_are_caught_and_different_photos_judged_by_the_rule(subject_set, checkpoint_dir, scorer, tmp_path,
                                                                   capsys):
    ref, gen = subject_set
    out = tmp_path / "out"
    report = tmp_path / "report.html"
    assert run(ref, gen, checkpoint_dir, out, "--copies", "--report", report) == 0
    summary = json.loads((out / "summary.json").read_text())
    flagged = {c["gen"]: c for c in summary["copies"]["nearid"]}
    exact, resized = str(gen / "cat" / "exact.png"), str(gen / "dog" / "resized.jpg")
    assert flagged[exact]["ref"] == str(ref / "cat" / "00.png") and flagged[exact]["reason"] == "pixels"
    assert flagged[resized]["ref"] == str(ref / "dog" / "01.png") and flagged[resized]["hash_distance"] <= HASH_DISTANCE
    for subject in ("cat", "dog"):  # the different pictures: flagged exactly when the documented rule says so
        refs = sorted((ref / subject).iterdir())
        real_max = max(float(scorer.score([a], [b])[0]) for a in refs for b in refs if a != b)
        other = gen / subject / "other.png"
        by_score = any(float(scorer.score([r], [other])[0]) > real_max for r in refs)
        by_pixels = any(hash_distance(difference_hash(load_image(r)), difference_hash(load_image(other)))
                        <= HASH_DISTANCE for r in refs)
        assert (str(other) in flagged) == (by_score or by_pixels)
    assert "possible copy" in capsys.readouterr().err
    html = report.read_text()
    assert "Copies" in html and "exact.png" in html and "Per subject" in html


def test_floor_sample_is_seeded_by_ci_seed(subject_set, checkpoint_dir, scorer, tmp_path):
    """--floor-pairs N samples N floor pairs per subject with --ci-seed: the floor is the mean over floor_pairs' sample."""
    from nearid_metric.calibration import floor_pairs

    ref, gen = subject_set
    out = tmp_path / "out"
    assert run(ref, gen, checkpoint_dir, out, "--calibrate", "--floor-pairs", "2", "--ci-seed", "7") == 0
    calibration = json.loads((out / "summary.json").read_text())["models"]["nearid"]["calibration"]
    refs = {s: sorted((ref / s).iterdir()) for s in ("cat", "dog")}
    gens = {s: sorted((gen / s).iterdir()) for s in ("cat", "dog")}
    sample = floor_pairs(refs, gens, max_pairs=2, seed=7)
    for s in ("cat", "dog"):
        mine = [(r, g) for subject, r, g in sample if subject == s]
        floor = float(scorer.score([r for r, _ in mine], [g for _, g in mine]).mean())
        assert calibration["subjects"][s]["floor"] == pytest.approx(floor, abs=1e-6)


def test_copy_margin_reaches_the_score_rule(subject_set, checkpoint_dir, tmp_path):
    """--copy-margin M: a copy by score beats real_max + M. M = -2 flags every generation (cosines lie in [-1, 1]);
    M = 2 none by score, so only the pixel-level copies are left."""
    ref, gen = subject_set
    every = {str(p) for p in gen.rglob("*.*")}
    for margin, expected in (("-2", every), ("2", {str(gen / "cat" / "exact.png"), str(gen / "dog" / "resized.jpg")})):
        out = tmp_path / f"out{margin}"
        assert run(ref, gen, checkpoint_dir, out, "--copies", "--copy-margin", margin) == 0
        summary = json.loads((out / "summary.json").read_text())
        flagged = {c["gen"]: c["reason"] for c in summary["copies"]["nearid"]}
        assert set(flagged) == expected and summary["copy_check"]["margin"] == float(margin)
        if margin == "2":
            assert set(flagged.values()) == {"pixels"}


def test_calibrated_view_in_the_report(subject_set, checkpoint_dir, tmp_path):
    ref, gen = subject_set
    report = tmp_path / "r.html"
    assert run(ref, gen, checkpoint_dir, tmp_path / "o", "--calibrate", "--report", report) == 0
    html = report.read_text()
    assert "Calibrated scores" in html and 'data-calibration="nearid"' in html and 'class="range"' in html


@needs_browser
def test_calibrated_view_renders_in_headless_chromium(subject_set, checkpoint_dir, tmp_path):
    ref, gen = subject_set
    report = tmp_path / "r.html"
    assert run(ref, gen, checkpoint_dir, tmp_path / "o", "--calibrate", "--report", report) == 0
    dom = chromium(report, tmp_path / "profile", "--dump-dom")
    assert "Calibrated scores" in dom and "Per subject" in dom and "Copies" in dom
    shot = tmp_path / "shot.png"
    chromium(report, tmp_path / "profile", "--window-size=1280,2400", f"--screenshot={shot}")
    picture = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int64)
    # the floor-to-ceiling bars: their gradient runs from #f3d5d5 (floor) to #d4ecd9 (ceiling)
    pink = (np.abs(picture - [0xF3, 0xD5, 0xD5]).sum(axis=2) < 12).sum()
    green = (np.abs(picture - [0xD4, 0xEC, 0xD9]).sum(axis=2) < 12).sum()
    assert pink > 50 and green > 50
