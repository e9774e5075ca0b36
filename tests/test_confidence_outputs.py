"""Confidence intervals where results are reported: nearid-score, nearid-bench (SSR / PA) and NearIDMetric."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_image

from nearid_metric import NearIDMetric, bench, bench_files
from nearid_metric.cli.bench import main as bench_main
from nearid_metric.cli.score import main as score_main
from nearid_metric.protocol import score_mtg_samples, score_nearid_samples
from nearid_metric.stats import bootstrap_ci, bootstrap_ratio_ci


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_score(*args) -> int:
    return score_main([str(a) for a in args] + ["--num-workers", "0", "--no-progress"])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """3 references, 9 generations named ref/k.png <-> gen/k.png (k = 0..8 over refs 0..2 via a manifest)."""
    root = tmp_path_factory.mktemp("ci")
    ref, gen = root / "ref", root / "gen"
    ref.mkdir(), gen.mkdir()
    for i in range(9):
        random_image(i % 3, (48, 40)).save(ref / f"{i}.png")
        random_image(100 + i, (44, 52)).save(gen / f"{i}.png")
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ref", "gen", "prompt"])
        for i in range(9):
            writer.writerow([f"{i}.png", f"{i}.png", f"prompt {i % 3}"])
    return ref, gen, root / "pairs.csv"


# --- nearid-score ---------------------------------------------------------------------------------


def test_score_summary_and_stdout_carry_the_interval(folders, checkpoint_dir, tmp_path, capsys):
    ref, gen, _ = folders
    assert run_score(ref, gen, "--model", checkpoint_dir, "--out", tmp_path) == 0
    out = capsys.readouterr().out
    model = json.loads((tmp_path / "summary.json").read_text())["models"]["nearid"]
    values = np.array([float(r["nearid"]) for r in read_csv(tmp_path / "scores.csv")])
    low, high = model["ci95"]
    expected = bootstrap_ci(values, resamples=1000, seed=0)
    assert low == pytest.approx(expected[0], abs=1e-6) and high == pytest.approx(expected[1], abs=1e-6)
    assert low < model["mean"] < high
    assert model["ci"] == {"method": "percentile bootstrap", "level": 0.95, "resamples": 1000, "seed": 0,
                           "unit": "pair", "n_units": 9}
    assert f"nearid: mean {model['mean']:.6f}  95% CI [{low:.6f}, {high:.6f}]" in out
    assert "percentile bootstrap of the mean over 9 pairs, 1000 resamples, seed 0" in out


def test_score_ci_flags(folders, checkpoint_dir, tmp_path, capsys):
    ref, gen, manifest = folders
    base = [ref, gen, "--model", checkpoint_dir]
    assert run_score(*base, "--out", tmp_path / "none", "--ci", "none") == 0
    assert "CI" not in capsys.readouterr().out
    model = json.loads((tmp_path / "none" / "summary.json").read_text())["models"]["nearid"]
    assert model["ci95"] is None and model["ci"] is None

    assert run_score(*base, "--out", tmp_path / "other", "--ci-resamples", "200", "--ci-seed", "5") == 0
    other = json.loads((tmp_path / "other" / "summary.json").read_text())["models"]["nearid"]
    assert (other["ci"]["resamples"], other["ci"]["seed"]) == (200, 5)
    values = np.array([float(r["nearid"]) for r in read_csv(tmp_path / "other" / "scores.csv")])
    assert other["ci95"] == pytest.approx(list(bootstrap_ci(values, resamples=200, seed=5)), abs=1e-6)

    # grouped: by reference image (3 references x 3 generations) and by a manifest column
    assert run_score(*base, "--pairing", "manifest", "--manifest", manifest, "--out", tmp_path / "ref",
                     "--ci-groups", "ref") == 0
    assert run_score(*base, "--pairing", "manifest", "--manifest", manifest, "--out", tmp_path / "prompt",
                     "--ci-groups", "prompt") == 0
    by_ref = json.loads((tmp_path / "ref" / "summary.json").read_text())["models"]["nearid"]
    by_prompt = json.loads((tmp_path / "prompt" / "summary.json").read_text())["models"]["nearid"]
    assert (by_ref["ci"]["unit"], by_ref["ci"]["n_units"]) == ("ref", 9)  # 9 distinct reference files
    assert (by_prompt["ci"]["unit"], by_prompt["ci"]["n_units"]) == ("prompt", 3)
    groups = [f"prompt {i % 3}" for i in range(9)]
    assert by_prompt["ci95"] == pytest.approx(list(bootstrap_ci(values, groups=groups)), abs=1e-6)
    assert "over 3 groups of the manifest column 'prompt'" in capsys.readouterr().out


def test_score_ci_groups_by_reference_with_all_pairing(tmp_path, checkpoint_dir):
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    for i in range(2):
        random_image(i, (40, 40)).save(ref / f"subject{i}.png")
    for j in range(3):
        random_image(10 + j, (40, 40)).save(gen / f"sample{j}.png")
    assert run_score(ref, gen, "--model", checkpoint_dir, "--pairing", "all", "--ci-groups", "ref",
                     "--out", tmp_path / "out") == 0
    model = json.loads((tmp_path / "out" / "summary.json").read_text())["models"]["nearid"]
    rows = read_csv(tmp_path / "out" / "scores.csv")
    values = [float(r["nearid"]) for r in rows]
    assert model["ci"]["n_units"] == 2
    assert model["ci95"] == pytest.approx(list(bootstrap_ci(values, groups=[r["ref"] for r in rows])), abs=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--ci-groups", "prompt"], "needs --pairing manifest"),
    (["--pairing", "manifest", "--ci-groups", "nope"], "has no such column"),
    (["--ci", "maybe"], "invalid choice"),
    (["--ci-resamples", "0"], "at least 1"),
])
def test_score_ci_usage_errors(folders, checkpoint_dir, flags, message, capsys):
    ref, gen, manifest = folders
    extra = ["--manifest", manifest] if "manifest" in flags else []
    with pytest.raises(SystemExit) as excinfo:
        run_score(ref, gen, "--model", checkpoint_dir, *flags, *extra)
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


def test_single_pair_has_no_interval(tmp_path, checkpoint_dir, capsys):
    random_image(0, (40, 40)).save(tmp_path / "a.png")
    random_image(1, (40, 40)).save(tmp_path / "b.png")
    assert run_score(tmp_path / "a.png", tmp_path / "b.png", "--model", checkpoint_dir, "--out", tmp_path / "o") == 0
    assert "95% CI n/a" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["models"]["nearid"]["ci95"] is None


# --- nearid-bench ---------------------------------------------------------------------------------


def nearid_csv(path: Path, rng: np.random.Generator) -> Path:
    """Similarities of 2 groups: 'easy' (every term wins) and 'mixed' (random margins, a missing view)."""
    names = ("sim_01", "sim_02", "sim_12", "cross_00", "cross_11", "cross_22")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "group", "model", *names])
        for group, n in (("easy", 12), ("mixed", 30)):
            for i in range(n):
                sims = rng.uniform(0.5, 0.9, 3)
                cross = sims.min() - 0.1 if group == "easy" else rng.uniform(0.4, 0.9, 3)
                cells = [*sims, *np.broadcast_to(cross, 3)]
                if group == "mixed" and i % 7 == 0:
                    cells[1] = cells[2] = cells[5] = ""  # view 2 missing
                writer.writerow([f"s{i}", group, "judge", *cells])
    return path


def test_bench_tables_have_ssr_pa_intervals_from_the_samples(tmp_path, capsys):
    path = nearid_csv(tmp_path / "judge.csv", np.random.default_rng(0))
    out = tmp_path / "out"
    assert bench_main(["--from-csv", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "table.json").read_text())["rows"]
    easy, mixed, pooled = rows
    assert (easy["SSR"], easy["SSR_ci_low"], easy["SSR_ci_high"]) == (100.0, 100.0, 100.0)
    assert (easy["PA_ci_low"], easy["PA_ci_high"]) == (100.0, 100.0)

    # the mixed group: resampling its samples, each carrying (term wins + mean win) / (terms + 1) for PA
    _, table = bench_files.read_similarities([path])
    keep = table["group"] == "mixed"
    result = score_nearid_samples({k: v[keep] for k, v in table.items() if k.startswith(("sim", "cross"))},
                                  per_sample=True)
    units = bench.rate_units(result)
    assert units["PA"][0].sum() / units["PA"][1].sum() == pytest.approx(mixed["PA"])
    assert units["SSR"][0].sum() / units["SSR"][1].sum() == pytest.approx(mixed["SSR"])
    assert (mixed["PA_ci_low"], mixed["PA_ci_high"]) == bootstrap_ratio_ci(*units["PA"], resamples=1000, seed=0)
    assert (mixed["SSR_ci_low"], mixed["SSR_ci_high"]) == bootstrap_ratio_ci(*units["SSR"], resamples=1000, seed=0)
    assert mixed["SSR_ci_low"] < mixed["SSR"] < mixed["SSR_ci_high"]
    # pooled: each group resampled on its own; the easy group has no spread, so the pooled interval is narrower
    # than the mixed group's, scaled by its share of the samples
    assert pooled["SSR_ci_low"] < pooled["SSR"] < pooled["SSR_ci_high"]
    share = mixed["n_samples"] / pooled["n_samples"]
    width = pooled["SSR_ci_high"] - pooled["SSR_ci_low"]
    assert width == pytest.approx(share * (mixed["SSR_ci_high"] - mixed["SSR_ci_low"]), rel=0.25)

    header = read_csv(out / "table.csv")[0]
    assert list(header)[4:10] == ["SSR", "SSR_ci_low", "SSR_ci_high", "PA", "PA_ci_low", "PA_ci_high"]
    assert printed.splitlines()[0].split()[:6] == ["model", "group", "SSR", "SSR_CI95", "PA", "PA_CI95"]
    assert f"[{mixed['SSR_ci_low']:.2f},{mixed['SSR_ci_high']:.2f}]" in printed.splitlines()[2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ci"]["resamples"] == 1000 and summary["ci"]["unit"] == "sample"


def test_bench_ci_none_and_seed(tmp_path, capsys):
    path = nearid_csv(tmp_path / "judge.csv", np.random.default_rng(1))
    assert bench_main(["--from-csv", str(path), "--out", str(tmp_path / "none"), "--ci", "none"]) == 0
    assert "CI95" not in capsys.readouterr().out
    rows = read_csv(tmp_path / "none" / "table.csv")
    assert all(row[key] == "" for row in rows for key in ("SSR_ci_low", "PA_ci_high"))
    assert json.loads((tmp_path / "none" / "summary.json").read_text())["ci"] is None
    a = bench.nearid_results(bench_files.read_similarities([path])[1], ci_seed=1)
    b = bench.nearid_results(bench_files.read_similarities([path])[1], ci_seed=2)
    assert a[1]["PA"] == b[1]["PA"] and a[1]["PA_ci_low"] != b[1]["PA_ci_low"]


def test_mtg_rows_have_intervals():
    rng = np.random.default_rng(2)
    n = 40
    table = {"model": np.array(["m"] * n, dtype=object), "group": np.array(["g"] * n, dtype=object),
             "sim_1_2": rng.uniform(0.5, 1, n), "sim_1_1p": rng.uniform(0.3, 1, n), "sim_1_2p": rng.uniform(0, 1, n),
             "sim_2_2p": rng.uniform(0.3, 1, n), "sim_2_1p": rng.uniform(0, 1, n),
             "oracle_1": rng.uniform(0, 1, n), "oracle_2": rng.uniform(0, 1, n)}
    group, pooled = bench.mtg_results(table)
    result = score_mtg_samples({k: table[k] for k in ("sim_1_2", "sim_1_1p", "sim_1_2p", "sim_2_2p", "sim_2_1p")},
                               table["oracle_1"], table["oracle_2"], per_sample=True)
    units = bench.rate_units(result, mean_trial=False)  # MTG's PA: term wins over terms, no mean trial
    assert group["PA"] == pytest.approx(units["PA"][0].sum() / units["PA"][1].sum())
    assert (group["PA_ci_low"], group["PA_ci_high"]) == bootstrap_ratio_ci(*units["PA"])
    assert (pooled["SSR_ci_low"], pooled["SSR_ci_high"]) == (group["SSR_ci_low"], group["SSR_ci_high"])


# --- NearIDMetric ---------------------------------------------------------------------------------


def test_metric_compute_has_the_interval(scorer):
    refs = [random_image(i, (40, 44)) for i in range(6)]
    gens = [random_image(50 + i, (52, 40)) for i in range(6)]
    metric = NearIDMetric(scorer)
    metric.update(refs[:4], gens[:4])
    metric.update(refs[4:], gens[4:])
    result = metric.compute()
    assert set(result) == {"mean", "std", "n", "ci_low", "ci_high"}
    assert (result["ci_low"], result["ci_high"]) == bootstrap_ci(metric.scores.numpy())
    assert result["ci_low"] < result["mean"] < result["ci_high"]
    other = NearIDMetric(scorer, ci_resamples=300, ci_seed=4)
    other.update(refs, gens)
    assert (other.compute()["ci_low"], other.compute()["ci_high"]) == bootstrap_ci(other.scores.numpy(),
                                                                                  resamples=300, seed=4)
    off = NearIDMetric(scorer, ci=None)
    off.update(refs, gens)
    assert set(off.compute()) == {"mean", "std", "n"}
    with pytest.raises(ValueError, match="ci must be"):
        NearIDMetric(scorer, ci="normal")
    empty = NearIDMetric(scorer).compute()
    assert empty["n"] == 0 and math.isnan(empty["ci_low"])


def test_torchmetrics_adapter_has_the_interval(scorer):
    pytest.importorskip("torchmetrics")
    from nearid_metric.torchmetrics_adapter import NearIDTorchMetric

    refs = [random_image(i, (40, 44)) for i in range(5)]
    gens = [random_image(70 + i, (52, 40)) for i in range(5)]
    adapter, plain = NearIDTorchMetric(scorer), NearIDMetric(scorer)
    adapter.update(refs, gens)
    plain.update(refs, gens)
    got, expected = adapter.compute(), plain.compute()
    assert set(got) == set(expected)
    assert got["ci_low"].dtype == torch.float64 and got["ci_low"].item() == expected["ci_low"]
    off = NearIDTorchMetric(scorer, ci=None)
    off.update(refs, gens)
    assert set(off.compute()) == {"mean", "std", "n"}
