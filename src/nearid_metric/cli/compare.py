"""``nearid-score compare RUN_A RUN_B``: is run B better than run A on the same references?
(:mod:`nearid_metric.compare`; docs/usage.md, "Comparing two runs")."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nearid_metric.cli.common import (
    EXIT_OK,
    add_ci_arguments,
    check_output_folder,
    command_parser,
    logger,
    run_command,
)
from nearid_metric.compare import compare_runs, format_comparison, read_run
from nearid_metric.outputs import write_json


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "nearid-score compare",
        "Compare two nearid-score runs (their --out folders) pair by pair: per model the means, the difference "
        "B - A with a paired bootstrap interval, and the share of pairs where B scores higher.",
        version=False,
    )
    parser.add_argument("run_a", type=Path, help="run A: a nearid-score --out folder (or its scores.csv)")
    parser.add_argument("run_b", type=Path, help="run B, scored against the same references")
    parser.add_argument("--groups", default="none", metavar="none|ref|subject|COLUMN",
                        help="what the bootstrap resamples together: none = single pairs (default); ref = all pairs "
                             "of one reference; subject = the first folder level of the reference (or a subject "
                             "column); COLUMN = a column of run A's scores.csv")
    parser.add_argument("--allow-different-signatures", action="store_true",
                        help="compare even when a model's signatures differ (other weights, precision or version)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the comparison as JSON")
    parser.add_argument("--report", type=Path, metavar="FILE",
                        help="also write a self-contained HTML page: the table, a scatter of B against A per model, "
                             "the largest gains and losses as thumbnails, pairs in one run only; needs pip install "
                             "'nearid-metric[report]'")
    add_ci_arguments(parser, groups=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """0 when the runs were compared; 2 for usage errors and runs that cannot be compared."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json is not None and args.json.is_dir():
        parser.error(f"--json {args.json} is a folder; give a file name")
    if args.report is not None:
        from nearid_metric.report import require_matplotlib

        try:
            require_matplotlib()
        except ImportError as e:
            parser.error(str(e))
        if args.report.is_dir():
            parser.error(f"--report {args.report} is a folder; give the HTML file to write")
        check_output_folder(args.report.parent, "--report's folder", parser)

    def command() -> int:
        run_a, run_b = read_run(args.run_a), read_run(args.run_b)
        result = compare_runs(run_a, run_b, groups=args.groups,
                              allow_different_signatures=args.allow_different_signatures,
                              resamples=None if args.ci == "none" else args.ci_resamples, seed=args.ci_seed)
        if result["signatures_differ"]:
            logger.warning("signatures differ for %s: compared anyway (--allow-different-signatures)",
                           ", ".join(result["signatures_differ"]))
        for side in ("a", "b"):
            only = result[f"only_{side}"]
            if only:
                shown = ", ".join(f"{ref} ~ {gen}" for ref, gen in only[:5]) + (", ..." if len(only) > 5 else "")
                logger.warning("%d pair(s) only in run %s, not compared: %s", len(only), side.upper(), shown)
        print(format_comparison(result))
        if result["ci"] is not None:
            unit = result["ci"]["unit"]
            print(f"95% CI of diff: paired percentile bootstrap, {args.ci_resamples} resamples, seed {args.ci_seed}, "
                  f"{'pairs' if unit == 'pair' else unit + ' groups'} resampled")
        if args.json is not None:
            write_json(args.json, result)
        if args.report is not None:
            from nearid_metric.compare_report import write_comparison_report

            write_comparison_report(args.report, run_a, run_b, result)
            logger.info("report written to %s", args.report)
        return EXIT_OK

    return run_command("nearid-score compare", command)


if __name__ == "__main__":
    sys.exit(main())
