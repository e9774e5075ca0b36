"""The HTML report of a ``nearid-score`` run (``--report FILE``): one self-contained, static page.

Everything is inside the one file: plots (matplotlib, optional extra ``report``) and image
thumbnails (PIL, at most :data:`THUMBNAIL_PX` px, JPEG) are ``data:`` URIs, the style sheet is
inline, and there is no JavaScript and no reference to anything outside the file, so it opens
offline, in a mail attachment or a CI artifact viewer. Every file name and text from the run is
HTML-escaped. How to read it: ``docs/report.md``.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nearid_metric._version import __version__
from nearid_metric.images import ImageLoadError, load_image
from nearid_metric.outputs import atomic_write, plural
from nearid_metric.stats import pearson

THUMBNAIL_PX = 128
"""Longest side of a thumbnail, in pixels."""

EXTREMES = 8
"""Lowest- and highest-scoring pairs shown per model."""

DIGITS = 6
"""Decimals of the scores on the page: scores of near-duplicates near 1 differ in the 5th or 6th."""

HISTOGRAM_SIZE = (5.6, 3.0)
SCATTER_SIZE = (4.4, 3.6)
"""Plot sizes in inches (shown at 100 px per inch)."""

LISTED = 500
"""At most this many entries of each problem list (failed, unmatched, ...); the rest are counted."""

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d2330;
       margin: 0 auto; padding: 24px 32px 48px; max-width: 1180px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 34px 0 10px; border-bottom: 2px solid #e3e7ef;
     padding-bottom: 4px; } h3 { font-size: 16px; margin: 22px 0 8px; }
.muted { color: #5b6473; } code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace;
       font-size: 13px; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 6px 0 12px; } th, td { padding: 5px 10px; text-align: left;
       vertical-align: top; border-bottom: 1px solid #e3e7ef; } th { background: #f4f6fa; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
dl.counts { display: grid; grid-template-columns: repeat(6, auto); gap: 4px 18px; margin: 12px 0; width: max-content; }
dl.counts dt { color: #5b6473; font-size: 13px; } dl.counts dd { margin: 0; font-size: 20px; font-weight: 600; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; } figure { margin: 0; } figcaption { font-size: 13px;
       color: #5b6473; }
.pairs td, .pairs th { padding: 4px 7px; } .pairs th { font-size: 13px; }
.pairs .head { max-width: 84px; overflow-wrap: anywhere; white-space: normal; margin-left: auto; }
.pairs td.img { width: 106px; } .pairs img { display: block; border: 1px solid #d5dae3; background: #f4f6fa;
       max-width: 104px; height: auto; }
.pairs .name { font-size: 12px; color: #5b6473; max-width: 106px; overflow-wrap: anywhere; }
.pairs td.score { font-size: 17px; font-weight: 600; } .side { display: flex; flex-wrap: wrap; gap: 10px 28px; }
.cite { background: #f4f6fa; border-left: 4px solid #3b6fd8; padding: 8px 12px; margin: 8px 0; }
.range { position: relative; width: 260px; height: 14px; background: linear-gradient(90deg, #f3d5d5, #d4ecd9);
       border-radius: 3px; } .range .mark { position: absolute; top: -3px; width: 4px; height: 20px;
       margin-left: -2px; background: #1d2330; }
.bad { color: #a4262c; } .ok { color: #2b7a3d; } ul.files { margin: 4px 0; padding-left: 22px; }
"""


