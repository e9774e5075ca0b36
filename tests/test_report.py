"""``nearid-score --report``: the HTML file parsed (self-contained, counts, failed files) and shown in Chromium.

The browser test takes a screenshot with the system's headless Chromium (Debian package
``chromium``; ``.ci/run`` installs it) and is skipped, saying so, where no browser is installed.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import make_reference_model, random_image, write_checkpoint
from PIL import Image

from nearid_metric.cli.score import main

pytest.importorskip("matplotlib", reason="the report needs the 'report' extra (matplotlib)")

ODD_NAME = 'a&b <i>"odd"'  # a file name that must be escaped


class Page(HTMLParser):
    """Every tag with its attributes, the text under each id, and the text of the page."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.by_id: dict[str, str] = {}
        self.text: list[str] = []
        self._open_ids: list[tuple[str, str, int]] = []  # (id, tag, start index in text)
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attributes = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attributes))
        if "id" in attributes:
            self._open_ids.append((attributes["id"], tag, len(self.text)))

    def handle_endtag(self, tag):
        if self._open_ids and self._open_ids[-1][1] == tag:
            key, _, start = self._open_ids.pop()
            self.by_id[key] = "".join(self.text[start:]).strip()

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def run(tmp_path_factory, checkpoint_dir):
    """A run with two models over 12 good pairs, 2 failed files and unmatched files on both sides."""
    root = tmp_path_factory.mktemp("report")
    ref, gen = root / "ref", root / "gen"
    (ref / "sub").mkdir(parents=True)
    (gen / "sub").mkdir(parents=True)
    names = [f"pair{i:02d}" for i in range(10)] + ["sub/nested", ODD_NAME]
    for i, name in enumerate(names):
        random_image(i, (60 + i, 48)).save(ref / f"{name}.png")
        random_image(i if i % 3 else 200 + i, (58, 50 + i)).save(gen / f"{name}.jpg", quality=90)
    random_image(40, (40, 40)).save(ref / "empty.png")
    (gen / "empty.png").write_bytes(b"")
    random_image(41, (40, 40)).save(ref / "text.png")
    (gen / "text.png").write_text("not an image")
    random_image(42, (40, 40), mode="RGBA").save(ref / "only_ref.png")
    random_image(43, (40, 40)).save(gen / "only_gen.png")
    other = write_checkpoint(make_reference_model(seed=3), root / "other-tiny")
    out = root / "out"
    args = [ref, gen, "--model", f"nearid={checkpoint_dir},nearid={other}", "--out", out,
            "--report", out / "report.html", "--num-workers", "0", "--no-progress"]
    assert main([str(a) for a in args]) == 0
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out / "report.html", rows, json.loads((out / "summary.json").read_text())


def test_report_is_self_contained_and_static(run):
    path, _, _ = run
    assert_static(path.read_text(encoding="utf-8"))


def assert_static(text: str) -> None:
    """No script, no reference outside the page: every src a data: image, every link an anchor."""
    page = Page(text)
    lowered = text.lower()
    assert "<script" not in lowered and "javascript:" not in lowered
    assert "http://" not in lowered and "https://" not in lowered
    assert "url(" not in lowered and "@import" not in lowered
    for tag, attributes in page.tags:
        for key in ("src", "href", "srcset", "data", "action", "poster"):
            if key in attributes:
                value = attributes[key]
                assert value.startswith("data:image/") if key == "src" else value.startswith("#"), (tag, key, value)
        assert tag not in ("script", "iframe", "object", "embed", "link", "base")
        assert not any(key.startswith("on") for key in attributes), (tag, attributes)


