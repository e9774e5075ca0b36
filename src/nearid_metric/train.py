"""Training the NearID head on a frozen SigLIP2 trunk (spec section 5), and ``nearid-train``.

- :func:`two_tier_infonce`: the two-tier contrastive loss, in one process and under
  ``torch.distributed`` (positives all-gathered with their gradient).
- :func:`train`: the recipe. The trunk is frozen, so only its MAP head (``attn_pool``,
  initialised from the base model's head) is trained; the trunk's final tokens come either from
  the trunk on the fly or from a feature cache (:class:`~nearid_metric.cache.ArrayStore`,
  computed once). Checkpoints every ``checkpoint_every`` steps, resumption, SSR / PA on a
  held-out split each epoch, and the export of the released checkpoint folder.
- :func:`main`: the ``nearid-train`` command (TOML / YAML config + flag overrides, ``torchrun``).

See docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from nearid_metric._console import stderr_logging
from nearid_metric._version import __version__
from nearid_metric.cache import HASH_MEMO, ArrayStore, content_keys
from nearid_metric.data import MTGSample, NearIDSample, image_source_key, nearid_similarities, unique_images
from nearid_metric.distributed import launched_by_torchrun, process_group, rank_device
from nearid_metric.hub import CHECKPOINT_FILES, checkpoint_sha256, resolve_checkpoint
from nearid_metric.images import ImageSource
from nearid_metric.model import VisionConfig, export_checkpoint, load_checkpoint_trunk
from nearid_metric.preprocess import PreprocessConfig, normalization_table, normalize_uint8
from nearid_metric.protocol import score_nearid_samples
from nearid_metric.scorer import _collate, _ImageDataset, pick_device

logger = logging.getLogger(__name__)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 (same shape on every rank); the backward sums every rank's
    gradient of the gathered tensor and returns this rank's slice (what DDP expects).

    torch's own ``torch.distributed.nn.functional.all_gather`` does the same but is
    deprecated (FutureWarning on every call) in recent torch, and its replacement is private.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _global_positives(positives: torch.Tensor, pos_mask: torch.Tensor, identities: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """All ranks' positives [M, D] (differentiable), mask [M] and owners' identities [M / P],
    and this rank's first sample index.

    Ranks may hold different batch sizes: every rank pads to the largest with masked slots,
    so global sample ``i`` owns columns ``i * P .. i * P + P - 1``.
    """
    batch, slots, dim = positives.shape
    if not _distributed():
        return positives.reshape(-1, dim), pos_mask.reshape(-1), identities, 0
    size = torch.tensor([batch], device=positives.device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    padded = int(size)
    positives = F.pad(positives, (0, 0, 0, 0, 0, padded - batch))
    pos_mask = F.pad(pos_mask, (0, 0, 0, padded - batch))  # padding is invalid (False)
    identities = F.pad(identities, (0, padded - batch), value=-1)
    masks = [torch.empty_like(pos_mask) for _ in range(dist.get_world_size())]
    dist.all_gather(masks, pos_mask)
    labels = [torch.empty_like(identities) for _ in range(dist.get_world_size())]
    dist.all_gather(labels, identities)
    gathered = _GatherWithGrad.apply(positives)
    return gathered.reshape(-1, dim), torch.cat(masks).reshape(-1), torch.cat(labels), dist.get_rank() * padded


def two_tier_infonce(
    anchor: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    pos_mask: torch.Tensor,
    neg_mask: torch.Tensor,
    *,
    temperature: float = 0.07,
    alpha: float = 0.5,
    identities: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The NearID two-tier InfoNCE loss (spec section 5): ``(loss, stats)``.

    Inputs (any float dtype; computed in float32, float64 stays float64, autocast off):
    ``anchor`` [B, D] (positive view 0), ``positives`` [B, P, D] (views 1..P),
    ``negatives`` [B, K, D] (the hard negatives: matched-context distractors),
    ``pos_mask`` [B, P] and ``neg_mask`` [B, K] bool (True = the slot holds an image).
    Every embedding is L2-normalised here, so raw head outputs can be passed (normalising
    already-normalised vectors changes neither values nor gradients). Masked slots are ignored
    whatever they hold (zeros, NaN) and get zero gradient.

    With logits = cosine / ``temperature`` and M = all valid positives of the global batch:

    - Tier 1, one row per valid positive (b, p): cross-entropy over anchor_b's logits to all
      M positives (b's own other views included) and to b's own valid hard negatives, target
      b's positive p. A sample with no valid positive has no row.
    - Tier 2, one term per valid hard negative (b, k): with ``s = anchor_b . n_k / T`` and
      ``L`` = logsumexp of anchor_b's logits to the positives of the *other* samples,
      ``-s + logaddexp(s, L)`` (= -log sigmoid(s - L): the distractor must beat the pooled
      random negatives). With no other valid positive, L = -inf and the term is exactly 0
      (masked logits are the dtype's most negative finite value, so no NaN arises).
    - ``identities`` (optional [B] int64, non-negative): samples sharing a label show the same
      identity (e.g. one object with two distractor sets), so their positives are not
      negatives of each other: an anchor's logits to the positives of *other* samples with its
      label are left out of both tiers. Default: every sample its own identity.
    - Each tier is the mean over its rows/terms in the global batch, 0 when it has none
      (no valid positive anywhere; no valid hard negative anywhere).
    - total = tier1 + ``alpha`` * tier2.

    Under ``torch.distributed`` (initialised, world size W > 1) every rank must call this
    (and later ``backward``) with the same P, K and D; batch sizes may differ. Each rank's
    anchors see all ranks' positives, and the returned loss on rank r is
    ``W * (tier-1 sum of r's rows / global tier-1 rows + alpha * tier-2 sum of r's terms /
    global tier-2 terms)``. So the mean over ranks of the returned losses equals the
    one-process loss on the concatenated batch, and with gradients averaged over ranks
    (DDP's default) every parameter gets exactly the one-process gradient. In one process
    the loss is the plain total.

    ``stats`` (detached 0-d tensors, global over all ranks): ``loss`` (the total),
    ``tier1``, ``tier2`` (the tier losses), ``tier1_acc`` (fraction of tier-1 rows whose
    target logit is the largest of its row; ties count as hits), ``tier2_acc`` (fraction of
    valid hard negatives with s > L, i.e. whose tier-2 term is below log 2; always a hit
    when L = -inf), ``tier1_rows``, ``tier2_rows`` (their counts). An accuracy with no rows
    is NaN.
    """
    batch, slots, dim = positives.shape
    if anchor.shape != (batch, dim) or negatives.shape[::2] != (batch, dim):
        raise ValueError(f"shapes: anchor {tuple(anchor.shape)} must be [B, D], positives "
                         f"{tuple(positives.shape)} [B, P, D], negatives {tuple(negatives.shape)} [B, K, D]")
    if pos_mask.shape != positives.shape[:2] or neg_mask.shape != negatives.shape[:2]:
        raise ValueError(f"masks {tuple(pos_mask.shape)}, {tuple(neg_mask.shape)} must be "
                         f"[B, P] = {tuple(positives.shape[:2])}, [B, K] = {tuple(negatives.shape[:2])}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    pos_mask, neg_mask = pos_mask.bool(), neg_mask.bool()
    device = anchor.device
    if identities is None:
        identities = torch.arange(batch, device=device)  # distinct labels; made global below
        distinct = True
    else:
        if identities.shape != (batch,) or identities.is_floating_point() or bool((identities < 0).any()):
            raise ValueError(f"identities must be [B] = [{batch}] non-negative integers, got "
                             f"{identities.dtype} {tuple(identities.shape)}")
        distinct = False
    dtype = torch.promote_types(anchor.dtype, torch.float32)
    with torch.autocast(device.type, enabled=False):
        anchor = F.normalize(anchor.to(dtype), dim=-1)
        positives = F.normalize(positives.to(dtype).where(pos_mask[..., None], 0), dim=-1)
        negatives = F.normalize(negatives.to(dtype).where(neg_mask[..., None], 0), dim=-1)
        all_pos, all_mask, labels, first = _global_positives(positives, pos_mask, identities.long())
        lowest = torch.finfo(dtype).min  # a finite -inf
        pos_logits = (anchor @ all_pos.T / temperature).masked_fill(~all_mask, lowest)  # [B, M]
        neg_logits = torch.einsum("bd,bkd->bk", anchor, negatives) / temperature  # [B, K]
        samples = first + torch.arange(batch, device=device)  # global index of each sample, [B]
        owner = torch.arange(all_mask.numel(), device=device) // slots  # global sample of each column, [M]
        own = owner[None, :] == samples[:, None]  # [B, M]
        # Columns of the anchor's identity: its own positives, and other samples' with its label.
        kin = own if distinct else labels[owner][None, :] == identities[:, None]
        pos_logits = pos_logits.masked_fill(kin & ~own, lowest)

        # Tier 1: one softmax row per sample, shared by its P targets.
        logits = torch.cat([pos_logits, neg_logits.masked_fill(~neg_mask, lowest)], dim=1)  # [B, M + K]
        target = logits.gather(1, samples[:, None] * slots + torch.arange(slots, device=device))  # [B, P]
        tier1 = (logits.logsumexp(1, keepdim=True) - target).where(pos_mask, 0)
        hits1 = (target >= logits.amax(1, keepdim=True)) & pos_mask

        # Tier 2: the positives of other samples, pooled into one logit L per anchor.
        pooled = pos_logits.masked_fill(kin, lowest).logsumexp(1, keepdim=True)  # [B, 1]
        tier2 = (torch.logaddexp(neg_logits, pooled) - neg_logits).where(neg_mask, 0)
        hits2 = (neg_logits > pooled) & neg_mask

        sums = torch.stack([tier1.sum(), tier2.sum()])
        counts = torch.stack([pos_mask.sum(), neg_mask.sum(), hits1.sum(), hits2.sum()]).to(dtype)
        totals = torch.cat([sums.detach(), counts])  # summed over ranks below
        world = 1
        if _distributed():
            dist.all_reduce(totals)
            world = dist.get_world_size()
        sum1, sum2, rows1, rows2, right1, right2 = totals
        tier1_loss, tier2_loss = sum1 / rows1.clamp(min=1), sum2 / rows2.clamp(min=1)
        loss = world * (sums[0] / rows1.clamp(min=1) + alpha * sums[1] / rows2.clamp(min=1))
    stats = {
        "loss": tier1_loss + alpha * tier2_loss,
        "tier1": tier1_loss,
        "tier2": tier2_loss,
        "tier1_acc": right1 / rows1,
        "tier2_acc": right2 / rows2,
        "tier1_rows": rows1,
        "tier2_rows": rows2,
    }
    return loss, stats


# --- configuration ---------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 1
SLOTS = ("anchor", "positive_1", "positive_2", "negative_0", "negative_1", "negative_2")
_AUTOCAST = ("auto", "fp32", "bf16", "fp16")
_STORE_DTYPES = {"fp16": "float16", "fp32": "float32"}
_EXPORT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass
class TrainConfig:
    """What ``nearid-train`` does. Config-file keys and ``--flags`` use these names (``_`` -> ``-``).

    Defaults are the paper's recipe (AdamW, lr 1e-4, 11 epochs, global batch 128, T 0.07,
    alpha 0.5, mixed precision on GPUs). Data fields are those of ``nearid-bench``.
    """

    out: str | None = None
    base: str = "siglip2-so400m"
    revision: str | None = None
    nearid_folder: list[str] = field(default_factory=list)
    positives: list[str] = field(default_factory=list)
    distractors: list[str] = field(default_factory=list)
    distractor_prefix: str = "auto"
    group: list[str] = field(default_factory=list)
    mtg: list[str] = field(default_factory=list)
    hf: bool = False
    split: str = "train"
    data_revision: str | None = None
    eval_fraction: float = 0.05
    eval_groups: list[str] = field(default_factory=list)
    epochs: int = 11
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.01
    temperature: float = 0.07
    alpha: float = 0.5
    seed: int = 0
    precision: str = "auto"
    device: str | None = None
    cache_dir: str | None = None
    cache_dtype: str = "fp16"
    num_workers: int = min(8, os.cpu_count() or 1)
    checkpoint_every: int = 500
    log_every: int = 10
    max_steps: int | None = None
    resume: bool = False
    export_dtype: str = "fp16"
    progress: bool = True


# Fields that define a run: a resumed run must have the same values.
RUN_FIELDS = ("base", "revision", "nearid_folder", "positives", "distractors", "distractor_prefix", "group", "mtg",
              "hf", "split", "data_revision", "eval_fraction", "eval_groups", "batch_size", "lr", "weight_decay",
              "temperature", "alpha", "seed", "precision", "cache_dtype")

_HELP = {
    "out": "output folder: checkpoint.pt, log.jsonl, summary.json and final/ (the exported checkpoint)",
    "base": "SigLIP(2) checkpoint whose trunk is frozen and whose head initialises training: registry name, "
            "folder or Hub repo id (default: siglip2-so400m)",
    "revision": "Hub revision of --base",
    "nearid_folder": "NearID image folders ROOT/<sample>/view_K.*, distractor_K.* or ROOT/<group>/<sample>/...",
    "positives": "NearID positives table(s) (.parquet/.arrow file(s) or a folder; id, img1..img3)",
    "distractors": "NearID distractor tables, one group each",
    "distractor_prefix": "distractor image columns: auto, img or nimg",
    "group": "group names, one per --distractors or --nearid-folder source",
    "mtg": "MTG tables mixed into training (anchor = view 1, positive = view 2, negatives = the part edits)",
    "hf": "--positives/--distractors/--mtg are Hugging Face dataset ids or saved dataset folders",
    "split": "dataset split with --hf",
    "data_revision": "dataset revision with --hf",
    "eval_fraction": "fraction of NearID identities held out for the per-epoch SSR / PA (by a hash of the id)",
    "eval_groups": "NearID groups (inpainting settings) held out for evaluation",
    "epochs": "passes over the training samples",
    "batch_size": "global batch (samples; split over ranks)",
    "lr": "AdamW learning rate (constant)",
    "weight_decay": "AdamW weight decay",
    "temperature": "InfoNCE temperature",
    "alpha": "weight of tier 2",
    "seed": "seed of the sample order",
    "precision": "autocast: auto (CUDA: bf16 where supported, else fp16 for the trunk; CPU: fp32), fp32, bf16 or "
                 "fp16 (trunk only: the head then trains in fp32)",
    "device": "torch device (default: cuda if available; cuda:LOCAL_RANK under torchrun)",
    "cache_dir": "feature cache folder: the trunk's tokens of each image are computed once and stored there",
    "cache_dtype": "feature cache storage: fp16 (default) or fp32",
    "num_workers": "data loader processes",
    "checkpoint_every": "steps between checkpoints (and at every epoch end)",
    "log_every": "steps between log.jsonl records",
    "max_steps": "stop after this many steps in total (checkpointed; --resume continues)",
    "resume": "continue from OUT/checkpoint.pt if there is one",
    "export_dtype": "dtype of the exported weights: fp16 (as released) or fp32",
    "progress": "progress bars",
}


def check_config(config: TrainConfig) -> None:
    """``ValueError`` naming the first setting that cannot work."""
    if not config.out:
        raise ValueError("out: an output folder is required")
    if not (config.nearid_folder or config.positives or config.mtg):
        raise ValueError("no data: give nearid_folder, positives + distractors, or mtg")
    if bool(config.positives) != bool(config.distractors):
        raise ValueError("positives and distractors go together (views and their distractors, joined on id)")
    if config.nearid_folder and config.positives:
        raise ValueError("give NearID data as nearid_folder or as positives + distractors, not both")
    if config.group and len(config.group) != len(config.nearid_folder or config.distractors):
        raise ValueError(f"group needs one name per NearID source, got {len(config.group)}")
    if not 0 <= config.eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}")
    for name in ("epochs", "batch_size", "checkpoint_every", "log_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {config.max_steps}")
    if config.num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {config.num_workers}")
    if config.lr <= 0 or config.temperature <= 0 or config.weight_decay < 0 or config.alpha < 0:
        raise ValueError("lr and temperature must be > 0, weight_decay and alpha >= 0")
    for name, choices in (("precision", _AUTOCAST), ("cache_dtype", _STORE_DTYPES), ("export_dtype", _EXPORT_DTYPES),
                          ("distractor_prefix", ("auto", "img", "nimg"))):
        if getattr(config, name) not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(config, name)!r}")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML (``.toml``) or YAML (``.yaml``/``.yml``) file of :class:`TrainConfig` keys, type-checked.

    Keys are the field names (``batch_size``) or the flag spelling (``batch-size``).
    """
    path = Path(path)
    try:
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:
                import tomli as tomllib
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError("YAML config files need PyYAML: pip install 'nearid-metric[train]'") from None

            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        else:
            raise ValueError("config files end in .toml, .yaml or .yml")
    except (OSError, ValueError) as e:  # tomllib / yaml errors are ValueErrors
        raise ValueError(f"{path}: {e}") from None
    except Exception as e:  # yaml.YAMLError
        raise ValueError(f"{path}: {type(e).__name__}: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
    names = [name.replace("-", "_") for name in values]  # flag spelling (batch-size) allowed too
    if len(set(names)) < len(names):
        raise ValueError(f"{path}: a setting is given twice (with - and with _)")
    return {name: _typed(name, value, str(path)) for name, value in zip(names, values.values())}


def _typed(name: str, value: Any, source: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if name not in fields:
        raise ValueError(f"{source}: unknown setting {name!r}; known: {', '.join(fields)}")
    default = TrainConfig().__getattribute__(name)
    kind = fields[name].type
    if isinstance(default, list):
        value = [value] if isinstance(value, str) else value
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif "int" in kind:
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (value is None and "None" in kind)
    else:
        ok = isinstance(value, str) or (value is None and "None" in kind)
    if not ok:
        raise ValueError(f"{source}: setting {name!r} must be {kind}, got {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nearid-train",
        description="Train the NearID identity head on a frozen SigLIP2 trunk and export a checkpoint folder that "
                    "NearIDScore loads. Settings: defaults (the paper's recipe) < CONFIG file < flags.",
    )
    parser.add_argument("config", nargs="?", type=Path, help="TOML or YAML file of settings (names as the flags)")
    for f in dataclasses.fields(TrainConfig):
        default = getattr(TrainConfig(), f.name)
        flag = "--" + f.name.replace("_", "-")
        common = dict(default=argparse.SUPPRESS, help=_HELP[f.name])
        if f.name == "progress":
            parser.add_argument("--no-progress", dest="progress", action="store_false", **common)
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", **common)
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", metavar=f.name.upper(), **common)
        elif isinstance(default, float):
            parser.add_argument(flag, type=float, **common)
        elif "int" in f.type:
            parser.add_argument(flag, type=int, **common)
        else:
            parser.add_argument(flag, **common)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Defaults, then the config file, then the flags; ``SystemExit(2)`` with a message for bad settings."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    path = args.pop("config")
    try:
        values = read_config_file(path) if path else {}
        values.update(args)
        config = TrainConfig(**values)
        check_config(config)
    except ValueError as e:
        parser.error(str(e))
    return config


# --- data ------------------------------------------------------------------------------------------


def read_training_samples(config: TrainConfig) -> list[NearIDSample]:
    """The NearID samples of the data settings, then the MTG rows as samples.

    An MTG row becomes views ``(1, 2)`` and distractors ``(1p, 2p)`` (each part edit sits in its
    view's background); its id is prefixed ``mtg:``.
    """
    from types import SimpleNamespace

    from nearid_metric.bench import load_samples

    common = dict(distractor_prefix=config.distractor_prefix, hf=config.hf, split=config.split if config.hf else None,
                  data_revision=config.data_revision)
    samples: list[NearIDSample] = []
    if config.nearid_folder or config.positives:
        found, _ = load_samples(SimpleNamespace(nearid_folder=config.nearid_folder, positives=config.positives,
                                                distractors=config.distractors, mtg=None, group=config.group,
                                                **common))
        samples += found
    if config.mtg:
        found, _ = load_samples(SimpleNamespace(nearid_folder=None, positives=None, distractors=None, mtg=config.mtg,
                                                group=None, **common))
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


class _Batches(Dataset):
    """Item ``i``: training batch ``i``, with its distinct images decoded or read from the cache.

    Returns ``index`` [b, 6] (rows into the batch's images, -1 = missing), ``identities`` [b],
    ``pixels`` uint8 [U, 3, H, W] or ``tokens`` [U, T, D], and ``failed`` {image row: reason}.
    """

    def __init__(self, batches: Sequence[np.ndarray], slots: np.ndarray, identities: np.ndarray,
                 images: Sequence[ImageSource], preprocess: PreprocessConfig,
                 store: ArrayStore | None, keys: Sequence[str | None] | None):
        self.batches, self.slots, self.identities = batches, slots, identities
        self.decoded = _ImageDataset(images, [preprocess])  # decoding and its errors, as when scoring
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
            _, pixels, failed = _collate([self.decoded[int(row)] for row in unique])
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


# --- the model being trained -----------------------------------------------------------------------


@dataclass
class _Model:
    """The frozen trunk and its trainable MAP head (``trunk.attn_pool``), on ``device``."""

    trunk: torch.nn.Module
    head: torch.nn.Module
    device: torch.device
    autocast: torch.dtype | None  # the trunk's autocast dtype; None: float32
    table: torch.Tensor  # uint8 -> normalised value, per channel (on device)

    def _autocast(self, dtype: torch.dtype | None):
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    @property
    def head_autocast(self) -> torch.dtype | None:
        """bf16 when the trunk runs in bf16; with fp16 the head trains in fp32 (no loss scaling needed)."""
        return self.autocast if self.autocast == torch.bfloat16 else None

    @torch.no_grad()
    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [U, 3, H, W] -> the trunk's final post-LayerNorm tokens [U, T, D]."""
        pixels = normalize_uint8(pixels.to(self.device, non_blocking=True), self.table)
        with self._autocast(self.autocast):
            return self.trunk.forward_features(pixels)

    def embed(self, item: dict[str, Any]) -> torch.Tensor:
        """A batch's ``pixels`` or cached ``tokens`` -> head outputs [U, D] float32 (not normalised)."""
        if "tokens" in item:
            tokens = item["tokens"].to(self.device, non_blocking=True)
        else:
            tokens = self.tokens(item["pixels"])
        tokens = tokens.float()  # cached or not, the head sees the same values
        if tokens.shape[0] == 0:
            return torch.zeros((0, self.trunk.num_features), device=self.device)
        with self._autocast(self.head_autocast):
            return self.head(tokens).float()


def batch_loss(embeddings: torch.Tensor, index: torch.Tensor, identities: torch.Tensor, *, temperature: float,
               alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`two_tier_infonce` of one batch: ``embeddings`` [U, D] of its images, ``index`` [b, 6]
    (rows of ``embeddings`` in :data:`SLOTS` order, -1 = missing), ``identities`` [b].

    A sample whose anchor is missing takes no part (all its slots are masked). The loss always
    requires grad, even for a batch without images (e.g. a rank's empty share of the last
    batch), so every rank runs the backward's collective.
    """
    valid = (index >= 0) & (index[:, :1] >= 0)
    if embeddings.shape[0] == 0:
        embeddings = embeddings.new_zeros((1, embeddings.shape[1])).requires_grad_()
    rows = embeddings[index.clamp(min=0)]  # [b, 6, D]
    return two_tier_infonce(rows[:, 0], rows[:, 1:3], rows[:, 3:], valid[:, 1:3], valid[:, 3:],
                            temperature=temperature, alpha=alpha, identities=identities)


def _average_gradients(parameters: Sequence[torch.nn.Parameter], world: int) -> None:
    """DDP's gradient averaging for the head, in one all-reduce (a missing gradient counts as zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for p, chunk in zip(parameters, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).clone()


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The trunk's autocast dtype for ``precision`` on ``device``; None = float32."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _precision_name(autocast: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast]


# --- features and evaluation -----------------------------------------------------------------------


def build_feature_cache(model: _Model, images: Sequence[ImageSource], keys: Sequence[str | None],
                        store: ArrayStore, preprocess: PreprocessConfig, *, batch_size: int = 64,
                        num_workers: int = 0, rank: int = 0, world: int = 1, progress: bool = True) -> dict[int, str]:
    """Store the trunk tokens of every image whose key is not in ``store`` (this rank's share:
    every ``world``-th). Returns ``{image row: reason}`` for the images that could not be decoded."""
    missing = [row for row, key in enumerate(keys) if key is not None and key not in store][rank::world]
    failures: dict[int, str] = {}
    if not missing:
        return failures
    logger.info("feature cache: computing the trunk tokens of %d image(s) into %s", len(missing), store.folder)
    loader = DataLoader(_ImageDataset([images[r] for r in missing], [preprocess]), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate, pin_memory=model.device.type == "cuda")
    with tqdm(total=len(missing), unit="img", desc="features", disable=not progress) as bar:
        for indices, pixels, failed in loader:
            failures.update({missing[i]: reason for i, reason in failed.items()})
            if pixels is not None:
                store.put([keys[missing[i]] for i in indices.tolist()], model.tokens(pixels[0]))
            bar.update(len(indices) + len(failed))
    store.flush()
    return failures


def evaluate(model: _Model, samples: Sequence[NearIDSample], *, preprocess: PreprocessConfig,
             store: ArrayStore | None = None, keys: dict[Any, str | None] | None = None, batch_size: int = 64,
             num_workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """SSR / PA / H (percent, :func:`~nearid_metric.protocol.score_nearid_samples`) of the current
    head on ``samples``, pooled and per group (``groups``). Images come from ``store`` (``keys``:
    image key -> content key) when given, else through the trunk; an unreadable or uncached image
    is a missing image."""
    images = unique_images(samples)
    dim = model.trunk.num_features
    embeddings = torch.full((len(images), dim), float("nan"))
    model.head.eval()
    with torch.no_grad(), tqdm(total=len(images), unit="img", desc="eval", disable=not progress) as bar:
        if store is not None:
            known = [(n, keys[image_source_key(image)]) for n, image in enumerate(images)]
            known = [(n, key) for n, key in known if key is not None and key in store]
            for start in range(0, len(known), batch_size):
                chunk = known[start:start + batch_size]
                tokens = torch.from_numpy(store.get([key for _, key in chunk]))
                embeddings[[n for n, _ in chunk]] = F.normalize(model.embed({"tokens": tokens}), dim=-1).cpu()
                bar.update(len(chunk))
        else:
            loader = DataLoader(_ImageDataset(images, [preprocess]), batch_size=batch_size, num_workers=num_workers,
                                collate_fn=_collate)
            for indices, pixels, failed in loader:
                if pixels is not None:
                    embeddings[indices] = F.normalize(model.embed({"pixels": pixels[0]}), dim=-1).cpu()
                bar.update(len(indices) + len(failed))
    model.head.train()
    sims = nearid_similarities(samples, embeddings, {image: n for n, image in enumerate(images)})
    result = _rates(score_nearid_samples(sims))
    groups = np.array([s.group for s in samples])
    result["groups"] = {group: _rates(score_nearid_samples({k: v[groups == group] for k, v in sims.items()}))
                        for group in dict.fromkeys(groups.tolist())}
    return result


def _rates(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("SSR", "PA", "PA_terms", "SSR_mean", "H", "H_mean", "n_samples", "n_excluded")
    return {k: (None if isinstance(result[k], float) and math.isnan(result[k]) else result[k]) for k in keys}


# --- the run ---------------------------------------------------------------------------------------


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def train(config: TrainConfig) -> dict[str, Any]:
    """Train (or, with ``config.resume``, continue) a NearID head; returns what ``summary.json`` holds.

    Under ``torchrun`` every rank runs this; rank 0 evaluates, checkpoints and exports.
    """
    check_config(config)
    if launched_by_torchrun() and not dist.is_initialized():
        with process_group(config.device, timeout=timedelta(hours=1)) as device:  # rank 0 evaluates alone
            return _train(config, dist.get_rank(), dist.get_world_size(), device)
    if dist.is_initialized() and dist.get_world_size() > 1:  # the caller's process group
        return _train(config, dist.get_rank(), dist.get_world_size(), rank_device(config.device))
    return _train(config, 0, 1, pick_device(config.device))


def _train(config: TrainConfig, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    out = Path(config.out)
    checkpoint_path = out / "checkpoint.pt"
    state = None
    if checkpoint_path.exists():
        if not config.resume:
            raise ValueError(f"{checkpoint_path} exists: pass --resume to continue that run, or choose another --out")
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)  # our own file, no code runs
        _check_resumable(state, config, checkpoint_path)
    if config.batch_size < world:
        raise ValueError(f"batch_size {config.batch_size} is smaller than the {world} ranks")
    show = config.progress and rank == 0

    samples = read_training_samples(config)
    train_samples, eval_samples = split_samples(samples, config.eval_fraction, config.eval_groups)
    if not train_samples:
        raise ValueError("no training samples left after holding out the evaluation split")
    images = unique_images(train_samples + eval_samples)
    rows = {image_source_key(image): n for n, image in enumerate(images)}
    slots = sample_slots(train_samples, rows)
    labels: dict[str, int] = {}
    identities = np.array([labels.setdefault(s.id, len(labels)) for s in train_samples], dtype=np.int64)
    logger.info("%d training samples (%d identities), %d held out, %d distinct images", len(train_samples),
                len(labels), len(eval_samples), len(images))

    checkpoint = resolve_checkpoint(config.base, config.revision, CHECKPOINT_FILES)
    trunk = load_checkpoint_trunk(checkpoint.folder, dtype=torch.float32, device="cpu", drop_text_tower=True)
    base_config = json.loads((checkpoint.folder / "config.json").read_text(encoding="utf-8"))
    preprocessor = json.loads((checkpoint.folder / "preprocessor_config.json").read_text(encoding="utf-8"))
    preprocess = PreprocessConfig.from_dict(preprocessor)
    autocast = _autocast_dtype(config.precision, device)
    model = _Model(trunk, trunk.attn_pool, device, autocast, normalization_table(preprocess).to(device))

    failures: dict[str, str] = {}
    store, keys = None, None
    if config.cache_dir:
        store, keys = _open_feature_cache(config, model, images, preprocess, checkpoint.folder, rank, world, show,
                                          failures)
        lost = [n for n, key in enumerate(keys) if key is None or key not in store]
        slots[np.isin(slots, lost)] = -1
    else:
        trunk.to(device)
    head = model.head.to(device).train().requires_grad_(True)
    parameters = list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    step, epoch, position, history = 0, 0, 0, []
    if state is not None:
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, position, history = state["step"], state["epoch"], state["batch"], state["history"]
        logger.info("resumed %s at step %d (epoch %d, batch %d)", checkpoint_path, step, epoch + 1, position)

    eval_keys = {image_source_key(image): keys[n] for n, image in enumerate(images)} if store is not None else None

    def run_eval() -> None:
        if rank == 0 and eval_samples:
            result = evaluate(model, eval_samples, preprocess=preprocess, store=store, keys=eval_keys,
                              num_workers=config.num_workers, progress=show)
            history.append({"epoch": epoch, "step": step, **result})
            logger.info("epoch %d: held-out SSR %s, PA %s (%s samples)", epoch, _pct(result["SSR"]),
                        _pct(result["PA"]), result["n_samples"])
            _append_log(out, {"epoch": epoch, "step": step, "eval": result})
        _barrier(world)

    def save() -> None:
        if rank == 0:
            _save_checkpoint(checkpoint_path, head, optimizer, step, epoch, position, history, config)

    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        run_eval()  # the untrained (base) head, epoch 0
    stopped = False
    started = time.perf_counter()
    while epoch < config.epochs and not stopped:
        batches = epoch_batches(len(train_samples), config.batch_size, config.seed, epoch)
        shards = [np.array_split(b, world)[rank] for b in batches[position:]]
        loader = DataLoader(_Batches(shards, slots, identities, images, preprocess, store, keys), batch_size=None,
                            num_workers=config.num_workers, pin_memory=device.type == "cuda")
        with tqdm(total=len(batches), initial=position, unit="step", desc=f"epoch {epoch + 1}/{config.epochs}",
                  disable=not show) as bar:
            for item in loader:
                for row, reason in item["failed"].items():
                    if str(images[row]) not in failures:
                        failures[str(images[row])] = reason
                        logger.warning("%s: %s (treated as missing)", images[row], reason)
                loss, stats = batch_loss(model.embed(item), item["index"].to(device), item["identities"].to(device),
                                         temperature=config.temperature, alpha=config.alpha)
                optimizer.zero_grad()
                loss.backward()
                if world > 1:
                    _average_gradients(parameters, world)
                optimizer.step()
                step, position = step + 1, position + 1
                figures = {k: float(v) for k, v in stats.items()}
                bar.update()
                bar.set_postfix(loss=f"{figures['loss']:.4f}", acc1=f"{figures['tier1_acc']:.3f}",
                                acc2=f"{figures['tier2_acc']:.3f}")
                if rank == 0 and (step % config.log_every == 0 or position == len(batches)):
                    _append_log(out, {"epoch": epoch, "step": step, **figures})
                if step % config.checkpoint_every == 0:
                    save()
                if config.max_steps is not None and step >= config.max_steps:
                    stopped = True
                    break
        if position == len(batches):
            epoch, position = epoch + 1, 0
            run_eval()
        save()
    summary = {"version": __version__, "base": checkpoint.source, "base_revision": checkpoint.revision,
               "steps": step, "epochs_done": epoch, "finished": epoch >= config.epochs,
               "seconds": time.perf_counter() - started, "train_samples": len(train_samples),
               "eval_samples": len(eval_samples), "images": len(images), "history": history,
               "failures": failures, "export": None}
    if summary["finished"] and rank == 0:
        final = out / "final"
        export_checkpoint(trunk.cpu(), final, vision_config=VisionConfig.from_dict(base_config["vision_config"]),
                          preprocessor_config=preprocessor, dtype=_EXPORT_DTYPES[config.export_dtype])
        (final / "training.json").write_text(json.dumps(
            {"version": __version__, "base": checkpoint.source, "base_revision": checkpoint.revision,
             "config": {k: getattr(config, k) for k in RUN_FIELDS}, "steps": step, "history": history}, indent=2),
            encoding="utf-8")
        summary["export"] = str(final)
        logger.info("exported the trained head to %s", final)
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _open_feature_cache(config: TrainConfig, model: _Model, images: Sequence[ImageSource],
                        preprocess: PreprocessConfig, base_folder: Path, rank: int, world: int, show: bool,
                        failures: dict[str, str]) -> tuple[ArrayStore, list[str | None]]:
    """Open the feature cache, fill in what it lacks (shared over ranks), and return it with each image's key."""
    trunk = model.trunk
    signature = (f"nearid-train trunk tokens|weights sha256:{checkpoint_sha256(base_folder / 'model.safetensors')}"
                 f"|{preprocess}|compute:{_precision_name(model.autocast)}")
    shape = (trunk.patch_embed.num_patches, trunk.num_features)
    dtype = np.dtype(_STORE_DTYPES[config.cache_dtype])
    part_rows = max(1, (256 << 20) // (math.prod(shape) * dtype.itemsize))  # about 256 MiB per part

    def open_store(verify: bool) -> ArrayStore:
        return ArrayStore(config.cache_dir, signature=signature, shape=shape, dtype=dtype, part_rows=part_rows,
                          verify=verify)

    # Rank 0 checks every part's checksum (a full read of the cache) and sets damaged parts aside;
    # the other ranks then open what is left without reading it all again.
    store = open_store(verify=True) if rank == 0 else None
    _barrier(world)
    if store is None:
        store = open_store(verify=False)
    keys, unreadable = _shared_content_keys(images, rank, world, memo=Path(config.cache_dir) / HASH_MEMO)
    if any(key is not None and key not in store for key in keys):
        trunk.to(model.device)
        decode = build_feature_cache(model, images, keys, store, preprocess, num_workers=config.num_workers,
                                     rank=rank, world=world, progress=show)
        unreadable.update(decode)
        trunk.cpu()
        _barrier(world)
        store.refresh()
    for row, reason in sorted(unreadable.items()):
        failures[str(images[row])] = reason
        logger.warning("%s: %s (treated as missing)", images[row], reason)
    absent = [n for n, key in enumerate(keys) if key is not None and key not in store and n not in unreadable]
    if absent:  # decoded by another rank, which logged why
        logger.warning("%d image(s) could not be cached by another rank (treated as missing)", len(absent))
    logger.info("feature cache %s: %d entries", store.folder, len(store))
    return store, keys


def _shared_content_keys(images: Sequence[ImageSource], rank: int, world: int, *, memo: Path
                         ) -> tuple[list[str | None], dict[int, str]]:
    """:func:`~nearid_metric.cache.content_keys` of ``images`` (hashes remembered in ``memo``),
    each rank hashing every ``world``-th file."""
    mine = list(range(rank, len(images), world))
    keys, failures = content_keys([images[i] for i in mine], memo=memo)
    if world == 1:
        return keys, failures
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, (mine, keys, {mine[i]: reason for i, reason in failures.items()}))
    every: list[str | None] = [None] * len(images)
    unreadable: dict[int, str] = {}
    for rows, share_keys, share_failures in shares:
        for row, key in zip(rows, share_keys):
            every[row] = key
        unreadable.update(share_failures)
    return every, dict(sorted(unreadable.items()))


def _check_resumable(state: dict[str, Any], config: TrainConfig, path: Path) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, this version reads {CHECKPOINT_FORMAT}")
    differ = [k for k in RUN_FIELDS if state["config"].get(k) != getattr(config, k)]
    if differ:
        detail = ", ".join(f"{k}: {state['config'].get(k)!r} -> {getattr(config, k)!r}" for k in differ)
        raise ValueError(f"{path} belongs to a run with other settings ({detail}); use another --out")


def _save_checkpoint(path: Path, head: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, epoch: int,
                     position: int, history: list, config: TrainConfig) -> None:
    """Write the resumable state atomically (a kill mid-write leaves the previous checkpoint)."""
    state = {"format": CHECKPOINT_FORMAT, "version": __version__, "step": step, "epoch": epoch, "batch": position,
             "head": head.state_dict(), "optimizer": optimizer.state_dict(),
             "config": {k: getattr(config, k) for k in RUN_FIELDS}, "history": history}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _append_log(out: Path, record: dict[str, Any]) -> None:
    with open(out / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(argv)
    with stderr_logging("nearid-train"):
        try:
            summary = train(config)
        except (OSError, ValueError, ImportError) as e:
            logger.error("%s", e)
            return 2
        if not summary["finished"]:
            logger.info("stopped at step %d; run again with --resume to continue", summary["steps"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
