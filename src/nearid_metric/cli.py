"""``nearid-score REF GEN``: score generated images against references, from the shell.

Also runs as ``torchrun --nproc-per-node N -m nearid_metric.cli REF GEN ...`` (or with
``--distributed``): the ranks share the embedding work and rank 0 writes the one result.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from nearid_metric._console import stderr_logging
from nearid_metric._version import __version__
from nearid_metric.distributed import launched_by_torchrun, missing_torchrun_variables, process_group, rank_and_world
from nearid_metric.pairing import Pairing, pair_all, pair_by_name, pair_from_manifest
from nearid_metric.scorer import PRECISIONS, Scorer, score_pairs
from nearid_metric.scorers import create_scorer, list_scorers

logger = logging.getLogger("nearid_metric")

EXIT_OK, EXIT_NOTHING_SCORED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nearid-score",
        description="Identity similarity (NearID cosine, -1..1, higher = identity better kept) of generated "
                    "images to reference images.",
    )
    parser.add_argument("ref", type=Path, help="reference image folder (searched recursively) or file")
    parser.add_argument("gen", type=Path, help="generated image folder (searched recursively) or file")
    parser.add_argument("--pairing", choices=["name", "all", "manifest"], default="name",
                        help="name: same relative path without extension (default); all: every ref x every gen; "
                             "manifest: pairs listed in --manifest")
    parser.add_argument("--manifest", type=Path, help="CSV with columns ref,gen (paths relative to REF and GEN)")
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, help="folder for scores.csv (per pair) and summary.json")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 if any file failed, was unmatched or ambiguous")
    parser.add_argument("--distributed", action="store_true",
                        help="share the work between the processes of a torchrun launch (implied when torchrun "
                             "starts more than one); rank 0 writes the results")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, device and batching flags shared by every command that embeds images."""
    parser.add_argument("--model", default="nearid",
                        help=f"comma-separated scorers: {', '.join(list_scorers())}; NAME=WEIGHTS picks other "
                             f"weights (local folder, registry name or Hub repo id); a bare folder or repo id "
                             f"means nearid with those weights (default: nearid)")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of the weights; one model only")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--compile", action="store_true", help="run the models through torch.compile")
    parser.add_argument("--batch-size", type=_positive_int,
                        help="images per forward pass (default: sized to the device; on CUDA it starts large and "
                             "halves on out-of-memory errors)")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="image decoding processes (default: min(8, CPU count))")
    parser.add_argument("--cache", type=Path, metavar="DIR",
                        help="embedding cache folder: embeddings of images seen before (same content, same model, "
                             "weights, precision, preprocessing and package version) are reused, new ones stored")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_models(spec: str) -> list[tuple[str, str, str | None]]:
    """``--model`` -> ``[(column, scorer name, weights or None)]``.

    Items are ``NAME``, ``NAME=WEIGHTS`` or (for NearID) a bare folder / repo id. The column
    is the scorer name, or the item as written when one scorer appears more than once.
    """
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ValueError("--model is empty")
    models = []
    for item in items:
        name, _, weights = item.partition("=")
        if name in list_scorers():
            models.append((item, name, weights or None))
        elif "=" in item:
            raise ValueError(f"unknown scorer {name!r} in --model; known: {', '.join(list_scorers())}")
        else:
            models.append((item, "nearid", item))
    names = [name for _, name, _ in models]
    models = [(name if names.count(name) == 1 else item, name, weights) for item, name, weights in models]
    if len({column for column, _, _ in models}) != len(models):
        raise ValueError(f"--model lists a model twice: {spec!r}")
    return models


def load_scorers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Scorer]:
    """Build the ``--model`` scorers, by column name; bad specs are usage errors."""
    try:
        models = parse_models(args.model)
    except ValueError as e:
        parser.error(str(e))
    if args.revision is not None and len(models) > 1:
        parser.error("--revision applies to one model; pin each model's weights with NAME=FOLDER instead")
    return {column: create_scorer(name, pretrained=weights, revision=args.revision, device=args.device,
                                  precision=args.precision, compile=args.compile)
            for column, name, weights in models}


