"""DreamBench++ human alignment (MH): keys, rating and score files, the generated-image tree,
correlations, and the ``nearid-dreambench`` command that ties them together.

Definitions follow spec section 4: per method, Pearson r of a scorer's scores with each of the
two human rating groups, each rounded to 4 decimals, averaged; then a Fisher-z mean over the
methods (clip 0.9999). Files are read and written in the layouts of the public DreamBench++
data; ``docs/dreambench.md`` describes them and every handling decision made here. Models are
only imported by :func:`score_runs` and :func:`main`, so the rest needs no model code.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from nearid_metric._console import stderr_logging
from nearid_metric._version import __version__
from nearid_metric.pairing import image_key, pair_by_name
from nearid_metric.stats import fisher_z_mean, pearson

if TYPE_CHECKING:
    from nearid_metric.scorer import Scorer

logger = logging.getLogger(__name__)

CATEGORIES = ("object", "live_subject_animal", "live_subject_human", "style")
"""DreamBench++ categories, selected by key prefix (585, 405, 180 and 180 keys)."""

METHODS = (
    "textual_inversion_sd",
    "dreambooth_sd",
    "dreambooth_lora_sdxl",
    "blip_diffusion",
    "emu2",
    "ip_adapter_plus_vit_h_sdxl",
    "ip_adapter_vit_g_sdxl",
)
"""The 7 personalisation methods with human ratings, spelled as in the rating files."""

RUN_PREFIXES = {
    **{method: method for method in METHODS},
    "ip_adapter_plus_vit_huge_sdxl": "ip_adapter_plus_vit_h_sdxl",
    "ip_adapter_vit_giant_sdxl": "ip_adapter_vit_g_sdxl",
}
"""Run-directory name prefix in the sample release -> method name in the rating files."""

MH_CLIP = 0.9999
"""Correlations are clipped to [-MH_CLIP, MH_CLIP] before the Fisher z transform."""

SCORE_SCALE = 100.0
"""A DreamBench++ score is SCORE_SCALE x the cosine of the (reference, generation) embeddings."""

RATING_RANGE = (0.0, 4.0)
"""Human concept-preservation ratings lie in this closed range."""

SIGNATURES_FILE = "signatures.json"
"""Sidecar in a score folder: {method: scorer signature}; never read as a method's scores."""

RATINGS_SUFFIX = "-cp.json"
"""Concept-preservation rating files are ``group{1,2}/<method>-cp.json``."""

KEY_ALIASES = {"rubik's_cube": "magic_cube"}
"""Spelling differences between files, applied by :func:`canonical_key`."""

_KEY_PATTERN = re.compile(r"(?P<concept>.+)-(?P<prompt>\d+)(?:_(?P<image>\d+))?")
_SHOWN = 5  # how many differing keys or files an error message lists

V = TypeVar("V")
Ratings = dict[str, tuple[dict[str, float], dict[str, float]]]


# --- keys ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DreamBenchKey:
    """A parsed DreamBench++ key, e.g. ``live_subject_animal_00_kitten-0_0``.

    ``category`` is one of :data:`CATEGORIES`; ``concept`` the numbered concept
    (``00_kitten``); ``prompt`` the prompt index after the last ``-``; ``image`` the trailing
    image index of metric keys, None for human keys (``live_subject_animal_00_kitten-0``).
    """

    category: str
    concept: str
    prompt: int
    image: int | None


def parse_key(key: str) -> DreamBenchKey:
    """Split ``<category>_<concept>-<prompt>[_<image>]``; ValueError naming ``key`` otherwise."""
    category = next((c for c in CATEGORIES if key.startswith(c + "_")), None)
    if category is None:
        raise ValueError(f"DreamBench++ key {key!r} does not start with a known category "
                         f"({', '.join(c + '_' for c in CATEGORIES)})")
    match = _KEY_PATTERN.fullmatch(key[len(category) + 1:])
    if match is None:
        raise ValueError(f"DreamBench++ key {key!r} is not <category>_<concept>-<prompt>[_<image>]")
    image = match["image"]
    return DreamBenchKey(category, match["concept"], int(match["prompt"]), None if image is None else int(image))


def canonical_key(key: str) -> str:
    """The key two files are aligned on: drop a trailing ``_<digits>``, then apply :data:`KEY_ALIASES`.

    ``object_20_rubik's_cube-3_0`` -> ``object_20_magic_cube-3``; human keys without an image
    index are unchanged.
    """
    key = re.sub(r"_\d+$", "", key)
    for alias, name in KEY_ALIASES.items():
        key = key.replace(alias, name)
    return key