def test_report_counts_match_the_csv_and_summary(run):
    path, rows, summary = run
    page = Page(path.read_text(encoding="utf-8"))
    assert len(rows) == 12
    assert page.by_id["pairs-scored"] == str(len(rows)) == str(summary["pairs_scored"])
    assert page.by_id["pairs-total"] == "14" and page.by_id["pairs-skipped"] == "2"
    assert page.by_id["failed-files"] == "2" and page.by_id["unmatched-ref"] == "1"
    counts = [attrs for tag, attrs in page.tags if tag == "td" and attrs.get("data-key") == "count"]
    assert len(counts) == 2  # one summary row per model
    models = [attrs["data-model"] for tag, attrs in page.tags if tag == "tr" and "data-model" in attrs]
    assert models == list(summary["models"])
    text = "".join(page.text)
    for model, info in summary["models"].items():
        assert info["signature"] in text
        low, high = info["ci95"]
        assert f"[{low:.6f}, {high:.6f}]" in text  # the interval in the summary table and the citation line
        assert f"{model} = {info['mean']:.6f}, 95% CI [{low:.6f}, {high:.6f}]" in text


def test_report_lists_failed_and_unmatched_files(run):
    path, _, summary = run
    page = Page(path.read_text(encoding="utf-8"))
    failures = page.by_id["failures"]
    for failure in summary["failures"]:
        assert failure["path"] in failures and failure["reason"] in failures
    assert {Path(f["path"]).name for f in summary["failures"]} == {"empty.png", "text.png"}
    assert page.by_id["unmatched-ref-list"].endswith("only_ref.png")
    assert page.by_id["unmatched-gen-list"].endswith("only_gen.png")


def test_report_thumbnails_plots_and_escaped_names(run):
    path, rows, _ = run
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    thumbnails = [a for a in images if a["src"].startswith("data:image/jpeg;base64,")]
    plots = [a for a in images if a["src"].startswith("data:image/png;base64,")]
    assert len(plots) == 3  # a histogram per model, one scatter of the second model against the first
    # 12 pairs <= 2 x 8: one table of all pairs per model, a reference and a generation per row
    assert len(thumbnails) == 2 * 2 * len(rows)
    for attrs in thumbnails[:6]:
        picture = Image.open(io.BytesIO(base64.b64decode(attrs["src"].split(",", 1)[1])))
        assert picture.format == "JPEG" and max(picture.size) <= 128
        assert (int(attrs["width"]), int(attrs["height"])) == picture.size
    # every pair appears, lowest first, and each score is the CSV's
    scores = sorted(float(r[list(r)[2]]) for r in rows)
    shown = [float(cell) for cell in _cells(text, "num score")[:len(rows)]]
    np.testing.assert_allclose(shown, scores, atol=5e-5)
    # the odd file name is escaped in the markup and reads back verbatim
    assert ODD_NAME not in text and "a&amp;b &lt;i&gt;&quot;odd&quot;" in text
    assert any(ODD_NAME in chunk for chunk in page.text)


def _cells(text: str, css_class: str) -> list[str]:
    marker = f'<td class="{css_class}">'
    return [part.split("<", 1)[0] for part in text.split(marker)[1:]]


def test_missing_matplotlib_is_a_clear_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    (tmp_path / "r").mkdir(), (tmp_path / "g").mkdir()
    with pytest.raises(SystemExit) as excinfo:
        main([str(tmp_path / "r"), str(tmp_path / "g"), "--report", str(tmp_path / "x.html")])
    assert excinfo.value.code == 2
    assert 'pip install "nearid-metric[report]"' in capsys.readouterr().err


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def chromium(page: Path, profile: Path, *args: str) -> str:
    """Run headless Chromium on ``page`` with ``args`` (a screenshot, or --dump-dom); returns its stdout."""
    command = [find_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", *args, page.resolve().as_uri()]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


needs_browser = pytest.mark.skipif(find_browser() is None, reason="no Chromium/Chrome binary on PATH (looked for "
                                   + ", ".join(BROWSERS) + "); install the Debian package 'chromium' as .ci/run does")


@needs_browser
def test_report_renders_in_headless_chromium(run, tmp_path):
    path, _, _ = run
    shot = tmp_path / "report.png"
    width, height = 1280, 2400
    chromium(path, tmp_path / "profile", f"--window-size={width},{height}", f"--screenshot={shot}")
    assert shot.is_file()
    picture = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int64)
    assert picture.shape == (height, width, 3)
    not_white = (picture < 235).any(axis=2)
    assert not_white.mean() > 0.03  # text, plots and thumbnails drawn, not a blank page
    # the histogram bars' blue (#8fb1e9 with its #3b6fd8 edge) is on screen: the embedded plots were decoded
    blue = (np.abs(picture - [0x8F, 0xB1, 0xE9]).sum(axis=2) < 40)
    assert blue.sum() > 500


