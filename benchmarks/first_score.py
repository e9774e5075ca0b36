#!/usr/bin/env python
"""Time to the first score: one (reference, generation) pair scored by a fresh interpreter from a local
checkpoint folder, broken down into imports, weight loading (fp16 file -> the precision's dtype, on the device)
and the first score (decode, resize, first forward pass).

The checkpoint is written once in the released format (float16 ``model.safetensors`` under
``backbone.vision_model.``, config.json, preprocessor_config.json) with random weights, full size
(``--model so400m``, SigLIP2 so400m/14-384) or tiny. Each repeat is a new interpreter (the file is in the
OS page cache after the first, untimed, run); the median of each phase is reported, with its share of the
whole run, and the peak resident memory after loading (a second copy of the weights would show there).
``--baseline-src DIR`` also runs another checkout's ``src`` (e.g. ``git archive`` of an older commit), the two
alternating run by run, and prints the ratio this tree / that one per phase.
Run: ``python benchmarks/first_score.py --help`` (the ``bench`` extra: transformers, for the writer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(folder: str, ref: str, gen: str, device: str, precision: str) -> dict:
    """In the fresh interpreter: the phases' seconds and the peak memory, as a dict."""
    import resource

    start = time.perf_counter()
    import nearid_metric.model  # noqa: F401  (torch and timm, as a load would import them)
    import nearid_metric.scorer  # noqa: F401
    from nearid_metric.hub import file_sha256
    from nearid_metric.scorers import create_scorer

    imported = time.perf_counter()
    scorer = create_scorer("nearid", pretrained=folder, device=device, precision=precision)
    loaded = time.perf_counter()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from nearid_metric.scorer import score_pairs

    scores, _, failures = score_pairs([scorer], [(ref, gen)], num_workers=0, progress=False)
    done = time.perf_counter()
    if failures:
        raise RuntimeError(f"the pair failed: {failures}")
    hash_start = time.perf_counter()  # what the signature's sha256 costs on its own (after the run)
    file_sha256(Path(folder) / "model.safetensors")
    return {"imports": imported - start, "load": loaded - imported, "first score": done - loaded,
            "sha256 alone": time.perf_counter() - hash_start, "peak MiB after load": rss_loaded,
            "score": scores[0][0].item()}


def run_child(folder: Path, ref: Path, gen: Path, device: str, precision: str, src: Path | None = None) -> dict:
    """One fresh interpreter (importing nearid_metric from ``src`` when given); adds its start-up and exit (the
    wall time outside the phases)."""
    env = dict(os.environ, PYTHONPATH=str(src)) if src is not None else None
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", str(folder), str(ref), str(gen), "--device", device,
                           "--precision", precision], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the child run failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["interpreter start + exit"] = wall - result["imports"] - result["load"] - result["first score"]
    result["whole run"] = wall
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("so400m", "tiny"), default="so400m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-src", type=Path, metavar="DIR",
                        help="another checkout's src folder, run alternately with this one for the ratio")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "REF", "GEN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.device, args.precision)))
        return 0
    sys.path.insert(0, str(HERE))
    import torch
    from embed_speed import (
        MODELS,
        machine_description,
        random_image,
        write_random_checkpoint,
    )

    print(f"machine: {machine_description(torch.device(args.device))}")
    print(f"command: python benchmarks/first_score.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_checkpoint(Path(tmp) / "ckpt", MODELS[args.model], args.seed)
        ref, gen = Path(tmp) / "ref.jpg", Path(tmp) / "gen.jpg"
        random_image(args.seed, (1024, 768)).save(ref, quality=95)
        random_image(args.seed + 1, (768, 768)).save(gen, quality=90)
        size = (folder / "model.safetensors").stat().st_size / 2 ** 20
        trees = {"this tree": None, **({"baseline": args.baseline_src.resolve()} if args.baseline_src else {})}
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for src in trees.values():
            run_child(folder, ref, gen, args.device, args.precision, src)  # untimed: fills the page cache
        for _ in range(args.repeats):
            for name, src in trees.items():
                runs[name].append(run_child(folder, ref, gen, args.device, args.precision, src))
    median = {name: {key: statistics.median(run[key] for run in done) for key in done[0]} for name, done in runs.items()}
    print(f"{args.model} checkpoint ({size:.0f} MiB fp16), {args.precision} on {args.device}, one pair; "
          f"median of {args.repeats} fresh interpreters per tree")
    names = list(trees)
    header = " | ".join(f"{name} s | share" for name in names)
    print(f"| phase | {header} |{' this / baseline |' if len(names) > 1 else ''}")
    print("|---|" + "---:|---:|" * len(names) + ("---:|" if len(names) > 1 else ""))
    for key in ("interpreter start + exit", "imports", "load", "first score", "whole run"):
        cells = " | ".join(f"{median[n][key]:.2f} | {median[n][key] / median[n]['whole run']:.2f}" for n in names)
        ratio = f" {median[names[0]][key] / median[names[1]][key]:.2f} |" if len(names) > 1 else ""
        print(f"| {key} | {cells} |{ratio}")
    for name in names:
        m = median[name]
        print(f"{name}: sha256 of the weights file alone {m['sha256 alone']:.2f} s "
              f"({m['sha256 alone'] / m['whole run']:.2f} of the whole run); peak resident memory after loading "
              f"{m['peak MiB after load']:.0f} MiB ({m['peak MiB after load'] / size:.2f}x the file)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