def select_category(values: Mapping[str, V], category: str | None) -> dict[str, V]:
    """The entries of ``values`` whose key is in ``category`` (order kept); all of them for None.

    Every key is parsed, so a key of no known category raises ValueError naming it.
    """
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"unknown DreamBench++ category {category!r}; expected one of {', '.join(CATEGORIES)}")
    return {k: v for k, v in values.items() if parse_key(k).category == category or category is None}


# --- rating and score files -----------------------------------------------------------------------


def load_ratings(path: str | os.PathLike) -> dict[str, float]:
    """A human rating file: JSON object key -> rating in [0, 4] (floats, file order kept).

    Raises ValueError naming the file for content that is not JSON, not an object, empty, has
    a non-numeric or out-of-range value, a repeated key, or two keys with one canonical key.
    """
    ratings = _load_key_values(path, "rating")
    low, high = RATING_RANGE
    for key, value in ratings.items():
        if not low <= value <= high:
            raise ValueError(f"{path}: rating {value} for {key!r} is outside [{low:g}, {high:g}]")
    return ratings


def load_rating_tree(root: str | os.PathLike) -> Ratings:
    """All concept-preservation ratings: {method: (group 1 ratings, group 2 ratings)}.

    ``root`` is ``data_human_rating`` or ``merged_data`` or any folder holding ``group1/`` and
    ``group2/``; the files read are ``group{1,2}/<method>-cp.json`` (other files, such as
    prompt-following ``-pf.json`` ratings, are skipped). Methods come in :data:`METHODS` order,
    then any others sorted. A method rated by one group only raises ValueError naming it.
    """
    root = Path(root)
    base = next((b for b in (root, root / "merged_data") if (b / "group1").is_dir() and (b / "group2").is_dir()),
                None)
    if base is None:
        raise ValueError(f"{root}: found no group1/ and group2/ folders in it or in its merged_data/; "
                         "point at data_human_rating, merged_data or the folder holding group1 and group2")
    groups = []
    for group in ("group1", "group2"):
        files = {p.name[:-len(RATINGS_SUFFIX)]: p for p in sorted((base / group).glob("*" + RATINGS_SUFFIX))}
        if not files:
            raise ValueError(f"{base / group}: no *{RATINGS_SUFFIX} rating files")
        groups.append(files)
    one_sided = sorted(groups[0].keys() ^ groups[1].keys())
    if one_sided:
        where = ", ".join(f"{m} (only in {'group1' if m in groups[0] else 'group2'})" for m in one_sided)
        raise ValueError(f"{base}: methods rated by one group only: {where}")
    return {m: (load_ratings(groups[0][m]), load_ratings(groups[1][m])) for m in _method_order(groups[0])}


def load_scores(path: str | os.PathLike) -> dict[str, float]:
    """A score file: JSON object key -> score (floats, file order kept; 100 x cosine for embedding scorers).

    Raises ValueError naming the file for content that is not JSON, not an object, empty, has
    a non-numeric or non-finite value, a repeated key, or two keys with one canonical key.
    """
    return _load_key_values(path, "score")


