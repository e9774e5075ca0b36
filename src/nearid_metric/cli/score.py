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

import numpy as np
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
    parse_models,
    positive_int,
    run_command,
)
from nearid_metric.cli.foreground import (
    add_mask_arguments,
    foreground_pairs,
    masks_summary,
    run_signature,
    score_foreground,
)
from nearid_metric.distributed import (
    launched_by_torchrun,
    missing_torchrun_variables,
    process_group,
    rank_and_world,
)
from nearid_metric.calibration import (
    HASH_DISTANCE,
    calibrate_column,
    ceiling_pairs,
    floor_pairs,
    image_hashes,
)
from nearid_metric.outputs import plural, write_scores
from nearid_metric.pairing import (
    Pairing,
    pair_all,
    pair_by_name,
    pair_by_subject,
    pair_from_manifest,
    pair_subjects_from_manifest,
    read_manifest,
)
from nearid_metric.prompts import lookup_prompts, read_prompts
from nearid_metric.protocols import PROTOCOLS, Protocol, ProtocolInputs, protocol_inputs, scale_scores
from nearid_metric.report import describe_ci
from nearid_metric.scorers import TEXT_SCORERS
from nearid_metric.subjects import format_subject_table


FLOOR_PAIRS = 200
"""Default number of floor pairs (a generation against another subject's reference) sampled per subject."""

if TYPE_CHECKING:
    from nearid_metric.runs import AnyScorer


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "nearid-score",
        "Identity similarity (NearID cosine, -1..1, higher = identity better kept) of generated "
        "images to reference images.",
    )
    parser.add_argument("ref", type=Path, help="reference image folder (searched recursively) or file")
    parser.add_argument("gen", type=Path, nargs="?",
                        help="generated image folder (searched recursively) or file (with --protocol dreambench, "
                             "REF is the run folder and GEN is left out)")
    parser.add_argument("--pairing", choices=["name", "all", "subject", "manifest"],
                        help="name: same relative path without extension (default); all: every ref x every gen; "
                             "subject: every gen x every ref of the same subject (the first folder level under REF "
                             "and GEN, or a manifest 'subject' column); manifest: pairs listed in --manifest")
    parser.add_argument("--manifest", type=Path,
                        help="CSV with columns ref,gen (paths relative to REF and GEN); optional columns subject "
                             "(per-subject figures) and prompt (clip-t)")
    protocols = parser.add_argument_group("benchmark protocols")
    protocols.add_argument("--protocol", choices=list(PROTOCOLS),
                           help="score as that benchmark's published procedure (scorers, preprocessing, scaling, "
                                "pairing, layout, aggregation; docs/protocols.md)")
    protocols.add_argument("--prompts", type=Path, metavar="FILE",
                           help="the prompt of each generation, for clip-t: CSV gen,prompt or JSON {gen: prompt} "
                                "(gen: its path relative to GEN, with or without extension)")
    protocols.add_argument("--ceiling", action="store_true",
                           help="also score every ordered pair of two different references of each subject (the "
                                "real-vs-real ceiling, DreamBooth's 'Real images' row); needs subject pairing")
    calibration = parser.add_argument_group("calibrated scores and copies (subject pairing)")
    calibration.add_argument("--calibrate", action="store_true",
                             help="per subject: the ceiling (as --ceiling), the floor (its generations against other "
                                  "subjects' references) and calibrated = (score - floor) / (ceiling - floor)")
    calibration.add_argument("--floor-pairs", type=positive_int, default=FLOOR_PAIRS, metavar="N",
                             help=f"floor pairs sampled per subject (seeded by --ci-seed; default {FLOOR_PAIRS})")
    calibration.add_argument("--copies", action="store_true",
                             help="list generations that copy a reference: closer to it than the subject's closest "
                                  "two real photos (+ --copy-margin), or a near-duplicate by difference hash; implied "
                                  "by --calibrate and --ceiling")
    calibration.add_argument("--copy-margin", type=float, default=0.0, metavar="M",
                             help="a copy scores above the subject's highest real-vs-real score by more than M "
                                  "(default 0, in the column's unit)")
    add_model_arguments(parser)
    parser.set_defaults(model=None)
    parser.add_argument("--max-pixels", type=positive_int, metavar="N",
                        help=f"refuse images with more pixels as possible decompression bombs (default: PIL's "
                             f"{Image.MAX_IMAGE_PIXELS})")
    parser.add_argument("--out", type=Path, help="folder for scores.csv (per pair) and summary.json")
    parser.add_argument("--report", type=Path, metavar="FILE",
                        help="also write a self-contained HTML report (summary, histograms, lowest- and highest-"
                             "scoring pairs, failed files); needs pip install 'nearid-metric[report]'")
    add_ci_arguments(parser, groups=True)
    add_mask_arguments(parser)
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 if any file failed, was unmatched or ambiguous")
    parser.add_argument("--distributed", action="store_true",
                        help="share the work between the processes of a torchrun launch (implied when torchrun "
                             "starts more than one); rank 0 writes the results")
    parser.epilog = ("nearid-score download [--model NAME] [--revision R] [--to DIR]: fetch and check weights first. "
                     "nearid-score compare RUN_A RUN_B [--groups ...]: compare two runs pair by pair.")
    return parser


