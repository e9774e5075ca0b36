"""The NearID and MTG benchmarks, end to end (data -> similarities -> SSR / PA / H), as ``nearid-bench`` runs them.

A run reads benchmark samples (:mod:`nearid_metric.data`), embeds every distinct image once with
all models in one pass (:func:`nearid_metric.scorer.embed_images`), writes one row of similarity
columns per model and sample, and scores them with :mod:`nearid_metric.protocol`, per model x
group plus one pooled row per model, with 95% bootstrap intervals of SSR and PA (samples
resampled; the pooled row resamples each group on its own). ``--from-csv`` redoes the last step
from saved similarity columns (e.g. a VLM judge's), without any model. Formats and decisions: ``docs/protocol.md``,
section "Running the benchmark".

A similarity table is a dict of equally long columns: ``id, group, model, signature, mask`` (object
arrays of str) and float64 similarity columns (NaN = a missing or unreadable image), one row per
model x sample, model after model, samples in reading order.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from nearid_metric import data
from nearid_metric.data import MTGSample, NearIDSample
from nearid_metric.folders import read_nearid_folder
from nearid_metric.protocol import (
    MTG_ALIGNMENT,
    MTG_COLUMNS,
    NEARID_TERMS,
    pool_groups,
    pool_results,
    score_mtg_samples,
    score_nearid_groups,
    score_nearid_samples,
)
from nearid_metric.selection import SampleSelection
from nearid_metric.similarity import (
    mtg_oracles,
    mtg_similarities,
    nearid_similarities,
    unique_images,
)
from nearid_metric.stats import BOOTSTRAP_RESAMPLES, CI_LEVEL, bootstrap_ratio_ci

if TYPE_CHECKING:
    from nearid_metric.scorer import Scorer

logger = logging.getLogger("nearid_metric")

Table = dict[str, np.ndarray]

ALL = "all"
"""Group name of the row pooled over a model's groups (reserved: no data group may use it)."""

PAPER = "paper"
"""Group name of the paper's headline pool (``pool="paper"``): every group except :data:`PAPER_EXCLUDED`."""

PAPER_EXCLUDED = ("fluxc", "fluxc_1024")
"""Distractor sources the paper computes but leaves out of its headline average (FluxC, FluxC_1024), matched by
group name, case-insensitive, with an optional ``NearID-`` prefix (the Hub repos' names)."""

FULL, FOREGROUND = "full", "fg"
"""The ``mask`` label of a row: whole images, or foreground-only (``--masks``)."""

LABELS = ("id", "group", "model", "signature", "mask")
"""Label columns of a similarity table, before the similarity columns."""

ORACLE_COLUMNS = ("oracle_1", "oracle_2")
"""MTG oracle of view 1 and view 2 (``1 - part area / object area``), a column each in MTG tables."""

NEARID_REQUIRED = tuple(dict.fromkeys(name for _, sim, cross in NEARID_TERMS for name in (sim, cross)))
"""The columns NearID rates use: ``sim_01, cross_00, cross_11, sim_02, cross_22, sim_12``."""

CI_RATES = ("SSR", "PA")
"""The rates that get a bootstrap interval, as columns ``<rate>_ci_low`` and ``<rate>_ci_high`` after the rate."""

RATES = ("SSR", "SSR_ci_low", "SSR_ci_high", "PA", "PA_ci_low", "PA_ci_high", "H", "SSR_mean", "PA_terms", "H_mean")
COUNTS = ("n_samples", "n_terms", "n_trials", "n_excluded")
CORRELATIONS = ("MO", "MO_strict", "MO_nan", "MO_strict_nan", *(key for key, _, _ in MTG_ALIGNMENT))
NEARID_TABLE = ("model", "group", "mask", "signature", *RATES, *COUNTS)
MTG_TABLE = (*NEARID_TABLE, *CORRELATIONS, *(f"n_{key}" for key, _, _ in MTG_ALIGNMENT))
"""Columns of ``table.csv`` per benchmark (``table.json`` rows have the same keys, MTG adds ``undefined_r``)."""

