"""``nearid-bench``: the NearID and MTG benchmarks (:mod:`nearid_metric.bench`) from the shell.

Formats and decisions: ``docs/protocol.md``, section "Running the benchmark".
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nearid_metric._version import __version__
from nearid_metric.bench import (
    ALL,
    FOREGROUND,
    FULL,
    PAPER,
    benchmark_results,
    ci_description,
    format_table,
    load_samples,
    model_signatures,
    mtg_similarity_table,
    nearid_similarity_table,
    sample_groups,
)
from nearid_metric.bench_files import read_similarities, write_results, write_similarities
from nearid_metric.cli.common import (
    EXIT_NOTHING_SCORED,
    EXIT_OK,
    add_ci_arguments,
    add_model_arguments,
    check_output_folder,
    command_parser,
    load_scorers,
    logger,
    run_command,
)
from nearid_metric.data import MTGSample, NearIDSample
from nearid_metric.masking import MASK_FILLS, foreground_samples, require_opencv
from nearid_metric.outputs import write_json
from nearid_metric.selection import read_selection
from nearid_metric.similarity import unique_images

if TYPE_CHECKING:
    from nearid_metric.scorer import Scorer


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "nearid-bench",
        "Run scorers over the NearID or MTG benchmark: per-sample similarities (each image embedded "
        "once per model) and SSR / PA / H per model and group, in percent. Give one data source.",
    )
    source = parser.add_argument_group("data (one source per run)")
    source.add_argument("--nearid-folder", nargs="+", type=Path, metavar="ROOT",
                        help="NearID image folders ROOT/<sample>/view_K.png, distractor_K.png (one group) or "
                             "ROOT/<group>/<sample>/... (K = 0, 1, 2)")
    source.add_argument("--positives", nargs="+", metavar="TABLE",
                        help="NearID positives: .parquet/.arrow file(s) or a folder of them (id, img1..img3 or "
                             "images1..images3; masks1..masks3 when present)")
    source.add_argument("--distractors", nargs="+", metavar="TABLE",
                        help="NearID distractor tables (id, img1..3 or nimg1..3), one group each: a file or a "
                             "folder of shards")
    source.add_argument("--distractor-prefix", choices=["auto", "img", "nimg"],
                        help="distractor image columns (default: auto, whichever is present)")
    source.add_argument("--mtg", nargs="+", metavar="TABLE", help="MTG tables, one group each: a file or a folder")
    source.add_argument("--group", nargs="+", metavar="NAME",
                        help="group names, one per --distractors, --nearid-folder or --mtg source (default: the "
                             "file or folder name; the group folders of a two-level --nearid-folder)")
    source.add_argument("--hf", action="store_true",
                        help="--positives/--distractors/--mtg are Hugging Face dataset repo ids or local dataset "
                             "folders (needs pip install 'nearid-metric[hf]')")
    source.add_argument("--split", help="dataset split with --hf (default: train for NearID, test for MTG)")
    source.add_argument("--data-revision", help="dataset revision (branch, tag or commit) with --hf")
    source.add_argument("--from-csv", nargs="+", type=Path, metavar="FILE",
                        help="recompute the table from saved similarity CSVs (no model is loaded); a 'model' "
                             "column tells models apart (default: the file name)")
    source.add_argument("--ids", type=Path, metavar="FILE",
                        help="score only the samples listed: a JSON list of row positions (0-based, in the positives "
                             "/ MTG table, like the reference's splits/test.json) or sample ids, or a text file with "
                             "one sample id per line")
    source.add_argument("--score-scale", type=float, metavar="S",
                        help="with --from-csv: divide every similarity by S (e.g. 10 for a VLM judge's 1-10 ratings)")
    choice = parser.add_argument_group("evaluation")
    choice.add_argument("--pool", choices=[ALL, PAPER], default=ALL,
                        help="all: one pooled row over every group (default); paper: also the paper's headline pool "
                             "(group 'paper'): every distractor source except FluxC and FluxC_1024")
    choice.add_argument("--masks", action="store_true",
                        help="foreground-only scoring, as the paper's fg rows: pixels outside each image's mask set "
                             "to --mask-fill (NearID masks cleaned as the reference does; needs pip install "
                             "'nearid-metric[masks]'); rows marked mask = fg")
    choice.add_argument("--mask-fill", choices=sorted(MASK_FILLS), default="black",
                        help="colour of the background with --masks (default black, as the reference)")
    add_model_arguments(parser)
    add_ci_arguments(parser, groups=False)
    parser.set_defaults(model=None)  # None: not given (--from-csv refuses it); else defaults to nearid
    parser.add_argument("--out", type=Path,
                        help="folder for similarities.csv, table.csv, table.json and summary.json")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any image or mask could not be read")
    return parser


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Exactly one data source, and only the flags that apply to it (usage errors exit 2)."""
    given = [flag for flag, value in (("--nearid-folder", args.nearid_folder),
                                      ("--positives/--distractors", args.positives or args.distractors),
                                      ("--mtg", args.mtg), ("--from-csv", args.from_csv)) if value]
    if not given:
        parser.error("no data: give --nearid-folder ROOT, --positives P --distractors D, --mtg TABLE or "
                     "--from-csv FILE")
    if len(given) > 1:
        parser.error(f"one data source per run, got {' and '.join(given)}")
    if bool(args.positives) != bool(args.distractors):
        parser.error("--positives and --distractors go together (positive views and their distractors, "
                     "joined on id)")
    if args.distractor_prefix and not args.positives:
        parser.error("--distractor-prefix applies to --positives/--distractors tables")
    if (args.hf or args.split or args.data_revision) and not (args.positives or args.mtg):
        parser.error("--hf, --split and --data-revision apply to --positives/--distractors and --mtg")
    if (args.split or args.data_revision) and not args.hf:
        parser.error("--split and --data-revision need --hf")
    if args.hf and args.positives and len(args.positives) != 1:
        parser.error("--hf takes one --positives dataset")
    sources = args.distractors or args.nearid_folder or args.mtg or []
    if args.group and args.from_csv:
        parser.error("--group does not apply to --from-csv (groups come from the 'group' column)")
    if args.group and len(args.group) != len(sources):
        parser.error(f"--group needs one name per source: {len(args.group)} name(s) for {len(sources)} source(s)")
    if args.from_csv and (args.ids or args.masks):
        parser.error("--ids and --masks choose what is embedded; --from-csv reads saved similarities")
    if args.score_scale is not None and not args.from_csv:
        parser.error("--score-scale applies to --from-csv")
    if args.score_scale is not None and not args.score_scale > 0:
        parser.error(f"--score-scale must be > 0, got {args.score_scale}")
    if args.from_csv and args.model is not None:
        parser.error("--from-csv reads saved similarities; --model does not apply (the 'model' column names them)")
    if args.model is None:
        args.model = "nearid"


