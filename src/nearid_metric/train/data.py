"""Training data: samples from the data settings, the held-out split, and the batches of an epoch."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from nearid_metric.bench import load_samples
from nearid_metric.cache import ArrayStore
from nearid_metric.data import MTGSample, NearIDSample
from nearid_metric.images import ImageSource
from nearid_metric.preprocess import PreprocessConfig
from nearid_metric.loading import PreprocessedImages, collate_preprocessed
from nearid_metric.similarity import image_source_key
from nearid_metric.train.config import SLOTS, TrainConfig


def read_training_samples(config: TrainConfig) -> list[NearIDSample]:
    """The NearID samples of the data settings, then the MTG rows as samples.

    An MTG row becomes views ``(1, 2)`` and distractors ``(1p, 2p)`` (each part edit sits in its
    view's background); its id is prefixed ``mtg:``.
    """
    common = dict(distractor_prefix=config.distractor_prefix, hf=config.hf, split=config.split if config.hf else None,
                  data_revision=config.data_revision)
    samples: list[NearIDSample] = []
    if config.nearid_folder or config.positives:
        found, _ = load_samples(nearid_folder=config.nearid_folder, positives=config.positives,
                                distractors=config.distractors, group=config.group, **common)
        samples += found
    if config.mtg:
        found, _ = load_samples(mtg=config.mtg, **common)
        samples += [mtg_as_nearid(s) for s in found]
    return samples


def mtg_as_nearid(sample: MTGSample) -> NearIDSample:
    """An MTG row as a training sample: views (1, 2), distractors (1p, 2p) in the same backgrounds."""
    return NearIDSample(id=f"mtg:{sample.id}", group=sample.group, views=(sample.image_1, sample.image_2, None),
                        distractors=(sample.image_1p, sample.image_2p, None))


def split_samples(samples: Sequence[NearIDSample], eval_fraction: float, eval_groups: Sequence[str] = ()
                  ) -> tuple[list[NearIDSample], list[NearIDSample]]:
    """``(train, held out)``. An identity is held out when the first 8 bytes of sha256(id), as a
    fraction of 2**64, fall below ``eval_fraction``; all its samples (every group) are then held out.
    Samples of ``eval_groups`` are held out too. MTG samples (id ``mtg:...``) always train.
    """
    def held_out_id(sample_id: str) -> bool:
        digest = hashlib.sha256(sample_id.encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2 ** 64 < eval_fraction

    unknown = set(eval_groups) - {s.group for s in samples}
    if unknown:
        raise ValueError(f"eval_groups not in the data: {sorted(unknown)}")
    train, held = [], []
    for sample in samples:
        mtg = sample.id.startswith("mtg:")
        (held if not mtg and (sample.group in eval_groups or held_out_id(sample.id)) else train).append(sample)
    return train, held


def sample_slots(samples: Sequence[NearIDSample], rows: dict[Any, int]) -> np.ndarray:
    """Image rows [S, 6] int64 in :data:`SLOTS` order (-1 = missing): the anchor is the first
    present view, the positives the other views, the negatives the 3 distractors."""
    slots = np.full((len(samples), len(SLOTS)), -1, dtype=np.int64)
    for n, sample in enumerate(samples):
        views = [rows[image_source_key(v)] for v in sample.views if v is not None]
        slots[n, :len(views)] = views
        slots[n, 3:] = [-1 if d is None else rows[image_source_key(d)] for d in sample.distractors]
    return slots


class TrainingBatches(Dataset):
    """Item ``i``: training batch ``i``, with its distinct images decoded or read from the cache.

    Returns ``index`` [b, 6] (rows into the batch's images, -1 = missing), ``identities`` [b],
    ``pixels`` uint8 [U, 3, H, W] or ``tokens`` [U, T, D], and ``failed`` {image row: reason}.
    """

    def __init__(self, batches: Sequence[np.ndarray], slots: np.ndarray, identities: np.ndarray,
                 images: Sequence[ImageSource], preprocess: PreprocessConfig,
                 store: ArrayStore | None, keys: Sequence[str | None] | None):
        self.batches, self.slots, self.identities = batches, slots, identities
        self.decoded = PreprocessedImages(images, [preprocess])  # decoding and its errors, as when scoring
        self.preprocess, self.store, self.keys = preprocess, store, keys

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        samples = self.batches[i]
        rows = self.slots[samples]
        unique = np.unique(rows[rows >= 0])
        failed: dict[int, str] = {}
        if self.store is not None:
            features = {"tokens": torch.from_numpy(self.store.get([self.keys[r] for r in unique]))}
        else:
            _, pixels, failed, _ = collate_preprocessed([self.decoded[int(row)] for row in unique])
            empty = torch.empty((0, 3, self.preprocess.height, self.preprocess.width), dtype=torch.uint8)
            features = {"pixels": empty if pixels is None else pixels[0]}
        unique = unique[~np.isin(unique, list(failed))]
        local = np.full(rows.shape, -1, dtype=np.int64)
        present = np.isin(rows, unique)
        local[present] = np.searchsorted(unique, rows[present])
        return {"index": torch.from_numpy(local), "identities": torch.from_numpy(self.identities[samples]),
                "failed": failed, **features}


def epoch_batches(n_samples: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The global batches of an epoch: a permutation seeded by ``(seed, epoch)``, cut every ``batch_size``."""
    order = np.random.default_rng([seed, epoch]).permutation(n_samples)
    return [order[i:i + batch_size] for i in range(0, n_samples, batch_size)]
