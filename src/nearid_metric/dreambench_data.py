"""DreamBench++ files: human rating files, score files and folders, the sample release's run folders,
scoring those runs, and the ``mh.json`` / ``mh.csv`` tables.

Files are read and written in the layouts of the public DreamBench++ data (``docs/dreambench.md``).
Models are imported only by :func:`score_runs`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nearid_metric.dreambench import (
    METHODS,
    OVERALL,
    RATING_RANGE,
    SCORE_SCALE,
    Alignment,
    Ratings,
    ScoreSet,
    alignment_value,
    canonical_key,
    canonical_values,
    in_categories,
    method_order,
    preview,
)
from nearid_metric.outputs import write_csv, write_json
from nearid_metric.pairing import image_key, pair_by_name

if TYPE_CHECKING:
    from nearid_metric.scorer import Scorer

logger = logging.getLogger(__name__)

SIGNATURES_FILE = "signatures.json"
"""Sidecar in a score folder: {method: scorer signature}; never read as a method's scores."""

MH_JSON, MH_CSV = "mh.json", "mh.csv"
"""The files of an MH table: everything (JSON), and one line per scorer, category and method (CSV)."""

RATINGS_SUFFIX = "-cp.json"
"""Concept-preservation rating files are ``group{1,2}/<method>-cp.json``."""

RUN_PREFIXES = {
    **{method: method for method in METHODS},
    "ip_adapter_plus_vit_huge_sdxl": "ip_adapter_plus_vit_h_sdxl",
    "ip_adapter_vit_giant_sdxl": "ip_adapter_vit_g_sdxl",
}
"""Run-directory name prefix in the sample release -> method name in the rating files."""



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
    return {m: (load_ratings(groups[0][m]), load_ratings(groups[1][m])) for m in method_order(groups[0])}



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
    return {m: load_scores(files[m]) for m in method_order(files)}



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
        raise ValueError(f"scores of {method!r} are not finite for {len(bad)} keys: {preview(bad)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{method}.json"
    write_json(path, {k: float(v) for k, v in scores.items()}, indent=4)
    signatures = load_signatures(folder)
    others = sorted(m for m, s in signatures.items() if m != method and s != signature)
    if others:
        logger.warning("%s: %s were scored with a different signature than %s (%s)",
                       folder, ", ".join(others), method, signature)
    signatures[method] = signature
    write_json(folder / SIGNATURES_FILE, signatures, indent=4)
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
    canonical_values(values, str(path))
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
    return {m: runs[m] for m in method_order(runs)}



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
                        f"{preview(pairing.unmatched_refs)}")
    if pairing.unmatched_gens:
        problems.append(f"{len(pairing.unmatched_gens)} in tgt_image without a reference: "
                        f"{preview(pairing.unmatched_gens)}")
    problems.extend(pairing.ambiguous)
    if problems:
        raise ValueError(f"{run}: images do not pair one to one: " + "; ".join(problems))
    if pairing.ignored:
        logger.warning("%s: skipped %d files without an image extension: %s",
                       run, len(pairing.ignored), preview(pairing.ignored))
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
    {column: Scorer}, e.g. from :func:`nearid_metric.create_scorer`. All pairs go through one
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



def in_rating_order(scores: Mapping[str, float], group1: Mapping[str, float]) -> dict[str, float]:
    """``scores`` re-ordered as the rating file (the reference tools pair values by position)."""
    by_canonical = {canonical_key(k): k for k in scores}
    keys = [by_canonical[c] for c in map(canonical_key, group1) if c in by_canonical]
    return {k: scores[k] for k in keys}



def find_score_folders(dirs: Sequence[Path], methods: Sequence[str]) -> list[tuple[str, Path]]:
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



def load_score_set(name: str, folder: Path, methods: Sequence[str], categories: Sequence[str]) -> ScoreSet:
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
    scores = {m: in_categories(load_scores(files[m]), categories) for m in methods}
    return ScoreSet(name, scores, folder, signatures)



def write_mh_tables(out: Path, table: Mapping[str, Mapping[str, Alignment | float]], rows: Sequence[ScoreSet],
                    ratings: str | os.PathLike, images: str | os.PathLike | None, allow_missing: bool,
                    methods: Sequence[str], categories: Sequence[str]) -> None:
    """``mh.json`` (everything) and ``mh.csv`` (one line per scorer, category and method, plus the means)."""
    by_name = {row.name: row for row in rows}
    entries = []
    for name, cells in table.items():
        row = by_name.get(name)
        entry: dict[str, object] = {
            "name": name,
            "scores": None if row is None else str(row.folder),
            "signatures": None if row is None else row.signatures,
            "mh": {c: alignment_value(cell) for c, cell in cells.items()},
            "undefined": {c: list(cells[c].undefined) for c in categories},
            "per_method": {c: [{"method": m.method, "n": m.n, "r1": m.r1, "r2": m.r2,
                                "r": m.r} for m in cells[c].methods] for c in categories},
        }
        if row is not None and row.missing:
            entry["missing_keys"] = row.missing
        entries.append(entry)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MH_JSON, indent=4, content={
        "ratings": str(ratings),
        "images": None if images is None else str(images),
        "methods": list(methods),
        "categories": list(categories),
        "allow_missing": allow_missing,
        "rows": entries,
    })
    def csv_rows() -> Iterator[list[object]]:
        for name, cells in table.items():
            for c in categories:
                for m in cells[c].methods:
                    yield [name, c, m.method, m.n, m.r1, m.r2, m.r]
                yield [name, c, "*", sum(m.n for m in cells[c].methods), "", "", cells[c].value]
            if OVERALL in cells:
                yield [name, OVERALL, "*", "", "", "", cells[OVERALL]]

    write_csv(out / MH_CSV, ["scorer", "category", "method", "n", "r1", "r2", "r"], csv_rows())
