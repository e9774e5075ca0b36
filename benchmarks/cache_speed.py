#!/usr/bin/env python
"""Embedding cache: a re-run of ``nearid-score`` over the same folders, with the cache vs without.

N random JPEG files (sizes cycling as in ``embed_speed.py``) are written to a temporary
folder, half under ``ref/`` and half under ``gen/`` with the same names (N/2 pairs, N
distinct images), next to random full-size SigLIP2 so400m/14-384 weights in the released
NearID folder format (written by ``embed_speed.write_random_checkpoint``). Then, in one
process, ``nearid-score``'s own entry point (``nearid_metric.cli.score.main``) runs three times:

* **uncached**: no ``--cache``;
* **cold**: ``--cache DIR`` on an empty DIR (everything embedded and stored);
* **warm**: ``--cache DIR`` again (every embedding read back).

Each run is ``cli.main(argv)`` and loads its model afresh (as a new ``nearid-score`` process
would); the model loading (weights read and hashed for the signature) is timed apart from the
rest (pairing, hashing the files, embedding or reading the cache, statistics, output files).
Reported: seconds and images/s of each, the ratio uncached / warm of the scoring time (the
figure the target is about: >= 50x), the same ratio end to end (load included), the cold
run's overhead over the uncached one, and whether the warm and cold runs' ``scores.csv``
and ``summary.json`` statistics are identical to the uncached run's (they must be: the cache
stores the float32 embeddings bit for bit).

One warm-up pass (2 images, not timed) runs first so that the uncached run does not pay
torch's one-time start-up. Run ``python benchmarks/cache_speed.py --help``; ``--model tiny``
smoke-tests the script in seconds. Needs ``transformers`` (the ``bench`` extra) to write the
weights. Nothing is downloaded: the Hugging Face Hub is put in offline mode.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never contact the Hub from a benchmark
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from embed_speed import IMAGE_SIZES, MODELS, log, machine_description, random_image, timed  # noqa: E402
from embed_speed import write_random_checkpoint  # noqa: E402

from nearid_metric.cli import common, score  # noqa: E402
from nearid_metric.scorer import PRECISIONS  # noqa: E402

TARGET_RATIO = 50.0  # the target: a cached re-run >= 50x faster than an uncached one
RUNS = ("uncached", "cold", "warm")


def make_folders(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """``n`` distinct JPEG files: ``root/ref/img_i.jpg`` and ``root/gen/img_i.jpg`` (n // 2 names each)."""
    ref, gen = root / "ref", root / "gen"
    ref.mkdir(parents=True)
    gen.mkdir()
    for i in range(n):
        side = ref if i % 2 == 0 else gen
        random_image(seed + i, IMAGE_SIZES[i % len(IMAGE_SIZES)]).save(side / f"img_{i // 2:04d}.jpg", quality=90)
    return ref, gen


def score_once(argv: list[str], out: Path, device: torch.device) -> dict:
    """One ``nearid-score`` run (``score.main(argv)``, writing to ``out``), with the model loading timed apart.

    ``score_s`` is everything else: listing and pairing the files, hashing them, embedding or
    reading the cache, the statistics and the output files.
    """
    loads = []
    real_load = score.load_scorers

    def timed_load(*args, **kwargs):
        seconds, scorers, _ = timed(lambda: real_load(*args, **kwargs), device)
        loads.append(seconds)
        return scorers

    stdout = io.StringIO()
    score.load_scorers = timed_load  # main() looks it up in the module when it runs
    try:
        with contextlib.redirect_stdout(stdout):  # the run's own report (count, mean, signature)
            total_s, code, share = timed(lambda: score.main([*argv, "--out", str(out)]), device)
    finally:
        score.load_scorers = real_load
    if code != common.EXIT_OK:
        raise RuntimeError(f"nearid-score {shlex.join(argv)} exited with {code}:\n{stdout.getvalue()}")
    summary = json.loads((out / "summary.json").read_text())
    return {"load_s": sum(loads), "score_s": total_s - sum(loads), "cpu_share": share,
            "pairs": summary["pairs_scored"], "scores_csv": (out / "scores.csv").read_text(),
            "stats": {k: v for k, v in summary["models"]["nearid"].items() if k != "signature"}}


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    results = {"machine": machine_description(device), "command": command,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "runs": {}}
    t_total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nearid-cache-bench-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        folder = write_random_checkpoint(tmp / "checkpoint", MODELS[args.model], args.seed)
        ref, gen = make_folders(tmp / "images", args.num_images, args.seed)
        log(f"wrote a random {args.model} checkpoint and {args.num_images} JPEGs in {time.perf_counter() - t0:.1f}s")
        common = [str(ref), str(gen), "--model", str(folder), "--device", str(device), "--precision", args.precision,
                  "--no-progress"]
        common += ["--num-workers", str(args.num_workers)] if args.num_workers is not None else []
        common += ["--batch-size", str(args.batch_size)] if args.batch_size else []

        warmup = tmp / "warmup"
        (warmup / "ref").mkdir(parents=True)
        (warmup / "gen").mkdir()
        shutil.copyfile(next(ref.iterdir()), warmup / "ref" / "a.jpg")
        shutil.copyfile(next(gen.iterdir()), warmup / "gen" / "a.jpg")
        seconds = score_once([str(warmup / "ref"), str(warmup / "gen"), *common[2:]], tmp / "out-w", device)["score_s"]
        log(f"warm-up (2 images): {seconds:.1f}s")

        cache = tmp / "cache"
        for name in RUNS:
            r = score_once(common + (["--cache", str(cache)] if name != "uncached" else []), tmp / f"out-{name}",
                           device)
            r["img_s"] = args.num_images / r["score_s"]
            results["runs"][name] = r
            log(f"{name}: load {r['load_s']:.1f}s, scoring {r['score_s']:.3f}s ({r['img_s']:.3g} img/s, "
                f"CPU share {r['cpu_share']:.2f})")
        results["cache_bytes"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        results["cache_files"] = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    runs = results["runs"]
    base, warm = runs["uncached"], runs["warm"]
    results["ratio_scoring"] = base["score_s"] / warm["score_s"]
    results["ratio_end_to_end"] = (base["load_s"] + base["score_s"]) / (warm["load_s"] + warm["score_s"])
    results["cold_overhead"] = runs["cold"]["score_s"] / base["score_s"] - 1
    results["identical"] = {name: runs[name]["scores_csv"] == base["scores_csv"]
                            and runs[name]["stats"] == base["stats"] for name in ("cold", "warm")}
    for r in runs.values():
        del r["scores_csv"]
    results["total_seconds"] = time.perf_counter() - t_total
    return results


def markdown(results: dict) -> str:
    m, s, runs = results["machine"], results["settings"], results["runs"]
    out = ["## Machine", ""]
    out.append(f"- CPU: {m['cpu']}, {m['cpu_cores']} cores visible, torch threads {m['torch_threads']}")
    out.append(f"- GPU: {m['gpu']} (CUDA {m.get('cuda')})" if m["gpu"] else "- GPU: none used")
    out.append(f"- Python {m['python']}, torch {m['torch']}, timm {m['timm']}, transformers {m['transformers']}, "
               f"Pillow {m['pillow']}, nearid-metric {m['nearid_metric']}")
    out += ["", "## Settings", ""]
    out.append(f"- model: {s['model']} (random weights, seed {s['seed']}), precision {s['precision']}; "
               f"{s['num_images']} JPEG images ({', '.join(f'{w}x{h}' for w, h in IMAGE_SIZES)} cycled), "
               f"{s['num_images'] // 2} pairs by name; batch size {s['batch_size'] or 'auto'}, "
               f"num_workers {s['num_workers'] if s['num_workers'] is not None else 'nearid-score default'}")
    out.append(f"- command: `python {results['command']}`")
    out.append(f"- total run time: {results['total_seconds'] / 60:.1f} min")
    out += ["", "## Results", "",
            "Scoring: the whole `nearid-score` run except loading the model (pairing, hashing the files, "
            "embedding or reading the cache, statistics, output files).", "",
            "| run | model load s | scoring s | images/s (scoring) | end to end s | CPU share |",
            "|---|---:|---:|---:|---:|---:|"]
    for name in RUNS:
        r = runs[name]
        out.append(f"| {name} | {r['load_s']:.2f} | {r['score_s']:.3f} | {r['img_s']:.3g} | "
                   f"{r['load_s'] + r['score_s']:.2f} | {r['cpu_share']:.2f} |")
    ok = results["ratio_scoring"] >= TARGET_RATIO
    out += ["",
            f"- **uncached / warm (scoring): {results['ratio_scoring']:.0f}x** (target >= {TARGET_RATIO:.0f}x: "
            f"{'met' if ok else 'NOT met'})",
            f"- uncached / warm end to end (model load included): {results['ratio_end_to_end']:.1f}x",
            f"- cold run overhead (hashing, writing the cache) over uncached: {results['cold_overhead'] * 100:+.1f}%",
            f"- cache on disk: {results['cache_bytes'] / 1024:.0f} KiB in {len(results['cache_files'])} files "
            f"({', '.join(Path(f).name for f in results['cache_files'])})",
            "- scores identical to the uncached run (scores.csv byte for byte, summary statistics): "
            + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in results["identical"].items())]
    return "\n".join(out) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32", help="default: fp32")
    p.add_argument("--num-images", type=int, default=None,
                   help="distinct JPEG files (even; half references, half generations); default 48 on CPU, "
                        "2048 on CUDA")
    p.add_argument("--batch-size", type=int, default=None, help="nearid-score --batch-size (default: auto)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="nearid-score --num-workers (default: nearid-score's, min(8, CPU count))")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's default)")
    p.add_argument("--model", choices=sorted(MODELS), default="so400m",
                   help="so400m (default) or tiny: a smoke test of this script")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and images (default 0)")
    p.add_argument("--workdir", default=None, help="parent of the temporary checkpoint/image/cache folder")
    p.add_argument("--out", default=None, help="also write the markdown report here")
    p.add_argument("--json", default=None, help="also write the raw results here as JSON")
    args = p.parse_args(argv)
    on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.num_images = args.num_images or (2048 if on_cuda else 48)
    if args.num_images < 2 or args.num_images % 2:
        p.error("--num-images must be an even number >= 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    report = markdown(results)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(results["identical"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
