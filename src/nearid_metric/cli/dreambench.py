"""``nearid-dreambench``: DreamBench++ human alignment (MH) of one or more scorers, from the shell.

See ``docs/dreambench.md`` ("The nearid-dreambench command"); the numbers are
:mod:`nearid_metric.dreambench`, the files :mod:`nearid_metric.dreambench_data`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from nearid_metric.cli.common import EXIT_NOTHING_SCORED as EXIT_PROBLEMS
from nearid_metric.cli.common import (
    EXIT_OK,
    add_model_arguments,
    check_output_folder,
    command_parser,
    load_scorers,
    logger,
    parse_models,
    run_command,
)
from nearid_metric.dreambench import (
    CATEGORIES,
    OVERALL,
    Ratings,
    ScoreSet,
    aligned_groups,
    check_coverage,
    format_mh_table,
    in_categories,
    mh_table,
    missing_keys,
    parse_key,
    preview,
)
from nearid_metric.dreambench_data import (
    MH_CSV,
    MH_JSON,
    find_runs,
    find_score_folders,
    in_rating_order,
    load_rating_tree,
    load_score_set,
    run_pairs,
    save_scores,
    score_runs,
    write_mh_tables,
)

DEFAULT_OUT = Path("dreambench_scores")
"""Where ``nearid-dreambench --images`` saves its scores and tables unless ``--out`` says otherwise."""


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "nearid-dreambench",
        "DreamBench++ human alignment (MH): score each method's generated images against the "
        "references, or read saved scores, and correlate them with the human concept-preservation "
        "ratings, per category and over the 4 categories.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, metavar="DIR",
                        help="DreamBench++ samples folder: one run folder per method holding src_image/ and "
                             "tgt_image/; scored with --model")
    source.add_argument("--scores", type=Path, nargs="+", metavar="DIR",
                        help="saved scores, no model loaded: each DIR is one scorer's folder of <method>.json "
                             "files, or a folder whose subfolders are such folders (e.g. the --out of an "
                             "--images run); any scorer, a VLM judge included")
    parser.add_argument("--ratings", type=Path, required=True, metavar="DIR",
                        help="human ratings: data_human_rating, its merged_data, or a folder holding group1/ "
                             "and group2/ with <method>-cp.json files")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help=f"with --images: folder for <model>/<method>.json scores, {MH_JSON} and {MH_CSV} "
                             f"(default: ./{DEFAULT_OUT}); with --scores: folder for {MH_JSON} and {MH_CSV} "
                             f"(default: print only)")
    parser.add_argument("--methods", metavar="M1,M2",
                        help="comma-separated methods to use, as spelled in the rating files (default: every "
                             "rated method, and each one then needs its run or score file)")
    parser.add_argument("--category", nargs="+", choices=CATEGORIES, metavar="CATEGORY",
                        help=f"categories to score and report: {', '.join(CATEGORIES)} (default: all 4; the "
                             f"'{OVERALL}' figure needs all 4)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="compute MH on the rated keys that have a score (unreadable images, keys absent "
                             "from a run or a score file), leaving the others out of both rating groups of that "
                             "method, with a warning; by default a missing score is an error")
    add_model_arguments(parser)
    parser.set_defaults(model=None)  # nearid, for --images; given with --scores it is a usage error
    return parser



def main(argv: Sequence[str] | None = None) -> int:
    """``nearid-dreambench``: exit 0 when the table was computed, 1 for problems in the data, 2 for usage errors.

    See ``docs/dreambench.md`` ("The nearid-dreambench command") for the options and outputs.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    # data problems exit 1: their messages name the file and what to do
    return run_command("nearid-dreambench", lambda: _command(args, parser), error_code=EXIT_PROBLEMS,
                       error_prefix="error: ")



def _command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.scores is not None and args.model is not None:
        parser.error("--model applies to --images; --scores reads saved scores and loads no model")
    for path in (args.ratings, args.images, *(args.scores or ())):
        if path is not None and not path.is_dir():
            parser.error(f"{path}: no such folder")
    if args.out is not None:  # before any work: a run must not end in a folder it cannot write
        check_output_folder(args.out, "--out", parser)
    folders = _model_folders(args, parser) if args.images is not None else {}
    categories = tuple(c for c in CATEGORIES if c in (args.category or CATEGORIES))

    all_ratings = load_rating_tree(args.ratings)
    methods = _pick_methods(all_ratings, args.methods, args.ratings, parser)
    ratings = {m: (in_categories(all_ratings[m][0], categories), in_categories(all_ratings[m][1], categories))
               for m in methods}
    for method in methods:
        aligned_groups(method, ratings[method])  # group 1 and group 2 must rate the same keys

    if args.images is not None:
        rows = _score_images(args, parser, ratings, categories, folders)
        if rows is None:
            return EXIT_PROBLEMS
        out = args.out if args.out is not None else DEFAULT_OUT
    else:
        rows = [load_score_set(name, folder, methods, categories)
                for name, folder in find_score_folders(args.scores, methods)]
        out = args.out
    check_coverage(rows, ratings, args.allow_missing)

    table = mh_table(rows, ratings, categories)
    print(format_mh_table(table, methods, categories))
    if out is not None:
        write_mh_tables(out, table, rows, args.ratings, args.images, args.allow_missing, methods, categories)
        logger.info("wrote %s and %s", out / MH_JSON, out / MH_CSV)
    return EXIT_OK

