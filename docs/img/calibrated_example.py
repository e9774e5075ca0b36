"""Regenerate ``docs/img/calibrated-example.png``: the per-subject, calibrated and copies sections of a
``nearid-score --pairing subject --calibrate --report`` page, from an illustrative summary (no model, no
images), rendered by headless Chromium.

    PYTHONPATH=src python docs/img/calibrated_example.py      # needs matplotlib and chromium on PATH
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from nearid_metric.report import render_report

OUT = Path(__file__).resolve().parent / "calibrated-example.png"
SUBJECTS = {"backpack": (0.41, 0.78, 0.86), "cat": (0.38, 0.71, 0.83), "teapot": (0.44, 0.52, 0.88),
            "dog": (0.36, 0.80, 0.79)}  # floor, score, ceiling


def summary() -> dict:
    subjects, calibrated = {}, {}
    for name, (floor, score, ceiling) in SUBJECTS.items():
        subjects[name] = {"nearid": {"mean": score, "n": 100, "ci95": [score - 0.02, score + 0.02],
                                     "ceiling": ceiling, "ceiling_n": 20}}
        value = (score - floor) / (ceiling - floor)
        calibrated[name] = {"score": score, "floor": floor, "ceiling": ceiling, "calibrated": value,
                            "ci95": [value - 0.05, value + 0.05], "n": 100}
    values = [c["calibrated"] for c in calibrated.values()]
    macro = float(np.mean([s[1] for s in SUBJECTS.values()]))
    return {
        "models": {"nearid": {"count": 400, "mean": macro, "ci95": [macro - 0.03, macro + 0.03], "std": 0.08,
                              "median": macro, "min": 0.2, "max": 0.97,
                              "ci": {"method": "percentile bootstrap", "level": 0.95, "resamples": 1000, "seed": 0,
                                     "unit": "pair", "n_units": 400},
                              "signature": "nearid:Aleksandar/nearid-siglip2@main|sha256:4f1c2a9e0b7d|fp32|v0.1.0",
                              "macro": {"mean": macro, "ci95": [macro - 0.06, macro + 0.06], "n_subjects": 4,
                                        "ceiling": 0.84},
                              "micro": {"mean": macro, "ci95": [macro - 0.02, macro + 0.02], "n": 400,
                                        "ceiling": 0.84},
                              "calibration": {"subjects": calibrated,
                                              "macro": {"calibrated": float(np.mean(values)), "n": 4,
                                                        "ci95": [float(np.mean(values)) - 0.1,
                                                                 float(np.mean(values)) + 0.1]}}}},
        "pairing": "subject", "ref": "dataset", "gen": "generations", "pairs_total": 400, "pairs_scored": 400,
        "pairs_skipped": 0, "subjects": subjects,
        "copies": {"nearid": [{"gen": "generations/dog/p07-2.png", "ref": "dataset/dog/03.jpg", "subject": "dog",
                               "score": 0.97, "real_max": 0.88, "reason": "pixels", "hash_distance": 3}]},
    }


def main() -> None:
    browser = shutil.which("chromium") or shutil.which("google-chrome")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        page.write_text(render_report([], {"nearid": np.array([])}, summary()), encoding="utf-8")
        shot = Path(tmp) / "shot.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp}/profile",
                        "--window-size=1280,1500", f"--screenshot={shot}", page.as_uri()], check=True,
                       capture_output=True, timeout=120)
        image = Image.open(shot).convert("RGB")
        small = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)
        small.quantize(128).save(OUT, optimize=True)  # a palette PNG: a fifth of the size, same look
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
