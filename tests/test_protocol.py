"""NearID / MTG protocol: hand-computed answers, properties on random tables, MTG alignment, bad input."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from PIL import Image
from scipy.stats import pearsonr

from nearid_metric.protocol import (
    NEARID_TERMS,
    harmonic_mean,
    mtg_oracle,
    pool_groups,
    pool_results,
    score_mtg_samples,
    score_nearid_groups,
    score_nearid_samples,
)

NAN = float("nan")
RATES = ("SSR", "SSR_mean", "PA", "PA_terms", "H", "H_mean")
COUNTS = ("n_samples", "n_terms", "n_trials", "n_excluded")
SEEDS = range(8)


def hand_table() -> dict[str, np.ndarray]:
    """Five samples; margins in NEARID_TERMS order (0->1, 1->0, 0->2, 2->0, 1->2, 2->1).

    A (3 views): 0.75-0.25=+0.5, 0.75-0.5=+0.25, 0.5-0.25=+0.25, 0.5-0.75=-0.25, 0.625-0.5=+0.125, 0.625-0.75=-0.125
       -> 6 terms, 4 wins, mean 0.75/6 = +0.125
    B (view 2 missing): 0.5-0.25=+0.25, 0.5-0.375=+0.125 -> 2 terms, 2 wins, mean +0.1875
    C (every image missing): no valid term -> excluded
    D (tie): 0.5-0.5=0 (a loss at threshold 0), 0.5-0.25=+0.25 -> 2 terms, 1 win, mean +0.125
    E: 0.25-0.5=-0.25, 0.25-0.75=-0.5 -> 2 terms, 0 wins, mean -0.375
    All values are dyadic, so every margin and mean is exact in float64.
    """
    return {
        "sim_01": np.array([0.75, 0.5, NAN, 0.5, 0.25]),
        "sim_02": np.array([0.5, NAN, NAN, NAN, NAN]),
        "sim_12": np.array([0.625, NAN, NAN, NAN, NAN]),
        "cross_00": np.array([0.25, 0.25, NAN, 0.5, 0.5]),
        "cross_11": np.array([0.5, 0.375, NAN, 0.25, 0.75]),
        "cross_22": np.array([0.75, NAN, NAN, NAN, NAN]),
        "cross_01": np.array([0.1, 0.2, NAN, 0.3, 0.4]),  # off-diagonal: not used
    }


def random_table(rng: np.random.Generator, n: int, *, missing: bool = True) -> dict[str, np.ndarray]:
    """Random cosines; with ``missing``, random positive views / distractors / whole samples missing."""
    table = {f"sim_{i}{j}": rng.uniform(-1, 1, n) for i, j in ((0, 1), (0, 2), (1, 2))}
    table |= {f"cross_{i}{j}": rng.uniform(-1, 1, n) for i in range(3) for j in range(3)}
    if missing:
        for view in range(3):
            gone = rng.random(n) < 0.2
            for name in table:
                if str(view) in name[-2:] and (name.startswith("sim") or name[-2] == str(view)):
                    table[name][gone] = NAN
            table[f"cross_{view}{view}"][rng.random(n) < 0.1] = NAN  # distractor missing
        for name in table:
            table[name][rng.random(n) < 0.05] = NAN  # single missing similarities
    return table


def assert_results_close(a: dict, b: dict) -> None:
    for key in COUNTS:
        assert a[key] == b[key], key
    for key in RATES:
        assert np.isclose(a[key], b[key], rtol=1e-12, atol=1e-12, equal_nan=True), (key, a[key], b[key])


# ---------------------------------------------------------------- NearID, known answers


def test_hand_table_threshold_0():
    result = score_nearid_samples(hand_table())
    # samples with a valid term: A, B, D, E (C excluded); terms 6 + 2 + 2 + 2 = 12; term wins 4 + 2 + 1 + 0 = 7
    # strict sample wins: B only -> SSR 1/4; mean wins: A, B, D -> SSR_mean 3/4
    # PA (paper) = (7 + 3) / (12 + 4) = 62.5; PA_terms = 7 / 12
    assert result["n_samples"] == 4 and result["n_excluded"] == 1
    assert result["n_terms"] == 12 and result["n_trials"] == 16
    assert result["SSR"] == 25.0
    assert result["SSR_mean"] == 75.0
    assert result["PA"] == 62.5
    assert result["PA_terms"] == pytest.approx(700 / 12)
    assert result["H"] == pytest.approx(2 * 25 * 62.5 / (25 + 62.5))  # 35.714...
    assert result["H_mean"] == pytest.approx(2 * 75 * 62.5 / (75 + 62.5))  # 68.18...


def test_hand_table_threshold_positive_ties_lose():
    result = score_nearid_samples(hand_table(), win_threshold=0.125)
    # win needs margin > 0.125 (0.125 itself loses):
    # A: +0.5 W, +0.25 W, +0.25 W, -0.25, +0.125 (tie), -0.125 -> 3 wins; mean 0.125 (tie) loses
    # B: +0.25 W, +0.125 (tie) -> 1 win; mean 0.1875 wins
    # D: 0, +0.25 W -> 1 win; mean 0.125 (tie) loses
    # E: no win
    # term wins 5 / 12; strict wins 0 / 4; mean wins 1 / 4; PA = (5 + 1) / 16
    assert result["SSR"] == 0.0
    assert result["SSR_mean"] == 25.0
    assert result["PA"] == 37.5
    assert result["PA_terms"] == pytest.approx(500 / 12)
    assert result["H"] == 0.0  # harmonic(0, 37.5)
    assert result["H_mean"] == pytest.approx(2 * 25 * 37.5 / 62.5)  # 30


def test_hand_table_per_sample():
    per = score_nearid_samples(hand_table(), per_sample=True)["per_sample"]
    assert [label for label, _, _ in NEARID_TERMS] == ["0->1", "1->0", "0->2", "2->0", "1->2", "2->1"]
    np.testing.assert_array_equal(per["margins"][0], [0.5, 0.25, 0.25, -0.25, 0.125, -0.125])
    np.testing.assert_array_equal(per["margins"][3], [0.0, 0.25, NAN, NAN, NAN, NAN])
    assert per["margins"].shape == (5, 6) and np.isnan(per["margins"][2]).all()
    np.testing.assert_array_equal(per["valid"].sum(axis=1), [6, 2, 0, 2, 2])
    np.testing.assert_array_equal(per["wins"][3], [False, True, False, False, False, False])
    np.testing.assert_array_equal(per["sample_valid"], [True, True, False, True, True])
    np.testing.assert_array_equal(per["sample_win"], [False, True, False, False, False])
    np.testing.assert_array_equal(per["sample_mean_win"], [True, True, False, True, False])
    np.testing.assert_array_equal(per["margin_mean"], [0.125, 0.1875, NAN, 0.125, -0.375])


def test_absent_columns_count_as_missing_images():
    # only views 0 and 1: the two terms 0->1 and 1->0 (samples B, C, D, E of the hand table)
    table = {k: v[1:] for k, v in hand_table().items() if k in ("sim_01", "cross_00", "cross_11")}
    result = score_nearid_samples(table)
    # B: 2 wins; C: excluded; D: 1 of 2, mean wins; E: 0 of 2 -> SSR 1/3, SSR_mean 2/3, PA (3 + 2) / (6 + 3)
    assert (result["n_samples"], result["n_terms"], result["n_excluded"]) == (3, 6, 1)
    assert result["SSR"] == pytest.approx(100 / 3)
    assert result["SSR_mean"] == pytest.approx(200 / 3)
    assert result["PA"] == pytest.approx(500 / 9)
    assert result["PA_terms"] == 50.0


def test_empty_and_all_missing_give_nan_rates():
    empty = score_nearid_samples({"sim_01": [], "cross_00": [], "cross_11": []}, per_sample=True)
    assert all(math.isnan(empty[k]) for k in RATES)
    assert [empty[k] for k in COUNTS] == [0, 0, 0, 0]
    assert empty["per_sample"]["margins"].shape == (0, 6)
    missing = score_nearid_samples({"sim_01": [NAN, NAN], "cross_00": [0.1, NAN], "cross_11": [NAN, 0.2]})
    assert all(math.isnan(missing[k]) for k in RATES)
    assert [missing[k] for k in COUNTS] == [0, 0, 0, 2]


def test_harmonic_mean():
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(0.0, 50.0) == 0.0
    assert harmonic_mean(50.0, 50.0) == 50.0
    assert math.isnan(harmonic_mean(NAN, 50.0))


def test_ssr_above_pa_terms_when_term_counts_differ():
    # sample 1: one valid term, a win; sample 2: six terms, all losses
    # SSR = 1/2 = 50 % but PA_terms = 1/7 = 14.3 % and PA = (1 + 1) / (7 + 2) = 22.2 %
    table = {
        "sim_01": [0.5, 0.0], "sim_02": [NAN, 0.0], "sim_12": [NAN, 0.0],
        "cross_00": [0.25, 0.5], "cross_11": [NAN, 0.5], "cross_22": [NAN, 0.5],
    }
    result = score_nearid_samples(table)
    assert result["SSR"] == 50.0
    assert result["PA_terms"] == pytest.approx(100 / 7)
    assert result["PA"] == pytest.approx(200 / 9)


# ---------------------------------------------------------------- NearID, properties on random tables


@pytest.mark.parametrize("seed", SEEDS)
def test_all_positive_and_all_negative_margins(seed):
    rng = np.random.default_rng(seed)
    n = 50
    table = random_table(rng, n)
    for name in table:
        if name.startswith("sim"):
            table[name] = np.where(np.isnan(table[name]), NAN, rng.uniform(0.6, 1.0, n))
        else:
            table[name] = np.where(np.isnan(table[name]), NAN, rng.uniform(-1.0, 0.5, n))
    high = score_nearid_samples(table)
    assert all(high[k] == 100.0 for k in RATES)
    low = score_nearid_samples({k: -v for k, v in table.items()})
    assert all(low[k] == 0.0 for k in RATES)
    assert [low[k] for k in COUNTS] == [high[k] for k in COUNTS]


@pytest.mark.parametrize("seed", SEEDS)
def test_invariants_on_random_tables(seed):
    rng = np.random.default_rng(seed)
    threshold = [0.0, 0.1][seed % 2]
    table = random_table(rng, 200)
    result = score_nearid_samples(table, win_threshold=threshold, per_sample=True)
    per = result["per_sample"]
    # counts
    assert result["n_samples"] + result["n_excluded"] == 200
    assert result["n_terms"] == per["valid"].sum() and result["n_trials"] == result["n_terms"] + result["n_samples"]
    # a sample whose valid margins all beat the threshold has a mean above it: SSR <= SSR_mean, H <= H_mean
    assert not (per["sample_win"] & ~per["sample_mean_win"]).any()
    assert result["SSR"] <= result["SSR_mean"] and result["H"] <= result["H_mean"]
    # PA pools both kinds of trial: PA * trials = PA_terms * terms + SSR_mean * samples
    assert result["PA"] * result["n_trials"] == pytest.approx(
        result["PA_terms"] * result["n_terms"] + result["SSR_mean"] * result["n_samples"]
    )
    # harmonic means lie between their two rates
    assert min(result["SSR"], result["PA"]) <= result["H"] <= max(result["SSR"], result["PA"])
    # per-sample margins are the defined differences
    for k, (_, sim, cross) in enumerate(NEARID_TERMS):
        np.testing.assert_array_equal(per["margins"][:, k], table[sim] - table[cross])


@pytest.mark.parametrize("seed", SEEDS)
def test_ssr_below_pa_when_every_sample_has_all_terms(seed):
    # with equal term counts PA_terms is the mean per-sample win fraction, which is >= the all-win fraction
    result = score_nearid_samples(random_table(np.random.default_rng(seed), 100, missing=False))
    assert result["n_terms"] == 600
    assert result["SSR"] <= result["PA_terms"] and result["SSR"] <= result["PA"]


@pytest.mark.parametrize("seed", SEEDS)
def test_row_order_does_not_matter(seed):
    rng = np.random.default_rng(seed)
    table = random_table(rng, 120)
    order = rng.permutation(120)
    assert score_nearid_samples(table) == score_nearid_samples({k: v[order] for k, v in table.items()})


def labelled_table(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    table = random_table(rng, n)
    table["model"] = rng.choice(np.array(["clip", "nearid", "siglip2"], dtype=object), n)
    table["setting"] = rng.choice(np.array(["flux", "powerpaint", "qwen", "sdxl"]), n)  # numpy str
    return table


@pytest.mark.parametrize("seed", SEEDS)
def test_groups_equal_scoring_each_subset(seed):
    rng = np.random.default_rng(seed)
    table = labelled_table(rng, 300)
    rows = score_nearid_groups(table, by=("model", "setting"), win_threshold=0.05)
    keys = [(row["model"], row["setting"]) for row in rows]
    assert keys == sorted(set(zip(table["model"].tolist(), table["setting"].tolist())))
    for row in rows:
        subset = (table["model"] == row["model"]) & (table["setting"] == row["setting"])
        expected = score_nearid_samples({k: v[subset] for k, v in table.items()}, win_threshold=0.05)
        assert {k: row[k] for k in expected} == expected
        assert type(row["setting"]) is str


@pytest.mark.parametrize("seed", SEEDS)
def test_pooling_over_settings_equals_union(seed):
    rng = np.random.default_rng(seed)
    table = labelled_table(rng, 300)
    per_setting = score_nearid_groups(table, by=("model", "setting"))
    pooled = pool_groups(per_setting, by="model")
    union = score_nearid_groups(table, by="model")
    assert [row["model"] for row in pooled] == [row["model"] for row in union]
    for p, u in zip(pooled, union):
        assert_results_close(p, u)
    assert_results_close(pool_results(per_setting), score_nearid_samples(table))


def test_pooling_weights_by_counts_from_a_saved_table():
    # setting a: SSR 50 over 2 samples, PA 40 over 5 trials, 1 of 3 terms won;
    # setting b: SSR 100 over 6, PA 90 over 20 trials, 12 of 14 terms won
    # counts read back as floats; a group with no sample (NaN rates) carries no weight
    rows = [
        {"SSR": 50.0, "SSR_mean": 50.0, "PA": 40.0, "PA_terms": 100 / 3,
         "n_samples": 2.0, "n_terms": 3.0, "n_trials": 5.0, "n_excluded": 1.0},
        {"SSR": 100.0, "SSR_mean": 100.0, "PA": 90.0, "PA_terms": 1200 / 14,
         "n_samples": 6, "n_terms": 14, "n_trials": 20, "n_excluded": 0},
        {"SSR": NAN, "SSR_mean": NAN, "PA": NAN, "PA_terms": NAN,
         "n_samples": 0, "n_terms": 0, "n_trials": 0, "n_excluded": 4},
    ]
    pooled = pool_results(rows)
    assert pooled["SSR"] == pytest.approx((50 * 2 + 100 * 6) / 8)  # 87.5
    assert pooled["PA"] == pytest.approx((40 * 5 + 90 * 20) / 25)  # 80
    assert pooled["PA_terms"] == pytest.approx((1 + 12) / 17 * 100)  # (1 + 12 term wins) / 17 terms
    assert pooled["H"] == pytest.approx(harmonic_mean(87.5, 80.0))
    assert [pooled[k] for k in COUNTS] == [8, 17, 25, 5]
    empty = pool_results([])
    assert math.isnan(empty["SSR"]) and empty["n_samples"] == 0


def test_dataframe_input_matches_dict():
    pd = pytest.importorskip("pandas")
    table = labelled_table(np.random.default_rng(0), 100)
    frame = pd.DataFrame(table)
    assert score_nearid_samples(frame) == score_nearid_samples(table)
    assert score_nearid_groups(frame, by=("model", "setting")) == score_nearid_groups(table, by=("model", "setting"))


# ---------------------------------------------------------------- MTG


def mtg_table() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Five MTG samples with correlations known exactly.

    oracle_1 = [0, 0, 1, 1, .5]; centred on rows 0-3: c = [-.5, -.5, .5, .5], |c| = 1.
    z = [.5, -.5, -.5, .5] is orthogonal to c and to the constant, |z| = 1.
    sim_1_1p = oracle_1 + (4/3) z (row 4 missing): r = 1 / sqrt(1 + 16/9) = 0.6 on 4 rows.
    oracle_2 = [.25, .75, .25, .75, NaN]; centred = .5 w with w = [-.5, .5, -.5, .5], w orthogonal to z.
    sim_2_2p = 1 - oracle_2 + .375 z: r = -.25 / (.5 * sqrt(.25 + .140625)) = -0.8 on 4 rows.
    sim_1_2p = .5 oracle_2 + .25: r = 1 on 4 rows (row 4 has no oracle_2).
    sim_2_1p: arbitrary, 5 rows.
    """
    sims = {
        "sim_1_2": np.array([1.0, 0.0, 0.5, 0.5, 0.75]),
        "sim_1_1p": np.array([2 / 3, -2 / 3, 1 / 3, 5 / 3, NAN]),
        "sim_2_2p": np.array([0.9375, 0.0625, 0.5625, 0.4375, 0.5]),
        "sim_1_2p": np.array([0.375, 0.625, 0.375, 0.625, 0.3]),
        "sim_2_1p": np.array([0.1, 0.4, 0.35, 0.9, 0.2]),
    }
    return sims, np.array([0.0, 0.0, 1.0, 1.0, 0.5]), np.array([0.25, 0.75, 0.25, 0.75, NAN])


