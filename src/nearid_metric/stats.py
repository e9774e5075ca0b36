"""Small statistics (numpy only): Pearson r, Fisher-z means, bootstrap confidence intervals, score summaries."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np


def pearson(x: Iterable[float], y: Iterable[float]) -> float:
    """Pearson correlation of two equally long sequences (float64); NaN when undefined.

    Undefined means fewer than 2 pairs or a constant side (zero variance). NaNs in the
    inputs are not dropped: drop missing pairs before calling.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson needs two 1-D sequences of equal length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    if denominator == 0:
        return float("nan")
    return float(np.clip((dx * dy).sum() / denominator, -1.0, 1.0))


def fisher_z_mean(rs: Iterable[float], clip: float) -> float:
    """Combine correlations: clip each to [-clip, clip], average their atanh, map back with tanh.

    ``clip`` is part of the definition (0.999 for MTG, 0.9999 for DreamBench++ MH).
    NaN correlations are refused rather than skipped: decide about them before calling.
    """
    rs = np.asarray(list(rs), dtype=np.float64)
    if len(rs) == 0:
        raise ValueError("fisher_z_mean of no correlations")
    if np.isnan(rs).any():
        raise ValueError(f"fisher_z_mean got undefined (NaN) correlations: {rs.tolist()}")
    return float(np.tanh(np.arctanh(np.clip(rs, -clip, clip)).mean()))


# --- bootstrap confidence intervals ---------------------------------------------------------------

BOOTSTRAP_RESAMPLES = 1000
"""Default number of bootstrap resamples."""

CI_LEVEL = 0.95
"""Default confidence level."""

_CHUNK_ELEMENTS = 1 << 21
"""Drawn indices per chunk (resamples x units); fixed, so a seed gives the same interval on every machine."""


def bootstrap_ci(
    values: Iterable[float],
    *,
    groups: Iterable[Hashable] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval ``(low, high)`` of the mean of ``values``.

    ``values``: N finite numbers (NaN and infinities are refused: drop missing values first).
    Without ``groups`` the pairs (values) are resampled with replacement; with ``groups`` (N
    labels, any hashable, e.g. the prompt or reference of each pair) whole groups are resampled
    and each resample's statistic is the mean over the pooled values of the drawn groups (so
    large groups weigh more, as in the plain mean). ``resamples`` resamples are drawn from
    ``numpy.random.default_rng(seed)``; the bounds are the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles (numpy's linear interpolation) of the resampled means.

    The result depends only on the values (and the group each belongs to), not on their order.
    Fewer than 2 resampling units (values, or groups) give ``(nan, nan)``: there is no spread
    to resample.
    """
    values = _finite_vector(values, "values")
    if groups is None:
        return bootstrap_ratio_ci(values, np.ones_like(values), resamples=resamples, seed=seed, level=level)
    codes = _codes(groups, len(values), "groups")
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    sums = np.bincount(codes, weights=values, minlength=n_groups)
    counts = np.bincount(codes, minlength=n_groups).astype(np.float64)
    return bootstrap_ratio_ci(sums, counts, resamples=resamples, seed=seed, level=level)


def bootstrap_ratio_ci(
    numerators: Iterable[float],
    denominators: Iterable[float],
    *,
    strata: Iterable[Hashable] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a ratio of sums, ``sum(numerators) / sum(denominators)``, over units.

    The sibling of :func:`bootstrap_ci` for statistics that are pooled counts: a unit is a
    sample (or a group of pairs) carrying a numerator and a denominator > 0, e.g. for a rate
    in percent ``100 * wins`` over ``trials``; a mean is numerators = values, denominators = 1.
    Units are resampled with replacement; with ``strata`` (one label per unit) each stratum is
    resampled on its own with its size kept, and the resampled sums are added over the strata
    (a pooled rate over fixed-size settings). Same seed, quantiles, order independence and
    ``(nan, nan)`` below 2 units as :func:`bootstrap_ci`.
    """
    num = _finite_vector(numerators, "numerators")
    den = _finite_vector(denominators, "denominators")
    if num.shape != den.shape:
        raise ValueError(f"numerators and denominators differ in length: {len(num)} and {len(den)}")
    if (den <= 0).any():
        raise ValueError("denominators must be > 0 (a unit without trials carries no information: drop it)")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level!r}")
    if len(num) < 2:
        return float("nan"), float("nan")
    codes = np.zeros(len(num), dtype=np.int64) if strata is None else _codes(strata, len(num), "strata")
    # canonical order: strata by label, units by (numerator, denominator) inside each
    order = np.lexsort((den, num, codes))
    num, den, codes = num[order], den[order], codes[order]
    bounds = np.flatnonzero(np.diff(codes)) + 1
    parts = [(n, d, bool((d == d[0]).all())) for n, d in zip(np.split(num, bounds), np.split(den, bounds))]

    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, _CHUNK_ELEMENTS // len(num)))
    statistics = np.empty(resamples)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        num_sum = np.zeros(size)
        den_sum = np.zeros(size)
        for part_num, part_den, constant_den in parts:
            index = rng.integers(0, len(part_num), size=(size, len(part_num)))
            num_sum += part_num[index].sum(axis=1)
            den_sum += part_den[0] * len(part_den) if constant_den else part_den[index].sum(axis=1)
        statistics[start:start + size] = num_sum / den_sum
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(statistics, [alpha, 1.0 - alpha])
    return float(low), float(high)


def summarize(scores: Iterable[float]) -> dict[str, float | int | None]:
    """count, mean, std (sample, ddof=1), median, min, max of scores (in float64); None where undefined."""
    def number(x: float) -> float | None:
        return None if math.isnan(x) else float(x)

    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    return {
        "count": n,
        "mean": number(scores.mean()) if n else None,
        "std": number(scores.std(ddof=1)) if n > 1 else None,
        "median": number(np.median(scores)) if n else None,
        "min": number(scores.min()) if n else None,
        "max": number(scores.max()) if n else None,
    }


def mean_ci(values: Sequence[float], groups: Sequence[Hashable] | None, *, resamples: int | None, seed: int,
            unit: str = "pair") -> dict[str, Any]:
    """``ci95`` ([low, high] of the mean, None when off or undefined) and ``ci`` (how it was computed).

    :func:`bootstrap_ci` at :data:`CI_LEVEL`; ``groups`` (one label per value, resampled together,
    named ``unit``) or None (each value alone). ``resamples=None``: no interval (both None).
    """
    if resamples is None:
        return {"ci95": None, "ci": None}
    low, high = bootstrap_ci(values, groups=groups, resamples=resamples, seed=seed, level=CI_LEVEL)
    return {"ci95": None if math.isnan(low) else [low, high],
            "ci": {"method": "percentile bootstrap", "level": CI_LEVEL, "resamples": resamples, "seed": seed,
                   "unit": "pair" if groups is None else unit,
                   "n_units": len(values) if groups is None else len(set(groups))}}


def _finite_vector(values: Iterable[float], name: str) -> np.ndarray:
    array = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values; drop missing values before bootstrapping")
    return array


def _codes(labels: Iterable[Hashable], n: int, name: str) -> np.ndarray:
    """Integer codes of ``labels``, numbered by sorted label (so the codes do not depend on the order)."""
    labels = np.asarray(labels, dtype=object).tolist() if isinstance(labels, np.ndarray) else list(labels)
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} labels for {n} values")
    distinct = sorted(set(labels), key=lambda label: (type(label).__name__, str(label)))
    index = {label: code for code, label in enumerate(distinct)}
    return np.array([index[label] for label in labels], dtype=np.int64)
