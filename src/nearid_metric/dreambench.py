"""DreamBench++ human alignment (MH): keys, rating and score files, the generated-image tree, correlations.

Definitions follow spec section 4: per method, Pearson r of a scorer's scores with each of the
two human rating groups, each rounded to 4 decimals, averaged; then a Fisher-z mean over the
methods (clip 0.9999). Files are read and written in the layouts of the public DreamBench++
data; ``docs/dreambench.md`` describes them and every handling decision made here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from nearid_metric.pairing import image_key, pair_by_name
from nearid_metric.stats import fisher_z_mean, pearson

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
