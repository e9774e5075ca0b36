"""``nearid-score``'s foreground-only scoring: ``--ref-masks`` / ``--gen-masks`` (or a manifest's ``ref_mask`` /
``gen_mask`` columns) and ``--mask-fill``. Each masked side is a :class:`~nearid_metric.masking.MaskedImage`,
decoded and keyed as ``nearid-bench --masks`` does (docs/usage.md, "Foreground-only scoring")."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nearid_metric.cli.common import logger
from nearid_metric.masking import MASK_FILLS, MaskedImage, find_mask
from nearid_metric.pairing import Pairing, read_manifest

if TYPE_CHECKING:
    from nearid_metric.loading import ImageInput
    from nearid_metric.runs import AnyScorer, RunScores

SIDES = ("ref", "gen")


@dataclass
class Foreground:
    """The pairs to score with their masked sides, the pairs that cannot be (a mask missing) and why, per image."""

    pairs: list[tuple[ImageInput, ImageInput]]
    skipped: set[int]  # pair indices not scored: a side's mask is missing, ambiguous or not named
    problems: dict[str, str]  # image: why its mask is missing
    settings: dict[str, Any]  # summary.json "masks": {"ref": {"folder", "column"} | None, "gen": ..., "fill"}


def add_mask_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``foreground-only scoring`` argument group."""
    group = parser.add_argument_group(
        "foreground-only scoring",
        "pixels outside the subject's mask (> 0 = subject, any image mode; resized with NEAREST to its image) are set "
        "to --mask-fill before each scorer's own preprocessing. A pair whose mask is missing, unreadable or empty is "
        "reported and not scored, never scored unmasked. With --pairing manifest, columns ref_mask / gen_mask name "
        "each mask (relative to --ref-masks / --gen-masks if given, else to REF / GEN)")
    for side, what in (("ref", "references"), ("gen", "generations")):
        group.add_argument(f"--{side}-masks", type=Path, metavar="DIR",
                           help=f"masks of the {what}: the file with the same relative path under DIR, any image "
                                f"extension")
    group.add_argument("--mask-fill", choices=sorted(MASK_FILLS), help="background colour (default black)")


def foreground_pairs(args: argparse.Namespace, parser: argparse.ArgumentParser, pairing: Pairing) -> Foreground | None:
    """The pairing's pairs masked as the flags say (None: no masks). Usage errors for a mask folder that is
    not a folder and for ``--mask-fill`` without masks."""
    columns, rows = read_manifest(args.manifest) if args.pairing == "manifest" else ([], [])
    settings: dict[str, Any] = {}
    for side in SIDES:
        folder = getattr(args, f"{side}_masks")
        if folder is not None and not folder.is_dir():
            parser.error(f"--{side}-masks {folder} is not a folder")
        column = f"{side}_mask" if f"{side}_mask" in columns else None
        settings[side] = None if folder is None and column is None else {
            "folder": None if folder is None else str(folder), "column": column}
    if not any(settings.values()):
        if args.mask_fill is not None:
            parser.error("--mask-fill is only used with --ref-masks, --gen-masks or a manifest's ref_mask / gen_mask "
                         "columns")
        return None
    fill = settings["fill"] = args.mask_fill or "black"
    out = Foreground([], set(), {}, settings)
    found: dict[tuple[str, Path], MaskedImage | None] = {}  # per side and image, from its mask folder

    def masked(n: int, side: str, image: Path) -> ImageInput | None:
        setting = settings[side]
        if setting is None:
            return image
        root = args.ref if side == "ref" else args.gen
        if setting["column"] is not None:
            cell = (rows[n][setting["column"]] or "").strip()
            if not cell:
                out.problems[str(image)] = (f"{args.manifest}, line {n + 2}: empty {setting['column']}; the pair is "
                                            "not scored (never unmasked)")
                return None
            return MaskedImage(image, Path(setting["folder"] or root) / cell, fill=fill)
        if (side, image) not in found:
            try:
                found[side, image] = MaskedImage(image, find_mask(image, root, setting["folder"]), fill=fill)
            except (OSError, ValueError) as e:
                found[side, image] = None
                out.problems[str(image)] = f"{e}; the pair is not scored (never unmasked)"
        return found[side, image]

    for n, (ref, gen) in enumerate(pairing.pairs):
        sources = masked(n, "ref", ref), masked(n, "gen", gen)
        if None in sources:
            out.skipped.add(n)
        out.pairs.append((ref, gen) if None in sources else sources)
    described = "; ".join(f"{'references' if side == 'ref' else 'generations'} by "
                          + (f"the manifest's {s['column']} column" if s["column"] else f"the masks in {s['folder']}")
                          for side in SIDES if (s := settings[side]))
    logger.info("foreground only: %s, background %s", described, fill)
    return out


