"""``nearid-score REF GEN``: score generated images against references, from the shell.

Also runs as ``torchrun --nproc-per-node N -m nearid_metric.cli REF GEN ...`` (or with
``--distributed``): the ranks share the embedding work and rank 0 writes the one result.
``nearid-score download [--model NAME] [--revision R] [--to DIR]`` fetches and checks a
scorer's weights (:func:`download_main`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shlex
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from nearid_metric._console import stderr_logging
from nearid_metric._version import __version__
from nearid_metric.distributed import launched_by_torchrun, missing_torchrun_variables, process_group, rank_and_world
from nearid_metric.hub import ChecksumError, Download, download_checkpoint, registry
from nearid_metric.pairing import Pairing, pair_all, pair_by_name, pair_from_manifest
from nearid_metric.report import describe_ci
from nearid_metric.scorer import PRECISIONS, Scorer, score_pairs
from nearid_metric.scorers import create_scorer, list_scorers, resolve_layout, scorer_info
from nearid_metric.stats import BOOTSTRAP_RESAMPLES, CI_LEVEL, bootstrap_ci

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
    parser.add_argument("--report", type=Path, metavar="FILE",
                        help="also write a self-contained HTML report (summary, histograms, lowest- and highest-"
                             "scoring pairs, failed files); needs pip install 'nearid-metric[report]'")
    add_ci_arguments(parser, groups=True)
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 if any file failed, was unmatched or ambiguous")
    parser.add_argument("--distributed", action="store_true",
                        help="share the work between the processes of a torchrun launch (implied when torchrun "
                             "starts more than one); rank 0 writes the results")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.epilog = "nearid-score download [--model NAME] [--revision R] [--to DIR]: fetch and check weights first."
    return parser


def add_ci_arguments(parser: argparse.ArgumentParser, *, groups: bool) -> None:
    """``--ci``, ``--ci-resamples``, ``--ci-seed`` (and ``--ci-groups`` where pairs can be grouped)."""
    ci = parser.add_argument_group("confidence intervals (95%)")
    ci.add_argument("--ci", choices=["bootstrap", "none"], default="bootstrap",
                    help="percentile bootstrap interval of each mean / rate (default), or none")
    ci.add_argument("--ci-resamples", type=_positive_int, default=BOOTSTRAP_RESAMPLES, metavar="N",
                    help=f"bootstrap resamples (default {BOOTSTRAP_RESAMPLES})")
    ci.add_argument("--ci-seed", type=int, default=0, metavar="SEED", help="seed of the resampling (default 0)")
    if groups:
        ci.add_argument("--ci-groups", default="none", metavar="none|ref|COLUMN",
                        help="what is resampled: none = single pairs (default); ref = all pairs of one reference "
                             "image together; COLUMN = a column of --manifest (e.g. prompt) whose rows with one "
                             "value are resampled together")


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
    """Build the ``--model`` scorers, by column name; bad specs are usage errors, refused weights exit 1."""
    try:
        models = parse_models(args.model)
    except ValueError as e:
        parser.error(str(e))
    if args.revision is not None and len(models) > 1:
        parser.error("--revision applies to one model; pin each model's weights with NAME=FOLDER instead")
    try:
        return {column: create_scorer(name, pretrained=weights, revision=args.revision, device=args.device,
                                      precision=args.precision, compile=args.compile)
                for column, name, weights in models}
    except ChecksumError as e:  # weights that differ from the recorded hash: a message, not a traceback
        logger.error("%s", e)
        raise SystemExit(EXIT_NOTHING_SCORED) from None


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


def ci_groups(args: argparse.Namespace, parser: argparse.ArgumentParser, pairing: Pairing) -> list[str] | None:
    """The resampling group of every pair of ``pairing`` for ``--ci-groups`` (None: each pair alone)."""
    if args.ci == "none" or args.ci_groups == "none":
        return None
    if args.ci_groups == "ref":
        return [str(ref) for ref, _ in pairing.pairs]
    if args.pairing != "manifest":
        parser.error(f"--ci-groups {args.ci_groups}: a column name needs --pairing manifest (or use none or ref)")
    with open(args.manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if args.ci_groups not in (reader.fieldnames or ()):
            parser.error(f"--ci-groups {args.ci_groups}: {args.manifest} has no such column "
                         f"(columns: {', '.join(reader.fieldnames or ())})")
        labels = [(row[args.ci_groups] or "").strip() for row in reader]
    if "" in labels:
        parser.error(f"{args.manifest}, line {labels.index('') + 2}: empty {args.ci_groups!r} (--ci-groups)")
    return labels


def ci_summary(values: np.ndarray, groups: Sequence[str] | None, args: argparse.Namespace) -> dict:
    """``ci95`` ([low, high], null when off or undefined) and ``ci`` (how it was computed) of one model's scores."""
    if args.ci == "none":
        return {"ci95": None, "ci": None}
    low, high = bootstrap_ci(values, groups=groups, resamples=args.ci_resamples, seed=args.ci_seed, level=CI_LEVEL)
    unit = "pair" if groups is None else args.ci_groups
    return {"ci95": None if math.isnan(low) else [low, high],
            "ci": {"method": "percentile bootstrap", "level": CI_LEVEL, "resamples": args.ci_resamples,
                   "seed": args.ci_seed, "unit": unit,
                   "n_units": len(values) if groups is None else len(set(groups))}}


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
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["download"]:  # a reference folder literally named download: write ./download
        return download_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    args.distributed = args.distributed or launched_by_torchrun()
    if args.distributed and missing_torchrun_variables():
        parser.error(f"--distributed needs the environment torchrun sets ({', '.join(missing_torchrun_variables())} "
                     f"missing): torchrun --nproc-per-node N -m nearid_metric.cli REF GEN ...")
    if args.report is not None:
        from nearid_metric.report import require_matplotlib

        try:
            require_matplotlib()
        except ImportError as e:
            parser.error(str(e))
    with stderr_logging("nearid-score"):
        pairing = make_pairing(args, parser)
        args.groups = ci_groups(args, parser, pairing)
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
    groups = getattr(args, "groups", None)
    groups = None if groups is None else [label for label, good in zip(groups, ok.tolist()) if good]
    report_problems(pairing, failures)

    summary = {
        "models": {column: {"signature": scorers[column].signature, **summarize(values),
                            **ci_summary(values, groups, args)}
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
    pairs = [(str(r), str(g)) for r, g in scored]
    if args.out is not None:
        write_outputs(args.out, pairs, scores, summary)
    if args.report is not None:
        from nearid_metric.report import write_report

        write_report(args.report, pairs, scores, summary)
        logger.info("report written to %s", args.report)

    print(f"count: {len(scored)}")
    if scored and args.ci != "none":
        print(describe_ci(next(iter(summary["models"].values()))["ci"]))
    for column, values in scores.items():
        ci95 = summary["models"][column]["ci95"]
        interval = f"  95% CI [{ci95[0]:.6f}, {ci95[1]:.6f}]" if ci95 else "  95% CI n/a" if args.ci != "none" else ""
        print(f"{column}: mean {values.mean():.6f}{interval}" if scored else f"{column}: mean n/a (nothing scored)")
        print(f"{column}: signature {scorers[column].signature}")
    return code


# --- nearid-score download ------------------------------------------------------------------------


def build_download_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nearid-score download",
        description="Fetch a scorer's weights into the Hugging Face cache (or --to DIR), check each file's sha256 "
                    "against the registry (or print it when none is recorded) and print the --model value that "
                    "loads them offline.",
    )
    parser.add_argument("--model", default="nearid",
                        help=f"comma-separated scorers ({', '.join(list_scorers())}); NAME=WEIGHTS for a registry "
                             f"name or Hub repo id; a bare repo id means nearid with those weights (default: nearid)")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit); one model only")
    parser.add_argument("--to", type=Path, metavar="DIR",
                        help="also copy the files into DIR and record their hashes in DIR/nearid-weights.json "
                             "(one model only)")
    return parser


