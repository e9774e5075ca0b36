#!/usr/bin/env python
"""Start-up time of the commands: ``--help``, ``--version`` and a usage error, each against a bare
``python -c "import torch"`` measured in the same run (the target: under 0.3x of it), and which heavy
modules each one imports.

Every case runs in a fresh interpreter ``--repeats`` times (after one warm-up run that fills the OS
file cache); the median wall time is reported. Run: ``python benchmarks/startup.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HEAVY = ("torch", "timm", "open_clip", "transformers", "matplotlib")
TARGET = 0.3  # the target: start-up under 0.3x a bare `import torch`
BASELINE = "python -c 'import torch'"

SCORE, BENCH = "nearid_metric.cli.score", "nearid_metric.cli.bench"
DREAMBENCH, TRAIN = "nearid_metric.cli.dreambench", "nearid_metric.cli.train"


def cases(tmp: Path) -> dict[str, str]:
    """{label: Python code run with -c}: each command through its console entry point's ``main``; usage errors
    are argparse's and the checks made before any work (folders in ``tmp``)."""
    ref, gen, file = tmp / "ref", tmp / "gen", tmp / "file.txt"
    calls = {
        "nearid-score --help": (SCORE, ["--help"]),
        "nearid-score --version": (SCORE, ["--version"]),
        "nearid-score (usage error: no arguments)": (SCORE, []),
        "nearid-score (usage error: missing REF)": (SCORE, [str(tmp / "missing"), str(gen)]),
        "nearid-score (usage error: --out is a file)": (SCORE, [str(ref), str(gen), "--out", str(file)]),
        "nearid-score download --help": (SCORE, ["download", "--help"]),
        "nearid-score download (usage error: unknown --model)": (SCORE, ["download", "--model", "dino"]),
        "nearid-score compare --help": (SCORE, ["compare", "--help"]),
        "nearid-score compare (usage error: no runs)": (SCORE, ["compare"]),
        "nearid-bench --help": (BENCH, ["--help"]),
        "nearid-bench --version": (BENCH, ["--version"]),
        "nearid-bench (usage error: no data)": (BENCH, []),
        "nearid-dreambench --help": (DREAMBENCH, ["--help"]),
        "nearid-dreambench --version": (DREAMBENCH, ["--version"]),
        "nearid-dreambench (usage error: missing folder)": (DREAMBENCH, ["--scores", str(tmp / "missing"),
                                                                          "--ratings", str(ref)]),
        "nearid-train --help": (TRAIN, ["--help"]),
        "nearid-train --version": (TRAIN, ["--version"]),
        "nearid-train (usage error: --epochs 0)": (TRAIN, ["--epochs", "0"]),
    }
    return {BASELINE: "import torch",
            **{label: f"from {module} import main; main({argv!r})" for label, (module, argv) in calls.items()}}


def run_once(code: str) -> tuple[float, list[str]]:
    """Wall seconds of ``python -c code`` (exit by SystemExit allowed) and the heavy modules it imported."""
    probe = (f"import sys, json\ntry:\n    exec({code!r})\nexcept SystemExit:\n    pass\n"
             f"sys.stderr.write('\\nIMPORTED ' + json.dumps([m for m in {HEAVY!r} if m in sys.modules]) + '\\n')")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    wall = time.perf_counter() - start
    line = [x for x in done.stderr.splitlines() if x.startswith("IMPORTED ")]
    if not line:
        raise RuntimeError(f"{code!r} failed:\n{done.stderr}")
    return wall, json.loads(line[-1].removeprefix("IMPORTED "))


def machine() -> str:
    """Cores, CPU model (as ``lscpu``'s model name), Python and torch versions (torch's from its metadata)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor() or platform.machine())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores ({model}), Python {platform.python_version()}, torch {metadata.version('torch')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "ref").mkdir()
        (Path(tmp) / "gen").mkdir()
        (Path(tmp) / "file.txt").write_text("not a folder\n")
        for label, code in cases(Path(tmp)).items():
            run_once(code)  # warm the file cache
            walls, imported = [], []
            for _ in range(args.repeats):
                wall, imported = run_once(code)
                walls.append(wall)
            results[label] = (statistics.median(walls), imported)
    base = results[BASELINE][0]
    print(f"machine: {machine()}; {datetime.date.today()}; median of {args.repeats} fresh interpreters")
    print(f"command: python benchmarks/startup.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print("| command | seconds | x import torch | heavy modules imported |")
    print("|---|---:|---:|---|")
    for label, (wall, imported) in results.items():
        print(f"| {label} | {wall:.3f} | {wall / base:.2f} | {', '.join(imported) or 'none'} |")
    slow = [label for label, (wall, _) in results.items() if label != BASELINE and wall / base >= TARGET]
    print(f"target < {TARGET}x: {'met' if not slow else 'missed by ' + ', '.join(slow)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