def test_scores_near_1_are_told_apart():
    from nearid_metric.report import render_report

    pairs = [("a.png", "b.png"), ("a.png", "c.png")]
    scores = {"nearid": np.array([0.99991, 0.99994])}
    summary = {"models": {"nearid": {"count": 2, "mean": 0.999925, "ci95": None, "std": 2e-5, "median": 0.999925,
                                     "min": 0.99991, "max": 0.99994, "signature": "s"}},
               "pairs_total": 2, "pairs_scored": 2, "ref": ".", "gen": "."}
    text = render_report(pairs, scores, summary)
    assert "0.999910" in text and "0.999940" in text and "0.999925" in text


# --- nearid-score compare --report -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, checkpoint_dir):
    """Two real runs on 12 references: B near-copies the references where A does not (gains) and the other way
    round for 4 (losses); one pair only in A, one only in B; one of A's generations deleted after scoring."""
    root = tmp_path_factory.mktemp("compare")
    refs, gen_a, gen_b = root / "refs", root / "A", root / "B"
    for folder in (refs / "sub", gen_a / "sub", gen_b / "sub"):
        folder.mkdir(parents=True)
    names = [f"p{i:02d}" for i in range(10)] + ["sub/nested", ODD_NAME]
    for i, name in enumerate(names):
        random_image(i, (48, 40)).save(refs / f"{name}.png")
        copy_in_b = i % 3 != 0
        random_image(i if not copy_in_b else 300 + i, (48, 40)).save(gen_a / f"{name}.png")
        random_image(i if copy_in_b else 400 + i, (48, 40)).save(gen_b / f"{name}.jpg", quality=95)
    random_image(50, (48, 40)).save(refs / "extra_a.png")
    random_image(51, (48, 40)).save(gen_a / "extra_a.png")
    random_image(52, (48, 40)).save(refs / "extra_b.png")
    random_image(53, (48, 40)).save(gen_b / "extra_b.png")
    common = ["--model", checkpoint_dir, "--num-workers", "0", "--no-progress"]
    assert main([str(a) for a in [refs, gen_a, "--out", root / "run_a", *common]]) == 0
    assert main([str(a) for a in [refs, gen_b, "--out", root / "run_b", *common]]) == 0
    (gen_a / "p01.png").unlink()  # its thumbnail is "unreadable now"
    page = root / "compare.html"
    assert main(["compare", str(root / "run_a"), str(root / "run_b"), "--report", str(page),
                 "--json", str(root / "compare.json"), "--groups", "ref"]) == 0
    return page, json.loads((root / "compare.json").read_text())


