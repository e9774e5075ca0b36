"""From embeddings to the similarity columns of benchmark samples (:mod:`nearid_metric.data`).

A run embeds :func:`unique_images` once and turns the embeddings into per-sample columns with
:func:`nearid_similarities` / :func:`mtg_similarities` (float64 cosines, NaN for a missing
image); :func:`mtg_oracles` reads the MTG masks. :mod:`nearid_metric.protocol` computes margins
and rates from those columns.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from nearid_metric.data import MTGSample, NearIDSample
from nearid_metric.images import EncodedImage, ImageLoadError, ImageSource, load_image
from nearid_metric.masking import MaskedImage
from nearid_metric.protocol import mtg_oracle

_DOT_CHUNK = 4096  # pairs per chunk when computing similarities
_PAIRS = ((0, 1), (0, 2), (1, 2))
_MTG_PAIRS = {"sim_1_2": ("image_1", "image_2"), "sim_1_1p": ("image_1", "image_1p"),
              "sim_1_2p": ("image_1", "image_2p"), "sim_2_2p": ("image_2", "image_2p"),
              "sim_2_1p": ("image_2", "image_1p")}


def image_source_key(image: ImageSource) -> Any:
    """Identity of an image source: the EncodedImage or MaskedImage itself, or the path as a string."""
    return image if isinstance(image, (EncodedImage, MaskedImage)) else os.fspath(image)


def unique_images(samples: Iterable[NearIDSample | MTGSample]) -> list[ImageSource]:
    """Each image to embed once, in order of first appearance (masks excluded).

    Paths are the same image when ``os.fspath`` gives the same string; an ``EncodedImage``
    when its name and bytes are equal (so re-reading a positives table for another
    distractor group repeats no work).
    """
    seen: dict[Any, ImageSource] = {}
    for sample in samples:
        for image in sample.images:
            if image is not None:
                seen.setdefault(image_source_key(image), image)
    return list(seen.values())


def _as_matrix(embeddings: Any) -> np.ndarray:
    if hasattr(embeddings, "detach"):  # a torch tensor; numpy has no bfloat16
        embeddings = embeddings.detach().cpu()
        if not embeddings.is_floating_point() or embeddings.element_size() < 4:
            embeddings = embeddings.float()
        embeddings = embeddings.numpy()
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D [images, dim] array, got shape {embeddings.shape}")
    return embeddings


def _rows_of(images: Sequence[ImageSource | None], index: dict[Any, int]) -> np.ndarray:
    """Embedding row of each image, -1 for a missing image; [N] int64."""
    rows = np.full(len(images), -1, dtype=np.int64)
    for n, image in enumerate(images):
        if image is not None:
            try:
                rows[n] = index[image_source_key(image)]
            except KeyError:
                raise KeyError(f"image {image} is not in the embedding index") from None
    return rows


def _lookup(embeddings: Any, index: Mapping[ImageSource, int]) -> tuple[np.ndarray, dict[Any, int]]:
    matrix = _as_matrix(embeddings)
    lookup = {image_source_key(image): int(row) for image, row in index.items()}
    bad = [f"{image} -> {row}" for image, row in index.items() if not 0 <= row < len(matrix)]
    if bad:
        raise ValueError(f"index rows outside the {len(matrix)} embeddings: {', '.join(bad[:5])}"
                         + (", ..." if len(bad) > 5 else ""))
    return matrix, lookup


def _cosines(matrix: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot products of rows ``a[n]`` and ``b[n]`` of ``matrix`` in float64; NaN where either is -1."""
    out = np.full(len(a), np.nan)
    both = np.flatnonzero((a >= 0) & (b >= 0))
    for start in range(0, len(both), _DOT_CHUNK):
        n = both[start:start + _DOT_CHUNK]
        out[n] = np.einsum("nd,nd->n", matrix[a[n]].astype(np.float64), matrix[b[n]].astype(np.float64))
    return out


def nearid_similarities(samples: Sequence[NearIDSample], embeddings: Any,
                        index: Mapping[ImageSource, int]) -> dict[str, np.ndarray]:
    """The per-sample similarity columns of the NearID protocol, each [N] float64 in sample order.

    ``embeddings``: [M, D] array or tensor of L2-normalised embeddings (cosine = dot product,
    computed in float64); ``index``: image source -> its row, e.g. enumerate
    ``unique_images(samples)``. Columns: ``sim_01, sim_02, sim_12`` (view i vs view j),
    ``cross_00 .. cross_22`` (view i vs distractor j), ``neg_sim_01, neg_sim_02, neg_sim_12``
    (distractor vs distractor). NaN where an image is missing or its embedding row holds NaN.
    Raises ``KeyError`` for an image that is not in ``index``.
    """
    matrix, lookup = _lookup(embeddings, index)
    views = [_rows_of([s.views[k] for s in samples], lookup) for k in range(3)]
    distractors = [_rows_of([s.distractors[k] for s in samples], lookup) for k in range(3)]
    columns = {f"sim_{i}{j}": _cosines(matrix, views[i], views[j]) for i, j in _PAIRS}
    columns.update({f"cross_{i}{j}": _cosines(matrix, views[i], distractors[j]) for i in range(3) for j in range(3)})
    columns.update({f"neg_sim_{i}{j}": _cosines(matrix, distractors[i], distractors[j]) for i, j in _PAIRS})
    return columns


def mtg_similarities(samples: Sequence[MTGSample], embeddings: Any,
                     index: Mapping[ImageSource, int]) -> dict[str, np.ndarray]:
    """The MTG similarity columns ``sim_1_2, sim_1_1p, sim_1_2p, sim_2_2p, sim_2_1p``, each [N] float64.

    Arguments and NaN rules as in :func:`nearid_similarities`.
    """
    matrix, lookup = _lookup(embeddings, index)
    rows = {field: _rows_of([getattr(s, field) for s in samples], lookup)
            for field in ("image_1", "image_2", "image_1p", "image_2p")}
    return {name: _cosines(matrix, rows[a], rows[b]) for name, (a, b) in _MTG_PAIRS.items()}


def mtg_oracles(samples: Sequence[MTGSample], failures: dict[str, str] | None = None, *,
                missing: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Oracle similarity of view 1 and view 2 per sample: ``1 - part area / object area``; [N] float64 each.

    The decoded masks go to :func:`nearid_metric.protocol.mtg_oracle` (binarised at > 0 there;
    0 when the object mask is empty). A view with a missing (None) object or part mask gets
    ``missing``: 0, as the reference did (its oracle of a missing mask is 0); pass NaN for the
    stricter variant that leaves such views out of the correlations. An unreadable mask raises
    :class:`~nearid_metric.images.ImageLoadError`, masks of different sizes ``ValueError``, each
    naming the mask; with ``failures`` given, that view's oracle is NaN instead and the problem
    is recorded there (``{mask name: reason}``), so one bad mask loses only its own view.
    """
    def oracle(object_mask: ImageSource | None, part_mask: ImageSource | None) -> float:
        if object_mask is None or part_mask is None:
            return missing
        try:
            return mtg_oracle(load_image(object_mask), load_image(part_mask))
        except ImageLoadError as e:
            if failures is None:
                raise
            failures[e.path] = e.reason
        except ValueError as e:
            reason = f"masks {object_mask} and {part_mask}: {e}"
            if failures is None:
                raise ValueError(reason) from None
            failures[str(part_mask)] = reason
        return float("nan")

    return (np.array([oracle(s.object_mask_1, s.part_mask_1) for s in samples], dtype=np.float64),
            np.array([oracle(s.object_mask_2, s.part_mask_2) for s in samples], dtype=np.float64))