def test_mtg_margins_by_hand():
    result = score_mtg_samples(*mtg_table(), per_sample=True)
    # m1 = sim_1_2 - sim_1_1p, m2 = sim_1_2 - sim_2_2p:
    # row 0: +1/3, +0.0625 -> all win;   row 1: +2/3, -0.0625 -> mean wins
    # row 2: +1/6, -0.0625 -> mean wins; row 3: -7/6, +0.0625 -> loses
    # row 4: NaN, +0.25 -> one term, wins
    # 5 samples, 9 terms, 6 term wins; strict wins 2, mean wins 4
    # MTG's PA is the plain term rate (no mean-based trial, unlike NearID's): 6 / 9, so n_trials = n_terms
    assert (result["n_samples"], result["n_terms"], result["n_trials"], result["n_excluded"]) == (5, 9, 9, 0)
    assert result["SSR"] == 40.0
    assert result["SSR_mean"] == 80.0
    assert result["PA"] == pytest.approx(600 / 9)
    assert result["PA_terms"] == pytest.approx(600 / 9)
    assert result["H"] == pytest.approx(2 * 40 * (600 / 9) / (40 + 600 / 9))
    assert result["per_sample"]["margins"].shape == (5, 2)


def test_mtg_alignment_known_correlations():
    sims, oracle_1, oracle_2 = mtg_table()
    result = score_mtg_samples(sims, oracle_1, oracle_2)
    assert result["r_1_1p"] == pytest.approx(0.6, abs=1e-12)
    assert result["r_2_2p"] == pytest.approx(-0.8, abs=1e-12)
    assert result["r_1_2p"] == pytest.approx(1.0, abs=1e-12)
    assert (result["n_r_1_1p"], result["n_r_2_2p"], result["n_r_1_2p"], result["n_r_2_1p"]) == (4, 4, 4, 5)
    pairs = {"r_1_1p": ("sim_1_1p", oracle_1), "r_2_2p": ("sim_2_2p", oracle_2),
             "r_1_2p": ("sim_1_2p", oracle_2), "r_2_1p": ("sim_2_1p", oracle_1)}
    for key, (column, oracle) in pairs.items():
        both = np.isfinite(sims[column]) & np.isfinite(oracle)
        assert result[key] == pytest.approx(pearsonr(sims[column][both], oracle[both])[0], abs=1e-12)
    # strict: atanh(.6) = ln 2, atanh(-.8) = -ln 3 -> tanh(ln(2/3) / 2) = (2/3 - 1) / (2/3 + 1) = -0.2
    assert result["MO_strict"] == pytest.approx(-0.2, abs=1e-12)
    # MO: the r = 1 is clipped to 0.999 before atanh
    rs = [0.6, -0.8, 0.999, pearsonr(sims["sim_2_1p"], oracle_1)[0]]
    assert result["MO"] == pytest.approx(math.tanh(sum(math.atanh(r) for r in rs) / 4), abs=1e-12)
    assert result["undefined_r"] == ()