def require_matplotlib() -> None:
    """Raise ImportError naming the ``report`` extra when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError('the HTML report needs matplotlib: pip install "nearid-metric[report]"') from None


def write_report(path: str | os.PathLike, pairs: Sequence[tuple[str, str]], scores: Mapping[str, np.ndarray],
                 summary: Mapping[str, Any], *, extremes: int = EXTREMES) -> None:
    """Write :func:`render_report` to ``path`` (UTF-8; the folder is created)."""
    text = render_report(pairs, scores, summary, extremes=extremes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(text)


def render_report(pairs: Sequence[tuple[str, str]], scores: Mapping[str, np.ndarray], summary: Mapping[str, Any],
                  *, extremes: int = EXTREMES) -> str:
    """The report page as a string.

    ``pairs``: the scored (reference, generation) paths; ``scores``: model column -> [N] scores
    aligned with ``pairs``; ``summary``: the ``summary.json`` content of the run (per-model
    statistics, signature and interval, failures, unmatched files). Needs matplotlib.
    """
    require_matplotlib()
    thumbs = Thumbnails()
    values = {model: np.asarray(v, dtype=np.float64) for model, v in scores.items()}
    pair_values = {model: v for model, v in values.items() if np.isfinite(v).all()}  # clip-t may lack prompts
    ref_root, gen_root = summary.get("ref", ""), summary.get("gen", "")
    protocol = summary.get("protocol")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>nearid-score report: {_e(ref_root)} vs {_e(gen_root)}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>nearid-score report</h1>",
        f'<p class="muted">references <span class="mono">{_e(ref_root)}</span>, generations '
        f'<span class="mono">{_e(gen_root)}</span>, pairing <b>{_e(summary.get("pairing", "?"))}</b>; '
        f"nearid-metric {_e(__version__)}. Scores are cosine similarities in [-1, 1] (unless a protocol "
        f"scales them: see the scale of each model); higher means the identity of the reference object is "
        f"better kept (for clip-t: the image matches its prompt).</p>",
        f'<p>Protocol <b id="protocol">{_e(protocol["name"])}</b>: {_e(protocol["title"])}, aggregation '
        f'{_e(protocol["aggregation"])}.</p>' if protocol else "",
        _masks_line(summary.get("masks")),
        _counts(summary),
        _summary_section(values, summary),
        _subjects_section(summary),
        _calibration_section(summary),
        _copies_section(summary),
        _distribution_section(pair_values, summary),
        _extremes_section(pairs, pair_values, ref_root, gen_root, thumbs, extremes),
        _problems_section(summary),
        '<p class="muted">Static page: no scripts, no external resources. How to read it: docs/report.md of '
        "nearid-metric.</p>",
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"


# --- sections ------------------------------------------------------------------------------------


def _masks_line(masks: Mapping[str, Any] | None) -> str:
    """Foreground-only runs say so above everything: their scores are not comparable with unmasked ones."""
    if not masks:
        return ""
    sides = [f"{'references' if side == 'ref' else 'generations'} by "
             + (f"the manifest column {m['column']}" if m["column"] else f"the masks in {m['folder']}")
             + (f" (under {m['folder']})" if m["column"] and m["folder"] else "")
             for side in ("ref", "gen") if (m := masks.get(side))]
    return (f'<p class="bad" id="masks"><b>Foreground only</b>: {_e("; ".join(sides))}; background set to '
            f'{_e(masks.get("fill"))}. Not comparable with unmasked scores.</p>')


def _counts(summary: Mapping[str, Any]) -> str:
    unmatched = summary.get("unmatched", {})
    items = [("pairs-total", "pairs", summary.get("pairs_total", 0)),
             ("pairs-scored", "scored", summary.get("pairs_scored", 0)),
             ("pairs-skipped", "skipped", summary.get("pairs_skipped", 0)),
             ("failed-files", "failed files", len(summary.get("failures", []))),
             ("unmatched-ref", "unmatched refs", len(unmatched.get("ref", []))),
             ("unmatched-gen", "unmatched gens", len(unmatched.get("gen", [])))]
    cells = "".join(f"<dt>{label}</dt>" for _, label, _ in items)
    cells += "".join(f'<dd id="{key}">{int(value)}</dd>' for key, _, value in items)
    problems = any(value for key, _, value in items[3:]) or summary.get("ambiguous")
    link = '<p><a href="#problems">Failed and unmatched files are listed at the end.</a></p>' if problems else ""
    return f'<dl class="counts">{cells}</dl>{link}'


def _summary_section(values: Mapping[str, np.ndarray], summary: Mapping[str, Any]) -> str:
    models = summary.get("models", {})
    head = ("<tr><th>model</th>" + "".join(f'<th class="num">{k}</th>' for k in
            ("n", "mean", "95% CI", "std", "median", "min", "max")) + "<th>signature</th></tr>")
    rows, cites = [], []
    for model in values:
        info = models.get(model, {})
        cells = [_number(info.get("mean"), DIGITS), _interval(info.get("ci95"), DIGITS)]
        cells += [_number(info.get(key), DIGITS) for key in ("std", "median", "min", "max")]
        rows.append(f'<tr data-model="{_e(model)}"><td><b>{_e(model)}</b></td>'
                    f'<td class="num" data-key="count">{int(info.get("count", len(values[model])))}</td>'
                    + "".join(f'<td class="num">{cell}</td>' for cell in cells)
                    + f'<td class="mono">{_e(info.get("signature", ""))}</td></tr>')
        cites.append(f'<div class="cite">{_e(citation(model, info))}</div>')
    ci = next((models[m].get("ci") for m in values if m in models), None)
    return "\n".join([
        "<h2>Summary</h2>",
        f"<table>{head}{''.join(rows)}</table>",
        f'<p class="muted">{_e(describe_ci(ci))}. std is the spread of the pair scores (ddof 1)'
        + ("; the interval is the uncertainty of the mean.</p>" if ci else ".</p>"),
        "<h3>How to cite</h3>", *cites,
    ])


def _subjects_section(summary: Mapping[str, Any]) -> str:
    """The per-subject table (mean, and the real-vs-real ceiling where scored) with the macro and micro rows."""
    subjects, models = summary.get("subjects"), summary.get("models", {})
    if not subjects:
        return ""
    columns = [m for m in models if any(m in entries for entries in subjects.values())]

    def cell(entry: Mapping[str, Any] | None) -> str:
        if not entry:
            return '<td class="num">-</td>'
        ceiling = entry.get("ceiling")
        extra = f' <span class="muted">/ {_number(ceiling, DIGITS)}</span>' if ceiling is not None else ""
        return f'<td class="num">{_number(entry.get("mean"), DIGITS)}{extra}</td>'

    head = "<tr><th>subject</th><th class=\"num\">n</th>" + "".join(f'<th class="num">{_e(m)}</th>' for m in columns)
    rows = [f'<tr data-subject="{_e(subject)}"><td>{_e(subject)}</td>'
            f'<td class="num">{max(e.get("n", 0) for e in entries.values())}</td>'
            + "".join(cell(entries.get(m)) for m in columns) + "</tr>" for subject, entries in subjects.items()]
    for kind in ("macro", "micro"):
        rows.append(f'<tr class="total" data-subject="{kind}"><td><b>{kind}</b></td><td class="num"></td>'
                    + "".join(cell(models[m].get(kind)) for m in columns) + "</tr>")
    return "\n".join([
        "<h2>Per subject</h2>",
        f"<table>{head}</tr>{''.join(rows)}</table>",
        '<p class="muted">Mean per subject (over its generation x reference pairs); after the slash, the '
        "subject's real-vs-real ceiling (different references of it) where --ceiling was given. macro: the "
        "mean over subjects (interval by resampling subjects); micro: the mean over pairs.</p>",
    ])


def _calibration_section(summary: Mapping[str, Any]) -> str:
    """Each subject's score drawn between its floor (left end) and ceiling (right end), per model."""
    models = {m: info["calibration"] for m, info in summary.get("models", {}).items() if info.get("calibration")}
    if not models:
        return ""
    parts = ["<h2>Calibrated scores</h2>",
             '<p class="muted">calibrated = (score - floor) / (ceiling - floor): 0 at the floor (the subject\'s '
             "generations against other subjects' references), 1 at the ceiling (its real photos against each "
             "other). The bar runs from floor to ceiling; the mark is the score (clipped to the bar).</p>"]
    for model, calibration in models.items():
        rows = []
        for subject, entry in calibration["subjects"].items():
            value = entry["calibrated"]
            mark = "" if value is None else f'<div class="mark" style="left:{100 * min(max(value, 0), 1):.1f}%"></div>'
            rows.append(f'<tr data-subject="{_e(subject)}"><td>{_e(subject)}</td>'
                        + "".join(f'<td class="num">{_number(entry[k], DIGITS)}</td>' for k in ("floor", "score", "ceiling"))
                        + f'<td class="num"><b>{_number(value, DIGITS)}</b></td>'
                        + f'<td class="num">{_interval(entry["ci95"], DIGITS)}</td>'
                        + f'<td><div class="range">{mark}</div></td></tr>')
        macro = calibration["macro"]
        parts += [f"<h3>{_e(model)}: macro calibrated {_number(macro['calibrated'], DIGITS)} "
                  f"{_interval(macro['ci95'], DIGITS)} over {macro['n']} subjects</h3>",
                  '<table data-calibration="' + _e(model) + '"><tr><th>subject</th><th class="num">floor</th>'
                  '<th class="num">score</th><th class="num">ceiling</th><th class="num">calibrated</th>'
                  '<th class="num">95% CI</th><th>floor to ceiling</th></tr>' + "".join(rows) + "</table>"]
    return "\n".join(parts)