_SHOWN = 5  # examples named in an error message


# --- similarity tables from models --------------------------------------------------------------


def nearid_similarity_table(samples: Sequence[NearIDSample], scorers: Mapping[str, Scorer], *,
                            batch_size: int | None = None, num_workers: int = 0, progress: bool | None = None,
                            cache_dir: str | os.PathLike | None = None, mask: str = FULL
                            ) -> tuple[Table, dict[str, str]]:
    """NearID similarity columns of every sample for every scorer, each image embedded once.

    ``scorers``: model name (the ``model`` column) -> scorer. Returns the table (``id, group,
    model, signature, mask``, then ``sim_01 .. sim_12``, ``cross_00 .. cross_22``, ``neg_sim_01 ..
    neg_sim_12``, float64 cosines, NaN where an image is missing or unreadable; rows model after
    model) and ``{image name: reason}`` for the images that could not be read. ``mask`` labels
    the rows (:data:`FOREGROUND` for :func:`~nearid_metric.masking.foreground_samples`). The
    other keyword arguments go to :func:`nearid_metric.scorer.embed_images`.
    """
    return _similarity_table(samples, scorers, nearid_similarities, mask, batch_size=batch_size,
                             num_workers=num_workers, progress=progress, cache_dir=cache_dir)


def mtg_similarity_table(samples: Sequence[MTGSample], scorers: Mapping[str, Scorer], *,
                         batch_size: int | None = None, num_workers: int = 0, progress: bool | None = None,
                         cache_dir: str | os.PathLike | None = None, mask: str = FULL
                         ) -> tuple[Table, dict[str, str]]:
    """MTG similarity columns (``sim_1_2, sim_1_1p, sim_1_2p, sim_2_2p, sim_2_1p``) plus ``oracle_1, oracle_2``.

    As :func:`nearid_similarity_table`; the oracles come from the masks (the same for every
    model), NaN where a mask is missing or unreadable (an unreadable mask is listed in the
    failures, like an unreadable image).
    """
    table, failures = _similarity_table(samples, scorers, mtg_similarities, mask, batch_size=batch_size,
                                        num_workers=num_workers, progress=progress, cache_dir=cache_dir)
    for name, oracle in zip(ORACLE_COLUMNS, mtg_oracles(samples, failures=failures)):
        table[name] = np.tile(oracle, len(scorers))
    return table, failures


def _similarity_table(samples: Sequence[NearIDSample | MTGSample], scorers: Mapping[str, Scorer],
                      similarities: Callable[..., dict[str, np.ndarray]], mask: str,
                      **embed_kwargs: Any) -> tuple[Table, dict[str, str]]:
    from nearid_metric.scorer import embed_images  # torch: not for --from-csv tables

    if not scorers:
        raise ValueError("no scorers given")
    images = unique_images(samples)
    embeddings, failed = embed_images(list(scorers.values()), images, **embed_kwargs)
    index = {image: row for row, image in enumerate(images)}
    n = len(samples)
    labels = {"id": [s.id for s in samples], "group": [s.group for s in samples]}
    parts = []
    for (model, scorer), matrix in zip(scorers.items(), embeddings):
        parts.append({**labels, "model": [model] * n, "signature": [scorer.signature] * n, "mask": [mask] * n,
                      **similarities(samples, matrix, index)})
    table = {name: np.concatenate([np.asarray(part[name], dtype=object if name in LABELS else np.float64)
                                   for part in parts]) for name in parts[0]}
    return table, {str(images[i]): reason for i, reason in sorted(failed.items())}


# --- tables of results ----------------------------------------------------------------------------


