#!/usr/bin/env python
"""Start-up time of the commands: ``--help``, ``--version`` and a usage error, each against a bare
``python -c "import torch"`` measured in the same run (the target: under 0.3x of it), and which heavy
modules each one imports.

Every case runs in a fresh interpreter ``--repeats`` times (after one warm-up run that fills the OS
file cache); the median wall time is reported. Run: ``python benchmarks/startup.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "timm", "open_clip", "transformers", "matplotlib")
TARGET = 0.3  # the target: start-up under 0.3x a bare `import torch`

# (label, Python code run with -c): each command through its console entry point
CASES = {
    "python -c 'import torch'": "import torch",
    "nearid-score --help": "from nearid_metric.cli.score import main; main(['--help'])",
    "nearid-score --version": "from nearid_metric.cli.score import main; main(['--version'])",
    "nearid-score (usage error)": "from nearid_metric.cli.score import main; main([])",
    "nearid-score download --help": "from nearid_metric.cli.score import main; main(['download', '--help'])",
    "nearid-score compare --help": "from nearid_metric.cli.score import main; main(['compare', '--help'])",
    "nearid-bench --help": "from nearid_metric.cli.bench import main; main(['--help'])",
    "nearid-dreambench --help": "from nearid_metric.cli.dreambench import main; main(['--help'])",
    "nearid-train --help": "from nearid_metric.cli.train import main; main(['--help'])",
}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    results = {}
    for label, code in CASES.items():
        run_once(code)  # warm the file cache
        walls, imported = [], []
        for _ in range(args.repeats):
            wall, imported = run_once(code)
            walls.append(wall)
        results[label] = (statistics.median(walls), imported)
    base = results["python -c 'import torch'"][0]
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"median of {args.repeats} fresh interpreters")
    print("| command | seconds | x import torch | heavy modules imported |")
    print("|---|---|---|---|")
    for label, (wall, imported) in results.items():
        print(f"| {label} | {wall:.3f} | {wall / base:.2f} | {', '.join(imported) or 'none'} |")
    slow = [label for label, (wall, _) in results.items() if label != "python -c 'import torch'"
            and wall / base >= TARGET]
    print(f"target < {TARGET}x: {'met' if not slow else 'missed by ' + ', '.join(slow)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