def main(argv: list[str] | None = None) -> int:
    """``nearid-bench``: 0 when something was scored, 1 when nothing was (or ``--strict`` and a file failed), 2 for
    usage errors and unreadable data."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(args, parser)
    if args.out is not None:  # before any work: a run must not end in a folder it cannot write
        check_output_folder(args.out, "--out", parser)
    return run_command("nearid-bench", lambda: command(args, parser))


def command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    resamples = None if args.ci == "none" else args.ci_resamples
    if args.from_csv:
        try:  # unreadable data is a usage error, as a bad flag is
            benchmark, table = read_similarities(args.from_csv, scale=args.score_scale or 1.0)
            rows = benchmark_results(benchmark, table, ci_resamples=resamples, ci_seed=args.ci_seed, pool=args.pool)
        except (OSError, ValueError) as e:
            parser.error(str(e))
        summary = {"benchmark": benchmark, "version": __version__,
                   "from_csv": [str(p) for p in args.from_csv], "n_rows": len(table["model"]),
                   "models": {model: {"signature": signature} for model, signature in model_signatures(table).items()},
                   "score_scale": args.score_scale or 1.0, "pool": args.pool,
                   "ci": ci_description(resamples, args.ci_seed), "failures": []}
        return report(args, rows, benchmark, summary, table=None, failures={})
    try:
        select = read_selection(args.ids) if args.ids is not None else None
        samples, sources = load_samples(nearid_folder=args.nearid_folder or (), positives=args.positives or (),
                                        distractors=args.distractors or (), mtg=args.mtg or (), group=args.group,
                                        distractor_prefix=args.distractor_prefix, hf=args.hf, split=args.split,
                                        data_revision=args.data_revision, select=select)
        if args.masks:
            require_opencv()
    except (OSError, ValueError, ImportError) as e:
        parser.error(str(e))
    return run(args, samples, sources, load_scorers(args, parser))


def run(args: argparse.Namespace, samples: Sequence[NearIDSample | MTGSample], sources: list[dict[str, Any]],
        scorers: Mapping[str, Scorer]) -> int:
    """Embed, score, report; the exit code."""
    benchmark = "mtg" if isinstance(samples[0], MTGSample) else "nearid"
    similarity_table = mtg_similarity_table if benchmark == "mtg" else nearid_similarity_table
    unmasked = []
    if args.masks:
        samples, unmasked = foreground_samples(samples, args.mask_fill)
        if unmasked:
            logger.warning("--masks: %d image(s) have no mask and are scored as missing (NaN), e.g. %s",
                           len(unmasked), ", ".join(unmasked[:5]))
    n_images = len(unique_images(samples))
    logger.info("%s: %d samples in %d group(s), %d distinct images, model(s) %s", benchmark, len(samples),
                len(sample_groups(samples)), n_images, ", ".join(scorers))
    table, failures = similarity_table(samples, scorers, batch_size=args.batch_size, num_workers=args.num_workers,
                                       progress=False if args.no_progress else None, cache_dir=args.cache,
                                       mask=FOREGROUND if args.masks else FULL)
    for image, reason in failures.items():
        logger.warning("unreadable, scored as missing (NaN): %s: %s", image, reason)
    if failures:
        logger.warning("%d image(s) or mask(s) could not be read%s", len(failures),
                       f"; listed in {args.out / 'summary.json'}" if args.out is not None else "")
    summary = {
        "benchmark": benchmark,
        "version": __version__,
        "sources": sources,
        "models": {model: {"name": scorer.name, "signature": scorer.signature} for model, scorer in scorers.items()},
        "groups": {group: sum(s.group == group for s in samples) for group in sample_groups(samples)},
        "n_samples": len(samples),
        "n_images": n_images,
        "selection": None if args.ids is None else str(args.ids),
        "mask": FOREGROUND if args.masks else FULL,
        "mask_fill": args.mask_fill if args.masks else None,
        "pool": args.pool,
        "ci": ci_description(None if args.ci == "none" else args.ci_resamples, args.ci_seed),
        "failures": [{"image": image, "reason": reason} for image, reason in failures.items()],
        "no_mask": unmasked,
    }
    rows = benchmark_results(benchmark, table, ci_resamples=None if args.ci == "none" else args.ci_resamples,
                             ci_seed=args.ci_seed, pool=args.pool)
    return report(args, rows, benchmark, summary, table, failures)


def report(args: argparse.Namespace, rows: list[dict[str, Any]], benchmark: str, summary: dict[str, Any],
           table: Mapping[str, Any] | None, failures: Mapping[str, str]) -> int:
    """Write the ``--out`` files, print the table; the exit code."""
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        if table is not None:
            write_similarities(args.out / "similarities.csv", table)
        write_results(args.out, rows, benchmark)
        write_json(args.out / "summary.json", summary)
    print(format_table(rows, benchmark, ci=args.ci != "none"))
    if args.ci != "none":
        print(f"95% CI: percentile bootstrap over samples, {args.ci_resamples} resamples, seed {args.ci_seed}")
    for model, info in summary["models"].items():
        print(f"{model}: signature {info['signature'] or 'n/a'}")
    if not any(row["group"] == ALL and row["n_samples"] > 0 for row in rows):
        logger.warning("nothing scored: no sample has a valid term")
        return EXIT_NOTHING_SCORED
    return EXIT_NOTHING_SCORED if args.strict and failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
