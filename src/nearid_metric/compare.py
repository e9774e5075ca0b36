"""Paired comparison of two ``nearid-score`` runs on the same references: is run B better than run A?

A run is an output folder of ``nearid-score`` (``scores.csv`` + ``summary.json``). Pairs are
matched by their reference (its path relative to the run's REF folder) and the generation's
pairing name (its path relative to the run's GEN folder, without extension), so
``runs/A/x.png`` and ``runs/B/x.jpg`` against the same reference compare. Per model, the
difference B - A of the means over the matched pairs, its 95% interval by a paired bootstrap
(the per-pair differences resampled, by groups when pairs are not independent), and the win
rate. Numpy only (no model).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from nearid_metric.stats import BOOTSTRAP_RESAMPLES, CI_LEVEL, bootstrap_ci

GROUPINGS = ("none", "ref", "subject")
"""``groups`` values besides a column name of ``scores.csv``."""

_SHOWN = 5  # pairs named in a message


@dataclass(frozen=True)
class Run:
    """A ``nearid-score`` run read back: its scores per matched key and what produced them."""

    folder: Path
    keys: list[tuple[str, str]]  # (reference name, generation pairing name) per row
    scores: dict[str, np.ndarray]  # model column -> [N] float64
    columns: dict[str, list[str]]  # the other columns of scores.csv (ref, gen, ...)
    signatures: dict[str, str]  # model column -> signature


def _relative(path: str, root: str | None, strip_suffix: bool) -> str:
    """``path`` relative to ``root`` (as POSIX text), without its extension when ``strip_suffix``; the file's
    name when it is not under ``root`` (a single-file REF or GEN)."""
    pure = PurePath(path)
    if root:
        try:
            pure = pure.relative_to(PurePath(root))
        except ValueError:
            pure = PurePath(pure.name)
    if strip_suffix:
        pure = pure.with_suffix("")
    return pure.as_posix()


def read_run(path: str | os.PathLike) -> Run:
    """A run from its output folder, or from its ``scores.csv`` or ``summary.json`` (the other beside it).

    Raises ``ValueError`` naming the file for a missing or malformed ``scores.csv`` / ``summary.json``,
    a model column without a signature, or two rows with one (reference, generation) key.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such run folder (a nearid-score --out folder with scores.csv and summary.json)")
    folder = path if path.is_dir() else path.parent
    scores_file, summary_file = folder / "scores.csv", folder / "summary.json"
    for file in (scores_file, summary_file):
        if not file.is_file():
            raise ValueError(f"{file}: not found; a run is a nearid-score --out folder with scores.csv and "
                             "summary.json")
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        models = summary["models"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{summary_file}: not a nearid-score summary ({type(e).__name__}: {e})") from None
    with open(scores_file, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0]) if rows else []
    if not {"ref", "gen"} <= set(header):
        raise ValueError(f"{scores_file}: needs ref and gen columns (has {', '.join(header) or 'none'})")
    model_columns = [c for c in header if c in models]
    if not model_columns:
        raise ValueError(f"{scores_file}: no score column of a model named in {summary_file} ({', '.join(models)})")
    keys = [(_relative(r["ref"], summary.get("ref"), False), _relative(r["gen"], summary.get("gen"), True))
            for r in rows]
    seen: dict[tuple[str, str], int] = {}
    for line, key in enumerate(keys, start=2):
        if key in seen:
            raise ValueError(f"{scores_file}, line {line}: reference {key[0]} and generation {key[1]} were already "
                             f"on line {seen[key]}; pairs must be unique to be matched")
        seen[key] = line
    try:
        scores = {c: np.array([float(r[c]) if r[c] != "" else math.nan for r in rows], dtype=np.float64)
                  for c in model_columns}  # an empty cell: that model has no score for the pair (clip-t without prompt)
    except ValueError as e:
        raise ValueError(f"{scores_file}: a score is not a number ({e})") from None
    others = {c: [r[c] for r in rows] for c in header if c not in model_columns}
    return Run(folder, keys, scores, others, {c: str(models[c].get("signature", "")) for c in model_columns})


