"""Regenerate ``docs/img/compare-example.png``: a ``nearid-score compare --report`` page of two synthetic runs,
rendered by headless Chromium. No model: the runs' scores.csv / summary.json are written directly, with drawn
pictures as the images so the thumbnails show.

    PYTHONPATH=src python docs/img/compare_example.py      # needs matplotlib and chromium on PATH
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from nearid_metric.cli.score import main

OUT = Path(__file__).resolve().parent / "compare-example.png"
WIDTH, HEIGHT = 1280, 2600  # the browser window, in CSS pixels; the PNG is 3/4 of that
SIGNATURES = {"nearid": "nearid:Aleksandar/nearid-siglip2@main|sha256:4f1c2a9e0b7d|fp32|v0.1.0",
              "dinov2": "dinov2:facebook/dinov2-large@main|sha256:9a0e77c1d3b2|fp32|v0.1.0"}


def picture(seed: int, shift: float) -> Image.Image:
    """An object (a coloured shape on a plain background); ``shift`` moves its colour and shape away."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(40, 220, 3)
    moved = np.clip(colour + shift * rng.normal(0, 90, 3), 0, 255).astype(int)
    image = Image.new("RGB", (96, 96), tuple(int(c) for c in rng.integers(200, 250, 3)))
    draw = ImageDraw.Draw(image)
    box = (18 + 20 * shift, 18, 78, 78 - 16 * shift)
    (draw.ellipse if seed % 2 else draw.rectangle)(box, fill=tuple(int(c) for c in moved), outline=(40, 40, 40))
    return image


def write_run(folder: Path, gen: str, scores: dict[str, np.ndarray], keep: list[int]) -> None:
    """A nearid-score --out folder of generations ``gen`` against refs/ (paths relative to the current folder)."""
    folder.mkdir(parents=True)
    root = Path(".")
    with open(folder / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ref", "gen", *scores])
        for i in keep:
            writer.writerow([root / "refs" / f"{i:02d}.png", root / gen / f"{i:02d}.png",
                             *(f"{v[i]:.8f}" for v in scores.values())])
    summary = {"ref": str(root / "refs"), "gen": str(root / gen),
               "models": {m: {"signature": SIGNATURES[m]} for m in scores}}
    (folder / "summary.json").write_text(json.dumps(summary))


def main_example() -> None:
    rng = np.random.default_rng(7)
    n = 40
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the runs name their images relative to here, as nearid-score writes them
        root = Path(".")
        for name in ("refs", "A", "B"):
            (root / name).mkdir()
        shift_a, shift_b = rng.uniform(0.2, 1.0, n), rng.uniform(0.0, 0.8, n)
        for i in range(n):
            picture(i, 0).save(root / "refs" / f"{i:02d}.png")
            picture(i, shift_a[i]).save(root / "A" / f"{i:02d}.png")
            picture(i, shift_b[i]).save(root / "B" / f"{i:02d}.png")
        noise = lambda: rng.normal(0, 0.02, n)  # noqa: E731
        a = {"nearid": 0.9 - 0.35 * shift_a + noise(), "dinov2": 0.8 - 0.2 * shift_a + noise()}
        b = {"nearid": 0.9 - 0.35 * shift_b + noise(), "dinov2": 0.8 - 0.2 * shift_b + noise()}
        write_run(Path("runs/A"), "A", a, list(range(n - 1)))  # without pair 39: only in B
        write_run(Path("runs/B"), "B", b, list(range(1, n)))  # without pair 0: only in A
        report = root / "compare.html"
        assert main(["compare", "runs/A", "runs/B", "--report", str(report)]) == 0
        shot = "shot.png"
        browser = next(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b))
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--virtual-time-budget=10000", "--run-all-compositor-stages-before-draw",
                        f"--user-data-dir={Path(tmp) / 'profile'}", f"--window-size={WIDTH},{HEIGHT}",
                        f"--screenshot={Path(tmp) / shot}", report.resolve().as_uri()], check=True, capture_output=True, timeout=120)
        image = Image.open(Path(tmp) / shot).convert("RGB")
        image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS).quantize(
            colors=96, method=Image.Quantize.MEDIANCUT).save(OUT, optimize=True)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main_example()