def test_mtg_undefined_correlations_are_named(caplog):
    sims, oracle_1, oracle_2 = mtg_table()
    with caplog.at_level(logging.WARNING, logger="nearid_metric.protocol"):
        result = score_mtg_samples(sims, oracle_1, np.full(5, 0.5))  # constant oracle_2
    assert result["undefined_r"] == ("r_2_2p", "r_1_2p")
    assert math.isnan(result["r_2_2p"]) and math.isnan(result["r_1_2p"])
    assert "r_2_2p" in caplog.text
    # as the reference: an undefined r counts as 0 in MO; the _nan variants are NaN instead
    r_2_1p = pearsonr(sims["sim_2_1p"], oracle_1)[0]
    assert result["MO_strict"] == pytest.approx(math.tanh((math.atanh(0.6) + 0.0) / 2), abs=1e-12)
    assert result["MO"] == pytest.approx(math.tanh((math.atanh(0.6) + math.atanh(r_2_1p)) / 4), abs=1e-12)
    assert math.isnan(result["MO_nan"]) and math.isnan(result["MO_strict_nan"])
    # a constant cross-view similarity: r_2_1p counts as 0 in MO only; MO_strict and MO_strict_nan defined
    sims["sim_2_1p"] = np.full(5, 0.5)
    result = score_mtg_samples(sims, oracle_1, oracle_2)
    assert result["undefined_r"] == ("r_2_1p",) and result["n_r_2_1p"] == 5
    assert math.isnan(result["MO_nan"]) and result["MO_strict_nan"] == pytest.approx(-0.2, abs=1e-12)
    assert result["MO_strict"] == pytest.approx(-0.2, abs=1e-12)
    assert result["MO"] == pytest.approx(math.tanh((math.atanh(0.6) + math.atanh(-0.8) + math.atanh(0.999)) / 4),
                                         abs=1e-12)
    # fewer than 2 rows is no data, not a constant: MO is NaN (as without oracles), MO_strict still defined
    sims["sim_2_1p"] = np.array([NAN, NAN, NAN, 0.5, NAN])
    result = score_mtg_samples(sims, oracle_1, oracle_2)
    assert result["undefined_r"] == ("r_2_1p",) and result["n_r_2_1p"] == 1
    assert math.isnan(result["MO"]) and math.isnan(result["MO_nan"])
    assert result["MO_strict"] == pytest.approx(-0.2, abs=1e-12)


