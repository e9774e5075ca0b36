"""The training run: the frozen trunk and its trainable head, the feature cache, evaluation,
checkpoints and resumption, ``torchrun``, and the export at the end (spec section 5, docs/training.md).

:func:`train` is the whole run; every rank of a ``torchrun`` launch calls it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from nearid_metric._version import __version__
from nearid_metric.cache import HASH_MEMO, ArrayStore, content_keys
from nearid_metric.data import NearIDSample
from nearid_metric.distributed import launched_by_torchrun, process_group, rank_device
from nearid_metric.hub import CHECKPOINT_FILES, checkpoint_sha256, resolve_checkpoint
from nearid_metric.images import ImageSource
from nearid_metric.model import VisionConfig, load_checkpoint_trunk
from nearid_metric.preprocess import (
    PreprocessConfig,
    normalization_table,
    normalize_uint8,
)
from nearid_metric.protocol import score_nearid_samples
from nearid_metric.loading import PreprocessedImages, collate_preprocessed
from nearid_metric.scorer import pick_device
from nearid_metric.similarity import (
    image_source_key,
    nearid_similarities,
    unique_images,
)
from nearid_metric.train.config import (
    CHECKPOINT_FORMAT,
    STORE_DTYPES,
    TrainConfig,
    check_config,
    run_fields,
)
from nearid_metric.train.data import (
    EpochPlan,
    TrainingBatches,
    compose_epoch,
    epoch_batches,
    read_training_samples,
    split_samples,
)
from nearid_metric.train.export import export_checkpoint
from nearid_metric.train.loss import batch_loss
from nearid_metric.train.optim import HeadUpdate, autocast_dtype, average_gradients, precision_name

logger = logging.getLogger(__name__)

EXPORT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
"""``export_dtype`` -> dtype of the exported weights."""


@dataclass
class TrainModel:
    """The frozen trunk and its trainable MAP head (``trunk.attn_pool``, float32 weights), on ``device``."""

    trunk: torch.nn.Module
    head: torch.nn.Module
    device: torch.device
    autocast: torch.dtype | None  # autocast dtype of trunk and head; None: float32
    table: torch.Tensor  # uint8 -> normalised value, per channel (on device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None)

    @torch.no_grad()
    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [U, 3, H, W] -> the trunk's final post-LayerNorm tokens [U, T, D]."""
        pixels = normalize_uint8(pixels.to(self.device, non_blocking=True), self.table)
        with self._autocast():
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
        with self._autocast():
            return self.head(tokens).float()


# --- features and evaluation -----------------------------------------------------------------------


def build_feature_cache(model: TrainModel, images: Sequence[ImageSource], keys: Sequence[str | None],
                        store: ArrayStore, preprocess: PreprocessConfig, *, batch_size: int = 64,
                        num_workers: int = 0, rank: int = 0, world: int = 1, progress: bool = True) -> dict[int, str]:
    """Store the trunk tokens of every image whose key is not in ``store`` (this rank's share:
    every ``world``-th). Returns ``{image row: reason}`` for the images that could not be decoded."""
    missing = [row for row, key in enumerate(keys) if key is not None and key not in store][rank::world]
    failures: dict[int, str] = {}
    if not missing:
        return failures
    logger.info("feature cache: computing the trunk tokens of %d image(s) into %s", len(missing), store.folder)
    loader = DataLoader(PreprocessedImages([images[r] for r in missing], [preprocess]), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=collate_preprocessed,
                        pin_memory=model.device.type == "cuda")
    with tqdm(total=len(missing), unit="img", desc="features", disable=not progress) as bar:
        for indices, pixels, failed, read in loader:
            failures.update({missing[i]: reason for i, reason in failed.items()})
            if pixels is not None:  # keyed by the bytes that were decoded, as the embedding cache
                store.put([key or keys[missing[i]] for key, i in zip(read, indices.tolist())], model.tokens(pixels[0]))
            bar.update(len(indices) + len(failed))
    store.flush()
    return failures


