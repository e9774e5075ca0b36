"""The NearID and MTG evaluation protocols (spec sections 2 and 3) as plain functions over numbers.

Input tables are any mapping of column name -> 1-D array-like (a dict of numpy arrays or a
pandas DataFrame). Rates are returned in percent, correlations as plain numbers.
Definitions and decisions: ``docs/protocol.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from nearid_metric.stats import fisher_z_mean, pearson

logger = logging.getLogger(__name__)

# Directed NearID terms, in the column order of the per-sample arrays: (label, sim column, cross column).
NEARID_TERMS: tuple[tuple[str, str, str], ...] = (
    ("0->1", "sim_01", "cross_00"),
    ("1->0", "sim_01", "cross_11"),
    ("0->2", "sim_02", "cross_00"),
    ("2->0", "sim_02", "cross_22"),
    ("1->2", "sim_12", "cross_11"),
    ("2->1", "sim_12", "cross_22"),
)
# MTG margins: (label, positive column, edited-part column).
MTG_TERMS: tuple[tuple[str, str, str], ...] = (
    ("m1", "sim_1_2", "sim_1_1p"),
    ("m2", "sim_1_2", "sim_2_2p"),
)
MTG_COLUMNS: tuple[str, ...] = ("sim_1_2", "sim_1_1p", "sim_1_2p", "sim_2_2p", "sim_2_1p")
# MTG alignment: (result key, similarity column, which oracle); the first two are the same-view (strict) ones.
MTG_ALIGNMENT: tuple[tuple[str, str, int], ...] = (
    ("r_1_1p", "sim_1_1p", 1),
    ("r_2_2p", "sim_2_2p", 2),
    ("r_1_2p", "sim_1_2p", 2),
    ("r_2_1p", "sim_2_1p", 1),
)
MTG_FISHER_CLIP = 0.999

# Rate -> the count that weights it when pooling groups.
_POOL_WEIGHTS: dict[str, str] = {"SSR": "n_samples", "SSR_mean": "n_samples", "PA": "n_trials", "PA_terms": "n_terms"}
_COUNTS: tuple[str, ...] = ("n_samples", "n_terms", "n_trials", "n_excluded")


def _column(name: str, values: ArrayLike, n_rows: int | None) -> np.ndarray:
    """``values`` as a finite-or-NaN float64 vector; ValueError naming ``name`` otherwise."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"column '{name}' is not numeric: {error}") from None
    if array.ndim != 1:
        raise ValueError(f"column '{name}' must be 1-D (one value per sample), got shape {array.shape}")
    if n_rows is not None and len(array) != n_rows:
        raise ValueError(f"column '{name}' has {len(array)} rows, expected {n_rows} like the other columns")
    if np.isinf(array).any():
        raise ValueError(f"column '{name}' holds infinite values; use NaN for a missing image")
    return array


def _columns(table: Mapping[str, ArrayLike], names: Iterable[str]) -> dict[str, np.ndarray]:
    """The named columns of ``table`` (those present), checked to be equally long numeric vectors."""
    out: dict[str, np.ndarray] = {}
    n_rows = None
    for name in names:
        if name in table:
            out[name] = _column(name, table[name], n_rows)
            n_rows = len(out[name])
    return out


def _margins(columns: Mapping[str, np.ndarray], terms: Sequence[tuple[str, str, str]], n_rows: int) -> np.ndarray:
    """Margins [N, len(terms)] float64, positive column minus negative column; NaN where either is absent."""
    margins = np.full((n_rows, len(terms)), np.nan)
    for k, (_, positive, negative) in enumerate(terms):
        if positive in columns and negative in columns:
            margins[:, k] = columns[positive] - columns[negative]
    return margins


def _rate(wins: int, trials: int) -> float:
    return 100.0 * wins / trials if trials else float("nan")


def harmonic_mean(a: float, b: float) -> float:
    """Harmonic mean of two rates: 2ab / (a + b), 0 when both are 0, NaN when either is NaN."""
    if np.isnan(a) or np.isnan(b):
        return float("nan")
    return 2.0 * a * b / (a + b) if a + b else 0.0


def _with_h(result: dict[str, Any]) -> dict[str, Any]:
    result["H"] = harmonic_mean(result["SSR"], result["PA"])
    result["H_mean"] = harmonic_mean(result["SSR_mean"], result["PA"])
    return result