def test_mtg_pools_like_nearid():
    sims, oracle_1, oracle_2 = mtg_table()
    halves = [score_mtg_samples({k: v[part] for k, v in sims.items()}, oracle_1[part], oracle_2[part])
              for part in (slice(0, 2), slice(2, 5))]
    assert_results_close(pool_results(halves), score_mtg_samples(sims, oracle_1, oracle_2))


def test_mtg_oracle_hand_drawn_masks():
    obj = np.zeros((4, 5), dtype=np.uint8)
    obj[1:3, 1:5] = 255  # 8 pixels
    part = np.zeros((4, 5), dtype=np.uint8)
    part[1, 3:5] = 1  # 2 pixels
    assert mtg_oracle(obj, part) == 0.75  # 1 - 2/8
    assert mtg_oracle(obj > 0, np.zeros((4, 5))) == 1.0
    assert mtg_oracle(Image.fromarray(obj), Image.fromarray(part * 255)) == 0.75  # mode "L"
    assert mtg_oracle(Image.fromarray(obj).convert("1"), part) == 0.75
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[1, 3, 2] = 10  # blue only
    rgb[1, 4, 0] = 200  # red only
    assert mtg_oracle(Image.fromarray(obj).convert("RGB"), Image.fromarray(rgb)) == 0.75
    palette = Image.fromarray(part, mode="L").convert("P")  # palette index = label value
    assert mtg_oracle(obj, palette) == 0.75
    # empty object mask: ratio 1, oracle 0
    assert mtg_oracle(np.zeros((4, 5)), part) == 0.0
    assert mtg_oracle(np.zeros((4, 5)), np.zeros((4, 5))) == 0.0


