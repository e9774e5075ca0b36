"""Embedding each image once: content keys, and the on-disk embedding cache of ``cache_dir=`` / ``--cache``.

An image's key is the sha256 of its content: of the file's bytes (or an :class:`EncodedImage`'s),
via :func:`nearid_metric.cache.content_key`; of the pixels for PIL images and tensors
(``pixels:<sha256 of mode, size, palette, transparency and pixel bytes>``). Images with the same
key are decoded and embedded once.

The cache keeps one :class:`nearid_metric.cache.ArrayStore` per scorer under the cache folder,
keyed by :func:`cache_signature`: the scorer's reproducibility signature (model, weights source
and revision, sha256 of the weights, precision, package version) plus a digest of its
preprocessing. An embedding is therefore only ever reused by the same weights, readout,
precision and preprocessing, and a new package version starts afresh (a release may change how
images become pixels). Entries are also checked on the way out: a row that is not a finite unit
vector is recomputed, not used (the store's checksums catch damaged files at open).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from nearid_metric.cache import HASH_MEMO, ArrayStore, content_keys
from nearid_metric.images import ORIENTATION
from nearid_metric.options import available_cores

if TYPE_CHECKING:
    from nearid_metric.scorer import Images, Scorer

logger = logging.getLogger(__name__)

HASH_THREADS = min(8, available_cores())  # file hashing releases the GIL
FLUSH_SECONDS = 60.0  # a killed run loses at most about this much embedding work
NORM_TOLERANCE = 1e-3  # a cached embedding must be a unit vector within this


def image_keys(images: Images, *, cache_dir: str | os.PathLike | None = None) -> list[str | None]:
    """Content key of each image; None where a file cannot be read (decoding then reports why).

    With ``cache_dir``, file hashes are remembered in ``cache_dir/``:data:`HASH_MEMO`
    (:class:`nearid_metric.cache.FileHashMemo`), so a re-run does not read unchanged files again.
    """
    in_memory = (Image.Image, torch.Tensor)
    keys = [_pixels_key(image) if isinstance(image, in_memory) else None for image in images]
    files = [i for i, image in enumerate(images) if not isinstance(image, in_memory)]
    memo = None if cache_dir is None else Path(cache_dir) / HASH_MEMO
    file_keys, _ = content_keys([images[i] for i in files], num_threads=HASH_THREADS, memo=memo)
    for i, key in zip(files, file_keys):
        keys[i] = key
    return keys


def _pixels_key(image: Image.Image | torch.Tensor) -> str | None:
    """``pixels:<sha256>`` of an in-memory picture; None if it cannot be read (e.g. a truncated lazy PIL image)."""
    try:
        if isinstance(image, torch.Tensor):  # uint8 [3, H, W], read as an RGB picture
            header, size, data = "RGB", (image.shape[2], image.shape[1]), image.permute(1, 2, 0).contiguous().numpy()
        else:
            header, size, data = image.mode, image.size, image.tobytes()
            if image.getexif().get(ORIENTATION, 1) != 1:  # applied before embedding (images.orient)
                header += f"|orientation={image.getexif()[ORIENTATION]}"
            if image.mode in ("P", "PA"):  # what RGB conversion reads besides the pixels
                header += f"|palette={image.getpalette()}"
            if "transparency" in image.info:
                header += f"|transparency={image.info['transparency']!r}"
    except Exception:  # decoding reports what is wrong with it
        return None
    digest = hashlib.sha256(f"{header}|{size[0]}x{size[1]}|".encode())
    digest.update(data)
    return "pixels:" + digest.hexdigest()


def cache_signature(scorer: Scorer) -> str:
    """What an embedding of ``scorer`` depends on: ``<signature>|pre:<12 hex of its preprocessing>``."""
    preprocessing = hashlib.sha256(repr(scorer.preprocess_config).encode()).hexdigest()[:12]
    return f"{scorer.signature}|pre:{preprocessing}"


class EmbeddingCache:
    """The stores of several scorers under one folder; scorers with the same cache signature share one.

    Use as a context manager: closing flushes what was computed (also when the run is
    interrupted by an exception); while running, rows are flushed at least every
    :data:`FLUSH_SECONDS`. The cache never costs a run its scores: a store that cannot be
    opened (a read-only or missing disk, another user's folder) is not used, and when writing
    fails (a full disk, no permission) one warning says so and the run goes on without storing.
    """

    def __init__(self, root: str | os.PathLike, scorers: Sequence[Scorer]):
        stores: dict[str, ArrayStore | None] = {}
        for scorer in scorers:
            signature = cache_signature(scorer)
            if signature not in stores:
                try:
                    stores[signature] = ArrayStore(root, signature=signature, shape=(scorer.embed_dim,),
                                                   dtype="float32")
                except OSError as e:
                    logger.warning("%s: the embedding cache in %s cannot be used (%s); embedding without it",
                                   scorer.name, root, e)
                    stores[signature] = None
        self._stores = [stores[cache_signature(s)] for s in scorers]
        self._names = [s.name for s in scorers]
        self._dims = [s.embed_dim for s in scorers]
        self._last_flush = time.monotonic()
        self._writable = True

    def lookup(self, k: int, keys: Sequence[str | None]) -> tuple[np.ndarray, torch.Tensor]:
        """Scorer ``k``'s cached rows: ``(hit mask [n] bool, embeddings [hits, D] float32)``."""
        store = self._stores[k]
        if store is None:
            return np.zeros(len(keys), dtype=bool), torch.zeros(0, self._dims[k])
        hit = np.array([key is not None and key in store for key in keys], dtype=bool)
        values = store.get([key for key, h in zip(keys, hit) if h])
        good = np.isfinite(values).all(axis=1) & (np.abs(np.linalg.norm(values, axis=1) - 1) <= NORM_TOLERANCE)
        if not good.all():
            logger.warning("%s: %d cached embedding(s) in %s are not unit vectors; recomputing them",
                           self._names[k], int((~good).sum()), store.folder)
            hit[np.flatnonzero(hit)[~good]] = False
            values = values[good]
        return hit, torch.from_numpy(values)

    def put(self, k: int, keys: Sequence[str | None], values: torch.Tensor) -> None:
        """Store scorer ``k``'s embeddings [n, D] (rows without a key are skipped)."""
        rows = [i for i, key in enumerate(keys) if key is not None]
        if rows and self._writable and self._stores[k] is not None:
            self._write(lambda: self._stores[k].put([keys[i] for i in rows], values[rows].float().cpu()))
        if time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        for store in self._open_stores():
            self._write(store.flush)
        self._last_flush = time.monotonic()

    def _open_stores(self) -> list[ArrayStore]:
        return [store for store in dict.fromkeys(self._stores) if store is not None]

    def _write(self, write: Callable[[], None]) -> None:
        """Run a store write; the first failure is one warning, and later writes are not tried."""
        if not self._writable:
            return
        try:
            write()
        except OSError as e:
            self._writable = False
            logger.warning("cannot write to the embedding cache (%s); the scores are not affected, but the "
                           "embeddings of this run are not stored", e)

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
        for store in self._open_stores():
            store.discard()
