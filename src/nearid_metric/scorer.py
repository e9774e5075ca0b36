"""``NearIDScore``: image pairs in, identity similarity out.

This is where an image becomes an embedding:
  file / PIL image / uint8 tensor
  -> :func:`nearid_metric.images.load_image` (decode, EXIF orientation)
  -> :func:`nearid_metric.preprocess.resize_to_uint8` (RGB, resize; in loader workers)
  -> :func:`nearid_metric.preprocess.normalize_uint8` (rescale + normalise, on the device)
  -> :func:`nearid_metric.model.embed_pixels` (timm SigLIP trunk + MAP head, L2-normalised).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from nearid_metric._version import __version__
from nearid_metric.hub import Checkpoint, file_sha256, resolve_checkpoint
from nearid_metric.images import ImageLoadError, load_image
from nearid_metric.model import VisionConfig, embed_pixels, load_trunk
from nearid_metric.preprocess import PreprocessConfig, normalization_table, normalize_uint8, resize_to_uint8

logger = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, Image.Image]
Images = Union[Sequence[ImageInput], torch.Tensor]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CHECKPOINT = "Aleksandar/nearid-siglip2"


class _ImageDataset(Dataset):
    """Decodes and resizes one input per item: ``(index, uint8 [3, H, W] or None, error or None)``."""

    def __init__(self, images: Images, config: PreprocessConfig):
        self.images = images
        self.config = config

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        item = self.images[index]
        try:
            if isinstance(item, torch.Tensor):
                image = Image.fromarray(item.permute(1, 2, 0).numpy())
            elif isinstance(item, Image.Image):
                image = item
            else:
                image = load_image(item)
            return index, resize_to_uint8(image, self.config), None
        except ImageLoadError as e:
            return index, None, e.reason
        except Exception as e:  # a bad in-memory image must not lose the other results
            return index, None, f"cannot preprocess ({type(e).__name__}: {e})"


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]):
    ok = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    failed = {i: error for i, _, error in items if error is not None}
    indices = torch.tensor([i for i, _ in ok], dtype=torch.long)
    pixels = torch.stack([p for _, p in ok]) if ok else None
    return indices, pixels, failed


def _check_images(images: Images) -> None:
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensors must be uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
    elif isinstance(images, (str, os.PathLike, Image.Image)):
        raise TypeError("pass a sequence of images (e.g. [path]), not a single image")


def pick_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class NearIDScore:
    """Identity similarity from a frozen SigLIP2 trunk and the NearID MAP head.

    Build it with :meth:`from_pretrained`. Scores are cosines of L2-normalised
    embeddings, in [-1, 1]; higher means the same identity is better preserved.
    """

    higher_is_better = True
    score_range = (-1.0, 1.0)

    def __init__(
        self,
        trunk: torch.nn.Module,
        preprocess_config: PreprocessConfig,
        *,
        signature: str,
        device: torch.device,
        precision: str = "fp32",
    ):
        self.trunk = trunk
        self.preprocess_config = preprocess_config
        self.signature = signature
        self.device = device
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self._table = normalization_table(preprocess_config).to(device)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_CHECKPOINT,
        *,
        revision: str | None = None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
    ) -> NearIDScore:
        """Load a checkpoint folder in the released format.

        ``name_or_path``: a local folder, a registered name (``nearid``) or a Hub repo id.
        ``precision``: ``fp32`` (default, as the reference), ``bf16`` or ``fp16`` weights
        and activations; embeddings are returned in float32 either way.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        checkpoint = resolve_checkpoint(name_or_path, revision)
        device = pick_device(device)
        trunk = load_checkpoint_trunk(checkpoint.folder, dtype=PRECISIONS[precision], device=device)
        preprocess_config = PreprocessConfig.from_file(checkpoint.folder / "preprocessor_config.json")
        logger.info("loaded %s from %s on %s", checkpoint.source, checkpoint.folder, device)
        return cls(trunk, preprocess_config, signature=signature("nearid", checkpoint, precision),
                   device=device, precision=precision)

    def embed_with_failures(
        self,
        images: Images,
        *,
        batch_size: int = 32,
        num_workers: int = 0,
        progress: bool | None = None,
    ) -> tuple[torch.Tensor, dict[int, str]]:
        """Embed every image that can be read: ``(embeddings [N, D] float32 CPU, {index: reason})``.

        Rows of images that failed are NaN; the dict says why each failed.
        ``progress=None`` shows a bar only on a terminal.
        """
        _check_images(images)
        dataset = _ImageDataset(images, self.preprocess_config)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                            pin_memory=self.device.type == "cuda")
        out: torch.Tensor | None = None
        failures: dict[int, str] = {}
        with torch.inference_mode(), tqdm(total=len(dataset), unit="img", disable=_disable(progress)) as bar:
            for indices, pixels, failed in loader:
                failures.update(failed)
                if pixels is not None:
                    pixels = pixels.to(self.device, non_blocking=True)
                    emb = embed_pixels(self.trunk, normalize_uint8(pixels, self._table).to(self.dtype)).cpu()
                    if out is None:
                        out = torch.full((len(dataset), emb.shape[1]), float("nan"))
                    out[indices] = emb
                bar.update(len(indices) + len(failed))
        if out is None:
            out = torch.full((len(dataset), self.embed_dim), float("nan"))
        return out, failures

    @property
    def embed_dim(self) -> int:
        return self.trunk.num_features

    def embed(self, images: Images, *, batch_size: int = 32, num_workers: int = 0,
              progress: bool | None = None) -> torch.Tensor:
        """Images -> L2-normalised embeddings [N, D], float32 on CPU.

        ``images``: file paths, PIL images, or a uint8 tensor [N, 3, H, W]. Raises
        :class:`ImageLoadError` naming every image that could not be read (after trying all).
        """
        emb, failures = self.embed_with_failures(images, batch_size=batch_size, num_workers=num_workers,
                                                 progress=progress)
        if failures:
            names = [_describe(images, i) for i in sorted(failures)]
            detail = "; ".join(f"{name}: {failures[i]}" for name, i in zip(names, sorted(failures)))
            raise ImageLoadError(names[0] if len(names) == 1 else f"{len(names)} images", detail)
        return emb

    def score(self, refs: Images, gens: Images, **embed_kwargs) -> torch.Tensor:
        """Cosine identity similarity of aligned pairs (refs[i], gens[i]): [N] float32."""
        if len(refs) != len(gens):
            raise ValueError(f"score() needs aligned pairs: {len(refs)} refs vs {len(gens)} gens")
        return (self.embed(refs, **embed_kwargs) * self.embed(gens, **embed_kwargs)).sum(-1)

    def score_matrix(self, refs: Images, gens: Images, **embed_kwargs) -> torch.Tensor:
        """Cosine similarity of every ref with every gen: [N, M] float32."""
        return self.embed(refs, **embed_kwargs) @ self.embed(gens, **embed_kwargs).T

    def __repr__(self) -> str:
        return f"NearIDScore({self.signature!r}, device={self.device})"


def load_checkpoint_trunk(folder: Path, *, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Read ``config.json`` + ``model.safetensors`` from a checkpoint folder into the timm trunk."""
    with open(folder / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    if "vision_config" not in config:
        raise ValueError(f"{folder / 'config.json'} has no vision_config: not a NearID/SigLIP checkpoint")
    if config.get("normalize_embeddings") is False:
        raise ValueError(f"{folder / 'config.json'} sets normalize_embeddings=false; NearID scores normalised cosines")
    state_dict = load_file(folder / "model.safetensors")
    return load_trunk(VisionConfig.from_dict(config["vision_config"]), state_dict, dtype=dtype, device=device)


def signature(kind: str, checkpoint: Checkpoint, precision: str) -> str:
    """``kind:source@revision|sha256:<12 hex of model.safetensors>|precision|v<package version>``."""
    digest = file_sha256(checkpoint.folder / "model.safetensors")[:12]
    return f"{kind}:{checkpoint.source}@{checkpoint.revision}|sha256:{digest}|{precision}|v{__version__}"


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _describe(images: Images, index: int) -> str:
    item = images[index] if not isinstance(images, torch.Tensor) else None
    return str(item) if isinstance(item, (str, os.PathLike)) else f"image {index}"