# ---------------------------------------------------------------- bad input


def test_bad_nearid_input():
    table = hand_table()
    with pytest.raises(ValueError, match="cross_11"):
        score_nearid_samples(table | {"cross_11": np.zeros(4)})
    with pytest.raises(ValueError, match="sim_12.*1-D"):
        score_nearid_samples(table | {"sim_12": np.zeros((5, 2))})
    with pytest.raises(ValueError, match="sim_01.*1-D"):
        score_nearid_samples(table | {"sim_01": 0.5})
    with pytest.raises(ValueError, match="cross_00.*not numeric"):
        score_nearid_samples(table | {"cross_00": ["a", "b", "c", "d", "e"]})
    with pytest.raises(ValueError, match="sim_02.*infinite"):
        score_nearid_samples(table | {"sim_02": np.full(5, np.inf)})
    with pytest.raises(ValueError, match="no complete NearID term"):
        score_nearid_samples({"sim_01": [0.5], "cross_01": [0.2], "cross_22": [0.1]})
    with pytest.raises(ValueError, match="win_threshold"):
        score_nearid_samples(table, win_threshold=NAN)


def test_bad_group_input():
    table = labelled_table(np.random.default_rng(0), 10)
    with pytest.raises(ValueError, match="'generator'"):
        score_nearid_groups(table, by=("model", "generator"))
    with pytest.raises(ValueError, match="'model'.*missing"):
        score_nearid_groups(table | {"model": np.array(["a"] * 9 + [None], dtype=object)}, by="model")
    with pytest.raises(ValueError, match="'setting'.*shape"):
        score_nearid_groups(table | {"setting": np.array(["a"] * 9)}, by="setting")
    rows = score_nearid_groups(table, by="model")
    with pytest.raises(ValueError, match="n_trials"):
        pool_results([rows[0] | {"n_trials": rows[0]["n_trials"] + 1}])
    with pytest.raises(ValueError, match="'n_terms'"):
        pool_results([{k: v for k, v in rows[0].items() if k != "n_terms"}])
    with pytest.raises(ValueError, match="'n_samples'.*not a count"):
        pool_results([rows[0] | {"n_samples": 2.5}])
    with pytest.raises(ValueError, match="group key"):
        pool_groups(rows, by="setting")