def _copies_section(summary: Mapping[str, Any]) -> str:
    """Generations flagged as copies of a reference, per model."""
    copies = summary.get("copies")
    if copies is None:
        return ""
    rows = [f'<tr class="bad"><td>{_e(model)}</td><td class="mono">{_e(c["gen"])}</td><td class="mono">{_e(c["ref"])}'
            f'</td><td>{_e(c["reason"])}</td><td class="num">{_number(c["score"], DIGITS)}</td>'
            f'<td class="num">{_number(c.get("real_max"), DIGITS)}</td><td class="num">{c.get("hash_distance", "")}'
            "</td></tr>" for model, items in copies.items() for c in items]
    if not rows:
        return '<h2>Copies</h2><p id="copies" class="ok">No generation was flagged as a copy of a reference.</p>'
    return ('<h2>Copies</h2><p id="copies">Generations closer to a reference than any two real photos of the subject '
            "(reason score), or near-duplicates of it at pixel level (reason pixels).</p><table><tr><th>model</th>"
            "<th>generation</th><th>reference</th><th>reason</th><th class=\"num\">score</th><th class=\"num\">"
            "highest real-vs-real</th><th class=\"num\">hash distance</th></tr>" + "".join(rows) + "</table>")


def citation(model: str, info: Mapping[str, Any]) -> str:
    """One line that quotes a model's mean with its interval, count, method and signature."""
    mean = info.get("mean")
    if mean is None:
        return f"{model}: nothing scored"
    ci, ci95 = info.get("ci"), info.get("ci95")
    interval = ""
    if ci95:
        interval = (f", 95% CI {_interval(ci95, DIGITS)} (percentile bootstrap over {_units(ci['unit'])}, "
                    f"{ci['resamples']} resamples, seed {ci['seed']})")
    return (f"{model} = {mean:.{DIGITS}f}{interval}, n = {plural(info.get('count', 0), 'pair')}; "
            f"signature {info.get('signature', '')}")