def make_pairing(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Pairing:
    for root in (args.ref, args.gen):
        if not root.exists():
            parser.error(f"{root} does not exist")
    if args.pairing == "manifest":
        if args.manifest is None:
            parser.error("--pairing manifest needs --manifest FILE")
        try:
            return pair_from_manifest(args.manifest, args.ref, args.gen)
        except (OSError, ValueError) as e:
            parser.error(str(e))
    if args.manifest is not None:
        parser.error("--manifest is only used with --pairing manifest")
    return pair_all(args.ref, args.gen) if args.pairing == "all" else pair_by_name(args.ref, args.gen)


def summarize(scores: np.ndarray) -> dict[str, float | int | None]:
    """count, mean, std (sample, ddof=1), median, min, max of the pair scores (in float64); None where undefined."""
    def number(x: float) -> float | None:
        return None if math.isnan(x) else float(x)

    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    return {
        "count": n,
        "mean": number(scores.mean()) if n else None,
        "std": number(scores.std(ddof=1)) if n > 1 else None,
        "median": number(np.median(scores)) if n else None,
        "min": number(scores.min()) if n else None,
        "max": number(scores.max()) if n else None,
    }


def report_problems(pairing: Pairing, failures: dict[str, str]) -> None:
    """One line on stderr per bad file and per unpairable name."""
    for path, reason in failures.items():
        logger.warning("skipped %s: %s", path, reason)
    for message in pairing.ambiguous:
        logger.warning("ambiguous: %s", message)
    for side, paths in (("reference", pairing.unmatched_refs), ("generated", pairing.unmatched_gens)):
        for path in paths:
            logger.warning("unmatched %s image: %s (no file with the same name on the other side)", side, path)
    if pairing.ignored:
        logger.info("ignored %d files without an image extension", len(pairing.ignored))


def write_outputs(out: Path, pairs: list[tuple[str, str]], scores: dict[str, np.ndarray], summary: dict) -> None:
    """``scores.csv`` (ref, gen, one column per model, 8 decimals) and ``summary.json``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ref", "gen", *scores])
        for i, (ref, gen) in enumerate(pairs):
            writer.writerow([ref, gen, *(f"{values[i]:.8f}" for values in scores.values())])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.distributed = args.distributed or launched_by_torchrun()
    if args.distributed and missing_torchrun_variables():
        parser.error(f"--distributed needs the environment torchrun sets ({', '.join(missing_torchrun_variables())} "
                     f"missing): torchrun --nproc-per-node N -m nearid_metric.cli REF GEN ...")
    with stderr_logging("nearid-score"):
        pairing = make_pairing(args, parser)
        with process_group(args.device) if args.distributed else nullcontext(None) as device:
            if device is not None:
                args.device = str(device)
            return run(args, pairing, load_scorers(args, parser))


def run(args: argparse.Namespace, pairing: Pairing, scorers: dict[str, Scorer]) -> int:
    """Embed every distinct image once (all models in one pass), score the pairs, report, write outputs.

    Under ``--distributed`` every rank takes part and returns the exit code; only rank 0
    reports and writes.
    """
    values, ok, failures = score_pairs(list(scorers.values()), pairing.pairs, batch_size=args.batch_size,
                                       num_workers=args.num_workers, progress=False if args.no_progress else None,
                                       cache_dir=args.cache, distributed=args.distributed)
    scored = [pair for pair, good in zip(pairing.pairs, ok.tolist()) if good]
    problems = failures or pairing.unmatched_refs or pairing.unmatched_gens or pairing.ambiguous
    code = EXIT_NOTHING_SCORED if not scored or (args.strict and problems) else EXIT_OK
    if rank_and_world(args.distributed)[0] > 0:
        return code
    scores = {column: v[ok].numpy() for column, v in zip(scorers, values)}
    report_problems(pairing, failures)

    summary = {
        "models": {column: {"signature": scorers[column].signature, **summarize(values)}
                   for column, values in scores.items()},
        "pairing": args.pairing,
        "ref": str(args.ref),
        "gen": str(args.gen),
        "pairs_total": len(pairing.pairs),
        "pairs_scored": len(scored),
        "pairs_skipped": len(pairing.pairs) - len(scored),
        "failures": [{"path": p, "reason": r} for p, r in failures.items()],
        "unmatched": {"ref": [str(p) for p in pairing.unmatched_refs], "gen": [str(p) for p in pairing.unmatched_gens]},
        "ambiguous": pairing.ambiguous,
        "ignored_files": [str(p) for p in pairing.ignored],
    }
    if args.out is not None:
        write_outputs(args.out, [(str(r), str(g)) for r, g in scored], scores, summary)

    print(f"count: {len(scored)}")
    for column, values in scores.items():
        print(f"{column}: mean {values.mean():.6f}" if scored else f"{column}: mean n/a (nothing scored)")
        print(f"{column}: signature {scorers[column].signature}")
    return code


if __name__ == "__main__":
    sys.exit(main())