def _score_margins(margins: np.ndarray, win_threshold: float, per_sample: bool) -> dict[str, Any]:
    """SSR, SSR_mean, PA, PA_terms, H, H_mean (percent) and counts from margins [N, T] (NaN = no trial)."""
    if not np.isfinite(win_threshold):
        raise ValueError(f"win_threshold must be a finite number, got {win_threshold!r}")
    valid = ~np.isnan(margins)
    wins = valid & (np.nan_to_num(margins, nan=-np.inf) > win_threshold)
    n_valid = valid.sum(axis=1)
    sample_valid = n_valid > 0
    n_wins = wins.sum(axis=1)
    sample_win = sample_valid & (n_wins == n_valid)
    margin_sum = np.where(valid, margins, 0.0).sum(axis=1)
    margin_mean = np.divide(margin_sum, n_valid, out=np.full(len(margins), np.nan), where=sample_valid)
    sample_mean_win = sample_valid & (np.nan_to_num(margin_mean, nan=-np.inf) > win_threshold)

    n_samples = int(sample_valid.sum())
    n_terms = int(n_valid.sum())
    term_wins = int(n_wins.sum())
    mean_wins = int(sample_mean_win.sum())
    result: dict[str, Any] = {
        "SSR": _rate(int(sample_win.sum()), n_samples),
        "SSR_mean": _rate(mean_wins, n_samples),
        "PA": _rate(term_wins + mean_wins, n_terms + n_samples),
        "PA_terms": _rate(term_wins, n_terms),
        "n_samples": n_samples,
        "n_terms": n_terms,
        "n_trials": n_terms + n_samples,
        "n_excluded": int(len(margins) - n_samples),
    }
    _with_h(result)
    if per_sample:
        result["per_sample"] = {
            "margins": margins,
            "valid": valid,
            "wins": wins,
            "margin_mean": margin_mean,
            "sample_valid": sample_valid,
            "sample_win": sample_win,
            "sample_mean_win": sample_mean_win,
        }
    return result


def _nearid_margins(sims: Mapping[str, ArrayLike]) -> np.ndarray:
    """NearID directed margins [N, 6] (order of ``NEARID_TERMS``); absent columns count as all-NaN."""
    names = dict.fromkeys(name for _, sim, cross in NEARID_TERMS for name in (sim, cross))
    columns = _columns(sims, names)
    if not any(sim in columns and cross in columns for _, sim, cross in NEARID_TERMS):
        raise ValueError(
            f"sims has no complete NearID term: need a 'sim_ij' column with 'cross_ii' or 'cross_jj' "
            f"(columns used: {', '.join(names)}); found {sorted(columns)}"
        )
    absent = [name for name in names if name not in columns]
    if absent:
        logger.info("NearID columns absent, treated as missing images: %s", ", ".join(absent))
    return _margins(columns, NEARID_TERMS, len(next(iter(columns.values()))))


def score_nearid_samples(
    sims: Mapping[str, ArrayLike], *, win_threshold: float = 0.0, per_sample: bool = False
) -> dict[str, Any]:
    """Score a set of NearID samples (spec section 2).

    ``sims``: column name -> 1-D array of N cosines: ``sim_01, sim_02, sim_12`` (positive vs
    positive) and ``cross_00, cross_11, cross_22`` (positive i vs the distractor in its
    background). NaN marks a missing image; an absent column counts as all NaN, but at least one
    directed term must be formable. Other columns (off-diagonal ``cross_ij``, ``neg_sim_ij``,
    group labels) are ignored. A term wins when its margin > ``win_threshold`` (equal loses).

    Returns rates in percent: ``SSR`` (all valid terms win), ``SSR_mean`` (mean valid margin
    wins), ``PA`` (paper-compatible: term wins + mean-based sample wins over terms + samples),
    ``PA_terms`` (term wins / terms), ``H`` = harmonic(SSR, PA), ``H_mean`` = harmonic(SSR_mean, PA);
    counts ``n_samples`` (samples with >= 1 valid term), ``n_terms``, ``n_trials`` (= n_terms +
    n_samples), ``n_excluded`` (samples without a valid term). No valid sample: rates NaN.

    With ``per_sample=True`` also ``per_sample``: ``margins`` [N, 6] float64 (NaN = no trial,
    columns in ``NEARID_TERMS`` order), ``valid`` and ``wins`` [N, 6] bool, ``margin_mean`` [N]
    (NaN when excluded), ``sample_valid``, ``sample_win``, ``sample_mean_win`` [N] bool (False
    for excluded samples).
    """
    return _score_margins(_nearid_margins(sims), win_threshold, per_sample)


def _group_keys(table: Mapping[str, ArrayLike], by: Sequence[str], n_rows: int) -> list[tuple]:
    """One tuple of plain Python group values per row; ValueError for absent, misshaped or missing labels."""
    labels = []
    for name in by:
        if name not in table:
            raise ValueError(f"group column '{name}' is not in the table")
        values = np.asarray(table[name])
        if values.shape != (n_rows,):
            raise ValueError(f"group column '{name}' has shape {values.shape}, expected ({n_rows},)")
        values = values.tolist()
        if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in values):
            raise ValueError(f"group column '{name}' has missing values (None/NaN); fill them first")
        labels.append(values)
    return list(zip(*labels)) if labels else [()] * n_rows