def _distribution_section(values: Mapping[str, np.ndarray], summary: Mapping[str, Any]) -> str:
    models = summary.get("models", {})
    scored = {model: v for model, v in values.items() if len(v)}
    if not scored:
        return "<h2>Distribution</h2><p>Nothing was scored.</p>"
    figures = []
    for model, v in scored.items():
        info = models.get(model, {})
        ci95 = info.get("ci95")
        caption = (f"{model}: {plural(len(v), 'pair score')}; line: mean {v.mean():.{DIGITS}f}"
                   + (f"; band: 95% CI {_interval(ci95, DIGITS)}" if ci95 else ""))
        figures.append(figure_html(_histogram(model, v, ci95), HISTOGRAM_SIZE, f"histogram of {model} scores", caption))
    parts = ["<h2>Distribution</h2>", f'<div class="plots">{"".join(figures)}</div>']
    names = list(scored)
    if len(names) > 1:
        scatters = []
        for other in names[1:]:
            x, y = scored[names[0]], scored[other]
            r = pearson(x, y) if len(x) > 1 else math.nan
            caption = f"one point per pair; Pearson r = {'n/a' if math.isnan(r) else f'{r:.3f}'}"
            scatters.append(figure_html(_scatter(names[0], x, other, y), SCATTER_SIZE, f"{other} against {names[0]}",
                                    caption))
        parts += ["<h3>Models against each other</h3>", f'<div class="plots">{"".join(scatters)}</div>']
    return "\n".join(parts)