def download_main(argv: list[str]) -> int:
    """``nearid-score download``: 0 when every model's files are there and match what is recorded, else 1."""
    parser = build_download_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)} (to score a reference folder named 'download', "
                     f"write ./download)")
    try:
        models = parse_models(args.model)
    except ValueError as e:
        parser.error(str(e))
    if len(models) > 1 and (args.revision or args.to):
        parser.error("--revision and --to apply to one model; download the models one at a time")
    code = EXIT_OK
    with stderr_logging("nearid-score download"):
        for column, name, weights in models:
            source = weights or scorer_info(name).weights
            try:
                _, layout = resolve_layout(name, source, args.revision)  # the files of the layout the source is in
                fetched = download_checkpoint(source, revision=args.revision, files=layout.files, to=args.to)
            except ChecksumError as e:
                logger.error("%s: %s", column, e)
                code = EXIT_NOTHING_SCORED
                continue
            except (FileNotFoundError, ValueError, OSError) as e:
                logger.error("%s: cannot download %s: %s", column, source, e)
                code = EXIT_NOTHING_SCORED
                continue
            print_download(name, source, fetched, args.revision)
    return code


def print_download(name: str, source: str, fetched: Download, revision: str | None = None) -> None:
    """The files, their hashes and status, how to pin unrecorded hashes, and the --model value to use."""
    checkpoint = fetched.checkpoint
    print(f"{name}: {checkpoint.source}@{checkpoint.revision} in {checkpoint.folder}")
    width = max(map(len, fetched.sha256))
    for file, digest in fetched.sha256.items():
        if file in fetched.recorded:
            status = "verified against the registry"
        elif fetched.record_file is not None:
            status = f"not in the registry; recorded in {fetched.record_file.name}"
        else:
            status = "not recorded in the registry"
        print(f"  {file.ljust(width)}  sha256 {digest}  {status}")
    missing = [file for file in fetched.sha256 if file not in fetched.recorded]
    if missing:
        pin = {"revision": checkpoint.revision, "sha256": fetched.sha256}
        entry = f'"{source}"' if source in registry() else f"of {checkpoint.source} (add one)"
        print(f"{name}: to pin these files, set in the registry entry {entry} (weights/registry.json): "
              f"{json.dumps(pin)}")
    print(f"{name}: use --model {shlex.quote(f'{name}={checkpoint.folder}')}")
    if fetched.record_file is None:
        by_name = name if source == scorer_info(name).weights else f"{name}={source}"
        pinned = f" --revision {shlex.quote(revision)}" if revision else ""
        print(f"{name}: or, from the cache with HF_HUB_OFFLINE=1: --model {shlex.quote(by_name)}{pinned}")


if __name__ == "__main__":
    sys.exit(main())
