"""The HTML report of ``nearid-score compare RUN_A RUN_B --report FILE``: one self-contained, static page.

Built like the run report (:mod:`nearid_metric.report`: its style sheet, matplotlib plots and JPEG
thumbnails as ``data:`` URIs, no script, nothing outside the file): per model the means of A and B,
the difference B - A with its interval, the win rate and n; a scatter of B against A, one point per
matched pair; the pairs with the largest gains and losses (reference, A's and B's generation); the
pairs found in one run only. How to read it: ``docs/report.md``.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from nearid_metric._version import __version__
from nearid_metric.compare import Run, matched_rows
from nearid_metric.outputs import atomic_write, plural
from nearid_metric.report import (
    EXTREMES,
    LISTED,
    SCATTER_SIZE,
    STYLE,
    Thumbnails,
    figure_html,
    image_cell,
    png_uri,
    require_matplotlib,
)

DIGITS = 4
"""Decimals of means and differences, as ``nearid-score compare`` prints them."""

GAIN, LOSS, TIE = "#1a9850", "#d73027", "#3b6fd8"
"""Scatter colours of pairs where B scores higher, lower, the same."""

_STYLE = """
.changes td.img { width: 84px; } .changes img { max-width: 82px; } .changes .name { max-width: 84px; }
"""  # smaller thumbnails than the run report's, so the gains and the losses fit side by side


def write_comparison_report(path: str | os.PathLike, run_a: Run, run_b: Run, result: Mapping[str, Any], *,
                            extremes: int = EXTREMES) -> None:
    """Write :func:`render_comparison_report` to ``path`` (UTF-8, atomically; the folder is created)."""
    text = render_comparison_report(run_a, run_b, result, extremes=extremes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(text)


def render_comparison_report(run_a: Run, run_b: Run, result: Mapping[str, Any], *, extremes: int = EXTREMES) -> str:
    """The comparison page as a string. ``result``: :func:`~nearid_metric.compare.compare_runs` of the two runs
    (per-model means, difference, interval, win rate). Thumbnails are read from the image paths in each run's
    ``scores.csv`` as written (relative ones from the current folder); missing files show as unreadable.
    Needs matplotlib."""
    require_matplotlib()
    rows_a, rows_b = matched_rows(run_a, run_b)
    pairs = [_Pair(run_a.keys[i], run_a.columns["ref"][i], run_a.columns["gen"][i], run_b.columns["gen"][j])
             for i, j in zip(rows_a, rows_b)]
    scores = {model: (run_a.scores[model][rows_a], run_b.scores[model][rows_b]) for model in result["models"]}
    thumbs = Thumbnails()
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>nearid-score compare: {_e(result['run_a'])} vs {_e(result['run_b'])}</title>",
        f"<style>{STYLE}{_STYLE}</style></head><body>",
        "<h1>nearid-score compare</h1>",
        f'<p class="muted">run A <span class="mono">{_e(result["run_a"])}</span>, run B <span class="mono">'
        f'{_e(result["run_b"])}</span>; pairs matched by reference and generation name; nearid-metric '
        f"{_e(__version__)}. Differences are B - A: positive means B keeps the identity better.</p>",
        _counts(result),
        _summary_section(result),
        _scatter_section(scores),
        _changes_section(pairs, scores, thumbs, extremes),
        _one_run_only_section(result),
        '<p class="muted">Static page: no scripts, no external resources. How to read it: docs/report.md of '
        "nearid-metric.</p>",
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"


class _Pair:
    """A matched pair: its key and the image paths as the two runs' scores.csv name them."""

    def __init__(self, key: tuple[str, str], ref: str, gen_a: str, gen_b: str):
        self.key, self.ref, self.gen_a, self.gen_b = key, ref, gen_a, gen_b


def _counts(result: Mapping[str, Any]) -> str:
    n = max((r["n"] for r in result["models"].values()), default=0)
    items = [("pairs-matched", "matched pairs", n), ("only-a", "only in A", len(result["only_a"])),
             ("only-b", "only in B", len(result["only_b"])), ("models", "models", len(result["models"]))]
    cells = "".join(f"<dt>{label}</dt>" for _, label, _ in items)
    cells += "".join(f'<dd id="{key}">{int(value)}</dd>' for key, _, value in items)
    return f'<dl class="counts" style="grid-template-columns: repeat(4, auto)">{cells}</dl>'


def _summary_section(result: Mapping[str, Any]) -> str:
    head = ("<tr><th>model</th>" + "".join(f'<th class="num">{k}</th>' for k in
            ("n", "mean A", "mean B", "diff B - A", "95% CI of diff", "B wins")) + "<th>verdict</th></tr>")
    rows, signatures = [], []
    for model, r in result["models"].items():
        ci = r["ci95"]
        cells = [str(r["n"]), f"{r['mean_a']:.{DIGITS}f}", f"{r['mean_b']:.{DIGITS}f}", f"{r['diff']:+.{DIGITS}f}",
                 "n/a" if ci is None else f"[{ci[0]:+.{DIGITS}f}, {ci[1]:+.{DIGITS}f}]",
                 "n/a" if math.isnan(r["win_rate"]) else f"{100 * r['win_rate']:.1f}%"]
        rows.append(f'<tr data-model="{_e(model)}"><td><b>{_e(model)}</b></td>'
                    + "".join(f'<td class="num">{cell}</td>' for cell in cells) + f"<td>{_verdict(ci)}</td></tr>")
        same = r["signature_a"] == r["signature_b"]
        signatures.append(f'<div class="cite"><b>{_e(model)}</b>: '
                          + (f'<span class="mono">{_e(r["signature_a"])}</span>' if same else
                             f'<span class="bad">signatures differ (compared with --allow-different-signatures)'
                             f'</span><br>A <span class="mono">{_e(r["signature_a"])}</span><br>B <span '
                             f'class="mono">{_e(r["signature_b"])}</span>') + "</div>")
    return "\n".join(["<h2>Summary</h2>", f"<table>{head}{''.join(rows)}</table>",
                      f'<p class="muted">{_e(_describe_ci(result))}. B wins: the share of matched pairs where B '
                      "scores higher (ties count half).</p>", "<h3>Signatures</h3>", *signatures])