def nearid_results(table: Mapping[str, Any], *, ci_resamples: int | None = BOOTSTRAP_RESAMPLES,
                   ci_seed: int = 0, pool: str = ALL) -> list[dict[str, Any]]:
    """SSR / PA / H rows per model x group, then a pooled row (group ``"all"``) per model.

    ``pool="paper"``: also the paper's headline pool per model (group ``"paper"``, after
    ``"all"``): every group except FluxC and FluxC_1024 (:data:`PAPER_EXCLUDED`).
    ``table``: ``model``, ``group``, optionally ``signature`` and ``mask`` (one each per model), and NearID
    similarity columns (see :func:`nearid_metric.protocol.score_nearid_samples`). Group rows come
    from :func:`~nearid_metric.protocol.score_nearid_groups`, the pooled rows from
    :func:`~nearid_metric.protocol.pool_groups` (weighted by the counts, the same as scoring the
    union). Models in order of first appearance, groups sorted. Keys: :data:`NEARID_TABLE`.
    ``SSR_ci_low`` ... ``PA_ci_high``: 95% percentile bootstrap intervals (:func:`rate_cis`,
    ``ci_resamples`` resamples, seed ``ci_seed``; ``ci_resamples=None``: NaN).
    """
    check_pool(pool)
    signatures, masks = model_signatures(table), model_labels(table, "mask", FULL)
    groups = score_nearid_groups(table, by=("model", "group"))
    pooled = {row["model"]: row for row in pool_groups(groups, by="model")}
    models, labels = (np.asarray(table[name], dtype=object) for name in ("model", "group"))
    protocol_logger = logging.getLogger(score_nearid_samples.__module__)
    level = protocol_logger.level
    protocol_logger.setLevel(logging.WARNING)  # absent columns were just reported by score_nearid_groups
    try:
        per_row = score_nearid_samples({name: table[name] for name in NEARID_REQUIRED if name in table},
                                       per_sample=True)
    finally:
        protocol_logger.setLevel(level)

    rows = []
    for model, signature in signatures.items():
        mine = {row["group"]: rate_units(per_row, (models == model) & (labels == row["group"]))
                for row in groups if row["model"] == model}
        for row in groups:
            if row["model"] == model:
                cis = rate_cis({row["group"]: mine[row["group"]]}, ci_resamples, ci_seed)
                rows.append(_result_row(model, row["group"], masks[model], signature, row | cis, NEARID_TABLE))
        cis = rate_cis(mine, ci_resamples, ci_seed)
        rows.append(_result_row(model, ALL, masks[model], signature, pooled[model] | cis, NEARID_TABLE))
        if pool == PAPER:
            headline = {g: units for g, units in mine.items() if in_paper_pool(g)}
            result = pool_results([row for row in groups if row["model"] == model and in_paper_pool(row["group"])])
            rows.append(_result_row(model, PAPER, masks[model], signature,
                                    result | rate_cis(headline, ci_resamples, ci_seed), NEARID_TABLE))
    return rows


def check_pool(pool: str) -> None:
    """``ValueError`` unless ``pool`` is ``"all"`` (pooled over every group) or ``"paper"`` (also the paper's pool)."""
    if pool not in (ALL, PAPER):
        raise ValueError(f"pool must be {ALL!r} or {PAPER!r}, got {pool!r}")


def in_paper_pool(group: str) -> bool:
    """Whether a group counts towards the paper's headline pool (it is not FluxC or FluxC_1024)."""
    name = group.lower()
    return name.removeprefix("nearid-") not in PAPER_EXCLUDED


