"""``nearid-score compare``: pairs matched across runs by reference and generation name, the paired
difference with a grouped bootstrap interval (known answers and coverage), win rates, signatures."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import random_image

from nearid_metric.cli.score import main as score_main
from nearid_metric.compare import Run, compare_runs, read_run, win_rate
from nearid_metric.stats import bootstrap_ci


def write_run(folder: Path, gen_root: str, rows: list[tuple[str, str, float]], signature: str = "sig",
              extra: dict[str, list[str]] | None = None) -> Path:
    """A nearid-score --out folder: scores.csv (ref, gen, nearid[, extra columns]) and summary.json."""
    folder.mkdir(parents=True)
    extra = extra or {}
    with open(folder / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ref", "gen", "nearid", *extra])
        for n, (ref, gen, score) in enumerate(rows):
            writer.writerow([f"refs/{ref}", f"{gen_root}/{gen}", f"{score:.8f}", *(v[n] for v in extra.values())])
    (folder / "summary.json").write_text(json.dumps({"ref": "refs", "gen": gen_root,
                                                     "models": {"nearid": {"signature": signature}}}))
    return folder


def test_pairs_match_by_reference_and_generation_name(tmp_path):
    a = write_run(tmp_path / "a", "runs/A", [("dog/1.png", "dog/x.png", 0.5), ("dog/1.png", "dog/y.png", 0.6),
                                             ("cat/1.png", "cat/x.png", 0.7), ("cat/1.png", "cat/only_a.png", 0.1)])
    b = write_run(tmp_path / "b", "runs/B", [("dog/1.png", "dog/x.jpg", 0.7), ("dog/1.png", "dog/y.webp", 0.6),
                                             ("cat/1.png", "cat/x.jpg", 0.6), ("cat/1.png", "cat/new.jpg", 0.9)])
    result = compare_runs(read_run(a), read_run(b / "scores.csv"), resamples=None)
    r = result["models"]["nearid"]
    # matched: x (dog) 0.5 -> 0.7, y 0.6 -> 0.6 (tie), x (cat) 0.7 -> 0.6
    assert r["n"] == 3
    assert r["mean_a"] == pytest.approx(1.8 / 3) and r["mean_b"] == pytest.approx(1.9 / 3)
    assert r["diff"] == pytest.approx(0.1 / 3)
    assert r["win_rate"] == pytest.approx((1 + 0.5) / 3)  # one win, one tie counted half, one loss
    assert r["ci95"] is None and result["ci"] is None
    assert result["only_a"] == [["cat/1.png", "cat/only_a"]] and result["only_b"] == [["cat/1.png", "cat/new"]]


def test_grouped_interval_is_the_bootstrap_of_the_differences(tmp_path):
    rng = np.random.default_rng(1)
    rows_a, rows_b = [], []
    for s in range(6):
        for k in range(4):
            score = rng.uniform(0.3, 0.8)
            rows_a.append((f"s{s}/ref.png", f"s{s}/{k}.png", score))
            rows_b.append((f"s{s}/ref.png", f"s{s}/{k}.png", score + rng.normal(0.05, 0.05)))
    a = read_run(write_run(tmp_path / "a", "A", rows_a, extra={"prompt": [str(i % 3) for i in range(24)]}))
    b = read_run(write_run(tmp_path / "b", "B", rows_b))
    differences = b.scores["nearid"] - a.scores["nearid"]
    for groups, labels in (("none", None), ("ref", [r for r, _, _ in rows_a]),
                           ("subject", [r.split("/")[0] for r, _, _ in rows_a]),
                           ("prompt", [str(i % 3) for i in range(24)])):
        r = compare_runs(a, b, groups=groups, resamples=500, seed=3)["models"]["nearid"]
        assert tuple(r["ci95"]) == bootstrap_ci(differences, groups=labels, resamples=500, seed=3), groups
    with pytest.raises(ValueError, match="no such column"):
        compare_runs(a, b, groups="style")


def simulated_runs(rng: np.random.Generator, delta: float, subjects: int = 40, per_subject: int = 6) -> tuple[Run, Run]:
    """Paired runs whose differences share a subject effect (clustered), true mean difference ``delta``."""
    keys = [(f"s{s}/r.png", f"s{s}/{k}") for s in range(subjects) for k in range(per_subject)]
    base = rng.uniform(0.4, 0.8, len(keys))
    effect = np.repeat(rng.normal(0, 0.05, subjects), per_subject)
    b = base + delta + effect + rng.normal(0, 0.05, len(keys))
    make = lambda scores: Run(Path("x"), keys, {"nearid": scores}, {}, {"nearid": "sig"})  # noqa: E731
    return make(base), make(b)


def test_paired_interval_coverage_with_grouped_resampling():
    rng = np.random.default_rng(0)
    hits = {"subject": 0, "none": 0}
    for k in range(200):
        a, b = simulated_runs(rng, 0.02)
        for groups in hits:
            low, high = compare_runs(a, b, groups=groups, resamples=400, seed=k)["models"]["nearid"]["ci95"]
            hits[groups] += low <= 0.02 <= high
    assert 0.90 <= hits["subject"] / 200 <= 0.99, hits
    assert hits["none"] / 200 < 0.85, hits  # pairs of one subject are not independent: overconfident


def test_signatures_must_agree(tmp_path):
    a = write_run(tmp_path / "a", "A", [("r.png", "x.png", 0.5), ("r.png", "y.png", 0.4)], signature="w1")
    b = write_run(tmp_path / "b", "B", [("r.png", "x.png", 0.6), ("r.png", "y.png", 0.3)], signature="w2")
    with pytest.raises(ValueError, match="different weights"):
        compare_runs(read_run(a), read_run(b))
    result = compare_runs(read_run(a), read_run(b), allow_different_signatures=True, resamples=None)
    assert result["signatures_differ"] == ["nearid"] and result["models"]["nearid"]["n"] == 2


def test_bad_runs_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="scores.csv"):
        read_run(tmp_path)
    a = write_run(tmp_path / "a", "A", [("r.png", "x.png", 0.5), ("r.png", "x.jpg", 0.4)])
    with pytest.raises(ValueError, match="already on line 2"):  # two generations with one pairing name
        read_run(a)
    c = write_run(tmp_path / "c", "C", [("q.png", "z.png", 0.5)])
    d = write_run(tmp_path / "d", "D", [("r.png", "x.png", 0.5)])
    with pytest.raises(ValueError, match="no .* pair in common"):
        compare_runs(read_run(c), read_run(d))
    assert math.isnan(win_rate(np.array([]), np.array([])))


def test_compare_command_end_to_end(tmp_path, checkpoint_dir, capsys):
    refs, gen_a, gen_b = tmp_path / "refs", tmp_path / "A", tmp_path / "B"
    for folder in (refs, gen_a, gen_b):
        folder.mkdir()
    for i in range(5):
        random_image(i, (40, 36)).save(refs / f"{i}.png")
        random_image(i + 100, (44, 40)).save(gen_a / f"{i}.png")
        random_image(i, (40, 36)).save(gen_b / f"{i}.jpg", quality=95)  # B: near copies of the references
    common = ["--model", checkpoint_dir, "--device", "cpu", "--num-workers", "0", "--no-progress"]
    assert score_main([refs, gen_a, "--out", tmp_path / "run_a", *common]) == 0
    assert score_main([refs, gen_b, "--out", tmp_path / "run_b", *common]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp.json"
    assert score_main(["compare", tmp_path / "run_a", tmp_path / "run_b", "--json", out]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["model", "mean_a", "mean_b", "diff", "ci95", "win_rate", "n"]
    result = json.loads(out.read_text())["models"]["nearid"]
    summary_a = json.loads((tmp_path / "run_a" / "summary.json").read_text())["models"]["nearid"]
    summary_b = json.loads((tmp_path / "run_b" / "summary.json").read_text())["models"]["nearid"]
    assert result["n"] == 5 and result["mean_a"] == pytest.approx(summary_a["mean"], abs=1e-8)
    assert result["diff"] == pytest.approx(summary_b["mean"] - summary_a["mean"], abs=1e-8)
    assert result["win_rate"] == 1.0 and result["ci95"][0] > 0  # near copies beat unrelated images
    assert score_main(["compare", tmp_path / "run_a", tmp_path / "nowhere"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err
