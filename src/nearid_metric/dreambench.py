"""DreamBench++ human alignment (MH): keys, categories and the correlations (spec section 4).

Per method, Pearson r of a scorer's scores with each of the two human rating groups, each
rounded to 4 decimals, averaged; then a Fisher-z mean over the methods (clip 0.9999).
:func:`mh_table` computes the whole table of ``nearid-dreambench``. The files (ratings, scores,
the sample release's run folders) are read by :mod:`nearid_metric.dreambench_data`;
``docs/dreambench.md`` describes them and every handling decision. Needs no torch.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

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

MH_CLIP = 0.9999
"""Correlations are clipped to [-MH_CLIP, MH_CLIP] before the Fisher z transform."""

SCORE_SCALE = 100.0
"""A DreamBench++ score is SCORE_SCALE x the cosine of the (reference, generation) embeddings."""

RATING_RANGE = (0.0, 4.0)
"""Human concept-preservation ratings lie in this closed range."""

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



def canonical_values(values: Mapping[str, float], source: str) -> dict[str, float]:
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



def preview(items: Sequence[object]) -> str:
    """The first few ``items`` for an error message, with how many more there are."""
    if not items:
        return "none"
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(str(i) for i in items[:_SHOWN]) + more



def method_order(methods: Mapping[str, object]) -> list[str]:
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
        group1, group2 = aligned_groups(method, ratings[method])
        own = canonical_values(scores[method], f"scores of {method!r}")
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
        group1, group2 = aligned_groups(method, ratings[method])
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



def aligned_groups(method: str, groups: tuple[Mapping[str, float], Mapping[str, float]]
                    ) -> tuple[dict[str, float], dict[str, float]]:
    group1 = canonical_values(groups[0], f"ratings group 1 of {method!r}")
    group2 = canonical_values(groups[1], f"ratings group 2 of {method!r}")
    _check_same_keys(method, ("ratings group 1", group1), ("ratings group 2", group2))
    return group1, group2



def _check_same_keys(method: str, a: tuple[str, Mapping[str, float]], b: tuple[str, Mapping[str, float]]) -> None:
    (name_a, keys_a), (name_b, keys_b) = a, b
    only_a = [k for k in keys_a if k not in keys_b]
    only_b = [k for k in keys_b if k not in keys_a]
    if only_a or only_b:
        raise ValueError(f"method {method!r}: canonical keys of {name_a} and {name_b} differ; "
                         f"{len(only_a)} only in {name_a}: {preview(only_a)}; "
                         f"{len(only_b)} only in {name_b}: {preview(only_b)}")

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

HUMAN_ROW = "Human-Human"

OVERALL = "overall"
"""Table column of the whole-benchmark figure: :func:`combine_categories` of the 4 category values."""



@dataclass
class ScoreSet:
    """One scorer's row of the table: its scores {method: {key: score}} and where they come from."""

    name: str
    scores: dict[str, dict[str, float]]
    folder: Path
    signatures: dict[str, str] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)  # method -> rated canonical keys without a score



def in_categories(values: Mapping[str, V], categories: Sequence[str]) -> dict[str, V]:
    """The entries of ``values`` in ``categories`` (order kept); every key is parsed, so odd keys raise."""
    return {k: v for k, v in values.items() if parse_key(k).category in categories}



def missing_keys(method: str, keys: Iterable[str], group1: Mapping[str, float], source: str) -> list[str]:
    """Rated canonical keys (rating order) that ``keys`` lack; ValueError when ``keys`` holds unrated keys."""
    own = canonical_values(dict.fromkeys(keys, 0.0), source)
    rated = canonical_values(group1, f"ratings group 1 of {method!r}")
    extra = [k for k in own if k not in rated]
    if extra:
        raise ValueError(f"{source}: {len(extra)} keys of {method!r} have no rating (canonical keys): {preview(extra)}")
    return [k for k in rated if k not in own]



def check_coverage(rows: Sequence[ScoreSet], ratings: Ratings, allow_missing: bool) -> None:
    """Record each row's rated keys without a score; refuse them unless ``allow_missing`` (then warn)."""
    problems = []
    for row in rows:
        for method, (group1, _) in ratings.items():
            missing = missing_keys(method, row.scores[method], group1, f"scores {row.folder / method}.json")
            if not missing:
                continue
            row.missing[method] = missing
            if allow_missing:
                logger.warning("%s, %s: %d of %d rated keys have no score and are left out of MH: %s",
                               row.name, method, len(missing), len(group1), preview(missing))
            else:
                problems.append(f"{row.folder / method}.json has no score for {len(missing)} of the {len(group1)} "
                                f"rated keys: {preview(missing)}")
    if problems:
        raise ValueError("; ".join(problems) + "; pass --allow-missing to compute MH without those keys")



def mh_table(rows: Sequence[ScoreSet], ratings: Ratings, categories: Sequence[str]
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



def alignment_value(cell: Alignment | float) -> float:
    return cell.value if isinstance(cell, Alignment) else cell



def format_mh_table(table: Mapping[str, Mapping[str, Alignment | float]], methods: Sequence[str],
                  categories: Sequence[str]) -> str:
    """The printed table: one row per scorer, one column per category (+ overall), 3 decimals."""
    columns = [*categories, *([OVERALL] if tuple(categories) == CATEGORIES else [])]
    width = max(len("scorer"), *map(len, table))
    widths = [max(len(c), len("-0.000")) for c in columns]
    lines = [f"DreamBench++ concept preservation: MH over {len(methods)} methods "
             f"(Pearson r with the human ratings, Fisher-z mean over the methods)",
             "  ".join(["scorer".ljust(width), *(c.rjust(w) for c, w in zip(columns, widths))])]
    for name, cells in table.items():
        values = (f"{alignment_value(cells[c]):.3f}".rjust(w) for c, w in zip(columns, widths))
        lines.append("  ".join([name.ljust(width), *values]))
    if OVERALL in columns:
        lines.append(f"{OVERALL}: Fisher-z mean of the 4 category values (not one Pearson r over all keys)")
    return "\n".join(lines)