def load_score_folder(folder: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Every ``<folder>/<method>.json`` except :data:`SIGNATURES_FILE`: {method: scores}.

    Methods come in :data:`METHODS` order, then any others sorted. Raises ValueError when the
    folder holds no score file.
    """
    folder = Path(folder)
    files = {p.stem: p for p in sorted(folder.glob("*.json")) if p.name != SIGNATURES_FILE}
    if not files:
        raise ValueError(f"{folder}: no <method>.json score files")
    return {m: load_scores(files[m]) for m in _method_order(files)}


def load_signatures(folder: str | os.PathLike) -> dict[str, str]:
    """The folder's :data:`SIGNATURES_FILE` as {method: scorer signature}; {} when there is none."""
    path = Path(folder) / SIGNATURES_FILE
    if not path.exists():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{path}: expected a JSON object method -> signature string")
    return data


def save_scores(folder: str | os.PathLike, method: str, scores: Mapping[str, float], signature: str) -> Path:
    """Write ``<folder>/<method>.json`` (key -> score, order kept) and record ``signature``.

    The score file keeps the reference format exactly (a flat JSON object, indent 4), so the
    reference tools read it; the scorer signature goes to ``<folder>/signatures.json`` under
    ``method``. Scores are stored as given: 100 x cosine for embedding scorers
    (:data:`SCORE_SCALE`). Non-finite scores raise ValueError naming the key. A warning is
    logged when other methods in the folder were scored with a different signature.
    Returns the path of the score file.
    """
    if not method or method != Path(method).name or f"{method}.json" == SIGNATURES_FILE:
        raise ValueError(f"{method!r} cannot be a method name in a score folder")
    bad = [k for k, v in scores.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"scores of {method!r} are not finite for {len(bad)} keys: {_some(bad)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{method}.json"
    _write_json(path, {k: float(v) for k, v in scores.items()})
    signatures = load_signatures(folder)
    others = sorted(m for m, s in signatures.items() if m != method and s != signature)
    if others:
        logger.warning("%s: %s were scored with a different signature than %s (%s)",
                       folder, ", ".join(others), method, signature)
    signatures[method] = signature
    _write_json(folder / SIGNATURES_FILE, signatures)
    return path


def _load_key_values(path: str | os.PathLike, what: str) -> dict[str, float]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object key -> {what}, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: no {what}s (empty JSON object)")
    values = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{path}: {what} for {key!r} is {value!r}, not a finite number")
        values[key] = float(value)
    _canonical_values(values, str(path))
    return values


def _read_json(path: str | os.PathLike) -> object:
    """Parse a JSON file, refusing repeated object keys; ValueError naming the file."""
    def no_repeats(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError(f"{path}: key {key!r} appears more than once")
            seen[key] = value
        return seen

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=no_repeats)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid UTF-8 JSON file ({e})") from None


def _write_json(path: Path, data: Mapping[str, object]) -> None:
    path.write_text(json.dumps(data, indent=4, allow_nan=False) + "\n", encoding="utf-8")


def _method_order(methods: Mapping[str, object]) -> list[str]:
    return [m for m in METHODS if m in methods] + sorted(m for m in methods if m not in METHODS)


# --- correlations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodCorrelation:
    """One method's row over the ``n`` keys of the category (correlations unitless, in [-1, 1]).

    Metric-human: ``r1`` / ``r2`` are Pearson r with group 1 / group 2, each rounded to 4
    decimals, and ``r = (r1 + r2) / 2``. Human-human: ``r`` is Pearson(group 1, group 2)
    rounded to 4 decimals and ``r1`` / ``r2`` are None. NaN marks an undefined correlation.
    """

    method: str
    n: int
    r: float
    r1: float | None = None
    r2: float | None = None


@dataclass(frozen=True)
class Alignment:
    """MH of one scorer (or human-human agreement) in one category.

    ``value`` is the Fisher-z mean (clip :data:`MH_CLIP`) of ``r`` over the methods whose
    correlation is defined, NaN when none is; ``undefined`` lists the methods left out.
    ``category`` None means all keys pooled per method (see :func:`human_alignment`).
    """

    category: str | None
    value: float
    methods: tuple[MethodCorrelation, ...]
    undefined: tuple[str, ...]


def human_alignment(
    scores: Mapping[str, Mapping[str, float]],
    ratings: Mapping[str, tuple[Mapping[str, float], Mapping[str, float]]],
    category: str | None,
    *,
    methods: Sequence[str] | None = None,
) -> Alignment:
    """Metric-human alignment (MH) of one scorer in ``category``.

    ``scores`` is {method: {key: score}}, ``ratings`` {method: (group 1, group 2)} as from
    :func:`load_rating_tree`. Keys are aligned by :func:`canonical_key`; differing canonical
    key sets (scores vs group 1, or group 1 vs group 2) raise ValueError naming the method and
    some keys on each side. ``methods`` None requires the same methods in ``scores`` and
    ``ratings`` (ValueError otherwise); a sequence picks those methods, each required in both.

    A method whose r1 or r2 is undefined (constant scores or ratings over the category) is
    reported in ``undefined``, logged as a warning and left out of the mean.
    ``category`` None pools all keys of a method into one Pearson r; that figure mixes the
    categories' different scales and is not the benchmark figure (see
    :func:`combine_categories`).
    """
    rows = []
    for method in _methods(scores, ratings, methods):
        group1, group2 = _aligned_groups(method, ratings[method])
        own = _canonical_values(scores[method], f"scores of {method!r}")
        _check_same_keys(method, ("scores", own), ("ratings group 1", group1))
        keys = _category_keys(method, group1, category)
        x = [own[k] for k in keys]
        r1 = round(pearson(x, [group1[k] for k in keys]), 4)
        r2 = round(pearson(x, [group2[k] for k in keys]), 4)
        rows.append(MethodCorrelation(method, len(keys), (r1 + r2) / 2, r1, r2))
        if math.isnan(r1 + r2):
            sides = {"scores": x, "group 1 ratings": [group1[k] for k in keys],
                     "group 2 ratings": [group2[k] for k in keys]}
            _warn_undefined(method, category, len(keys), sides)
    return _combine_methods(category, rows)


def human_human_alignment(
    ratings: Mapping[str, tuple[Mapping[str, float], Mapping[str, float]]],
    category: str | None,
) -> Alignment:
    """Agreement of the two human groups in ``category``: per method Pearson(group 1, group 2),
    rounded to 4 decimals, then the Fisher-z mean over methods (clip :data:`MH_CLIP`).

    Key alignment and undefined correlations are handled as in :func:`human_alignment`.
    """
    rows = []
    for method in ratings:
        group1, group2 = _aligned_groups(method, ratings[method])
        keys = _category_keys(method, group1, category)
        x, y = [group1[k] for k in keys], [group2[k] for k in keys]
        r = round(pearson(x, y), 4)
        rows.append(MethodCorrelation(method, len(keys), r))
        if math.isnan(r):
            _warn_undefined(method, category, len(keys), {"group 1 ratings": x, "group 2 ratings": y})
    return _combine_methods(category, rows)


def combine_categories(values: Mapping[str, float]) -> float:
    """Whole-benchmark figure: Fisher-z mean (clip :data:`MH_CLIP`) of the 4 per-category values.

    ``values`` is {category: MH value} and must hold exactly :data:`CATEGORIES`; a NaN value
    raises ValueError naming the category. This is not one Pearson r pooled over all keys,
    which mixes the categories' different score scales.
    """
    if set(values) != set(CATEGORIES):
        raise ValueError(f"combine_categories needs exactly the categories {', '.join(CATEGORIES)}; "
                         f"got {', '.join(values) or 'none'}")
    undefined = [c for c in CATEGORIES if math.isnan(values[c])]
    if undefined:
        raise ValueError(f"undefined (NaN) alignment in categories: {', '.join(undefined)}")
    return fisher_z_mean([values[c] for c in CATEGORIES], clip=MH_CLIP)


def _methods(scores: Mapping[str, object], ratings: Mapping[str, object], methods: Sequence[str] | None) -> list[str]:
    if methods is None:
        only_scores = sorted(scores.keys() - ratings.keys())
        only_ratings = sorted(ratings.keys() - scores.keys())
        if only_scores or only_ratings:
            raise ValueError(f"scores and ratings cover different methods: only in scores {only_scores}, "
                             f"only in ratings {only_ratings}; pass methods=[...] to pick the methods to use")
        return list(ratings)
    if not methods:
        raise ValueError("methods is empty; pass None to use every method")
    missing = [m for m in methods if m not in scores or m not in ratings]
    if missing:
        raise ValueError(f"methods {missing} are not in both scores ({list(scores)}) and ratings ({list(ratings)})")
    return list(dict.fromkeys(methods))


def _aligned_groups(method: str, groups: tuple[Mapping[str, float], Mapping[str, float]]
                    ) -> tuple[dict[str, float], dict[str, float]]:
    group1 = _canonical_values(groups[0], f"ratings group 1 of {method!r}")
    group2 = _canonical_values(groups[1], f"ratings group 2 of {method!r}")
    _check_same_keys(method, ("ratings group 1", group1), ("ratings group 2", group2))
    return group1, group2


def _canonical_values(values: Mapping[str, float], source: str) -> dict[str, float]:
    """``values`` re-keyed by :func:`canonical_key`; ValueError naming ``source`` on a collision."""
    out: dict[str, float] = {}
    original: dict[str, str] = {}
    for key, value in values.items():
        canonical = canonical_key(key)
        if canonical in out:
            raise ValueError(f"{source}: keys {original[canonical]!r} and {key!r} "
                             f"both have the canonical key {canonical!r}")
        out[canonical], original[canonical] = float(value), key
    return out


def _check_same_keys(method: str, a: tuple[str, Mapping[str, float]], b: tuple[str, Mapping[str, float]]) -> None:
    (name_a, keys_a), (name_b, keys_b) = a, b
    only_a = [k for k in keys_a if k not in keys_b]
    only_b = [k for k in keys_b if k not in keys_a]
    if only_a or only_b:
        raise ValueError(f"method {method!r}: canonical keys of {name_a} and {name_b} differ; "
                         f"{len(only_a)} only in {name_a}: {_some(only_a)}; "
                         f"{len(only_b)} only in {name_b}: {_some(only_b)}")


def _category_keys(method: str, group1: Mapping[str, float], category: str | None) -> list[str]:
    keys = list(select_category(group1, category))
    if not keys:
        raise ValueError(f"method {method!r} has no keys in category {category!r}")
    return keys


def _warn_undefined(method: str, category: str | None, n: int, sides: Mapping[str, list[float]]) -> None:
    constant = [name for name, values in sides.items() if len(set(values)) == 1]
    reason = f"{' and '.join(constant)} constant" if constant and n > 1 else f"only {n} key(s)"
    logger.warning("method %s, category %s: Pearson r undefined (%s over %d keys); left out of the Fisher-z mean",
                   method, category, reason, n)


def _combine_methods(category: str | None, rows: list[MethodCorrelation]) -> Alignment:
    defined = [row.r for row in rows if not math.isnan(row.r)]
    undefined = tuple(row.method for row in rows if math.isnan(row.r))
    value = fisher_z_mean(defined, clip=MH_CLIP) if defined else float("nan")
    return Alignment(category, value, tuple(rows), undefined)


# --- generated-image tree -------------------------------------------------------------------------


def find_runs(images_root: str | os.PathLike) -> dict[str, Path]:
    """Run directories of the DreamBench++ sample release under ``images_root``: {method: run dir}.

    A folder is a run when its name is a :data:`RUN_PREFIXES` prefix, alone or followed by
    ``_``, ``-`` or ``.`` (``ip_adapter_plus_vit_huge_sdxl_...`` is ``ip_adapter_plus_vit_h_sdxl``).
    Other folders are logged as a warning and skipped; hidden folders and plain files are
    ignored. Raises ValueError for two runs of one method, a run without ``src_image/`` or
    ``tgt_image/``, or no run at all. Methods come in :data:`METHODS` order.
    """
    root = Path(images_root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder (expected the DreamBench++ samples folder with one run per method)")
    runs: dict[str, Path] = {}
    unknown = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        method = _run_method(folder.name)
        if method is None:
            unknown.append(folder.name)
            continue
        if method in runs:
            raise ValueError(f"two runs for method {method}: {runs[method]} and {folder}; keep one")
        missing = [side for side in ("src_image", "tgt_image") if not (folder / side).is_dir()]
        if missing:
            raise ValueError(f"{folder}: run of {method} has no {' or '.join(missing)}/ folder")
        runs[method] = folder
    if unknown:
        logger.warning("%s: skipped folders not named after a DreamBench++ method: %s", root, ", ".join(unknown))
    if not runs:
        raise ValueError(f"{root}: no run folder named after a DreamBench++ method ({', '.join(RUN_PREFIXES)})")
    return {m: runs[m] for m in _method_order(runs)}


def run_pairs(run_dir: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """``(key, reference, generation)`` for every image of a run, sorted by relative path.

    ``src_image/<p>.<ext>`` pairs with ``tgt_image/<p>.<ext2>`` (same relative path without
    extension, :func:`nearid_metric.pairing.pair_by_name`); the key is ``<p>`` with ``/``
    replaced by ``-``. Raises ValueError listing the files when any image has no partner, a
    name is shared by two files on one side, two paths give one key, or nothing pairs; files
    without an image extension are logged as a warning and skipped.
    """
    run = Path(run_dir)
    src, tgt = run / "src_image", run / "tgt_image"
    for side in (src, tgt):
        if not side.is_dir():
            raise ValueError(f"{side}: missing; a DreamBench++ run holds src_image/ and tgt_image/")
    pairing = pair_by_name(src, tgt)
    problems = []
    if pairing.unmatched_refs:
        problems.append(f"{len(pairing.unmatched_refs)} in src_image without a generation: "
                        f"{_some(pairing.unmatched_refs)}")
    if pairing.unmatched_gens:
        problems.append(f"{len(pairing.unmatched_gens)} in tgt_image without a reference: "
                        f"{_some(pairing.unmatched_gens)}")
    problems.extend(pairing.ambiguous)
    if problems:
        raise ValueError(f"{run}: images do not pair one to one: " + "; ".join(problems))
    if pairing.ignored:
        logger.warning("%s: skipped %d files without an image extension: %s",
                       run, len(pairing.ignored), _some(pairing.ignored))
    pairs = [(image_key(ref, src).replace("/", "-"), ref, gen) for ref, gen in pairing.pairs]
    if not pairs:
        raise ValueError(f"{run}: no images in src_image/ and tgt_image/")
    keys: dict[str, Path] = {}
    for key, ref, _ in pairs:
        if key in keys:
            raise ValueError(f"{run}: {keys[key]} and {ref} both give the key {key!r}")
        keys[key] = ref
    return pairs


def _run_method(name: str) -> str | None:
    for prefix, method in RUN_PREFIXES.items():
        if name == prefix or (name.startswith(prefix) and name[len(prefix)] in "_-."):
            return method
    return None


def _some(items: Sequence[object]) -> str:
    """The first few ``items`` for an error message, with how many more there are."""
    if not items:
        return "none"
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(str(i) for i in items[:_SHOWN]) + more


# --- scoring the sample release -------------------------------------------------------------------


def score_runs(
    runs: Mapping[str, Sequence[tuple[str, str | os.PathLike, str | os.PathLike]]],
    scorers: Mapping[str, Scorer],
    *,
    batch_size: int | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, str]]:
    """Score the ``(key, reference, generation)`` pairs of every run with every scorer.

    ``runs`` is {method: pairs}, the pairs as from :func:`run_pairs`; ``scorers`` is
    {column: Scorer}, e.g. from ``nearid_metric.cli.load_scorers``. All pairs go through one
    :func:`nearid_metric.scorer.score_pairs` pass (which takes the keyword arguments): each
    distinct image is decoded once and embedded once per scorer; images are told apart by
    content, so a ``src_image/`` shared between runs (symlinked or copied) is read once.

    Returns ``(scores, failures)``: ``scores`` is {column: {method: {key: score}}} with
    score = :data:`SCORE_SCALE` x cosine of the L2-normalised embeddings (a Python float, from
    float32 embeddings), keys in pair order; a pair whose reference or generation could not be
    read has no score. ``failures`` is {path: reason} for every unreadable file.
    """
    from nearid_metric.scorer import score_pairs

    flat = [(method, key, ref, gen) for method, pairs in runs.items() for key, ref, gen in pairs]
    logger.info("scoring %d pairs of %d methods, models %s", len(flat), len(runs), ", ".join(scorers))
    values, ok, failures = score_pairs(list(scorers.values()), [(ref, gen) for _, _, ref, gen in flat],
                                       batch_size=batch_size, num_workers=num_workers, progress=progress,
                                       cache_dir=cache_dir)
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for column, cosines in zip(scorers, values):
        scores[column] = {method: {} for method in runs}
        for (method, key, _, _), cosine, good in zip(flat, cosines.tolist(), ok.tolist()):
            if good:
                scores[column][method][key] = SCORE_SCALE * cosine
    return scores, failures


# --- the nearid-dreambench command ----------------------------------------------------------------

EXIT_OK, EXIT_PROBLEMS = 0, 1  # usage errors exit 2, through argparse
DEFAULT_OUT = Path("dreambench_scores")
"""Where ``nearid-dreambench --images`` saves its scores and tables unless ``--out`` says otherwise."""

HUMAN_ROW = "Human-Human"
OVERALL = "overall"
"""Table column of the whole-benchmark figure: :func:`combine_categories` of the 4 category values."""

MH_JSON, MH_CSV = "mh.json", "mh.csv"


@dataclass
class _Row:
    """One scorer's row of the table: its scores {method: {key: score}} and where they come from."""

    name: str
    scores: dict[str, dict[str, float]]
    folder: Path
    signatures: dict[str, str] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)  # method -> rated canonical keys without a score


def build_parser() -> argparse.ArgumentParser:
    from nearid_metric.cli import add_model_arguments

    parser = argparse.ArgumentParser(
        prog="nearid-dreambench",
        description="DreamBench++ human alignment (MH): score each method's generated images against the "
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
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``nearid-dreambench``: exit 0 when the table was computed, 1 for problems in the data, 2 for usage errors.

    See ``docs/dreambench.md`` ("The nearid-dreambench command") for the options and outputs.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    with stderr_logging("nearid-dreambench") as package_logger:
        try:
            return _command(args, parser)
        except (OSError, ValueError) as e:  # data problems; the messages name the file and what to do
            package_logger.error("error: %s", e)
            return EXIT_PROBLEMS


def _command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.scores is not None and args.model is not None:
        parser.error("--model applies to --images; --scores reads saved scores and loads no model")
    for path in (args.ratings, args.images, *(args.scores or ())):
        if path is not None and not path.is_dir():
            parser.error(f"{path}: no such folder")
    folders = _model_folders(args, parser) if args.images is not None else {}
    categories = tuple(c for c in CATEGORIES if c in (args.category or CATEGORIES))

    all_ratings = load_rating_tree(args.ratings)
    methods = _pick_methods(all_ratings, args.methods, args.ratings, parser)
    ratings = {m: (_in_categories(all_ratings[m][0], categories), _in_categories(all_ratings[m][1], categories))
               for m in methods}
    for method in methods:
        _aligned_groups(method, ratings[method])  # group 1 and group 2 must rate the same keys

    if args.images is not None:
        rows = _score_images(args, parser, ratings, categories, folders)
        if rows is None:
            return EXIT_PROBLEMS
        out = args.out if args.out is not None else DEFAULT_OUT
    else:
        rows = [_load_row(name, folder, methods, categories) for name, folder in _score_folders(args.scores, methods)]
        out = args.out
    _check_coverage(rows, ratings, args.allow_missing)

    table = _table(rows, ratings, categories)
    print(_format_table(table, methods, categories))
    if out is not None:
        _write_tables(out, table, rows, args, methods, categories)
        logger.info("wrote %s and %s", out / MH_JSON, out / MH_CSV)
    return EXIT_OK


def _model_folders(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, str]:
    """{--model column: score folder name}, checked before any data is read."""
    from nearid_metric.cli import parse_models

    args.model = args.model or "nearid"
    try:
        columns = [column for column, _, _ in parse_models(args.model)]
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


def _in_categories(values: Mapping[str, V], categories: Sequence[str]) -> dict[str, V]:
    """The entries of ``values`` in ``categories`` (order kept); every key is parsed, so odd keys raise."""
    return {k: v for k, v in values.items() if parse_key(k).category in categories}


def _missing_keys(method: str, keys: Iterable[str], group1: Mapping[str, float], source: str) -> list[str]:
    """Rated canonical keys (rating order) that ``keys`` lack; ValueError when ``keys`` holds unrated keys."""
    own = _canonical_values(dict.fromkeys(keys, 0.0), source)
    rated = _canonical_values(group1, f"ratings group 1 of {method!r}")
    extra = [k for k in own if k not in rated]
    if extra:
        raise ValueError(f"{source}: {len(extra)} keys of {method!r} have no rating (canonical keys): {_some(extra)}")
    return [k for k in rated if k not in own]


def _score_images(args: argparse.Namespace, parser: argparse.ArgumentParser, ratings: Ratings,
                  categories: Sequence[str], folders: Mapping[str, str]) -> list[_Row] | None:
    """Find the runs, check their keys against the ratings, score them, save the score files.

    Returns the table rows, or None when images could not be read and ``--allow-missing`` was
    not given (the complete methods' score files are written, the others are not).
    """
    from nearid_metric.cli import load_scorers

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
        missing = _missing_keys(m, (key for key, _, _ in pairs[m]), ratings[m][0], f"run {runs[m]}")
        if missing and not args.allow_missing:
            problems.append(f"run {runs[m]} has no images for {len(missing)} rated keys of {m}: {_some(missing)}")
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
                save_scores(out / folders[column], method, _in_rating_order(by_method[method], ratings[method][0]),
                            signature)
        rows.append(_Row(column, by_method, out / folders[column], dict.fromkeys(methods, signature)))
    if incomplete and not args.allow_missing:
        logger.error("error: %d image files could not be read (listed above), so %s lack scores for some rated "
                     "keys; their score files were not written and MH was not computed, since MH over fewer keys "
                     "is a different number. Replace the files, or pass --allow-missing to compute MH without "
                     "those keys", len(failures), ", ".join(incomplete))
        return None
    logger.info("saved the scores under %s", out)
    return rows


def _in_rating_order(scores: Mapping[str, float], group1: Mapping[str, float]) -> dict[str, float]:
    """``scores`` re-ordered as the rating file (the reference tools pair values by position)."""
    by_canonical = {canonical_key(k): k for k in scores}
    keys = [by_canonical[c] for c in map(canonical_key, group1) if c in by_canonical]
    return {k: scores[k] for k in keys}


def _score_folders(dirs: Sequence[Path], methods: Sequence[str]) -> list[tuple[str, Path]]:
    """``--scores`` folders -> [(row name, scorer folder)], expanding folders of scorer folders."""
    def holds_scores(folder: Path) -> bool:
        return any((folder / f"{m}.json").is_file() for m in methods)

    found: list[tuple[str, Path]] = []
    for folder in dirs:
        if holds_scores(folder):
            found.append((folder.resolve().name, folder))
            continue
        inner = [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".") and holds_scores(p)]
        if not inner:
            raise ValueError(f"{folder}: no score file for the methods ({', '.join(m + '.json' for m in methods)}) "
                             "in it or in its subfolders")
        found.extend((p.name, p) for p in inner)
    resolved = [p.resolve() for _, p in found]
    twice = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if twice:
        raise ValueError(f"--scores names the score folder {', '.join(twice)} more than once")
    names = [name for name, _ in found]
    return [(name if names.count(name) == 1 else str(folder), folder) for name, folder in found]


def _load_row(name: str, folder: Path, methods: Sequence[str], categories: Sequence[str]) -> _Row:
    files = {p.stem: p for p in sorted(folder.glob("*.json")) if p.name != SIGNATURES_FILE}
    absent = [m for m in methods if m not in files]
    if absent:
        raise ValueError(f"{folder}: no score file for {', '.join(m + '.json' for m in absent)}; add them, or "
                         "pass --methods to use a subset of the methods")
    unused = sorted(set(files) - set(methods))
    if unused:
        logger.warning("%s: not reading %s (not among the methods used)", folder,
                       ", ".join(m + ".json" for m in unused))
    signatures = load_signatures(folder)
    signatures = {m: signatures[m] for m in methods if m in signatures}
    if len(set(signatures.values())) > 1:
        logger.warning("%s: the score files come from different scorers: %s", folder, signatures)
    scores = {m: _in_categories(load_scores(files[m]), categories) for m in methods}
    return _Row(name, scores, folder, signatures)


def _check_coverage(rows: Sequence[_Row], ratings: Ratings, allow_missing: bool) -> None:
    """Record each row's rated keys without a score; refuse them unless ``allow_missing`` (then warn)."""
    problems = []
    for row in rows:
        for method, (group1, _) in ratings.items():
            missing = _missing_keys(method, row.scores[method], group1, f"scores {row.folder / method}.json")
            if not missing:
                continue
            row.missing[method] = missing
            if allow_missing:
                logger.warning("%s, %s: %d of %d rated keys have no score and are left out of MH: %s",
                               row.name, method, len(missing), len(group1), _some(missing))
            else:
                problems.append(f"{row.folder / method}.json has no score for {len(missing)} of the {len(group1)} "
                                f"rated keys: {_some(missing)}")
    if problems:
        raise ValueError("; ".join(problems) + "; pass --allow-missing to compute MH without those keys")


def _table(rows: Sequence[_Row], ratings: Ratings, categories: Sequence[str]
           ) -> dict[str, dict[str, Alignment | float]]:
    """{row name: {category: Alignment, OVERALL: float (all 4 categories only)}}, Human-Human first."""
    table: dict[str, dict[str, Alignment | float]] = {
        HUMAN_ROW: {c: human_human_alignment(ratings, c) for c in categories}}
    for row in rows:
        rated = {}
        for method, groups in ratings.items():
            missing = set(row.missing.get(method, ()))
            rated[method] = tuple({k: v for k, v in g.items() if canonical_key(k) not in missing} for g in groups)
        table[row.name] = {c: human_alignment(row.scores, rated, c, methods=list(ratings)) for c in categories}
    if tuple(categories) == CATEGORIES:
        for name, cells in table.items():
            try:
                cells[OVERALL] = combine_categories({c: cells[c].value for c in CATEGORIES})
            except ValueError as e:
                logger.warning("%s: no %s figure: %s", name, OVERALL, e)
                cells[OVERALL] = float("nan")
    return table


def _value(cell: Alignment | float) -> float:
    return cell.value if isinstance(cell, Alignment) else cell


def _format_table(table: Mapping[str, Mapping[str, Alignment | float]], methods: Sequence[str],
                  categories: Sequence[str]) -> str:
    """The printed table: one row per scorer, one column per category (+ overall), 3 decimals."""
    columns = [*categories, *([OVERALL] if tuple(categories) == CATEGORIES else [])]
    width = max(len("scorer"), *map(len, table))
    widths = [max(len(c), len("-0.000")) for c in columns]
    lines = [f"DreamBench++ concept preservation: MH over {len(methods)} methods "
             f"(Pearson r with the human ratings, Fisher-z mean over the methods)",
             "  ".join(["scorer".ljust(width), *(c.rjust(w) for c, w in zip(columns, widths))])]
    for name, cells in table.items():
        values = (f"{_value(cells[c]):.3f}".rjust(w) for c, w in zip(columns, widths))
        lines.append("  ".join([name.ljust(width), *values]))
    if OVERALL in columns:
        lines.append(f"{OVERALL}: Fisher-z mean of the 4 category values (not one Pearson r over all keys)")
    return "\n".join(lines)


def _number(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def _write_tables(out: Path, table: Mapping[str, Mapping[str, Alignment | float]], rows: Sequence[_Row],
                  args: argparse.Namespace, methods: Sequence[str], categories: Sequence[str]) -> None:
    """``mh.json`` (everything) and ``mh.csv`` (one line per scorer, category and method, plus the means)."""
    by_name = {row.name: row for row in rows}
    entries = []
    for name, cells in table.items():
        row = by_name.get(name)
        entry: dict[str, object] = {
            "name": name,
            "scores": None if row is None else str(row.folder),
            "signatures": None if row is None else row.signatures,
            "mh": {c: _number(_value(cell)) for c, cell in cells.items()},
            "undefined": {c: list(cells[c].undefined) for c in categories},
            "per_method": {c: [{"method": m.method, "n": m.n, "r1": _number(m.r1), "r2": _number(m.r2),
                                "r": _number(m.r)} for m in cells[c].methods] for c in categories},
        }
        if row is not None and row.missing:
            entry["missing_keys"] = row.missing
        entries.append(entry)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / MH_JSON, {
        "ratings": str(args.ratings),
        "images": None if args.images is None else str(args.images),
        "methods": list(methods),
        "categories": list(categories),
        "allow_missing": args.allow_missing,
        "rows": entries,
    })
    with open(out / MH_CSV, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["scorer", "category", "method", "n", "r1", "r2", "r"])
        for name, cells in table.items():
            for c in categories:
                for m in cells[c].methods:
                    writer.writerow([name, c, m.method, m.n, _cell(m.r1), _cell(m.r2), _cell(m.r)])
                writer.writerow([name, c, "*", sum(m.n for m in cells[c].methods), "", "", _cell(cells[c].value)])
            if OVERALL in cells:
                writer.writerow([name, OVERALL, "*", "", "", "", _cell(cells[OVERALL])])


def _cell(x: float | None) -> str:
    return "" if x is None else repr(float(x))


if __name__ == "__main__":
    sys.exit(main())