def test_bad_mtg_input():
    sims, oracle_1, oracle_2 = mtg_table()
    with pytest.raises(ValueError, match="sim_2_1p"):
        score_mtg_samples({k: v for k, v in sims.items() if k != "sim_2_1p"}, oracle_1, oracle_2)
    with pytest.raises(ValueError, match="oracle_1"):
        score_mtg_samples(sims, oracle_1[:4], oracle_2)
    with pytest.raises(ValueError, match="sim_1_2p"):
        score_mtg_samples(sims | {"sim_1_2p": sims["sim_1_2p"][:3]}, oracle_1, oracle_2)
    with pytest.raises(ValueError, match="part_mask"):
        mtg_oracle(np.ones((4, 5)), np.ones((5, 4)))
    with pytest.raises(ValueError, match="object_mask"):
        mtg_oracle(np.ones(4), np.ones(4))


def test_numeric_modules_import_without_torch():
    """Scoring saved tables (protocol, DreamBench++ MH) must not import torch or model code."""
    import subprocess
    import sys

    code = ("import sys, nearid_metric.protocol, nearid_metric.dreambench, nearid_metric.stats; "
            "print(sorted(m for m in ('torch', 'timm', 'open_clip') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_pooling_refuses_null_rates_from_json():
    """A row read back from table.json (NaN written as null) with a nonzero weight is an error, not a crash."""
    from nearid_metric.protocol import pool_results

    row = {"SSR": None, "SSR_mean": 50.0, "PA": 40.0, "PA_terms": 30.0,
           "n_samples": 2, "n_terms": 10, "n_trials": 12, "n_excluded": 0}
    with pytest.raises(ValueError, match="no value for 'SSR'"):
        pool_results([row])
