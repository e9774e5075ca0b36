"""Training data: samples from the data settings, the held-out split, the composition and the batches of an epoch."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
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
from nearid_metric.train.config import TrainConfig


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


@dataclass(frozen=True)
class EpochPlan:
    """What every epoch is composed from (:func:`compose_epoch`): one entry per NearID identity
    (all its groups together) and one per MTG row.

    ``views`` [E, 3]: image rows of the entry's views (from its first sample; -1 = missing).
    ``distractors`` [E, G, 3]: image rows of distractor j in generator (group) ``groups[g]``
    (-1 = missing), and ``present`` [E, G] bool: the entry has a sample in that group.
    ``labels`` [E]: identity labels (one per id). ``repeat`` [E]: copies per epoch.
    """

    views: np.ndarray
    distractors: np.ndarray
    present: np.ndarray
    labels: np.ndarray
    repeat: np.ndarray
    groups: tuple[str, ...]

    @classmethod
    def from_samples(cls, samples: Sequence[NearIDSample], rows: dict[Any, int], mtg_repeat: int = 1
                     ) -> EpochPlan:
        """The plan of the training ``samples`` (``rows``: image key -> image row). MTG samples (id
        ``mtg:...``) are entries of their own, ``mtg_repeat`` copies each; NearID samples of one id
        (one per group) form one entry, whose views are taken from its first sample: the groups
        of an identity share its views (one positives table)."""
        groups = tuple(dict.fromkeys(s.group for s in samples))
        entry_of: dict[str, int] = {}
        entries: list[list[NearIDSample]] = []
        for sample in samples:
            if sample.id.startswith("mtg:"):
                entries.append([sample])
            elif sample.id in entry_of:
                entries[entry_of[sample.id]].append(sample)
            else:
                entry_of[sample.id] = len(entries)
                entries.append([sample])

        def image_rows(images: Sequence[ImageSource | None]) -> list[int]:
            return [-1 if image is None else rows[image_source_key(image)] for image in images]

        views = np.array([image_rows(members[0].views) for members in entries], dtype=np.int64).reshape(-1, 3)
        distractors = np.full((len(entries), len(groups), 3), -1, dtype=np.int64)
        present = np.zeros((len(entries), len(groups)), dtype=bool)
        for n, members in enumerate(entries):
            for sample in members:
                g = groups.index(sample.group)
                distractors[n, g], present[n, g] = image_rows(sample.distractors), True
        labels: dict[str, int] = {}
        ids = np.array([labels.setdefault(m[0].id, len(labels)) for m in entries], dtype=np.int64)
        repeat = np.array([mtg_repeat if m[0].id.startswith("mtg:") else 1 for m in entries], dtype=np.int64)
        return cls(views, distractors, present, ids, repeat, groups)

    def __len__(self) -> int:
        """Samples per epoch (entries with their copies)."""
        return int(self.repeat.sum())

    def without_images(self, lost: Sequence[int]) -> EpochPlan:
        """The plan with the image rows ``lost`` (e.g. not in the feature cache) missing."""
        return dataclasses.replace(self, views=np.where(np.isin(self.views, lost), -1, self.views),
                                   distractors=np.where(np.isin(self.distractors, lost), -1, self.distractors))


def compose_epoch(plan: EpochPlan, seed: int, epoch: int, *, shuffle_anchor: bool = True
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Epoch ``epoch``'s samples: image rows [N, 6] in :data:`SLOTS` order (-1 = missing) and
    identity labels [N], N = ``len(plan)`` (entry order; every copy of an entry is identical).

    Random draws depend on ``(seed, epoch)`` and the entry only, so every rank and every resumed
    run composes the same epoch. Per entry, distractor slot j draws its generator uniformly from
    the groups the entry has a sample in, and takes that sample's distractor j. The entry's
    present views are then put first, shuffled (``shuffle_anchor``; else in view order), the
    missing ones last; distractor j moves with view j (it sits in view j's background). The first
    view is the anchor, the next two the positives.
    """
    entries, slots = plan.views.shape
    rng = np.random.default_rng([seed, epoch, 1])  # [seed, epoch] orders the samples (epoch_batches)
    draws, keys = rng.random((entries, slots)), rng.random((entries, slots))
    choices = plan.present.sum(1, keepdims=True)  # groups to draw from, [E, 1]
    kth = np.minimum((draws * choices).astype(np.int64), choices - 1)  # [E, 3]
    group = (np.cumsum(plan.present, 1)[:, None, :] > kth[..., None]).argmax(2)  # the kth present group, [E, 3]
    negatives = plan.distractors[np.arange(entries)[:, None], group, np.arange(slots)]  # [E, 3]
    if not shuffle_anchor:
        keys = np.broadcast_to(np.arange(slots, dtype=float), (entries, slots))
    order = np.argsort(np.where(plan.views >= 0, keys, np.inf), axis=1, kind="stable")
    composed = np.concatenate([np.take_along_axis(plan.views, order, 1), np.take_along_axis(negatives, order, 1)], 1)
    copies = np.repeat(np.arange(entries), plan.repeat)
    return composed[copies], plan.labels[copies]


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