def score_foreground(args: argparse.Namespace, pairing: Pairing, scorers: Mapping[str, AnyScorer],
                     prompts: Sequence[str | None] | None, extra: Sequence[tuple[str, Path, Path]]
                     ) -> tuple[RunScores, list[tuple[str, Path, Path]]]:
    """:func:`~nearid_metric.runs.score_run` of the pairing's pairs (and the ``(subject, a, b)`` extra pairs:
    ceilings, floors), masked by ``args.foreground`` (:func:`foreground_pairs`) when set. Pairs whose mask is
    missing are not scored and their images are named in the failures; an extra pair is scored with the
    masked images of the scored pairs, and left out when one of its images has none (never unmasked).
    Returns the scores of every pair (NaN where not scored) and the extra pairs scored, in order."""
    from nearid_metric.runs import RunScores, score_run

    options = dict(batch_size=args.batch_size, num_workers=args.num_workers,
                   progress=False if args.no_progress else None, cache_dir=args.cache, distributed=args.distributed)
    foreground: Foreground | None = getattr(args, "foreground", None)
    if foreground is None:
        return score_run(scorers, pairing.pairs, prompts=prompts, extra_pairs=[(a, b) for _, a, b in extra],
                         **options), list(extra)
    keep = [n for n in range(len(pairing.pairs)) if n not in foreground.skipped]
    source: dict[Path, ImageInput] = {}
    for n in keep:
        (ref, gen), (masked_ref, masked_gen) = pairing.pairs[n], foreground.pairs[n]
        source[ref], source[gen] = masked_ref, masked_gen
    extra = [(s, a, b) for s, a, b in extra if a in source and b in source]
    result = score_run(scorers, [foreground.pairs[n] for n in keep],
                       prompts=None if prompts is None else [prompts[n] for n in keep],
                       extra_pairs=[(source[a], source[b]) for _, a, b in extra], **options)
    index = np.array(keep, dtype=np.int64)
    scored = np.zeros(len(pairing.pairs), dtype=bool)
    scored[index] = result.scored
    scores = {}
    for column, values in result.scores.items():
        scores[column] = np.full(len(pairing.pairs), np.nan)
        scores[column][index] = values
    return RunScores(scores, scored, {**foreground.problems, **result.failures}, result.extra), extra


def masks_summary(args: argparse.Namespace) -> dict[str, Any] | None:
    """summary.json's ``masks``: per side the mask folder and manifest column (None: not masked), and the fill;
    None without masks."""
    foreground: Foreground | None = getattr(args, "foreground", None)
    return None if foreground is None else foreground.settings


def run_signature(scorer: AnyScorer, args: argparse.Namespace) -> str:
    """The scorer's signature, with ``|fg:<masked sides>:<fill>`` appended for foreground-only scores (they are
    not comparable with unmasked ones, nor with other masked sides or fills)."""
    settings = masks_summary(args)
    if settings is None:
        return scorer.signature
    return f"{scorer.signature}|fg:{'+'.join(side for side in SIDES if settings[side])}:{settings['fill']}"
