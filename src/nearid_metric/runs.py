"""A scoring run as ``nearid-score`` computes it: (reference, generation) pairs and their prompts in, one
score column per scorer out, image-image cosines (DINO, CLIP-I, NearID) and image-text cosines (CLIP-T)
from one embedding pass over the distinct images."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch

from nearid_metric.loading import ImageInput
from nearid_metric.scorer import Scorer, embed_pairs
from nearid_metric.stats import mean_ci, summarize
from nearid_metric.subjects import subject_summary

if TYPE_CHECKING:
    from nearid_metric.text import TextScorer

AnyScorer = Union[Scorer, "TextScorer"]


def is_text_scorer(scorer: object) -> bool:
    """Whether ``scorer`` scores an image against a prompt (a CLIP-T scorer) rather than against a reference."""
    return hasattr(scorer, "embed_texts")


@dataclass
class RunScores:
    """Scores of a run: ``scores`` column -> float64 [P] (NaN where a pair was not scored, or for a text
    column where its prompt is missing), ``scored`` bool [P] (both images read), ``failures`` {image:
    reason}, ``extra`` image column -> float64 [E] cosines of the extra pairs (NaN where unreadable)."""

    scores: dict[str, np.ndarray]
    scored: np.ndarray
    failures: dict[str, str]
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def score_run(columns: Mapping[str, AnyScorer], pairs: Sequence[tuple[ImageInput, ImageInput]], *,
              prompts: Sequence[str | None] | None = None,
              extra_pairs: Sequence[tuple[ImageInput, ImageInput]] = (),
              batch_size: int | None = None, num_workers: int = 0, progress: bool | None = None,
              cache_dir: str | os.PathLike | None = None, distributed: bool = False) -> RunScores:
    """Score ``pairs`` with every scorer of ``columns`` ({column: scorer}), each distinct image decoded once.

    An image scorer gives the cosine of the reference's and the generation's embeddings; a text
    scorer (:func:`nearid_metric.text.create_text_scorer`) the cosine of the generation's image
    embedding and its prompt's text embedding (``prompts``: one per pair, None where missing;
    its image tower shares the embedding pass and is embedded once when another column uses the
    same weights). ``extra_pairs`` (e.g. real-vs-real ceiling pairs) are scored by the image
    columns in the same pass. Raw cosines; scaling is the protocol's (:mod:`nearid_metric.protocols`).
    """
    text_columns = [c for c, s in columns.items() if is_text_scorer(s)]
    if text_columns and (prompts is None or len(prompts) != len(pairs)):
        raise ValueError(f"text scorers ({', '.join(text_columns)}) need one prompt per pair")
    encoders: list[Scorer] = []
    slot: dict[str, int] = {}
    for column, scorer in columns.items():
        image_scorer = scorer.image_scorer if is_text_scorer(scorer) else scorer
        known = [i for i, s in enumerate(encoders) if s.signature == image_scorer.signature]
        slot[column] = known[0] if known else len(encoders)
        if not known:
            encoders.append(image_scorer)
    everything = [*pairs, *extra_pairs]
    embeddings, refs, gens, read, failures = embed_pairs(
        encoders, everything, batch_size=batch_size, num_workers=num_workers, progress=progress,
        cache_dir=cache_dir, distributed=distributed)
    n = len(pairs)
    scores: dict[str, np.ndarray] = {}
    extra: dict[str, np.ndarray] = {}
    for column, scorer in columns.items():
        emb = embeddings[slot[column]]
        if is_text_scorer(scorer):
            scores[column] = _text_scores(scorer, emb[gens[:n]], read[:n], prompts, batch_size)
            continue
        cosines = torch.where(read, (emb[refs] * emb[gens]).sum(-1), float("nan")).double().numpy()
        scores[column], extra[column] = cosines[:n], cosines[n:]
    return RunScores(scores, read[:n].numpy(), failures, extra)


def _text_scores(scorer: TextScorer, images: torch.Tensor, read: torch.Tensor, prompts: Sequence[str | None],
                 batch_size: int | None) -> np.ndarray:
    """Cosine of each generation's image embedding [P, E] with its prompt's; NaN where unread or no prompt."""
    from nearid_metric.text import image_text_scores

    out = np.full(len(prompts), np.nan)
    wanted = [i for i, prompt in enumerate(prompts) if prompt is not None and bool(read[i])]
    if not wanted:
        return out
    distinct = list(dict.fromkeys(prompts[i] for i in wanted))
    texts = scorer.embed_texts(distinct, batch_size=batch_size)
    row = {prompt: k for k, prompt in enumerate(distinct)}
    index = torch.tensor([row[prompts[i]] for i in wanted], dtype=torch.long)
    out[wanted] = image_text_scores(images[wanted], texts[index]).double().numpy()
    return out


def run_summary(result: RunScores, *, text_columns: Sequence[str] = (), gens: Sequence[str] | None = None,
                subjects: Sequence[str] | None = None, ceilings: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                categories: Sequence[str] | None = None, groups: Sequence[str] | None = None, unit: str = "pair",
                resamples: int | None, seed: int = 0) -> dict[str, Any]:
    """The figures of a run's (already scaled) columns: ``{"models": {column: {count, mean, ci95, ...[, macro,
    micro, ceiling]}}[, "subjects": {subject: {column: {mean, n, ci95[, ceiling]}}], "categories": ...]}``.

    Every column is summarised over its finite scores; a text column (``text_columns``, its value is a
    property of the generation alone) over each distinct generation once (``gens``: the generation of
    each pair). ``subjects`` (one per pair) adds per-subject means and the ``macro`` / ``micro`` means
    (:func:`nearid_metric.subjects.subject_summary`), ``ceilings`` (column -> subject -> real-vs-real
    scores) the ceiling of each; ``categories`` (one per pair) the DreamBench++ per-category means.
    ``groups`` / ``unit``: the resampling groups of the pair-level interval.
    """
    models: dict[str, dict[str, Any]] = {}
    per_subject: dict[str, dict[str, Any]] = {}
    per_category: dict[str, dict[str, Any]] = {}
    for column, values in result.scores.items():
        keep = result.scored & np.isfinite(values)
        if column in text_columns and gens is not None:
            first: dict[str, int] = {}
            for i in np.flatnonzero(keep):
                first.setdefault(gens[i], int(i))
            keep = np.zeros(len(values), dtype=bool)
            keep[list(first.values())] = True
        rows = np.flatnonzero(keep)
        kept = values[rows]
        kept_groups = None if groups is None else [groups[i] for i in rows]
        models[column] = {**summarize(kept), **mean_ci(kept, kept_groups, resamples=resamples, seed=seed, unit=unit)}
        if subjects is not None and len(rows):
            column_ceilings = None if ceilings is None or column not in ceilings else ceilings[column]
            figures = subject_summary(kept, [subjects[i] for i in rows], resamples=resamples, seed=seed,
                                      groups=kept_groups, unit=unit, ceilings=column_ceilings)
            models[column]["macro"], models[column]["micro"] = figures["macro"], figures["micro"]
            for subject, entry in figures["subjects"].items():
                per_subject.setdefault(subject, {})[column] = entry
        if categories is not None:
            for category in dict.fromkeys(categories):
                mine = np.array([categories[i] == category for i in rows], dtype=bool)
                subset = kept[mine]
                per_category.setdefault(category, {})[column] = {
                    "mean": float(subset.mean()) if len(subset) else None, "n": int(len(subset)),
                    "ci95": mean_ci(subset, None, resamples=resamples, seed=seed)["ci95"] if len(subset) else None}
    out: dict[str, Any] = {"models": models}
    if subjects is not None:
        out["subjects"] = dict(sorted(per_subject.items()))
    if categories is not None:
        out["categories"] = per_category
    return out
