"""Where a score lies between its floor and its ceiling, and generations that copy a reference.

Per subject (a set of reference photos of one object and the generations meant to show it):

- **ceiling**: the real-vs-real figure, the mean cosine over every ordered pair of two
  *different* references of the subject (DreamBooth's "Real images" row);
- **floor**: the subject's generations scored against *other* subjects' references (a
  seeded sample of at most ``floor_pairs`` pairs): what an unrelated object scores;
- **calibrated** = ``(score - floor) / (ceiling - floor)``: 0 at the floor, 1 at the ceiling.

A generation **copies** a reference when its similarity to one of its subject's references
exceeds the subject's highest real-vs-real similarity by more than a margin (no real second
photo is that close), or when the two are near-duplicates at pixel level: a 64-bit difference
hash (:func:`difference_hash`) within :data:`HASH_DISTANCE` bits. Copying is a known way to
game DINO / CLIP-I and identity metrics alike. Numpy and PIL only.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from nearid_metric.stats import BOOTSTRAP_RESAMPLES, CI_LEVEL, bootstrap_ci

HASH_DISTANCE = 8
"""Difference hashes (64 bits) at most this many bits apart are near-duplicates: a resize or a JPEG
re-encode of one picture moves a few bits, a different photo about half of them."""


def ceiling_pairs(refs: Mapping[Hashable, Sequence[Any]]) -> list[tuple[Hashable, Any, Any]]:
    """``(subject, reference a, reference b)`` for every ordered pair of two different references of a subject."""
    return [(s, a, b) for s, items in refs.items() for i, a in enumerate(items) for j, b in enumerate(items) if i != j]


def floor_pairs(refs: Mapping[Hashable, Sequence[Any]], gens: Mapping[Hashable, Sequence[Any]], *,
                max_pairs: int, seed: int = 0) -> list[tuple[Hashable, Any, Any]]:
    """``(subject, other subject's reference, generation)``: each subject's generations against the references of
    every *other* subject, a seeded random sample of at most ``max_pairs`` per subject (all when fewer)."""
    if max_pairs < 1:
        raise ValueError(f"floor pairs must be at least 1, got {max_pairs}")
    rng = np.random.default_rng(seed)
    out = []
    for subject, items in gens.items():
        candidates = [(ref, gen) for other, others in refs.items() if other != subject for ref in others
                      for gen in items]
        if len(candidates) > max_pairs:
            candidates = [candidates[i] for i in sorted(rng.choice(len(candidates), max_pairs, replace=False))]
        out += [(subject, ref, gen) for ref, gen in candidates]
    return out


def calibrate(scores: Mapping[Hashable, Sequence[float]], ceilings: Mapping[Hashable, Sequence[float]],
              floors: Mapping[Hashable, Sequence[float]], *, resamples: int | None = BOOTSTRAP_RESAMPLES,
              seed: int = 0) -> dict[str, Any]:
    """Calibrated scores per subject and over subjects.

    ``scores``: subject -> its (generation, reference) cosines; ``ceilings`` / ``floors``: subject ->
    the cosines of its :func:`ceiling_pairs` / :func:`floor_pairs`. Returns ``{"subjects": {subject:
    {score, floor, ceiling, calibrated, ci95, n}}, "macro": {calibrated, ci95, n}}``. A subject's
    ``ci95`` is its score's bootstrap interval mapped through the same affine map (floor and ceiling
    held fixed); ``macro`` is the mean of the subjects' calibrated values with an interval by
    resampling subjects. A subject without a ceiling (one reference), without floor pairs, or whose
    ceiling does not exceed its floor gets ``calibrated = None`` and is left out of the macro.
    """
    subjects: dict[Hashable, dict[str, Any]] = {}
    for subject, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        ceiling = float(np.mean(ceilings[subject])) if len(ceilings.get(subject, ())) else math.nan
        floor = float(np.mean(floors[subject])) if len(floors.get(subject, ())) else math.nan
        score = float(values.mean()) if len(values) else math.nan
        entry: dict[str, Any] = {"score": score, "floor": floor, "ceiling": ceiling, "calibrated": None,
                                 "ci95": None, "n": len(values)}
        if math.isfinite(score) and math.isfinite(floor) and math.isfinite(ceiling) and ceiling > floor:
            span = ceiling - floor
            entry["calibrated"] = (score - floor) / span
            if resamples is not None:
                low, high = bootstrap_ci(values, resamples=resamples, seed=seed, level=CI_LEVEL)
                if not math.isnan(low):
                    entry["ci95"] = [(low - floor) / span, (high - floor) / span]
        subjects[subject] = entry
    defined = [e["calibrated"] for e in subjects.values() if e["calibrated"] is not None]
    macro: dict[str, Any] = {"calibrated": float(np.mean(defined)) if defined else None, "ci95": None,
                             "n": len(defined)}
    if defined and resamples is not None:
        low, high = bootstrap_ci(defined, resamples=resamples, seed=seed, level=CI_LEVEL)
        macro["ci95"] = None if math.isnan(low) else [low, high]
    return {"subjects": subjects, "macro": macro}


def difference_hash(image: Image.Image) -> int:
    """64-bit difference hash: the image as 9 x 8 grey levels (PIL bilinear with antialiasing, after RGB
    conversion onto white), one bit per horizontally adjacent pair: left brighter than right."""
    rgb = image.convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", rgb.size, (255, 255, 255, 255)), rgb).convert("L")
    grey = np.asarray(flat.resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (grey[:, :-1] > grey[:, 1:]).ravel()
    return int(sum(1 << k for k, bit in enumerate(bits) if bit))


def hash_distance(a: int, b: int) -> int:
    """Number of differing bits of two hashes."""
    return bin(a ^ b).count("1")


def find_copies(pairs: Sequence[tuple[Hashable, str, str, float]], real_max: Mapping[Hashable, float], *,
                margin: float = 0.0, hashes: Mapping[str, int] | None = None,
                max_distance: int = HASH_DISTANCE) -> list[dict[str, Any]]:
    """Generations that copy a reference: ``[{gen, ref, subject, score, reason, ...}]``, one per generation.

    ``pairs``: ``(subject, reference, generation, cosine)``; ``real_max``: subject -> its highest
    real-vs-real cosine (subjects without one are judged by the hashes only). A generation is a copy
    when a cosine to one of its references exceeds ``real_max + margin`` (``reason: "score"``), or
    when ``hashes`` (file -> :func:`difference_hash`) puts it within ``max_distance`` bits of one of
    its references (``reason: "pixels"``, ``distance``). The reference reported is the closest one.
    """
    found: dict[str, dict[str, Any]] = {}
    for subject, ref, gen, score in pairs:
        threshold = real_max.get(subject, math.nan)
        by_score = math.isfinite(threshold) and score > threshold + margin
        distance = None
        if hashes is not None and ref in hashes and gen in hashes:
            distance = hash_distance(hashes[ref], hashes[gen])
        by_pixels = distance is not None and distance <= max_distance
        if not (by_score or by_pixels):
            continue
        entry = {"gen": gen, "ref": ref, "subject": subject, "score": score,
                 "real_max": None if math.isnan(threshold) else threshold,
                 "reason": "pixels" if by_pixels else "score", "hash_distance": distance}
        best = found.get(gen)
        if best is None or (by_pixels, score) > (best["reason"] == "pixels", best["score"]):
            found[gen] = entry
    return list(found.values())


def image_hashes(paths: Sequence[str]) -> dict[str, int]:
    """:func:`difference_hash` of each readable image file (unreadable ones are left out: they were not scored)."""
    from nearid_metric.images import ImageLoadError, load_image

    hashes = {}
    for path in dict.fromkeys(paths):
        try:
            hashes[path] = difference_hash(load_image(path))
        except (ImageLoadError, OSError):
            continue
    return hashes


def calibrate_column(values: Sequence[float], subjects: Sequence[Hashable], pairs: Sequence[tuple[str, str]], *,
                     real: Sequence[tuple[Hashable, str, str, float]],
                     floor: Sequence[tuple[Hashable, str, str, float]] = (), calibrated: bool = True,
                     margin: float = 0.0, hashes: Mapping[str, int] | None = None,
                     resamples: int | None = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """One score column's calibration and copies from its scored pairs.

    ``values`` [P] (finite) with the ``subjects`` and (reference, generation) ``pairs`` they belong to;
    ``real`` / ``floor``: ``(subject, a, b, score)`` of the :func:`ceiling_pairs` / :func:`floor_pairs`
    (unreadable ones left out). Returns ``{"ceilings": {subject: its real-vs-real scores}, "copies":
    find_copies(...)}`` and, when ``calibrated``, ``"calibration": calibrate(...)``.
    """
    def by_subject(rows: Sequence[tuple[Hashable, str, str, float]]) -> dict[Hashable, list[float]]:
        out: dict[Hashable, list[float]] = {}
        for subject, _, _, score in rows:
            out.setdefault(subject, []).append(score)
        return out

    ceilings = by_subject(real)
    result: dict[str, Any] = {"ceilings": ceilings, "copies": find_copies(
        [(s, ref, gen, float(v)) for s, (ref, gen), v in zip(subjects, pairs, values)],
        {s: max(v) for s, v in ceilings.items()}, margin=margin, hashes=hashes)}
    if calibrated:
        scores: dict[Hashable, list[float]] = {}
        for subject, value in zip(subjects, values):
            scores.setdefault(subject, []).append(float(value))
        result["calibration"] = calibrate(scores, ceilings, by_subject(floor), resamples=resamples, seed=seed)
    return result