def _sort_key(key: tuple) -> tuple:
    return tuple((type(v).__name__, v) for v in key)


def score_nearid_groups(
    sims: Mapping[str, ArrayLike], by: Sequence[str] = ("model", "setting"), *, win_threshold: float = 0.0
) -> list[dict[str, Any]]:
    """``score_nearid_samples`` on each group of rows sharing the values of the ``by`` columns.

    Group columns may hold strings or numbers. Returns one dict per group, sorted by group key:
    the group values under their column names, then the metrics.
    """
    by = (by,) if isinstance(by, str) else tuple(by)
    margins = _nearid_margins(sims)
    groups: dict[tuple, list[int]] = {}
    for row, key in enumerate(_group_keys(sims, by, len(margins))):
        groups.setdefault(key, []).append(row)
    return [
        dict(zip(by, key)) | _score_margins(margins[groups[key]], win_threshold, per_sample=False)
        for key in sorted(groups, key=_sort_key)
    ]


def pool_results(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Pool already-computed results (e.g. one per setting) into one, from their rates and counts.

    SSR and SSR_mean are weighted by ``n_samples``, PA by ``n_trials``, PA_terms by ``n_terms``;
    H and H_mean are recomputed from the pooled rates; counts are summed. This equals scoring the
    union of the samples. Works on rows read back from a saved table, of NearID or of MTG rates
    (not mixed: their PAs count trials differently).
    """
    rows = list(results)
    pooled: dict[str, Any] = {}
    for count in _COUNTS:
        values = []
        for i, row in enumerate(rows):
            if count not in row:
                raise ValueError(f"result {i} has no '{count}'")
            value = float(row[count])
            if not value.is_integer() or value < 0:
                raise ValueError(f"result {i} has '{count}' = {row[count]!r}, not a count")
            values.append(int(value))
        pooled[count] = sum(values)
    # NearID's PA has one mean-based trial per sample (n_trials = n_terms + n_samples), MTG's none
    # (n_trials = n_terms); rows of one pool must agree
    kinds = set()
    for i, row in enumerate(rows):
        trials, terms, samples = int(row["n_trials"]), int(row["n_terms"]), int(row["n_samples"])
        if trials not in (terms + samples, terms):
            raise ValueError(f"result {i}: n_trials is neither n_terms + n_samples (NearID) nor n_terms (MTG)")
        if samples:
            kinds.add(trials == terms)
    if len(kinds) > 1:
        raise ValueError("results mix NearID rates (PA with a mean trial per sample) and MTG rates (PA over terms)")
    for rate, weight in _POOL_WEIGHTS.items():
        total, weighted = 0, 0.0
        for i, row in enumerate(rows):
            if int(row[weight]) == 0:
                continue
            if rate not in row or row[rate] is None or np.isnan(row[rate]):
                raise ValueError(f"result {i} has {weight} > 0 but no value for '{rate}'")
            total += int(row[weight])
            weighted += float(row[rate]) * int(row[weight])
        pooled[rate] = weighted / total if total else float("nan")
    return _with_h({rate: pooled[rate] for rate in _POOL_WEIGHTS} | {c: pooled[c] for c in _COUNTS})


def pool_groups(results: Iterable[Mapping[str, Any]], by: Sequence[str] = ("model",)) -> list[dict[str, Any]]:
    """``pool_results`` over the rows sharing the values of the ``by`` keys (e.g. pool settings per model).

    Returns one dict per group, sorted by group key: the ``by`` values, then the pooled metrics.
    """
    by = (by,) if isinstance(by, str) else tuple(by)
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for i, row in enumerate(results):
        missing = [name for name in by if name not in row]
        if missing:
            raise ValueError(f"result {i} has no group key {missing}")
        groups.setdefault(tuple(row[name] for name in by), []).append(row)
    return [dict(zip(by, key)) | pool_results(groups[key]) for key in sorted(groups, key=_sort_key)]


def score_mtg_samples(
    sims: Mapping[str, ArrayLike],
    oracle_1: ArrayLike,
    oracle_2: ArrayLike,
    *,
    win_threshold: float = 0.0,
    per_sample: bool = False,
) -> dict[str, Any]:
    """Score a set of MTG (part-level) samples (spec section 3), as the reference computed the published numbers.

    ``sims``: the five columns ``sim_1_2, sim_1_1p, sim_1_2p, sim_2_2p, sim_2_1p`` (all required;
    NaN = missing), N rows each. ``oracle_1``, ``oracle_2``: [N] oracles of views 1 and 2
    (``mtg_oracle``; NaN = unknown). Margins ``m1 = sim_1_2 - sim_1_1p``,
    ``m2 = sim_1_2 - sim_2_2p`` are scored like NearID terms (same keys, percent; ``per_sample``
    margins are [N, 2]), except that MTG's ``PA`` is the plain pooled term rate (term wins /
    valid terms, = ``PA_terms``; ``n_trials`` = ``n_terms``): the reference's MTG code adds no
    mean-based trial, unlike its NearID code. ``H`` uses that PA.

    Alignment (plain numbers): ``r_1_1p`` (sim_1_1p vs oracle_1), ``r_2_2p`` (sim_2_2p vs
    oracle_2), ``r_1_2p`` (sim_1_2p vs oracle_2), ``r_2_1p`` (sim_2_1p vs oracle_1), each Pearson
    over the rows where both are finite, with that row count in ``n_r_1_1p`` etc. A correlation
    with fewer than 2 rows or a constant side is undefined: NaN in its own column and listed in
    ``undefined_r`` (logged as a warning). ``MO`` is the Fisher-z mean (clip 0.999) of the four,
    ``MO_strict`` (the reference's MOpair) of ``r_1_1p`` and ``r_2_2p``. A correlation undefined by
    a constant side counts as r = 0 there, as the reference did; one with fewer than 2 rows (no
    data, e.g. no oracles) makes them NaN. ``MO_nan`` and ``MO_strict_nan`` are the stricter
    variants, NaN when any correlation they combine is undefined.
    """
    missing = [name for name in MTG_COLUMNS if name not in sims]
    if missing:
        raise ValueError(f"MTG sims lack the columns {missing} (need {', '.join(MTG_COLUMNS)})")
    columns = _columns(sims, MTG_COLUMNS)
    n_rows = len(columns["sim_1_2"])
    oracles = {1: _column("oracle_1", oracle_1, n_rows), 2: _column("oracle_2", oracle_2, n_rows)}

    result = _score_margins(_margins(columns, MTG_TERMS, n_rows), win_threshold, per_sample)
    result["PA"], result["n_trials"] = result["PA_terms"], result["n_terms"]
    _with_h(result)
    rs: dict[str, float] = {}
    for key, column, view in MTG_ALIGNMENT:
        x, y = columns[column], oracles[view]
        both = ~np.isnan(x) & ~np.isnan(y)
        rs[key] = pearson(x[both], y[both])
        result[key] = rs[key]
        result["n_" + key] = int(both.sum())
    undefined = tuple(key for key, r in rs.items() if np.isnan(r))
    if undefined:
        logger.warning("MTG correlations undefined (fewer than 2 rows or a constant side): %s; a constant side "
                       "counts as r = 0 in MO", ", ".join(undefined))
    strict = [key for key, _, _ in MTG_ALIGNMENT[:2]]
    # constant side: r = 0 (the reference); fewer than 2 rows: NaN, which fisher_z_mean refuses
    as_zero = {key: 0.0 if key in undefined and result["n_" + key] >= 2 else r for key, r in rs.items()}

    def combine(keys: Sequence[str]) -> float:
        values = [as_zero[k] for k in keys]
        return float("nan") if any(np.isnan(values)) else fisher_z_mean(values, MTG_FISHER_CLIP)

    result["MO"] = combine(list(rs))
    result["MO_strict"] = combine(strict)
    result["MO_nan"] = float("nan") if undefined else result["MO"]
    result["MO_strict_nan"] = float("nan") if set(strict) & set(undefined) else result["MO_strict"]
    result["undefined_r"] = undefined
    return result


def _binary_mask(mask: Any, name: str) -> np.ndarray:
    """[H, W] bool: a 2-D mask > 0, or an [H, W, C] mask > 0 in any channel (alpha included)."""
    array = np.asarray(mask)  # PIL: "1" -> bool, "P" -> palette indices, RGB(A) -> [H, W, C]
    if array.ndim == 3:
        return (array > 0).any(axis=2)
    if array.ndim == 2:
        return array > 0
    raise ValueError(f"{name} must be [H, W] or [H, W, C], got shape {array.shape}")


def mtg_oracle(object_mask: Any, part_mask: Any) -> float:
    """Oracle similarity of an MTG view: ``1 - part area / object area`` (0 when the object mask is empty).

    Masks are numpy arrays ([H, W] or [H, W, C]) or PIL images of any mode, binarised at > 0; a
    multi-channel mask counts a pixel when any channel (alpha included) is > 0, a palette ("P")
    image by its palette index. Both masks must have the same height and width. Areas are pixel
    counts; the part is not intersected with the object.
    """
    obj = _binary_mask(object_mask, "object_mask")
    part = _binary_mask(part_mask, "part_mask")
    if obj.shape != part.shape:
        raise ValueError(f"object_mask is {obj.shape} (H, W) but part_mask is {part.shape}; they must match")
    object_area = int(obj.sum())
    ratio = int(part.sum()) / object_area if object_area else 1.0
    return 1.0 - ratio