def evaluate(model: TrainModel, samples: Sequence[NearIDSample], *, preprocess: PreprocessConfig,
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
            loader = DataLoader(PreprocessedImages(images, [preprocess]), batch_size=batch_size,
                                num_workers=num_workers, collate_fn=collate_preprocessed)
            for indices, pixels, failed, _ in loader:
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
    plan = EpochPlan.from_samples(train_samples, {image_source_key(image): n for n, image in enumerate(images)},
                                  config.mtg_repeat)
    logger.info("%d training samples (%d identities, generators %s): %d per epoch; %d held out, %d distinct images",
                len(train_samples), len(set(plan.labels.tolist())), ", ".join(plan.groups), len(plan),
                len(eval_samples), len(images))

    checkpoint = resolve_checkpoint(config.base, config.revision, CHECKPOINT_FILES)
    trunk = load_checkpoint_trunk(checkpoint.folder, dtype=torch.float32, device="cpu", drop_text_tower=True)
    base_config = json.loads((checkpoint.folder / "config.json").read_text(encoding="utf-8"))
    preprocessor = json.loads((checkpoint.folder / "preprocessor_config.json").read_text(encoding="utf-8"))
    preprocess = PreprocessConfig.from_dict(preprocessor)
    autocast = autocast_dtype(config.precision, device)
    model = TrainModel(trunk, trunk.attn_pool, device, autocast, normalization_table(preprocess).to(device))

    failures: dict[str, str] = {}
    store, keys = None, None
    if config.cache_dir:
        store, keys = _open_feature_cache(config, model, images, preprocess, checkpoint.folder, rank, world, show,
                                          failures)
        plan = plan.without_images([n for n, key in enumerate(keys) if key is None or key not in store])
    else:
        trunk.to(device)
    head = model.head.to(device).train().requires_grad_(True)
    parameters = list(head.parameters())
    steps_per_epoch = math.ceil(len(plan) / config.batch_size)
    update = HeadUpdate(parameters, lr=config.lr, weight_decay=config.weight_decay, schedule=config.lr_schedule,
                        warmup_steps=config.warmup_steps, total_steps=config.epochs * steps_per_epoch,
                        grad_clip=config.grad_clip,
                        scaler=torch.amp.GradScaler(device.type) if autocast == torch.float16 else None)
    step, epoch, position, history, best = 0, 0, 0, [], None
    if state is not None:
        head.load_state_dict(state["head"])
        update.load_state_dict(state)
        step, epoch, position, history, best = (state[k] for k in ("step", "epoch", "batch", "history", "best"))
        logger.info("resumed %s at step %d (epoch %d, batch %d)", checkpoint_path, step, epoch + 1, position)

    eval_keys = {image_source_key(image): keys[n] for n, image in enumerate(images)} if store is not None else None

    def run_eval() -> None:
        nonlocal best
        if rank == 0 and eval_samples:
            result = evaluate(model, eval_samples, preprocess=preprocess, store=store, keys=eval_keys,
                              num_workers=config.num_workers, progress=show)
            history.append({"epoch": epoch, "step": step, **result})
            logger.info("step %d (epoch %d): held-out SSR %s, PA %s (%s samples)", step, epoch, _pct(result["SSR"]),
                        _pct(result["PA"]), result["n_samples"])
            _append_log(out, {"epoch": epoch, "step": step, "eval": result})
            if result["SSR"] is not None and (best is None or result["SSR"] > best["SSR"]):
                best = {"step": step, "epoch": epoch, "SSR": result["SSR"]}
                _atomic_save(out / "best.pt", {"head": head.state_dict(), **best})
        _barrier(world)

    def save() -> None:
        if rank == 0:
            _atomic_save(checkpoint_path, {
                "format": CHECKPOINT_FORMAT, "version": __version__, "step": step, "epoch": epoch, "batch": position,
                "head": head.state_dict(), **update.state_dict(), "config": dataclasses.asdict(config),
                "history": history, "best": best})

    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        run_eval()  # the untrained (base) head, step 0
    stopped = False
    started = time.perf_counter()
    while epoch < config.epochs and not stopped:
        slots, identities = compose_epoch(plan, config.seed, epoch, shuffle_anchor=config.shuffle_anchor)
        batches = epoch_batches(len(plan), config.batch_size, config.seed, epoch)
        shards = [np.array_split(b, world)[rank] for b in batches[position:]]
        batches_data = TrainingBatches(shards, slots, identities, images, preprocess, store, keys)
        loader = DataLoader(batches_data, batch_size=None,
                            num_workers=config.num_workers, pin_memory=device.type == "cuda")
        with tqdm(total=len(batches), initial=position, unit="step", desc=f"epoch {epoch + 1}/{config.epochs}",
                  disable=not show) as bar:
            for item in loader:
                for row, reason in item["failed"].items():
                    if str(images[row]) not in failures:
                        failures[str(images[row])] = reason
                        logger.warning("%s: %s (treated as missing)", images[row], reason)
                loss, stats = batch_loss(model.embed(item), item["index"].to(device), item["identities"].to(device),
                                         temperature=config.temperature, alpha=config.alpha,
                                         tier1_mean=config.tier1_mean)
                update.zero_grad()
                update.backward(loss)
                if world > 1:
                    average_gradients(parameters, world)
                figures = {**{k: float(v) for k, v in stats.items()}, **update.step()}
                if update.scaler is not None:
                    figures["loss_scale"] = update.scaler.get_scale()
                step, position = step + 1, position + 1
                bar.update()
                bar.set_postfix(loss=f"{figures['loss']:.4f}", acc1=f"{figures['tier1_acc']:.3f}",
                                acc2=f"{figures['tier2_acc']:.3f}")
                if rank == 0 and (step % config.log_every == 0 or position == len(batches)):
                    _append_log(out, {"epoch": epoch, "step": step, **figures})
                if step % config.eval_every == 0 and position < len(batches):  # an epoch's end evaluates below
                    run_eval()
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
               "epoch_samples": len(plan), "eval_samples": len(eval_samples), "images": len(images),
               "history": history, "best": best, "failures": failures, "export": None}
    if summary["finished"] and rank == 0:
        record = {"version": __version__, "base": checkpoint.source, "base_revision": checkpoint.revision,
                  "config": dataclasses.asdict(config),
                  "resolved": {"precision": precision_name(autocast), "device": str(device), "world_size": world,
                               "steps_per_epoch": steps_per_epoch},
                  "steps": step, "history": history, "best": best}
        heads = [("final", head.state_dict())]
        if best is not None:
            heads.append(("best", torch.load(out / "best.pt", map_location="cpu", weights_only=True)["head"]))
        trunk.cpu()
        for name, weights in heads:
            head.load_state_dict(weights)
            export_checkpoint(trunk, out / name, vision_config=VisionConfig.from_dict(base_config["vision_config"]),
                              preprocessor_config=preprocessor, dtype=EXPORT_DTYPES[config.export_dtype])
            (out / name / "training.json").write_text(json.dumps({**record, "head": name}, indent=2) + "\n",
                                                      encoding="utf-8")
        summary["export"] = str(out / "final")
        summary["export_best"] = str(out / "best") if best is not None else None
        logger.info("exported the last head to %s%s", out / "final",
                    f" and the best (step {best['step']}, SSR {_pct(best['SSR'])}) to {out / 'best'}" if best else "")
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _open_feature_cache(config: TrainConfig, model: TrainModel, images: Sequence[ImageSource],
                        preprocess: PreprocessConfig, base_folder: Path, rank: int, world: int, show: bool,
                        failures: dict[str, str]) -> tuple[ArrayStore, list[str | None]]:
    """Open the feature cache, fill in what it lacks (shared over ranks), and return it with each image's key."""
    trunk = model.trunk
    signature = (f"nearid-train trunk tokens|weights sha256:{checkpoint_sha256(base_folder / 'model.safetensors')}"
                 f"|{preprocess}|compute:{precision_name(model.autocast)}")
    shape = (trunk.patch_embed.num_patches, trunk.num_features)
    dtype = np.dtype(STORE_DTYPES[config.cache_dtype])
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
    differ = [k for k in run_fields(config) if state["config"].get(k) != getattr(config, k)]
    if differ:
        detail = ", ".join(f"{k}: {state['config'].get(k)!r} -> {getattr(config, k)!r}" for k in differ)
        raise ValueError(f"{path} belongs to a run with other settings ({detail}); use another --out")


def _atomic_save(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` atomically (a kill mid-write leaves the previous file)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _append_log(out: Path, record: dict[str, Any]) -> None:
    with open(out / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"