def _extremes_section(pairs: Sequence[tuple[str, str]], values: Mapping[str, np.ndarray], ref_root: str,
                      gen_root: str, thumbs: Thumbnails, extremes: int) -> str:
    if not pairs:
        return ""
    parts = ["<h2>Lowest- and highest-scoring pairs</h2>"]
    for model, v in values.items():
        order = np.argsort(v, kind="stable")
        if len(v) <= 2 * extremes:
            tables = [(f"{model}: all {plural(len(v), 'pair')}, lowest first", order)]
        else:
            tables = [(f"{model}: lowest {extremes}", order[:extremes]),
                      (f"{model}: highest {extremes}", order[::-1][:extremes])]
        blocks = []
        for title, rows in tables:
            body = "".join(_pair_row(rank, int(i), pairs, values, model, ref_root, gen_root, thumbs)
                           for rank, i in enumerate(rows, start=1))
            heads = "".join(f'<th class="num"><div class="head">{_e(m)}</div></th>'
                            for m in [model, *(m for m in values if m != model)])
            blocks.append(f'<div><h3>{_e(title)}</h3><table class="pairs"><tr><th>#</th><th>reference</th>'
                          f"<th>generation</th>{heads}</tr>{body}</table></div>")
        parts.append(f'<div class="side">{"".join(blocks)}</div>')
    return "\n".join(parts)


def _pair_row(rank: int, i: int, pairs: Sequence[tuple[str, str]], values: Mapping[str, np.ndarray], model: str,
              ref_root: str, gen_root: str, thumbs: Thumbnails) -> str:
    ref, gen = pairs[i]
    cells = [f"<td>{rank}</td>", image_cell(ref, _relative(ref, ref_root), thumbs),
             image_cell(gen, _relative(gen, gen_root), thumbs),
             f'<td class="num score">{values[model][i]:.{DIGITS}f}</td>']
    cells += [f'<td class="num">{v[i]:.{DIGITS}f}</td>' for m, v in values.items() if m != model]
    return f"<tr>{''.join(cells)}</tr>"


def image_cell(path: str, name: str, thumbs: Thumbnails) -> str:
    """A table cell with the thumbnail of the file ``path`` (or "unreadable now"), captioned ``name``."""
    uri = thumbs.get(path)
    image = (f'<img src="{uri[0]}" width="{uri[1]}" height="{uri[2]}" alt="{_e(name)}">' if uri
             else '<span class="bad">(unreadable now)</span>')
    return f'<td class="img">{image}<div class="name">{_e(name)}</div></td>'


def _problems_section(summary: Mapping[str, Any]) -> str:
    failures = summary.get("failures", [])
    unmatched = summary.get("unmatched", {})
    parts = ['<h2 id="problems">Failed and unmatched files</h2>']
    if failures:
        rows = "".join(f"<tr><td class=\"mono\">{_e(f['path'])}</td><td>{_e(f['reason'])}</td></tr>"
                       for f in failures[:LISTED])
        parts.append(f'<h3 class="bad">Failed files ({len(failures)}): not scored</h3>'
                     f'<table id="failures"><tr><th>file</th><th>reason</th></tr>{rows}</table>{_more(failures)}')
    lists = [("unmatched-ref-list", "Unmatched references", unmatched.get("ref", [])),
             ("unmatched-gen-list", "Unmatched generations", unmatched.get("gen", [])),
             ("ambiguous-list", "Ambiguous names", summary.get("ambiguous", [])),
             ("ignored-list", "Ignored files (not images)", summary.get("ignored_files", []))]
    for key, title, items in lists:
        if items:
            entries = "".join(f'<li class="mono">{_e(item)}</li>' for item in items[:LISTED])
            parts.append(f'<h3>{title} ({len(items)})</h3><ul class="files" id="{key}">{entries}</ul>{_more(items)}')
    if len(parts) == 1:
        parts.append('<p class="ok">None: every file was read and paired.</p>')
    return "\n".join(parts)


