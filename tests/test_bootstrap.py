"""Bootstrap confidence intervals (nearid_metric.stats): coverage on simulated data, seeds, shrinkage, groups.

Pure numpy; the coverage checks simulate 200 data sets each (about 1 s in all).
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from nearid_metric.stats import bootstrap_ci, bootstrap_ratio_ci

DATASETS = 200


def coverage(simulate, true_mean: float, *, grouped: bool = False, seed: int = 0) -> tuple[float, float]:
    """Share of ``DATASETS`` simulated data sets whose 95% interval holds ``true_mean``, and the mean width."""
    rng = np.random.default_rng(seed)
    hits, widths = 0, []
    for k in range(DATASETS):
        values, groups = simulate(rng)
        low, high = bootstrap_ci(values, groups=groups if grouped else None, seed=k)
        hits += low <= true_mean <= high
        widths.append(high - low)
    return hits / DATASETS, float(np.mean(widths))


def scores_like(rng: np.random.Generator, n: int = 100) -> tuple[np.ndarray, None]:
    """Skewed scores in [0, 1] like identity cosines (Beta(8, 3), mean 8/11)."""
    return rng.beta(8, 3, n), None


def clustered(rng: np.random.Generator, prompts: int = 50, per_prompt: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Several generations per prompt sharing a prompt effect (intra-class correlation 0.5), mean 0.5."""
    effect = rng.normal(0, 0.1, prompts)
    values = 0.5 + effect[:, None] + rng.normal(0, 0.1, (prompts, per_prompt))
    return values.ravel(), np.repeat(np.arange(prompts), per_prompt)


def test_covers_the_true_mean_at_about_the_nominal_rate():
    rate, _ = coverage(scores_like, 8 / 11)
    assert 0.90 <= rate <= 0.99, rate
    normal, _ = coverage(lambda rng: (rng.normal(0.3, 0.2, 40), None), 0.3, seed=1)
    assert 0.90 <= normal <= 0.99, normal


def test_grouped_interval_covers_clustered_data_where_the_pair_interval_does_not():
    """Pairs of one prompt are not independent: resampling pairs is overconfident, resampling prompts is not."""
    grouped, grouped_width = coverage(clustered, 0.5, grouped=True)
    pairs, pairs_width = coverage(clustered, 0.5, grouped=False)
    assert 0.90 <= grouped <= 0.99, grouped
    assert pairs < 0.80, pairs  # about 0.6 here
    assert grouped_width > 1.8 * pairs_width


def test_reproducible_with_the_seed_and_depends_on_it():
    values = np.random.default_rng(3).beta(8, 3, 200)
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)
    groups = np.arange(200) // 4
    assert bootstrap_ci(values, groups=groups, seed=7) == bootstrap_ci(values, groups=groups, seed=7)


def test_width_shrinks_like_one_over_root_n():
    rng = np.random.default_rng(4)
    widths = {}
    for n in (100, 400, 1600):
        low, high = bootstrap_ci(rng.normal(0.5, 0.2, n), resamples=2000, seed=0)
        widths[n] = high - low
        # the normal-theory width 2 * 1.96 * sd / sqrt(n), within 15 %
        assert widths[n] == pytest.approx(2 * 1.96 * 0.2 / math.sqrt(n), rel=0.15), n
    assert widths[400] == pytest.approx(widths[100] / 2, rel=0.2)
    assert widths[1600] == pytest.approx(widths[400] / 2, rel=0.2)


def test_order_does_not_matter():
    """The interval is a function of the values (and their groups), not of how they are listed or split."""
    rng = np.random.default_rng(5)
    values = rng.beta(2, 5, 301)
    groups = rng.integers(0, 40, 301).astype(str)
    order = rng.permutation(301)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values[order], seed=3)
    assert bootstrap_ci(values, groups=groups, seed=3) == bootstrap_ci(values[order], groups=groups[order], seed=3)


