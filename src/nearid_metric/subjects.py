"""Per-subject figures (numpy only): each subject's mean, the macro mean over subjects, the micro mean over
pairs, and the real-vs-real ceiling of each subject.

A benchmark such as DreamBooth scores every generation of a subject against every reference of
it, takes the mean per subject and reports the mean over subjects (*macro*); the mean over all
pairs (*micro*) weighs subjects by their number of pairs. Both come with 95% intervals: the
macro one resamples subjects, the micro one pairs (or the groups asked for).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from nearid_metric.stats import CI_LEVEL, bootstrap_ci, mean_ci


def _interval(values: np.ndarray, resamples: int | None, seed: int) -> list[float] | None:
    if resamples is None:
        return None
    low, high = bootstrap_ci(values, resamples=resamples, seed=seed, level=CI_LEVEL)
    return None if math.isnan(low) else [low, high]


def subject_summary(values: Sequence[float], subjects: Sequence[str], *, resamples: int | None, seed: int = 0,
                    groups: Sequence[Hashable] | None = None, unit: str = "pair",
                    ceilings: Mapping[str, Sequence[float]] | None = None) -> dict[str, Any]:
    """Per-subject means and the macro / micro means of one score column.

    ``values``: the finite scores [P] and ``subjects`` the subject of each; ``groups``: resampling
    groups of the micro interval (as :func:`nearid_metric.stats.mean_ci`). ``ceilings``: subject ->
    its real-vs-real scores (:func:`nearid_metric.calibration.ceiling_pairs`). Returns
    ``{"subjects": {subject: {mean, n, ci95[, ceiling, ceiling_n]}}, "macro": {mean, ci95, n_subjects[,
    ceiling]}, "micro": {mean, ci95, n[, ceiling]}}``, subjects in sorted order; a subject's ``ci95``
    resamples its pairs. ``ceiling`` is None for a subject with fewer than two references.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) != len(subjects):
        raise ValueError(f"{len(values)} values for {len(subjects)} subjects")
    labels = np.asarray(subjects, dtype=object)
    per: dict[str, dict[str, Any]] = {}
    for subject in sorted(set(subjects)):
        mine = values[labels == subject]
        per[subject] = {"mean": float(mine.mean()), "n": len(mine), "ci95": _interval(mine, resamples, seed)}
        if ceilings is not None:
            real = np.asarray(ceilings.get(subject, ()), dtype=np.float64)
            per[subject]["ceiling"] = float(real.mean()) if len(real) else None
            per[subject]["ceiling_n"] = len(real)
    means = np.array([entry["mean"] for entry in per.values()])
    macro: dict[str, Any] = {"mean": float(means.mean()) if len(means) else None,
                             "ci95": _interval(means, resamples, seed), "n_subjects": len(means)}
    micro: dict[str, Any] = {"mean": float(values.mean()) if len(values) else None,
                             "ci95": mean_ci(values, groups, resamples=resamples, seed=seed, unit=unit)["ci95"],
                             "n": len(values)}
    if ceilings is not None:
        real_means = [entry["ceiling"] for entry in per.values() if entry["ceiling"] is not None]
        macro["ceiling"] = float(np.mean(real_means)) if real_means else None
        pooled = [v for subject in per for v in ceilings.get(subject, ())]
        micro["ceiling"] = float(np.mean(pooled)) if pooled else None
    return {"subjects": per, "macro": macro, "micro": micro}


def format_subject_table(subjects: Mapping[str, Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Per-subject means as a text table (``mean/ceiling`` where the ceiling was scored)."""
    def cell(entry: Mapping[str, Any] | None) -> str:
        if entry is None:
            return "-"
        text = f"{entry['mean']:.4f}"
        return text + (f"/{entry['ceiling']:.4f}" if entry.get("ceiling") is not None else "")

    header = ["subject", "n", *columns]
    rows = [[subject, str(max(e["n"] for e in entries.values())), *(cell(entries.get(c)) for c in columns)]
            for subject, entries in subjects.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(value.ljust(width) for value, width in zip(row, widths)) for row in [header, *rows])