def test_comparison_report_holds_the_comparison(comparison):
    path, result = comparison
    text = path.read_text(encoding="utf-8")
    assert_static(text)
    page = Page(text)
    r = result["models"]["nearid"]
    assert (r["n"], result["only_a"], result["only_b"]) == (12, [["extra_a.png", "extra_a"]],
                                                            [["extra_b.png", "extra_b"]])
    assert page.by_id["pairs-matched"] == "12" and page.by_id["only-a"] == "1" and page.by_id["only-b"] == "1"
    row = [attrs for tag, attrs in page.tags if tag == "tr" and "data-model" in attrs]
    assert [attrs["data-model"] for attrs in row] == ["nearid"]
    words = "".join(page.text)
    low, high = r["ci95"]
    for cell in (f"{r['mean_a']:.4f}", f"{r['mean_b']:.4f}", f"{r['diff']:+.4f}", f"[{low:+.4f}, {high:+.4f}]",
                 f"{100 * r['win_rate']:.1f}%", r["signature_a"], "paired percentile bootstrap over groups (ref)"):
        assert cell in words, cell
    assert "extra_a.png ~ extra_a" in page.by_id["only-a-list"] and "extra_b.png ~ extra_b" in page.by_id["only-b-list"]
    plots = [a for tag, a in page.tags if tag == "img" and a["src"].startswith("data:image/png;base64,")]
    assert len(plots) == 1  # one scatter per model
    # 8 gains and 4 losses: a reference, A's and B's generation per row, except the deleted file
    thumbnails = [a for tag, a in page.tags if tag == "img" and a["src"].startswith("data:image/jpeg;base64,")]
    gains, losses = page.by_id["gains-nearid"], page.by_id["losses-nearid"]
    assert gains.count("B - A") == losses.count("B - A") == 1
    shown = _cells(text, "num score ok") + _cells(text, "num score bad")
    assert len(shown) == 12 and len(thumbnails) == 3 * 12 - 1 and "(unreadable now)" in text
    assert sorted(float(v) for v in shown) == pytest.approx(sorted(r_b - r_a for r_a, r_b in _pair_scores(path)),
                                                            abs=5e-5)
    assert ODD_NAME not in text and "a&amp;b &lt;i&gt;&quot;odd&quot;" in text


def _pair_scores(page: Path) -> list[tuple[float, float]]:
    """(A, B) of every matched pair, from the two runs' scores.csv beside the page."""
    runs = []
    for run in ("run_a", "run_b"):
        with open(page.parent / run / "scores.csv", newline="") as f:
            runs.append({Path(row["ref"]).stem: float(row["nearid"]) for row in csv.DictReader(f)})
    return [(runs[0][k], runs[1][k]) for k in runs[0] if k in runs[1]]


def test_comparison_report_needs_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as excinfo:
        main(["compare", str(tmp_path), str(tmp_path), "--report", str(tmp_path / "c.html")])
    assert excinfo.value.code == 2 and 'pip install "nearid-metric[report]"' in capsys.readouterr().err


@needs_browser
def test_comparison_report_renders_in_headless_chromium(comparison, tmp_path):
    from nearid_metric.compare_report import GAIN, LOSS

    path, _ = comparison
    dom = chromium(path, tmp_path / "profile", "--dump-dom")
    for text in ("nearid-score compare", "largest gains (B higher)", "Pairs in one run only", "extra_b.png ~ extra_b"):
        assert text in dom, text
    # the page, and the same page with a white picture for its plot (the same layout: the box keeps its size)
    white = io.BytesIO()
    Image.new("RGB", (44, 36), "white").save(white, format="PNG")
    blank = "data:image/png;base64," + base64.b64encode(white.getvalue()).decode("ascii")
    without_plot = tmp_path / "without-plot.html"
    without_plot.write_text(re.sub(r'data:image/png;base64,[^"]*', blank, path.read_text(encoding="utf-8")),
                            encoding="utf-8")
    width, height = 1280, 2000
    pictures = []
    for page in (path, without_plot):
        shot = tmp_path / f"{page.stem}.png"
        chromium(page, tmp_path / "profile", f"--window-size={width},{height}", f"--screenshot={shot}")
        pictures.append(np.asarray(Image.open(shot).convert("RGB"), dtype=np.int64))
    picture = pictures[0]
    assert picture.shape == (height, width, 3)
    assert (picture < 235).any(axis=2).mean() > 0.03  # text, the scatter and thumbnails drawn
    # where the plot is drawn, the gain and the loss points are (their colours at alpha 0.8 on white)
    plot = (pictures[0] != pictures[1]).any(axis=2)
    rows, columns = np.nonzero(plot)
    assert 200 < rows.max() - rows.min() <= 360 and 300 < columns.max() - columns.min() <= 440  # within one plot
    for colour in (GAIN, LOSS):
        drawn = 0.8 * np.array([int(colour[k:k + 2], 16) for k in (1, 3, 5)]) + 0.2 * 255
        assert ((np.abs(picture - drawn).sum(axis=2) < 30) & plot).sum() > 15, colour
