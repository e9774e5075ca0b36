#!/usr/bin/env python
"""Training epoch time of ``nearid-train``: trunk tokens from the feature cache vs through the trunk.

One process runs :func:`nearid_metric.train.loop.train` three times on the same synthetic NearID
folder (JPEG files; every sample has 3 views and 3 distractors), from the same random
SigLIP2 weights (full-size so400m/14-384 by default, written once in the released folder
format by ``embed_speed.write_random_checkpoint``), with the same seed and settings:

1. uncached: every step decodes the images and runs the frozen trunk, then the head;
2. cached, cold: the feature cache is filled first (the trunk's tokens of every image,
   fp16), then the epochs read the tokens from it;
3. cached, warm: a second run on the filled cache (nothing is computed before training).

Nothing is held out (no per-epoch evaluation). An epoch's time is that of its training steps:
the time spent writing checkpoints (about 180 MB of head and AdamW state for so400m, once per
epoch here, once per 500 steps in a real run) is measured and left out. The figure that counts
is the uncached / cached epoch-time ratio. The
script also prints the per-step loss difference between the runs (the fp16 cache changes the
losses by rounding only) and the cache's disk use per image.

Run ``python benchmarks/train_speed.py --help``. Needs ``transformers`` (the ``bench`` extra)
to write the weights. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never contact the Hub from a benchmark

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_speed import MODELS, IMAGE_SIZES, machine_description, random_image, write_random_checkpoint  # noqa: E402

import nearid_metric.train.loop as training  # noqa: E402
from nearid_metric.train.config import TrainConfig  # noqa: E402
from nearid_metric.train.loop import train  # noqa: E402

SLOT_FILES = tuple(f"view_{k}.jpg" for k in range(3)) + tuple(f"distractor_{k}.jpg" for k in range(3))


def write_nearid_folder(root: Path, samples: int, seed: int) -> int:
    """``root/<sample>/view_K.jpg, distractor_K.jpg`` with distinct random pictures; returns the image count."""
    n = 0
    for s in range(samples):
        folder = root / f"sample_{s:04d}"
        folder.mkdir(parents=True)
        for name in SLOT_FILES:
            random_image(seed + n, IMAGE_SIZES[n % len(IMAGE_SIZES)]).save(folder / name, quality=90)
            n += 1
    return n


def step_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class CheckpointTimer:
    """Wraps ``nearid_metric.train.loop._atomic_save`` (checkpoint writes) and adds up the seconds spent in it."""

    def __init__(self):
        self.seconds = 0.0
        self._save = training._atomic_save

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        self._save(*args, **kwargs)
        self.seconds += time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="nearid-train-speed-") as tmp:
        tmp = Path(tmp)
        base = write_random_checkpoint(tmp / "base", MODELS[args.model], seed=0)
        images = write_nearid_folder(tmp / "data", args.samples, seed=100)
        common = dict(base=str(base), nearid_folder=[str(tmp / "data")], eval_fraction=0.0, epochs=args.epochs,
                      batch_size=args.batch_size, seed=0, precision=args.precision, device=args.device,
                      num_workers=args.num_workers, checkpoint_every=10 ** 9, log_every=1, progress=False)
        runs = {}
        for name, cache in (("uncached", None), ("cached, cold", tmp / "cache"), ("cached, warm", tmp / "cache")):
            out = tmp / name.replace(", ", "-")
            config = TrainConfig(out=str(out), cache_dir=None if cache is None else str(cache), **common)
            print(f"{name} ...", file=sys.stderr, flush=True)
            training._atomic_save = timer = CheckpointTimer()
            start = time.perf_counter()
            try:
                summary = train(config)
            finally:
                training._atomic_save = timer._save
            wall = time.perf_counter() - start
            runs[name] = {"wall_s": wall, "epoch_s": (summary["seconds"] - timer.seconds) / args.epochs,
                          "checkpoint_s": timer.seconds, "losses": step_losses(out)}
        cache_bytes = folder_bytes(tmp / "cache")
    uncached = runs["uncached"]["losses"]
    for figures in runs.values():
        losses = figures.pop("losses")
        figures["max_rel_loss_diff"] = float(np.max(np.abs(np.subtract(losses, uncached)) / np.abs(uncached)))
    return {
        "command": "python benchmarks/train_speed.py " + " ".join(sys.argv[1:]),
        "machine": machine_description(device),
        "settings": {"model": args.model, "samples": args.samples, "images": images, "epochs": args.epochs,
                     "batch_size": args.batch_size, "precision": args.precision, "device": args.device,
                     "num_workers": args.num_workers},
        "runs": runs,
        "cache_bytes_per_image": cache_bytes / images,
        "ratio_uncached_over_cached_epoch": runs["uncached"]["epoch_s"] / runs["cached, warm"]["epoch_s"],
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"Command: `{result['command']}`; model {s['model']}, {s['samples']} samples ({s['images']} JPEG images), "
        f"{s['epochs']} epochs, batch {s['batch_size']}, precision {s['precision']}, device {s['device']}, "
        f"{s['num_workers']} loader workers.",
        "",
        "| run | whole run (s) | epoch, steps only (s) | checkpoints (s) | max rel. step-loss diff vs uncached |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in result["runs"].items():
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['epoch_s']:.2f} | {r['checkpoint_s']:.1f} "
                     f"| {r['max_rel_loss_diff']:.2e} |")
    lines += ["", f"Uncached / cached epoch time: **{result['ratio_uncached_over_cached_epoch']:.1f}x**. "
                  f"Feature cache on disk: {result['cache_bytes_per_image'] / 2 ** 20:.3f} MiB per image."]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="so400m",
                        help="so400m (full size, default) or tiny (a seconds-long smoke run)")
    parser.add_argument("--samples", type=int, default=8, help="NearID samples (6 images each)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="auto: fp16 with loss scaling on CUDA, fp32 on CPU (nearid-train's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result["machine"], indent=2))
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