def _groups(run: Run, rows: Sequence[int], groups: str) -> list[str] | None:
    """The resampling group of each matched row of ``run``: none, ref, subject or a column of scores.csv."""
    if groups == "none":
        return None
    if groups == "ref":
        return [run.keys[i][0] for i in rows]
    if groups == "subject":
        if "subject" in run.columns:
            return [run.columns["subject"][i] for i in rows]
        return [run.keys[i][0].split("/", 1)[0] if "/" in run.keys[i][0] else "" for i in rows]
    if groups not in run.columns:
        raise ValueError(f"--groups {groups}: {run.folder / 'scores.csv'} has no such column "
                         f"(columns: {', '.join(run.columns)}); use none, ref, subject or a column name")
    return [run.columns[groups][i] for i in rows]


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pairs where ``b`` scores higher than ``a``, ties counted half; NaN for no pairs."""
    if len(a) == 0:
        return math.nan
    return float(((b > a).sum() + 0.5 * (b == a).sum()) / len(a))


def matched_rows(run_a: Run, run_b: Run) -> tuple[list[int], list[int]]:
    """The rows of ``run_a`` whose (reference, generation name) key ``run_b`` also has, in A's order, and the
    matching rows of ``run_b``."""
    index_b = {key: i for i, key in enumerate(run_b.keys)}
    rows_a = [i for i, key in enumerate(run_a.keys) if key in index_b]
    return rows_a, [index_b[run_a.keys[i]] for i in rows_a]


def compare_runs(run_a: Run, run_b: Run, *, groups: str = "none", allow_different_signatures: bool = False,
                 resamples: int | None = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """``{"models": {model: {mean_a, mean_b, diff, ci95, win_rate, n}}, "only_a", "only_b", ...}``.

    Models: those both runs scored. ``diff`` = mean_b - mean_a over the matched pairs; ``ci95``
    its percentile bootstrap interval (:func:`~nearid_metric.stats.bootstrap_ci` of the
    per-pair differences, ``groups`` resampled together: ``none`` (pairs), ``ref``, ``subject``
    (the first folder level of the reference, or a ``subject`` column) or a column of A's
    ``scores.csv``), None when undefined or ``resamples=None``. ``only_a`` / ``only_b``: the
    pairs found in one run only. Raises ``ValueError`` when the runs share no model or no pair,
    or when a model's signatures differ (unless ``allow_different_signatures``).
    """
    shared = [m for m in run_a.scores if m in run_b.scores]
    if not shared:
        raise ValueError(f"{run_a.folder} and {run_b.folder} share no model column ({', '.join(run_a.scores)} vs "
                         f"{', '.join(run_b.scores)})")
    differ = [m for m in shared if run_a.signatures[m] != run_b.signatures[m]]
    if differ and not allow_different_signatures:
        details = "; ".join(f"{m}: {run_a.signatures[m]} vs {run_b.signatures[m]}" for m in differ)
        raise ValueError(f"the runs were scored with different weights, precision or version ({details}); their "
                         "scores are not comparable. Re-score one run, or pass --allow-different-signatures")
    rows_a, rows_b = matched_rows(run_a, run_b)
    if not rows_a:
        raise ValueError(f"{run_a.folder} and {run_b.folder} have no (reference, generation name) pair in common")
    matched = set(run_a.keys[i] for i in rows_a)
    labels = _groups(run_a, rows_a, groups)
    out: dict[str, Any] = {"run_a": str(run_a.folder), "run_b": str(run_b.folder), "groups": groups,
                           "ci": None if resamples is None else {"method": "paired percentile bootstrap",
                                                                 "level": CI_LEVEL, "resamples": resamples,
                                                                 "seed": seed, "unit": "pair" if labels is None
                                                                 else groups},
                           "signatures_differ": differ, "models": {}}
    for model in shared:
        a, b = run_a.scores[model][rows_a], run_b.scores[model][rows_b]
        both = np.isfinite(a) & np.isfinite(b)  # pairs one run could not score for this model are left out
        a, b = a[both], b[both]
        model_labels = None if labels is None else [label for label, keep in zip(labels, both) if keep]
        low = high = math.nan
        if resamples is not None and len(a):
            low, high = bootstrap_ci(b - a, groups=model_labels, resamples=resamples, seed=seed, level=CI_LEVEL)
        out["models"][model] = {"mean_a": float(a.mean()) if len(a) else None,
                                "mean_b": float(b.mean()) if len(b) else None,
                                "diff": float((b - a).mean()) if len(a) else None,
                                "ci95": None if math.isnan(low) else [low, high], "win_rate": win_rate(a, b),
                                "n": len(a), "signature_a": run_a.signatures[model],
                                "signature_b": run_b.signatures[model]}
    out["only_a"] = [list(k) for k in run_a.keys if k not in matched]
    out["only_b"] = [list(k) for k in run_b.keys if k not in matched]
    return out


def format_comparison(result: Mapping[str, Any]) -> str:
    """The printed table: one row per model, means and difference with 4 decimals, the win rate in percent."""
    header = ["model", "mean_a", "mean_b", "diff", "ci95", "win_rate", "n"]
    lines = [header]
    for model, r in result["models"].items():
        ci = "n/a" if r["ci95"] is None else f"[{r['ci95'][0]:+.4f},{r['ci95'][1]:+.4f}]"
        if not r["n"]:
            lines.append([model, "n/a", "n/a", "n/a", ci, "n/a", "0"])
            continue
        lines.append([model, f"{r['mean_a']:.4f}", f"{r['mean_b']:.4f}", f"{r['diff']:+.4f}", ci,
                      f"{100 * r['win_rate']:.1f}%", str(r["n"])])
    widths = [max(len(line[k]) for line in lines) for k in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if k == 0 else cell.rjust(w) for k, (cell, w) in
                               enumerate(zip(line, widths))).rstrip() for line in lines)