def test_known_answers_and_degenerate_inputs():
    assert bootstrap_ci([0.25] * 50) == (0.25, 0.25)  # no spread
    low, high = bootstrap_ci([0.0, 1.0] * 50, seed=0)
    assert low < 0.5 < high and low > 0.35 and high < 0.65
    assert all(math.isnan(x) for x in bootstrap_ci([0.7]))  # one unit: nothing to resample
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    # one group of many pairs is one unit too
    assert all(math.isnan(x) for x in bootstrap_ci([0.1, 0.9, 0.5], groups=["a", "a", "a"]))
    # two values: the resampled means are 0, 0.5 or 1; the bounds are quantiles of those
    low, high = bootstrap_ci([0.0, 1.0], resamples=4000, seed=0)
    assert low == 0.0 and high == 1.0
    # the interval of a level is nested in the wider level's
    values = np.random.default_rng(6).normal(size=80)
    low80, high80 = bootstrap_ci(values, level=0.8)
    low99, high99 = bootstrap_ci(values, level=0.99)
    assert low99 < low80 < values.mean() < high80 < high99


def test_grouped_mean_weighs_groups_by_their_size():
    """A resample drawing every group once gives the pooled mean, not the mean of group means."""
    values = np.array([1.0] * 9 + [0.0])  # group a: nine 1s, group b: one 0 -> pooled mean 0.9
    groups = ["a"] * 9 + ["b"]
    low, high = bootstrap_ci(values, groups=groups, resamples=5000, seed=0)
    # draws: aa -> 1, bb -> 0, ab -> 0.9 (pooled, not 0.5): quantiles land on those values
    assert (low, high) == (0.0, 1.0)
    low, high = bootstrap_ci(values, groups=groups, resamples=5000, seed=0, level=0.4)
    assert low == high == 0.9


def test_ratio_interval_of_rates_and_strata():
    rng = np.random.default_rng(7)
    wins = (rng.random(500) < 0.8).astype(float)
    low, high = bootstrap_ratio_ci(100 * wins, np.ones(500), seed=0)
    se = 100 * math.sqrt(0.8 * 0.2 / 500)
    assert low < 100 * wins.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)
    # a ratio with unequal denominators: sum(num) / sum(den) is the centre
    trials = rng.integers(1, 7, 500).astype(float)
    hits = rng.binomial(trials.astype(int), 0.6).astype(float)
    low, high = bootstrap_ratio_ci(hits, trials, seed=0)
    assert low < hits.sum() / trials.sum() < high
    # strata: each is resampled on its own, sizes kept; a stratum without spread adds none
    constant = np.ones(500)
    plain = bootstrap_ratio_ci(np.r_[wins, constant], np.ones(1000), seed=0)
    stratified = bootstrap_ratio_ci(np.r_[wins, constant], np.ones(1000), strata=["x"] * 500 + ["y"] * 500, seed=0)
    assert stratified[1] - stratified[0] < plain[1] - plain[0]
    half = bootstrap_ratio_ci(wins, np.ones(500), seed=0)
    assert stratified[1] - stratified[0] == pytest.approx((half[1] - half[0]) / 2, rel=0.2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(values=[0.1, float("nan")]), "NaN"),
    (dict(values=[0.1, float("inf")]), "NaN or infinite"),
    (dict(values=[[0.1, 0.2]]), "1-D"),
    (dict(values=[0.1, 0.2], groups=["a"]), "1 labels for 2 values"),
    (dict(values=[0.1, 0.2], resamples=0), "positive integer"),
    (dict(values=[0.1, 0.2], level=1.0), "between 0 and 1"),
])
def test_bad_input_is_refused(kwargs, message):
    values = kwargs.pop("values")
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(values, **kwargs)
    with pytest.raises(ValueError, match="> 0"):
        bootstrap_ratio_ci([1.0, 2.0], [1.0, 0.0])


def test_large_inputs_are_chunked_and_fast():
    """100k values x 1000 resamples: drawn in chunks (bounded memory), same answer on every call."""
    values = np.random.default_rng(8).random(100_000)
    first = bootstrap_ci(values, resamples=1000, seed=1)
    assert first == bootstrap_ci(values, resamples=1000, seed=1)
    assert first[0] < values.mean() < first[1] and first[1] - first[0] < 0.005


def test_stats_imports_without_torch():
    code = "import sys, nearid_metric.stats; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
