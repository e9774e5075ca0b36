"""Every command's ``--help``, ``--version`` and usage errors run without importing torch, timm or open_clip
(a property checked in a fresh interpreter, not a timing; the timings are ``benchmarks/startup.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

HEAVY = ("torch", "timm", "open_clip")


def cases(tmp: Path) -> list[tuple[str, str, list[str], int]]:
    """(label, module of the command's ``main``, argv, expected exit code)."""
    ref, gen, file = tmp / "ref", tmp / "gen", tmp / "file.txt"
    score, bench = "nearid_metric.cli.score", "nearid_metric.cli.bench"
    dreambench, train = "nearid_metric.cli.dreambench", "nearid_metric.cli.train"
    return [
        ("nearid-score --help", score, ["--help"], 0),
        ("nearid-score --version", score, ["--version"], 0),
        ("nearid-score without arguments", score, [], 2),
        ("nearid-score missing REF", score, [str(tmp / "missing"), str(gen)], 2),
        ("nearid-score bad --out", score, [str(ref), str(gen), "--out", str(file)], 2),
        ("nearid-score unknown --model", score, [str(ref), str(gen), "--model", "dino"], 2),
        ("nearid-score bad --num-workers", score, [str(ref), str(gen), "--num-workers", "-1"], 2),
        ("nearid-score download --help", score, ["download", "--help"], 0),
        ("nearid-score download --version", score, ["download", "--version"], 2),
        ("nearid-score download unknown --model", score, ["download", "--model", "dino"], 2),
        ("nearid-score compare --help", score, ["compare", "--help"], 0),
        ("nearid-score compare without runs", score, ["compare"], 2),
        ("nearid-score compare --json folder", score, ["compare", str(ref), str(gen), "--json", str(tmp)], 2),
        ("nearid-bench --help", bench, ["--help"], 0),
        ("nearid-bench --version", bench, ["--version"], 0),
        ("nearid-bench without data", bench, [], 2),
        ("nearid-bench --from-csv with --model", bench, ["--from-csv", str(file), "--model", "nearid"], 2),
        ("nearid-dreambench --help", dreambench, ["--help"], 0),
        ("nearid-dreambench --version", dreambench, ["--version"], 0),
        ("nearid-dreambench without --ratings", dreambench, ["--images", str(ref)], 2),
        ("nearid-dreambench missing folder", dreambench, ["--scores", str(tmp / "missing"), "--ratings", str(ref)], 2),
        ("nearid-train --help", train, ["--help"], 0),
        ("nearid-train --version", train, ["--version"], 0),
        ("nearid-train bad setting", train, ["--epochs", "0"], 2),
    ]


PROBE = textwrap.dedent("""
    import contextlib, importlib, io, json, sys
    results = []
    for label, module, argv, _ in json.loads(sys.argv[1]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                code = importlib.import_module(module).main(argv)
            except SystemExit as e:
                code = e.code
        results.append([label, code, [m for m in {heavy!r} if m in sys.modules]])
    print(json.dumps(results))
""").format(heavy=HEAVY)


def test_help_version_and_usage_errors_import_no_model_library(tmp_path):
    """One fresh interpreter runs the cases in turn; after each, none of torch, timm, open_clip is loaded."""
    (tmp_path / "ref").mkdir()
    (tmp_path / "gen").mkdir()
    (tmp_path / "file.txt").write_text("not a folder\n")
    todo = cases(tmp_path)
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(todo)], capture_output=True, text=True, check=True)
    results = json.loads(done.stdout)
    assert [label for label, _, _ in results] == [label for label, _, _, _ in todo]
    assert {label: code for label, code, _ in results} == {label: code for label, _, _, code in todo}
    assert {label: heavy for label, _, heavy in results if heavy} == {}


def test_importing_the_package_imports_no_torch():
    """``import nearid_metric`` and the scorer names load no model library; a torch-needing name loads torch."""
    code = ("import sys, nearid_metric; names = nearid_metric.list_scorers(); from nearid_metric.scorers import SCORERS; "
            "before = [m for m in ('torch', 'timm', 'open_clip') if m in sys.modules]; "
            "cls = nearid_metric.NearIDScore; print(before, 'nearid' in names, 'torch' in sys.modules, "
            "cls.__module__ + '.' + cls.__qualname__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["[]", "True", "True", "nearid_metric.scorers.NearIDScore"]
