#!/usr/bin/env python
"""Time to the first score: one (reference, generation) pair scored by a fresh interpreter from a local
checkpoint folder, broken down into imports, weight loading (fp16 file -> the precision's dtype, on the device)
and the first score (decode, resize, first forward pass).

The checkpoint is written once in the released format (float16 ``model.safetensors`` under
``backbone.vision_model.``, config.json, preprocessor_config.json) with random weights, full size
(``--model so400m``, SigLIP2 so400m/14-384) or tiny. Each repeat is a new interpreter (the file is in the
OS page cache after the first, untimed, run); the median of each phase is reported, with its share of the
whole run, and the peak resident memory after loading (a second copy of the weights would show there).
Run: ``python benchmarks/first_score.py --help`` (the ``bench`` extra: transformers, for the writer).
"""

from __future__ import annotations

import argparse
import json
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


def run_child(folder: Path, ref: Path, gen: Path, device: str, precision: str) -> dict:
    """One fresh interpreter; adds its start-up (wall time outside the phases)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", str(folder), str(ref), str(gen), "--device", device,
                           "--precision", precision], capture_output=True, text=True)
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
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "REF", "GEN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.device, args.precision)))
        return 0
    sys.path.insert(0, str(HERE))
    import torch
    from embed_speed import MODELS, machine_description, random_image, write_random_checkpoint

    print(f"machine: {machine_description(torch.device(args.device))}")
    print(f"command: python benchmarks/first_score.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_checkpoint(Path(tmp) / "ckpt", MODELS[args.model], args.seed)
        ref, gen = Path(tmp) / "ref.jpg", Path(tmp) / "gen.jpg"
        random_image(args.seed, (1024, 768)).save(ref, quality=95)
        random_image(args.seed + 1, (768, 768)).save(gen, quality=90)
        size = (folder / "model.safetensors").stat().st_size / 2 ** 20
        run_child(folder, ref, gen, args.device, args.precision)  # untimed: fills the page cache
        runs = [run_child(folder, ref, gen, args.device, args.precision) for _ in range(args.repeats)]
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    whole = median["whole run"]
    print(f"{args.model} checkpoint ({size:.0f} MiB fp16), {args.precision} on {args.device}, one pair; "
          f"median of {args.repeats} fresh interpreters")
    print("| phase | seconds | share of the whole run |")
    print("|---|---:|---:|")
    for key in ("interpreter start + exit", "imports", "load", "first score", "whole run"):
        print(f"| {key} | {median[key]:.2f} | {median[key] / whole:.2f} |")
    print(f"sha256 of the weights file alone: {median['sha256 alone']:.2f} s ({median['sha256 alone'] / whole:.2f} "
          f"of the whole run); peak resident memory after loading: {median['peak MiB after load']:.0f} MiB "
          f"({median['peak MiB after load'] / size:.2f}x the file)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