def _model_folders(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, str]:
    """{--model column: score folder name}, checked before any data is read."""
    args.model = args.model or "nearid"
    try:
        columns = [column for column, _, _ in parse_models(args.model, text=False)]
    except ValueError as e:
        parser.error(str(e))
    folders = {column: re.sub(r"[^\w.=+-]+", "_", column).strip("._") or "scorer" for column in columns}
    if len(set(folders.values())) < len(folders):
        parser.error(f"--model columns {columns} do not give distinct folder names ({list(folders.values())})")
    return folders

def _pick_methods(ratings: Ratings, spec: str | None, root: Path, parser: argparse.ArgumentParser) -> list[str]:
    if spec is None:
        return list(ratings)
    chosen = {m.strip() for m in spec.split(",") if m.strip()}
    if not chosen:
        parser.error("--methods is empty")
    unknown = sorted(chosen - ratings.keys())
    if unknown:
        parser.error(f"--methods: {', '.join(unknown)} not rated in {root}; rated: {', '.join(ratings)}")
    return [m for m in ratings if m in chosen]

def _score_images(args: argparse.Namespace, parser: argparse.ArgumentParser, ratings: Ratings,
                  categories: Sequence[str], folders: Mapping[str, str]) -> list[ScoreSet] | None:
    """Find the runs, check their keys against the ratings, score them, save the score files.

    Returns the table rows, or None when images could not be read and ``--allow-missing`` was
    not given (the complete methods' score files are written, the others are not).
    """
    methods = list(ratings)
    runs = find_runs(args.images)
    absent = [m for m in methods if m not in runs]
    if absent:
        raise ValueError(f"{args.images}: no run folder for the rated methods {', '.join(absent)} (runs found: "
                         f"{', '.join(runs)}); add the runs, or pass --methods to use a subset of the methods")
    unused = [m for m in runs if m not in methods]
    if unused:
        logger.warning("%s: not scoring the runs of %s (%s)", args.images, ", ".join(unused),
                       "not in --methods" if args.methods else "no ratings for them")
    pairs = {m: [p for p in run_pairs(runs[m]) if parse_key(p[0]).category in categories] for m in methods}
    problems = []
    for m in methods:
        missing = missing_keys(m, (key for key, _, _ in pairs[m]), ratings[m][0], f"run {runs[m]}")
        if missing and not args.allow_missing:
            problems.append(f"run {runs[m]} has no images for {len(missing)} rated keys of {m}: {preview(missing)}")
    if problems:
        raise ValueError("; ".join(problems) + "; add the images, or pass --allow-missing to compute MH without them")

    try:
        scorers = load_scorers(args, parser)
    except (OSError, ValueError) as e:
        parser.error(f"cannot load --model {args.model}: {e}")
    scores, failures = score_runs(pairs, scorers, batch_size=args.batch_size, num_workers=args.num_workers,
                                  progress=False if args.no_progress else None, cache_dir=args.cache)
    for path, reason in failures.items():
        logger.warning("cannot read %s: %s", path, reason)
    first = next(iter(scores.values()))  # the same pairs fail for every model
    incomplete = [m for m in methods if len(first[m]) < len(pairs[m])]

    out = args.out if args.out is not None else DEFAULT_OUT
    rows = []
    for column, by_method in scores.items():
        signature = scorers[column].signature
        for method in methods:
            if method not in incomplete or args.allow_missing:
                save_scores(out / folders[column], method, in_rating_order(by_method[method], ratings[method][0]),
                            signature)
        rows.append(ScoreSet(column, by_method, out / folders[column], dict.fromkeys(methods, signature)))
    if incomplete and not args.allow_missing:
        logger.error("error: %d image files could not be read (listed above), so %s lack scores for some rated "
                     "keys; their score files were not written and MH was not computed, since MH over fewer keys "
                     "is a different number. Replace the files, or pass --allow-missing to compute MH without "
                     "those keys", len(failures), ", ".join(incomplete))
        return None
    logger.info("saved the scores under %s", out)
    return rows


if __name__ == "__main__":
    sys.exit(main())