# --- plots and images ------------------------------------------------------------------------------


def _histogram(model: str, v: np.ndarray, ci95: Sequence[float] | None) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=HISTOGRAM_SIZE)
    ax = fig.add_subplot()
    bins = np.histogram_bin_edges(v, bins="auto")
    ax.hist(v, bins=bins if len(bins) <= 61 else 60, color="#8fb1e9", edgecolor="#3b6fd8", linewidth=0.6)
    if ci95:
        ax.axvspan(ci95[0], ci95[1], color="#f0a23b", alpha=0.35, label=f"95% CI [{ci95[0]:.3f}, {ci95[1]:.3f}]")
    ax.axvline(float(v.mean()), color="#c0392b", linewidth=1.6, label=f"mean {v.mean():.3f}")
    ax.set_xlabel(f"{model} score (cosine)")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return png_uri(fig)


def _scatter(x_name: str, x: np.ndarray, y_name: str, y: np.ndarray) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=SCATTER_SIZE)
    ax = fig.add_subplot()
    ax.scatter(x, y, s=10 if len(x) < 2000 else 3, alpha=0.6 if len(x) < 2000 else 0.3, color="#3b6fd8",
               linewidths=0)
    ax.set_xlabel(f"{x_name} score")
    ax.set_ylabel(f"{y_name} score")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return png_uri(fig)


def png_uri(fig: Any) -> str:
    """A matplotlib figure as a PNG ``data:`` URI (150 dpi, no software tag)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_html(uri: str, size: tuple[float, float], alt: str, caption: str) -> str:
    """A plot shown at 100 px per inch of its figure size (the PNG has 1.5x that, for sharp text)."""
    width, height = (round(100 * inches) for inches in size)
    return (f'<figure style="max-width: {width}px"><img src="{uri}" width="{width}" height="{height}" alt="{_e(alt)}" '
            f'style="max-width: 100%; height: auto"><figcaption>{_e(caption)}</figcaption></figure>')


class Thumbnails:
    """``path -> (data URI, width, height)`` of a JPEG thumbnail, each file encoded once; None if unreadable."""

    def __init__(self) -> None:
        self._done: dict[str, tuple[str, int, int] | None] = {}

    def get(self, path: str) -> tuple[str, int, int] | None:
        if path not in self._done:
            self._done[path] = self._encode(path)
        return self._done[path]

    @staticmethod
    def _encode(path: str) -> tuple[str, int, int] | None:
        try:
            image = load_image(path)
        except ImageLoadError:
            return None
        if image.mode in ("RGBA", "LA", "PA", "P") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image.alpha_composite(rgba)
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=82)
        return ("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"),
                image.width, image.height)


# --- text ----------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _interval(ci95: Sequence[float] | None, digits: int) -> str:
    return "n/a" if not ci95 else f"[{ci95[0]:.{digits}f}, {ci95[1]:.{digits}f}]"


def describe_ci(info: Mapping[str, Any] | None) -> str:
    """How an interval was computed, from a model's ``ci`` entry in ``summary.json`` (None: turned off)."""
    if not info:
        return "no confidence interval (--ci none)"
    return (f"95% CI: percentile bootstrap of the mean over {info['n_units']} {_units(info['unit'], info['n_units'])}, "
            f"{info['resamples']} resamples, seed {info['seed']}")


def _units(unit: str, count: int = 2) -> str:
    """What was resampled, in the plural (or the singular for a ``count`` of 1)."""
    one = count == 1
    return {"pair": "pair" if one else "pairs", "ref": "reference image" if one else "reference images"}.get(
        unit, f"group{'' if one else 's'} of the manifest column '{unit}'")


def _relative(path: str, root: str) -> str:
    try:
        relative = Path(path).relative_to(root)
    except ValueError:
        return str(path)
    return str(path) if relative == Path(".") else relative.as_posix()


def _more(items: Sequence[Any]) -> str:
    extra = len(items) - LISTED
    return f'<p class="muted">... and {extra} more (all in summary.json).</p>' if extra > 0 else ""