def apply_protocol(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Protocol | None:
    """The ``--protocol`` preset with its settings put into ``args``; a flag the user gave that the preset
    sets differently is a usage error (never silently changed)."""
    if args.protocol is None:
        args.pairing, args.model = args.pairing or "name", args.model or "nearid"
        if args.gen is None:
            parser.error("the following arguments are required: gen")
        return None
    protocol = PROTOCOLS[args.protocol]
    pairing = "name" if protocol.layout == "dreambench-run" else "subject"
    if args.pairing not in (None, pairing):
        parser.error(f"--protocol {protocol.name} pairs by {pairing}; drop --pairing {args.pairing}")
    if args.manifest is not None:
        parser.error(f"--protocol {protocol.name} reads its own layout; drop --manifest")
    if args.model is not None:
        try:
            names = [name for _, name, _ in parse_models(args.model)]
        except ValueError as e:
            parser.error(str(e))
        if sorted(names) != sorted(c.scorer for c in protocol.columns):
            parser.error(f"--protocol {protocol.name} scores {protocol.model_spec}; --model may only point those "
                         f"scorers at other weights (NAME=FOLDER), got {args.model!r}")
    args.pairing, args.model = pairing, args.model or protocol.model_spec
    return protocol


def make_inputs(args: argparse.Namespace, parser: argparse.ArgumentParser, protocol: Protocol | None,
                needs_prompts: bool) -> ProtocolInputs:
    """The pairs (with subjects), prompts and categories to score; usage errors for bad inputs."""
    for root in (args.ref, args.gen) if protocol is None or protocol.layout != "concepts" else (args.gen,):
        if root is not None and not root.exists():
            parser.error(f"{root} does not exist")
    try:
        if protocol is not None:
            inputs = protocol_inputs(protocol, args.ref, args.gen, prompts_file=args.prompts)
        else:
            pairing = make_pairing(args, parser)
            inputs = ProtocolInputs(pairing, None, None, args.ref, args.gen)
            if args.prompts is not None:
                inputs.prompts = lookup_prompts([g for _, g in pairing.pairs], args.gen, read_prompts(args.prompts))
                inputs.prompt_source = str(args.prompts)
            elif args.pairing == "manifest" and needs_prompts:
                columns, rows = read_manifest(args.manifest)
                if "prompt" in columns:
                    inputs.prompts = [row["prompt"] if row["prompt"] else None for row in rows]
                    inputs.prompt_source = f"{args.manifest} (prompt column)"
    except (OSError, ValueError) as e:
        parser.error(str(e))
    if needs_prompts and inputs.prompts is None:
        parser.error("clip-t scores each generation against its prompt: give --prompts FILE (CSV gen,prompt or JSON "
                     "{gen: prompt}) or a manifest 'prompt' column")
    wanted = [flag for flag, on in (("--ceiling", args.ceiling), ("--calibrate", args.calibrate),
                                    ("--copies", args.copies)) if on]
    if wanted and inputs.pairing.subjects is None:
        parser.error(f"{wanted[0]} needs subjects: --pairing subject, or a manifest 'subject' column")
    return inputs


def make_pairing(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Pairing:
    if args.pairing == "manifest" or (args.pairing == "subject" and args.manifest is not None):
        if args.manifest is None:
            parser.error("--pairing manifest needs --manifest FILE")
        if args.pairing == "subject":
            return pair_subjects_from_manifest(args.manifest, args.ref, args.gen)
        return pair_from_manifest(args.manifest, args.ref, args.gen)
    if args.manifest is not None:
        parser.error("--manifest is only used with --pairing manifest or subject")
    if args.pairing == "subject":
        return pair_by_subject(args.ref, args.gen)
    return pair_all(args.ref, args.gen) if args.pairing == "all" else pair_by_name(args.ref, args.gen)


def ci_groups(args: argparse.Namespace, parser: argparse.ArgumentParser, pairing: Pairing) -> list[str] | None:
    """The resampling group of every pair of ``pairing`` for ``--ci-groups`` (None: each pair alone)."""
    if args.ci == "none" or args.ci_groups == "none":
        return None
    if args.ci_groups == "ref":
        return [str(ref) for ref, _ in pairing.pairs]
    if args.ci_groups == "subject":
        if pairing.subjects is None:
            parser.error("--ci-groups subject needs subjects: --pairing subject, or a manifest 'subject' column")
        return list(pairing.subjects)
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
    for message in pairing.subject_problems:
        logger.warning("%s", message)
    why = "its subject is not scored" if pairing.subjects is not None else "no file with the same name on the other side"
    for side, paths in (("reference", pairing.unmatched_refs), ("generated", pairing.unmatched_gens)):
        for path in paths:
            logger.warning("unmatched %s image: %s (%s)", side, path, why)
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

    protocol = apply_protocol(args, parser)
    try:
        needs_prompts = any(name in TEXT_SCORERS for _, name, _ in parse_models(args.model))
    except ValueError as e:
        parser.error(str(e))
    if args.prompts is not None and not needs_prompts:
        parser.error("--prompts is read by clip-t only; add clip-t to --model")

    def command() -> int:
        inputs = make_inputs(args, parser, protocol, needs_prompts)
        args.groups = ci_groups(args, parser, inputs.pairing)
        preprocess = {} if protocol is None else {c.scorer: c.preprocess for c in protocol.columns if c.preprocess}
        args.foreground = foreground_pairs(args, parser, inputs.pairing)
        with process_group(args.device) if args.distributed else nullcontext(None) as device:
            if device is not None:
                args.device = str(device)
            return run(args, inputs, load_scorers(args, parser, preprocess, text=True), protocol)

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


def run(args: argparse.Namespace, inputs: ProtocolInputs, scorers: dict[str, AnyScorer],
        protocol: Protocol | None = None) -> int:
    """Embed every distinct image once (all models in one pass), score the pairs, report, write outputs.

    Under ``--distributed`` every rank takes part and returns the exit code; only rank 0
    reports and writes.
    """
    from nearid_metric.runs import is_text_scorer, run_summary

    pairing = inputs.pairing
    args.ceiling = args.ceiling or args.calibrate or args.copies
    real = ceiling_pairs(pairing.subject_refs) if args.ceiling else []
    floor = floor_pairs(pairing.subject_refs, subject_generations(pairing), max_pairs=args.floor_pairs,
                        seed=args.ci_seed) if args.calibrate else []
    result, extra_pairs = score_foreground(args, pairing, scorers, inputs.prompts, [*real, *floor])
    real_set = set(real)  # the extra pairs scored (those with a masked image missing are left out), in order
    real, floor = [p for p in extra_pairs if p in real_set], [p for p in extra_pairs if p not in real_set]
    ok = result.scored
    scored = [pair for pair, good in zip(pairing.pairs, ok.tolist()) if good]
    problems = result.failures or pairing.unmatched_refs or pairing.unmatched_gens or pairing.ambiguous
    code = EXIT_NOTHING_SCORED if not scored or (args.strict and problems) else EXIT_OK
    if rank_and_world(args.distributed)[0] > 0:
        return code
    report_problems(pairing, result.failures)
    text_columns = [column for column, scorer in scorers.items() if is_text_scorer(scorer)]
    scales = {column: protocol.column(scorers[column].name).scale if protocol else "cosine" for column in scorers}
    for column in scorers:
        result.scores[column] = scale_scores(result.scores[column], scales[column])
    ceilings, checks = None, {}
    if args.ceiling:
        ceilings = {}
        hashes = image_hashes([str(p) for pair in pairing.pairs for p in pair])
        for column in scorers:
            if column in text_columns:
                continue
            extra = scale_scores(result.extra[column], scales[column]).tolist()
            tagged = [(s, str(a), str(b), v) for (s, a, b), v in zip([*real, *floor], extra)]
            real_rows = [row for row in tagged[:len(real)] if row[3] == row[3]]  # x == x: not NaN (both read)
            floor_rows = [row for row in tagged[len(real):] if row[3] == row[3]]
            good = ok & np.isfinite(result.scores[column])
            checks[column] = calibrate_column(
                result.scores[column][good], [s for s, g in zip(pairing.subjects, good) if g],
                [(str(r), str(g)) for (r, g), keep in zip(pairing.pairs, good) if keep], real=real_rows,
                floor=floor_rows, calibrated=args.calibrate, margin=args.copy_margin, hashes=hashes,
                resamples=None if args.ci == "none" else args.ci_resamples, seed=args.ci_seed)
            ceilings[column] = checks[column]["ceilings"]
    missing = missing_prompts(inputs, ok) if text_columns else []
    figures = run_summary(result, text_columns=text_columns, gens=[str(g) for _, g in pairing.pairs],
                          subjects=pairing.subjects, ceilings=ceilings, categories=inputs.categories,
                          groups=getattr(args, "groups", None), unit=args.ci_groups,
                          resamples=None if args.ci == "none" else args.ci_resamples, seed=args.ci_seed)
    signatures = {column: run_signature(scorer, args) + (f"|{protocol.signature_suffix(scorer.name)}" if protocol
                                                          else "") for column, scorer in scorers.items()}
    summary = {
        "models": {column: {"signature": signatures[column], "scale": scales[column], **figures["models"][column],
                            **({"calibration": checks[column]["calibration"]} if args.calibrate and column in checks
                               else {})}
                   for column in scorers},
        **({"protocol": protocol.settings()} if protocol else {}),
        "pairing": args.pairing,
        "ref": str(inputs.ref_root),
        "gen": str(inputs.gen_root),
        "masks": masks_summary(args),
        "pairs_total": len(pairing.pairs),
        "pairs_scored": len(scored),
        "pairs_skipped": len(pairing.pairs) - len(scored),
        **{key: figures[key] for key in ("subjects", "categories") if key in figures},
        **({"prompts": inputs.prompt_source, "missing_prompts": missing} if text_columns else {}),
        **({"copies": {column: check["copies"] for column, check in checks.items()},
            "copy_check": {"margin": args.copy_margin, "hash": "difference hash, 64 bits",
                           "max_hash_distance": HASH_DISTANCE}} if args.ceiling else {}),
        "failures": [{"path": p, "reason": r} for p, r in result.failures.items()],
        "unmatched": {"ref": [str(p) for p in pairing.unmatched_refs], "gen": [str(p) for p in pairing.unmatched_gens]},
        "ambiguous": pairing.ambiguous,
        "subject_problems": pairing.subject_problems,
        "ignored_files": [str(p) for p in pairing.ignored],
        "skipped_folders": [{"path": str(p), "reason": r} for p, r in pairing.skipped_folders.items()],
    }
    pairs = [(str(r), str(g)) for r, g in scored]
    scores = {column: values[ok] for column, values in result.scores.items()}
    labels = {} if pairing.subjects is None else {"subject": [s for s, good in zip(pairing.subjects, ok) if good]}
    if args.out is not None:
        write_scores(args.out, pairs, scores, summary, labels)
    if args.report is not None:
        from nearid_metric.report import write_report

        write_report(args.report, pairs, scores, summary)
        logger.info("report written to %s", args.report)
    print_summary(summary, scored=bool(scored), ci=args.ci != "none")
    return code


def subject_generations(pairing: Pairing) -> dict[str, list[Path]]:
    """Each subject's distinct generations, in pairing order."""
    gens: dict[str, dict[Path, None]] = {}
    for (_, gen), subject in zip(pairing.pairs, pairing.subjects or ()):
        gens.setdefault(subject, {})[gen] = None
    return {subject: list(items) for subject, items in gens.items()}


def missing_prompts(inputs: ProtocolInputs, ok: object) -> list[str]:
    """The generations (of read pairs) without a prompt, each once, logged: their clip-t is not scored."""
    missing = list(dict.fromkeys(str(gen) for (_, gen), prompt, good in zip(inputs.pairing.pairs, inputs.prompts, ok)
                                 if prompt is None and good))
    for gen in missing:
        logger.warning("no prompt for %s (%s): its clip-t is not scored", gen, inputs.prompt_source)
    return missing


def print_summary(summary: dict, *, scored: bool, ci: bool) -> None:
    """The figures on stdout: count, per model the mean (interval), macro / micro and ceilings, per subject."""
    models = summary["models"]
    print(f"count: {summary['pairs_scored']}")
    if scored and ci:
        print(describe_ci(next(iter(models.values()))["ci"]))
    for column, info in models.items():
        ci95 = info["ci95"]
        interval = f"  95% CI [{ci95[0]:.6f}, {ci95[1]:.6f}]" if ci95 else "  95% CI n/a" if ci else ""
        unit = "" if info["scale"] == "cosine" else f" ({info['scale']})"
        print(f"{column}: mean {info['mean']:.6f}{interval}{unit}" if info["mean"] is not None
              else f"{column}: mean n/a (nothing scored)")
        for kind in ("macro", "micro"):
            if kind in info:
                entry = info[kind]
                interval = f"  95% CI [{entry['ci95'][0]:.6f}, {entry['ci95'][1]:.6f}]" if entry["ci95"] else ""
                ceiling = f"  ceiling {entry['ceiling']:.6f}" if entry.get("ceiling") is not None else ""
                print(f"{column}: {kind} {entry['mean']:.6f}{interval}{ceiling}")
        if info.get("calibration"):
            macro = info["calibration"]["macro"]
            interval = f"  95% CI [{macro['ci95'][0]:.4f}, {macro['ci95'][1]:.4f}]" if macro["ci95"] else ""
            value = "n/a" if macro["calibrated"] is None else f"{macro['calibrated']:.4f}"
            print(f"{column}: calibrated macro {value}{interval} (0 = floor, 1 = ceiling; {macro['n']} subjects)")
        print(f"{column}: signature {info['signature']}")
    for column, copies in summary.get("copies", {}).items():
        for copy in copies:
            logger.warning("possible copy (%s, %s): %s of reference %s", column, copy["reason"], copy["gen"],
                           copy["ref"])
        print(f"{column}: {plural(len(copies), 'generation')} flagged as copying a reference")
    if "subjects" in summary:
        print(format_subject_table(summary["subjects"], list(models)))
    for category, entries in summary.get("categories", {}).items():
        cells = "  ".join(f"{c} {e['mean']:.4f}" if e["mean"] is not None else f"{c} n/a" for c, e in entries.items())
        print(f"category {category}: {cells}")


if __name__ == "__main__":
    sys.exit(main())
