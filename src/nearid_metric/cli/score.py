"""``nearid-score REF GEN``: score generated images against references, from the shell.

Also runs as ``torchrun --nproc-per-node N -m nearid_metric.cli REF GEN ...`` (or with
``--distributed``): the ranks share the embedding work and rank 0 writes the one result.
``nearid-score download ...`` is :mod:`nearid_metric.cli.download`.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from nearid_metric.cli import compare, download
from nearid_metric.cli.common import (
    EXIT_NOTHING_SCORED,
    EXIT_OK,
    add_ci_arguments,
    add_model_arguments,
    check_output_folder,
    command_parser,
    load_scorers,
    logger,
    positive_int,
    run_command,
)
from nearid_metric.distributed import (
    launched_by_torchrun,
    missing_torchrun_variables,
    process_group,
    rank_and_world,
)
from nearid_metric.outputs import plural, write_scores
from nearid_metric.pairing import Pairing, pair_all, pair_by_name, pair_from_manifest, read_manifest
from nearid_metric.report import describe_ci
from nearid_metric.stats import mean_ci, summarize

if TYPE_CHECKING:
    from nearid_metric.scorer import Scorer


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "nearid-score",
        "Identity similarity (NearID cosine, -1..1, higher = identity better kept) of generated "
        "images to reference images.",
    )
    parser.add_argument("ref", type=Path, help="reference image folder (searched recursively) or file")
    parser.add_argument("gen", type=Path, help="generated image folder (searched recursively) or file")
    parser.add_argument("--pairing", choices=["name", "all", "manifest"], default="name",
                        help="name: same relative path without extension (default); all: every ref x every gen; "
                             "manifest: pairs listed in --manifest")
    parser.add_argument("--manifest", type=Path, help="CSV with columns ref,gen (paths relative to REF and GEN)")
    add_model_arguments(parser)
    parser.add_argument("--max-pixels", type=positive_int, metavar="N",
                        help=f"refuse images with more pixels as possible decompression bombs (default: PIL's "
                             f"{Image.MAX_IMAGE_PIXELS})")
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
    parser.epilog = ("nearid-score download [--model NAME] [--revision R] [--to DIR]: fetch and check weights first. "
                     "nearid-score compare RUN_A RUN_B [--groups ...]: compare two runs pair by pair.")
    return parser


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
    columns, rows = read_manifest(args.manifest)
    if args.ci_groups not in columns:
        parser.error(f"--ci-groups {args.ci_groups}: {args.manifest} has no such column "
                     f"(columns: {', '.join(columns)})")
    labels = [(row[args.ci_groups] or "").strip() for row in rows]
    if "" in labels:
        parser.error(f"{args.manifest}, line {labels.index('') + 2}: empty {args.ci_groups!r} (--ci-groups)")
    return labels


def report_problems(pairing: Pairing, failures: dict[str, str]) -> None:
    """One line on stderr per bad file, per folder not searched and per unpairable name."""
    for path, reason in failures.items():
        logger.warning("skipped %s: %s", path, reason)
    for folder, reason in pairing.skipped_folders.items():
        logger.warning("skipped folder %s: %s", folder, reason)
    for message in pairing.ambiguous:
        logger.warning("ambiguous: %s", message)
    for side, paths in (("reference", pairing.unmatched_refs), ("generated", pairing.unmatched_gens)):
        for path in paths:
            logger.warning("unmatched %s image: %s (no file with the same name on the other side)", side, path)
    if pairing.ignored:
        logger.info("ignored %s without an image extension", plural(len(pairing.ignored), "file"))


def main(argv: list[str] | None = None) -> int:
    """``nearid-score``: 0 when pairs were scored, 1 when nothing was (or ``--strict`` and something failed or was
    unmatched), 2 for usage errors. ``nearid-score download ...`` runs :func:`nearid_metric.cli.download.main`,
    ``nearid-score compare ...`` :func:`nearid_metric.cli.compare.main`."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["download"]:  # a reference folder literally named download: write ./download
        return download.main(argv[1:])
    if argv[:1] == ["compare"]:  # likewise ./compare
        return compare.main(argv[1:])
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
    check_outputs(args, parser)
    if args.max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = args.max_pixels  # PIL's decompression-bomb limit (loader workers take it along)

    def command() -> int:
        pairing = make_pairing(args, parser)
        args.groups = ci_groups(args, parser, pairing)
        with process_group(args.device) if args.distributed else nullcontext(None) as device:
            if device is not None:
                args.device = str(device)
            return run(args, pairing, load_scorers(args, parser))

    return run_command("nearid-score", command)


def check_outputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse ``--out`` and ``--report`` paths that cannot be written, before any work (usage errors)."""
    if args.out is not None:
        check_output_folder(args.out, "--out", parser)
        for name in ("scores.csv", "summary.json"):
            if (args.out / name).is_dir():
                parser.error(f"--out {args.out}: {args.out / name} is a folder")
    if args.report is not None:
        if args.report.is_dir():
            parser.error(f"--report {args.report} is a folder; give the HTML file to write")
        check_output_folder(args.report.parent, "--report's folder", parser)


def run(args: argparse.Namespace, pairing: Pairing, scorers: dict[str, Scorer]) -> int:
    """Embed every distinct image once (all models in one pass), score the pairs, report, write outputs.

    Under ``--distributed`` every rank takes part and returns the exit code; only rank 0
    reports and writes.
    """
    from nearid_metric.scorer import score_pairs

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
                            **mean_ci(values, groups, resamples=None if args.ci == "none" else args.ci_resamples,
                                      seed=args.ci_seed, unit=args.ci_groups)}
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
        "skipped_folders": [{"path": str(p), "reason": r} for p, r in pairing.skipped_folders.items()],
    }
    pairs = [(str(r), str(g)) for r, g in scored]
    if args.out is not None:
        write_scores(args.out, pairs, scores, summary)
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


if __name__ == "__main__":
    sys.exit(main())