def rate_units(scored: Mapping[str, Any], rows: np.ndarray | None = None, *,
               mean_trial: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per scored sample, the numerator (in percent) and denominator of SSR and PA.

    ``scored``: a result with ``per_sample`` (``score_nearid_samples`` / ``score_mtg_samples``
    with ``per_sample=True``); ``rows``: a boolean mask of the samples to take (default all).
    SSR: 100 x (all valid terms win) over 1. PA: 100 x (term wins + mean win) over (valid terms
    + 1) with ``mean_trial`` (NearID's PA), else 100 x term wins over valid terms (MTG's PA).
    Summed over samples and divided, they give the rates; samples without a valid term are left out.
    """
    per = scored["per_sample"]
    valid = per["sample_valid"] if rows is None else per["sample_valid"] & np.asarray(rows, dtype=bool)
    extra = 1.0 if mean_trial else 0.0
    pa_wins = per["wins"].sum(axis=1) + (per["sample_mean_win"] if mean_trial else 0)
    return {"SSR": (100.0 * per["sample_win"][valid], np.ones(int(valid.sum()))),
            "PA": (100.0 * pa_wins[valid], (per["valid"].sum(axis=1) + extra)[valid])}


def rate_cis(units: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], resamples: int | None,
             seed: int) -> dict[str, float]:
    """``SSR_ci_low, SSR_ci_high, PA_ci_low, PA_ci_high``: bootstrap intervals over the samples of some groups.

    ``units``: group -> :func:`rate_units`. One group: its samples are resampled. Several (a
    pooled row): each group's samples are resampled on their own, group sizes kept, and the
    resampled counts are pooled, as :func:`~nearid_metric.protocol.pool_groups` pools.
    ``resamples=None``: NaN. See :func:`nearid_metric.stats.bootstrap_ratio_ci`.
    """
    out = {}
    for rate in CI_RATES:
        parts = {group: per_rate[rate] for group, per_rate in units.items()}
        numerators = np.concatenate([num for num, _ in parts.values()]) if parts else np.zeros(0)
        denominators = np.concatenate([den for _, den in parts.values()]) if parts else np.zeros(0)
        strata = [group for group, (num, _) in parts.items() for _ in range(len(num))]
        low = high = math.nan
        if resamples is not None:
            low, high = bootstrap_ratio_ci(numerators, denominators, strata=strata if len(parts) > 1 else None,
                                           resamples=resamples, seed=seed, level=CI_LEVEL)
        out[f"{rate}_ci_low"], out[f"{rate}_ci_high"] = low, high
    return out


def mtg_results(table: Mapping[str, Any], *, ci_resamples: int | None = BOOTSTRAP_RESAMPLES,
                ci_seed: int = 0, pool: str = ALL) -> list[dict[str, Any]]:
    """MTG rows per model x group, then one row over all the model's samples (group ``"all"``).

    ``table``: ``model``, ``group``, optionally ``signature``, the five MTG similarity columns and
    optionally ``oracle_1, oracle_2`` (absent: correlations and MO are NaN). Each row is
    :func:`~nearid_metric.protocol.score_mtg_samples` over its samples; for the ``"all"`` row
    that is the union of the groups (correlations cannot be pooled from per-group values; the
    rates equal the pooled ones). Keys: :data:`MTG_TABLE` plus ``undefined_r``. SSR and PA
    intervals as in :func:`nearid_results` (the ``"all"`` row resamples each group on its own).
    """
    check_pool(pool)  # MTG has no distractor sources: "paper" adds no row
    signatures, masks = model_signatures(table), model_labels(table, "mask", FULL)
    models, groups = (np.asarray(table[name], dtype=object) for name in ("model", "group"))
    if any(name not in table for name in ORACLE_COLUMNS):
        logger.warning("no oracle_1/oracle_2 columns: MTG correlations and MO are not computed")
    oracles = [np.asarray(table[name], dtype=np.float64) if name in table else np.full(len(models), np.nan)
               for name in ORACLE_COLUMNS]

    def score(rows: np.ndarray) -> dict[str, Any]:
        return score_mtg_samples({name: np.asarray(table[name], dtype=np.float64)[rows] for name in MTG_COLUMNS},
                                 oracles[0][rows], oracles[1][rows], per_sample=True)

    out = []
    for model, signature in signatures.items():
        mine = models == model
        units = {}
        for group in sorted(set(groups[mine].tolist())):
            result = score(mine & (groups == group))
            units[group] = rate_units(result, mean_trial=False)
            cis = rate_cis({group: units[group]}, ci_resamples, ci_seed)
            out.append(_result_row(model, group, masks[model], signature, result | cis, MTG_TABLE))
        out.append(_result_row(model, ALL, masks[model], signature,
                               score(mine) | rate_cis(units, ci_resamples, ci_seed), MTG_TABLE))
    return out


def benchmark_results(benchmark: str, table: Mapping[str, Any], *, ci_resamples: int | None = BOOTSTRAP_RESAMPLES,
                      ci_seed: int = 0, pool: str = ALL) -> list[dict[str, Any]]:
    """:func:`mtg_results` for ``benchmark == "mtg"``, else :func:`nearid_results`."""
    results = mtg_results if benchmark == "mtg" else nearid_results
    return results(table, ci_resamples=ci_resamples, ci_seed=ci_seed, pool=pool)


def model_signatures(table: Mapping[str, Any]) -> dict[str, str]:
    """Model -> its signature ("" without a signature column), models in order of first appearance."""
    return model_labels(table, "signature", "")


def model_labels(table: Mapping[str, Any], column: str, default: str) -> dict[str, str]:
    """Model -> its one value of the label ``column`` (``default`` without that column), models in order of first
    appearance; ``ValueError`` for a model whose rows disagree (e.g. two signatures under one model name)."""
    models = [str(m) for m in np.asarray(table["model"], dtype=object).tolist()]
    values = ([str(s) for s in np.asarray(table[column], dtype=object).tolist()] if column in table
              else [default] * len(models))
    seen: dict[str, set[str]] = {}
    for model, value in zip(models, values):
        seen.setdefault(model, set()).add(value)
    mixed = [f"{model!r} ({', '.join(sorted(s))})" for model, s in seen.items() if len(s) > 1]
    if mixed:
        raise ValueError(f"a model has rows with different {column}s: {'; '.join(mixed[:_SHOWN])}; "
                         f"give each {column} its own model name")
    return {model: s.pop() for model, s in seen.items()}


def _result_row(model: str, group: str, mask: str, signature: str, result: Mapping[str, Any],
                keys: Sequence[str]) -> dict[str, Any]:
    row = {"model": model, "group": group, "mask": mask, "signature": signature} | {k: result[k] for k in keys[4:]}
    if "undefined_r" in result:
        row["undefined_r"] = list(result["undefined_r"])
    return row


def ci_description(resamples: int | None, seed: int) -> dict[str, Any] | None:
    """How the SSR / PA intervals were computed (``summary.json``); None without intervals (``resamples=None``)."""
    if resamples is None:
        return None
    return {"method": "percentile bootstrap", "level": CI_LEVEL, "resamples": resamples, "seed": seed,
            "unit": "sample", "pooled": "each group resampled on its own, counts pooled", "rates": list(CI_RATES)}


def format_table(rows: Sequence[Mapping[str, Any]], benchmark: str, *, ci: bool = True) -> str:
    """The printed table: rates in percent with 2 decimals, correlations with 3, NaN as n/a.

    ``ci``: a ``SSR_CI95`` / ``PA_CI95`` column after SSR / PA, ``[low,high]`` (no space, so the
    table splits on whitespace).
    """
    rates = ["SSR", "SSR_CI95", "PA", "PA_CI95"] if ci else ["SSR", "PA"]
    masked = ["mask"] if any(row.get("mask", FULL) != FULL for row in rows) else []
    columns = ["model", "group", *masked, *rates, "H", *(["MO", "MO_strict"] if benchmark == "mtg" else []),
               "n_samples", "n_excluded"]

    def text(key: str, value: Any) -> str:
        if key.endswith("_CI95"):
            low, high = (value.get(f"{key[:-5]}_ci_{end}", math.nan) for end in ("low", "high"))
            return "n/a" if low is None or math.isnan(low) else f"[{low:.2f},{high:.2f}]"
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.3f}" if key in CORRELATIONS else f"{value:.2f}"
        return str(value)

    cells = [columns] + [[text(key, row if key.endswith("_CI95") else row[key]) for key in columns] for row in rows]
    widths = [max(len(line[k]) for line in cells) for k in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) if k < 2 + len(masked) else cell.rjust(w) for k, (cell, w) in
                               enumerate(zip(line, widths))).rstrip() for line in cells)


# --- samples -------------------------------------------------------------------------------------


def load_samples(*, nearid_folder: Sequence[str | os.PathLike] = (), positives: Sequence[str] = (),
                 distractors: Sequence[str] = (), mtg: Sequence[str] = (), group: Sequence[str] | None = None,
                 distractor_prefix: str | None = None, hf: bool = False, split: str | None = None,
                 data_revision: str | None = None, select: SampleSelection | None = None
                 ) -> tuple[list[NearIDSample] | list[MTGSample], list[dict[str, Any]]]:
    """The samples of one data source and a description of each of its parts (for ``summary.json``).

    The arguments are those of ``nearid-bench``'s data flags: NearID image folders
    (``nearid_folder``), NearID tables (``positives`` + ``distractors``, one group per
    distractor source) or MTG tables (``mtg``), as files or, with ``hf``, Hugging Face datasets
    (``split``, default ``train`` for NearID and ``test`` for MTG, the splits the reference
    evaluates; ``data_revision``). ``group``: one name per source (default: the file or folder
    name). ``select``: only the samples it names (``--ids``; rows of the positives / MTG table,
    or of each folder group). Raises ``ValueError``, ``OSError`` or ``ImportError`` naming the
    file for unreadable data, and ``ValueError`` for two samples of one group with one id.
    """
    samples: list = []
    sources: list[dict[str, Any]] = []
    default_split = "test" if mtg and not (nearid_folder or positives) else "train"
    hf_args = {"split": split or default_split, "revision": data_revision} if hf else None
    groups = group or [None] * len(distractors or nearid_folder or mtg)
    if nearid_folder:
        for root, group in zip(nearid_folder, groups):
            found = read_nearid_folder(root, group=group, select=select)
            sources.append({"type": "nearid-folder", "path": str(root), "groups": sample_groups(found)})
            samples += found
    elif positives:
        table = positives[0] if len(positives) == 1 else positives
        prefix = distractor_prefix or "auto"
        for source, group in zip(distractors, groups):
            if hf_args:
                found = data.read_nearid_hf(table, source, distractor_prefix=prefix, group=group, select=select,
                                            **hf_args)
            else:
                found = data.read_nearid_parquet(table, source, distractor_prefix=prefix, group=group, select=select)
            sources.append({"type": "nearid-hf" if hf_args else "nearid-tables", "positives": list(positives),
                            "distractors": source, "groups": sample_groups(found), **(hf_args or {})})
            samples += found
    else:
        for path, group in zip(mtg, groups):
            found = (data.read_mtg_hf(path, group=group, select=select, **hf_args) if hf_args
                     else data.read_mtg_parquet(path, group=group, select=select))
            sources.append({"type": "mtg-hf" if hf_args else "mtg-tables", "path": path, "groups": sample_groups(found),
                            **(hf_args or {})})
            samples += found
    _check_samples(samples)
    return samples, sources


def sample_groups(samples: Sequence[NearIDSample | MTGSample]) -> list[str]:
    """The samples' groups in order of first appearance."""
    return list(dict.fromkeys(s.group for s in samples))


def _check_samples(samples: Sequence[NearIDSample | MTGSample]) -> None:
    if any(s.group == ALL for s in samples):
        raise ValueError(f"a group is named {ALL!r}, the name of the pooled row; rename it with --group")
    counts = Counter((s.group, s.id) for s in samples)
    twice = [f"{group}/{id_}" for (group, id_), n in counts.items() if n > 1]
    if twice:
        raise ValueError(f"{len(twice)} sample(s) appear twice in one group, e.g. {', '.join(twice[:_SHOWN])}: "
                         "two sources share a group name; name them apart with --group")