def _verdict(ci: Sequence[float] | None) -> str:
    if ci is None:
        return '<span class="muted">no interval</span>'
    if ci[0] > 0:
        return '<span class="ok">B higher</span>'
    if ci[1] < 0:
        return '<span class="bad">A higher</span>'
    return '<span class="muted">no clear difference (the interval contains 0)</span>'


def _describe_ci(result: Mapping[str, Any]) -> str:
    ci = result.get("ci")
    if not ci:
        return "no confidence interval (--ci none)"
    unit = "pairs" if ci["unit"] == "pair" else f"groups ({ci['unit']})"
    return (f"95% CI of the difference: paired percentile bootstrap over {unit}, {ci['resamples']} resamples, "
            f"seed {ci['seed']}")


def _scatter_section(scores: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
    figures = []
    for model, (a, b) in scores.items():
        gains, losses = int((b > a).sum()), int((b < a).sum())
        caption = (f"{model}: one point per matched pair; above the diagonal B scores higher ({gains} pairs), below "
                   f"it lower ({losses})")
        figures.append(figure_html(_scatter(model, a, b), SCATTER_SIZE, f"{model}: run B against run A", caption))
    return "\n".join(["<h2>Run B against run A</h2>", f'<div class="plots">{"".join(figures)}</div>'])


def _scatter(model: str, a: np.ndarray, b: np.ndarray) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=SCATTER_SIZE)
    ax = fig.add_subplot()
    low, high = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    pad = 0.05 * (high - low or 1.0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="#8a93a3", linewidth=1, linestyle="--")
    colours = np.where(b > a, GAIN, np.where(b < a, LOSS, TIE))
    ax.scatter(a, b, s=14 if len(a) < 2000 else 4, alpha=0.8 if len(a) < 2000 else 0.35, c=colours, linewidths=0)
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel(f"{model} score, run A")
    ax.set_ylabel(f"{model} score, run B")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return png_uri(fig)


def _changes_section(pairs: Sequence[_Pair], scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
                     thumbs: Thumbnails, extremes: int) -> str:
    parts = ["<h2>Largest gains and losses</h2>"]
    for model, (a, b) in scores.items():
        diff = b - a
        order = np.argsort(-diff, kind="stable")
        gains = [i for i in order[:extremes] if diff[i] > 0]
        losses = [i for i in order[::-1][:extremes] if diff[i] < 0]
        blocks = []
        for key, title, rows in ((f"gains-{model}", f"{model}: largest gains (B higher)", gains),
                                 (f"losses-{model}", f"{model}: largest losses (B lower)", losses)):
            if not rows:
                blocks.append(f"<div><h3>{_e(title)}</h3><p class=\"muted\">none</p></div>")
                continue
            body = "".join(_change_row(rank, pairs[i], a[i], b[i], thumbs) for rank, i in enumerate(rows, start=1))
            blocks.append(f'<div><h3>{_e(title)}</h3><table class="pairs changes" id="{_e(key)}"><tr><th>#</th>'
                          f'<th>reference</th><th>A</th><th>B</th><th class="num">A</th><th class="num">B</th>'
                          f'<th class="num">B - A</th></tr>{body}</table></div>')
        parts.append(f'<div class="side">{"".join(blocks)}</div>')
    return "\n".join(parts)


def _change_row(rank: int, pair: _Pair, a: float, b: float, thumbs: Thumbnails) -> str:
    ref_name, gen_name = pair.key
    cells = [f"<td>{rank}</td>", image_cell(pair.ref, ref_name, thumbs),
             image_cell(pair.gen_a, gen_name + PurePath(pair.gen_a).suffix, thumbs),
             image_cell(pair.gen_b, gen_name + PurePath(pair.gen_b).suffix, thumbs), f'<td class="num">{a:.{DIGITS}f}</td>',
             f'<td class="num">{b:.{DIGITS}f}</td>',
             f'<td class="num score {"ok" if b > a else "bad"}">{b - a:+.{DIGITS}f}</td>']
    return f"<tr>{''.join(cells)}</tr>"


def _one_run_only_section(result: Mapping[str, Any]) -> str:
    parts = ['<h2 id="one-run-only">Pairs in one run only</h2>']
    for side in ("a", "b"):
        only = result[f"only_{side}"]
        if only:
            entries = "".join(f'<li class="mono">{_e(ref)} ~ {_e(gen)}</li>' for ref, gen in only[:LISTED])
            more = len(only) - LISTED
            parts.append(f"<h3>Only in run {side.upper()} ({plural(len(only), 'pair')}): not compared</h3>"
                         f'<ul class="files" id="only-{side}-list">{entries}</ul>'
                         + (f'<p class="muted">... and {more} more (all in --json).</p>' if more > 0 else ""))
    if len(parts) == 1:
        parts.append('<p class="ok">None: every pair of each run was matched.</p>')
    return "\n".join(parts)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
