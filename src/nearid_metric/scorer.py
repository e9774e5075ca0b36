"""``NearIDScore``: image pairs in, identity similarity out.

This is where an image becomes an embedding:
  file / PIL image / uint8 tensor
  -> :func:`nearid_metric.images.load_image` (decode, EXIF orientation)
  -> :func:`nearid_metric.preprocess.resize_to_uint8` (RGB, resize; in loader workers)
  -> :func:`nearid_metric.preprocess.normalize_uint8` (rescale + normalise, on the device)
  -> ``Scorer.encoder`` (for NearID: the timm SigLIP trunk + MAP head), L2-normalised.

The same path serves the baselines (:mod:`nearid_metric.scorers` builds their encoders);
:func:`embed_images` runs several scorers over one decode of each image.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from nearid_metric._version import __version__
from nearid_metric.hub import Checkpoint, file_sha256
from nearid_metric.images import EncodedImage, ImageLoadError, load_image
from nearid_metric.preprocess import PreprocessConfig, normalization_table, normalize_uint8, resize_to_uint8

logger = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, EncodedImage, Image.Image]
Images = Union[Sequence[ImageInput], torch.Tensor]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CHECKPOINT = "nearid"  # the registry entry of the released weights


class _ImageDataset(Dataset):
    """Decodes each input once and prepares it for every distinct preprocessing.

    Item: ``(index, tuple of uint8 [3, H, W] per config, or None, error or None)``.
    """

    def __init__(self, images: Images, configs: Sequence[PreprocessConfig]):
        self.images = images
        self.configs = configs

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, tuple[torch.Tensor, ...] | None, str | None]:
        item = self.images[index]
        try:
            if isinstance(item, torch.Tensor):
                image = Image.fromarray(item.permute(1, 2, 0).numpy())
            elif isinstance(item, Image.Image):
                image = item
            else:
                image = load_image(item)
            return index, tuple(resize_to_uint8(image, config) for config in self.configs), None
        except ImageLoadError as e:
            return index, None, e.reason
        except Exception as e:  # a bad in-memory image must not lose the other results
            return index, None, f"cannot preprocess ({type(e).__name__}: {e})"


def _collate(items: list[tuple[int, tuple[torch.Tensor, ...] | None, str | None]]):
    ok = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    failed = {i: error for i, _, error in items if error is not None}
    indices = torch.tensor([i for i, _ in ok], dtype=torch.long)
    pixels = tuple(torch.stack(group) for group in zip(*(p for _, p in ok))) if ok else None
    return indices, pixels, failed


def _check_images(images: Images) -> None:
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensors must be uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
    elif isinstance(images, (str, os.PathLike, Image.Image, EncodedImage)):
        raise TypeError("pass a sequence of images (e.g. [path]), not a single image")


def pick_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Scorer:
    """Identity similarity as the cosine of L2-normalised image embeddings of one encoder.

    ``encoder`` maps normalised pixels [B, 3, H, W] (on ``device``, in the precision's
    dtype) to pooled features [B, D]; ``preprocess_config`` says how images become those
    pixels. Build scorers with :func:`nearid_metric.create_scorer` (or
    :meth:`NearIDScore.from_pretrained`). Scores are in [-1, 1], higher = more similar.
    """

    higher_is_better = True
    score_range = (-1.0, 1.0)

    def __init__(
        self,
        encoder: torch.nn.Module,
        preprocess_config: PreprocessConfig,
        *,
        name: str,
        signature: str,
        embed_dim: int,
        device: torch.device,
        precision: str = "fp32",
    ):
        self.encoder = encoder
        self.preprocess_config = preprocess_config
        self.name = name
        self.signature = signature
        self.embed_dim = embed_dim
        self.device = device
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self._table = normalization_table(preprocess_config).to(device)

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [B, 3, H, W] from :func:`resize_to_uint8` -> L2-normalised embeddings [B, D] float32."""
        pixels = normalize_uint8(pixels.to(self.device, non_blocking=True), self._table).to(self.dtype)
        return F.normalize(self.encoder(pixels).float(), dim=-1)

    def embed_with_failures(self, images: Images, *, batch_size: int = 32, num_workers: int = 0,
                            progress: bool | None = None) -> tuple[torch.Tensor, dict[int, str]]:
        """Embed every image that can be read: ``(embeddings [N, D] float32 CPU, {index: reason})``.

        Rows of images that failed are NaN; the dict says why each failed.
        ``progress=None`` shows a bar only on a terminal.
        """
        (emb,), failures = embed_images([self], images, batch_size=batch_size, num_workers=num_workers,
                                        progress=progress)
        return emb, failures

    def embed(self, images: Images, *, batch_size: int = 32, num_workers: int = 0,
              progress: bool | None = None) -> torch.Tensor:
        """Images -> L2-normalised embeddings [N, D], float32 on CPU.

        ``images``: file paths, PIL images, :class:`EncodedImage` or a uint8 tensor [N, 3, H, W].
        Raises :class:`ImageLoadError` naming every image that could not be read (after trying all).
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
        return f"{type(self).__name__}({self.signature!r}, device={self.device})"


class NearIDScore(Scorer):
    """Identity similarity from a frozen SigLIP2 trunk and the NearID MAP head.

    Build it with :meth:`from_pretrained`. Scores are cosines of L2-normalised
    embeddings, in [-1, 1]; higher means the same identity is better preserved.
    """

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_CHECKPOINT,
        *,
        revision: str | None = None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
    ) -> NearIDScore:
        """Load a checkpoint folder in the released format (same as ``create_scorer("nearid", pretrained=...)``).

        ``name_or_path``: a local folder, a registered name (``nearid``, the default) or a Hub repo id.
        ``precision``: ``fp32`` (default, as the reference), ``bf16`` or ``fp16`` weights
        and activations; embeddings are returned in float32 either way.
        """
        from nearid_metric.scorers import create_scorer

        return create_scorer("nearid", pretrained=name_or_path, revision=revision, device=device,
                             precision=precision)

    @property
    def trunk(self) -> torch.nn.Module:
        """The timm ViT (SigLIP2 trunk + NearID MAP head)."""
        return self.encoder


def embed_images(
    scorers: Sequence[Scorer],
    images: Images,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool | None = None,
) -> tuple[list[torch.Tensor], dict[int, str]]:
    """Embed ``images`` with several scorers, decoding each image once.

    Returns one float32 CPU tensor [N, D_k] per scorer (NaN rows for images that failed)
    and ``{index: reason}`` for the failures, which are the same for every scorer.
    Scorers sharing a preprocessing share the resized pixels.
    """
    _check_images(images)
    configs = list(dict.fromkeys(s.preprocess_config for s in scorers))
    slot = [configs.index(s.preprocess_config) for s in scorers]
    loader = DataLoader(_ImageDataset(images, configs), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=any(s.device.type == "cuda" for s in scorers))
    n = len(images)
    out = [torch.full((n, s.embed_dim), float("nan")) for s in scorers]
    failures: dict[int, str] = {}
    with torch.inference_mode(), tqdm(total=n, unit="img", disable=_disable(progress)) as bar:
        for indices, pixels, failed in loader:
            failures.update(failed)
            if pixels is not None:
                for k, scorer in enumerate(scorers):
                    out[k][indices] = scorer.embed_pixels(pixels[slot[k]]).cpu()
            bar.update(len(indices) + len(failed))
    return out, failures


def score_pairs(
    scorers: Sequence[Scorer],
    pairs: Sequence[tuple[ImageInput, ImageInput]],
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, str]]:
    """Cosines of (reference, generation) pairs for several scorers, each distinct image decoded once.

    Files are told apart by resolved path (a file reached through a symlink is read once),
    other inputs by equality. Returns one float32 tensor [P] per scorer (NaN for a pair with
    an unreadable side), the mask [P] of scored pairs (the same for every scorer) and
    ``{image: reason}`` for the unreadable images, in order of first appearance.
    """
    rows: dict[object, int] = {}
    images: list[ImageInput] = []

    def row(image: ImageInput) -> int:
        key = Path(image).resolve() if isinstance(image, (str, os.PathLike)) else image
        if key not in rows:
            rows[key] = len(images)
            images.append(image)
        return rows[key]

    refs = torch.tensor([row(ref) for ref, _ in pairs], dtype=torch.long)
    gens = torch.tensor([row(gen) for _, gen in pairs], dtype=torch.long)
    embeddings, failed = embed_images(scorers, images, batch_size=batch_size, num_workers=num_workers,
                                      progress=progress)
    bad = torch.zeros(len(images), dtype=torch.bool)
    bad[list(failed)] = True
    scored = ~(bad[refs] | bad[gens])
    scores = [torch.where(scored, (emb[refs] * emb[gens]).sum(-1), float("nan")) for emb in embeddings]
    return scores, scored, {str(images[i]): reason for i, reason in sorted(failed.items())}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")


def signature(kind: str, checkpoint: Checkpoint, precision: str, weights_file: str = "model.safetensors") -> str:
    """``kind:source@revision|sha256:<12 hex of the weights file>|precision|v<package version>``."""
    digest = file_sha256(checkpoint.folder / weights_file)[:12]
    return f"{kind}:{checkpoint.source}@{checkpoint.revision}|sha256:{digest}|{precision}|v{__version__}"


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _describe(images: Images, index: int) -> str:
    item = images[index] if not isinstance(images, torch.Tensor) else None
    return str(item) if isinstance(item, (str, os.PathLike, EncodedImage)) else f"image {index}"
