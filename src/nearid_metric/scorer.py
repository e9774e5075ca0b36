"""``Scorer``: image pairs in, identity similarity out (``NearIDScore`` and the baselines are scorers).

This is where an image becomes an embedding:
  file / PIL image / uint8 tensor
  -> :func:`nearid_metric.images.load_image` (decode, EXIF orientation)
  -> :func:`nearid_metric.preprocess.resize_to_uint8` (RGB, resize; in loader workers)
  -> :func:`nearid_metric.preprocess.normalize_uint8` (rescale + normalise, on the device)
  -> ``Scorer.encoder`` (for NearID: the timm SigLIP trunk + MAP head), L2-normalised,
     in forward batches sized to the device (:mod:`nearid_metric.batching`).

The same path serves every scorer (:mod:`nearid_metric.scorers` builds their encoders).
:func:`embed_images` runs several scorers over one decode of each distinct image (by content,
:mod:`nearid_metric.embedding_cache`), reusing cached embeddings (``cache_dir``) and sharing
the work between ``torch.distributed`` ranks (``distributed=True``, :mod:`nearid_metric.distributed`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from nearid_metric import distributed as dist_utils
from nearid_metric._version import __version__
from nearid_metric.batching import auto_batch_size, forward_in_chunks
from nearid_metric.embedding_cache import EmbeddingCache, image_keys
from nearid_metric.hub import Checkpoint, checkpoint_sha256
from nearid_metric.images import EncodedImage, ImageLoadError
from nearid_metric.loading import (
    ImageInput,
    Images,
    PreprocessedBatch,
    PreprocessedImages,
    load_batches,
)
from nearid_metric.options import PRECISION_DTYPES
from nearid_metric.preprocess import (
    PreprocessConfig,
    normalization_table,
    normalize_uint8,
)

logger = logging.getLogger(__name__)

PRECISIONS = {name: getattr(torch, dtype) for name, dtype in PRECISION_DTYPES.items()}
"""Precision name (``--precision``) -> torch dtype of the weights and activations."""


def _check_images(images: Images) -> None:
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensors must be uint8 [N, 3, H, W], got {images.dtype} {list(images.shape)}")
    elif isinstance(images, (str, os.PathLike, Image.Image, EncodedImage)):
        raise TypeError("pass a sequence of images (e.g. [path]), not a single image")


def pick_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; ``ValueError`` for a device this machine does not have."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({e})") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here (no GPU, or a CPU-only torch "
                             f"{torch.__version__}); use --device cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return chosen


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
        self.batch_limit: int | None = None  # largest forward batch that fit, once one ran out of memory
        self._table = normalization_table(preprocess_config).to(device)

    def forward_batch_size(self, requested: int | None = None) -> int:
        """Images per forward pass: ``requested``, or sized to the device if None; never above :attr:`batch_limit`."""
        size = requested or auto_batch_size(self.device, self.preprocess_config.height, self.preprocess_config.width)
        return min(size, self.batch_limit) if self.batch_limit else size

    def embed_pixels(self, pixels: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """uint8 pixels [B, 3, H, W] from :func:`resize_to_uint8` -> L2-normalised embeddings [B, D] float32.

        Runs forward passes of :meth:`forward_batch_size` images; an out-of-memory error halves the
        batch and retries (:func:`nearid_metric.batching.forward_in_chunks`), and the size that
        fit is kept in :attr:`batch_limit` for later calls. The result stays on the device.
        """
        pixels = pixels.to(self.device, non_blocking=True)
        size = self.forward_batch_size(batch_size)
        out, fitted = forward_in_chunks(self._forward, pixels, size, name=self.name)
        if fitted < size:
            self.batch_limit = fitted
        return out

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = normalize_uint8(pixels, self._table).to(self.dtype)
        return F.normalize(self.encoder(pixels).float(), dim=-1)

    def embed_with_failures(self, images: Images, *, batch_size: int | None = None, num_workers: int = 0,
                            progress: bool | None = None,
                            cache_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, dict[int, str]]:
        """Embed every image that can be read: ``(embeddings [N, D] float32 CPU, {index: reason})``.

        Rows of images that failed are NaN; the dict says why each failed. See :meth:`embed`.
        """
        (emb,), failures = embed_images([self], images, batch_size=batch_size, num_workers=num_workers,
                                        progress=progress, cache_dir=cache_dir)
        return emb, failures

    def embed(self, images: Images, *, batch_size: int | None = None, num_workers: int = 0,
              progress: bool | None = None, cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
        """Images -> L2-normalised embeddings [N, D], float32 on CPU.

        ``images``: file paths, PIL images, :class:`EncodedImage` or a uint8 tensor [N, 3, H, W];
        images with the same content are embedded once. ``batch_size``: images per forward
        pass (None: sized to the device, see :mod:`nearid_metric.batching`); ``num_workers``:
        decoding processes; ``progress=None`` shows a bar only on a terminal; ``cache_dir``:
        reuse and store embeddings there (see :mod:`nearid_metric.embedding_cache`).
        Raises :class:`ImageLoadError` naming every image that could not be read (after trying all).
        """
        emb, failures = self.embed_with_failures(images, batch_size=batch_size, num_workers=num_workers,
                                                 progress=progress, cache_dir=cache_dir)
        if failures:
            names = [describe_image(images, i) for i in sorted(failures)]
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


def embed_images(
    scorers: Sequence[Scorer],
    images: Images,
    *,
    batch_size: int | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    distributed: bool = False,
) -> tuple[list[torch.Tensor], dict[int, str]]:
    """Embed ``images`` with several scorers, decoding and embedding each distinct image once.

    Returns one float32 CPU tensor [N, D_k] per scorer (NaN rows for images that failed)
    and ``{index: reason}`` for the failures, which are the same for every scorer.
    Images with the same content (file bytes, or pixels) share one decode and one embedding;
    scorers sharing a preprocessing share the resized pixels. ``batch_size``: images per
    forward pass (None: :meth:`Scorer.forward_batch_size`). ``cache_dir``: embeddings found
    there are reused, new ones stored (:class:`~nearid_metric.embedding_cache.EmbeddingCache`).
    ``distributed``: every rank of the initialised ``torch.distributed`` group passes the same
    images; each embeds a share and all return the full result (:mod:`nearid_metric.distributed`).
    """
    _check_images(images)
    rank, world = dist_utils.rank_and_world(distributed)
    keys = image_keys(images, cache_dir=cache_dir)
    if distributed:
        dist_utils.check_same_inputs(keys)
    first: dict[str, int] = {}
    owner = torch.tensor([i if key is None else first.setdefault(key, i) for i, key in enumerate(keys)],
                         dtype=torch.long)  # the image whose embedding image i gets
    unique = torch.nonzero(owner == torch.arange(len(owner))).flatten()
    n = len(images)
    out = [torch.full((n, s.embed_dim), float("nan")) for s in scorers]
    cache = EmbeddingCache(cache_dir, scorers) if cache_dir is not None else None
    with cache or contextlib.nullcontext():
        need = torch.ones(len(scorers), len(unique), dtype=torch.bool)
        if cache is not None:
            for k in range(len(scorers)):
                hit, values = cache.lookup(k, [keys[i] for i in unique.tolist()])
                need[k] = torch.from_numpy(~hit)
                out[k][unique[torch.from_numpy(hit)]] = values
        if distributed:
            need = dist_utils.any_rank(need)  # a rank that opened the cache later may have seen more entries
        todo = torch.nonzero(need.any(0)).flatten()
        computed, failures = _embed_todo(scorers, images, keys, unique[todo], need[:, todo], cache,
                                         batch_size=batch_size, num_workers=num_workers, progress=progress,
                                         rank=rank, world=world)
    if distributed:
        computed = [dist_utils.merge_rows(c) for c in computed]
        failures = dist_utils.merge_dicts(failures)
    for k in range(len(scorers)):
        rows = need[k, todo]
        out[k][unique[todo][rows]] = computed[k][rows]
    bad = torch.tensor(sorted(failures), dtype=torch.long)
    for k in range(len(scorers)):
        out[k][bad] = float("nan")
        out[k] = out[k][owner]
    return out, {i: failures[j] for i, j in enumerate(owner.tolist()) if j in failures}


def _embed_todo(scorers: Sequence[Scorer], images: Images, keys: Sequence[str | None], rows: torch.Tensor,
                need: torch.Tensor, cache: EmbeddingCache | None, *, batch_size: int | None, num_workers: int,
                progress: bool | None, rank: int, world: int) -> tuple[list[torch.Tensor], dict[int, str]]:
    """Embed ``images[rows]`` (scorer k only where ``need[k]``), this rank's share of the loader batches.

    Returns per scorer [len(rows), D_k] (zeros where not computed here) and {image index: reason}.
    """
    configs = list(dict.fromkeys(s.preprocess_config for s in scorers))
    slot = [configs.index(s.preprocess_config) for s in scorers]
    sizes = [s.forward_batch_size(batch_size) for s in scorers]
    position = {image: p for p, image in enumerate(rows.tolist())}
    batches = [rows[start:start + max(sizes)].tolist() for start in range(0, len(rows), max(sizes))][rank::world]
    computed = [torch.zeros(len(rows), s.embed_dim) for s in scorers]
    failures: dict[int, str] = {}
    if not batches:
        return computed, failures
    total = sum(map(len, batches))
    hide = True if rank > 0 else _disable(progress)
    with torch.inference_mode(), tqdm(total=total, unit="img", disable=hide) as bar:

        def embed(batch: PreprocessedBatch) -> None:
            failures.update(batch.failed)
            if batch.pixels is not None:
                places = torch.tensor([position[i] for i in batch.indices.tolist()], dtype=torch.long)
                for k, scorer in enumerate(scorers):
                    mine = need[k, places]
                    if not mine.any():
                        continue
                    pixels = batch.pixels[slot[k]] if mine.all() else batch.pixels[slot[k]][mine]
                    emb = check_finite(scorer.embed_pixels(pixels, sizes[k]).cpu(), scorer.name)
                    computed[k][places[mine]] = emb
                    if cache is not None:  # keyed by the bytes that were decoded (a file rewritten since hashing)
                        read = [key or keys[i] for key, i in zip(batch.keys, batch.indices.tolist())]
                        cache.put(k, [key for key, m in zip(read, mine.tolist()) if m], emb)
            bar.update(len(batch.indices) + len(batch.failed))

        crashed = load_batches(PreprocessedImages(images, configs), batches, embed, num_workers=num_workers,
                               pin_memory=any(s.device.type == "cuda" for s in scorers))
        bar.update(len(crashed))
    failures.update(crashed)
    return computed, failures


def check_finite(embeddings: torch.Tensor, name: str) -> torch.Tensor:
    """``embeddings`` if every value is finite; else ``ValueError`` (broken weights give NaN for every image)."""
    if not torch.isfinite(embeddings).all():
        raise ValueError(f"{name}: the model produced non-finite embeddings (NaN or inf); its weights are "
                         f"probably broken (NaN or inf values, or fp16 overflow): check them, or use --precision fp32")
    return embeddings


def embed_pairs(
    scorers: Sequence[Scorer],
    pairs: Sequence[tuple[ImageInput, ImageInput]],
    **embed_kwargs,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, dict[str, str]]:
    """Embed the distinct images of ``pairs`` once per scorer (:func:`embed_images` takes ``embed_kwargs``).

    Returns the embeddings per scorer [U, D_k] of the U distinct images, the row of each pair's
    reference and generation [P] in them, the mask [P] of pairs whose both sides were read, and
    ``{image: reason}`` for the unreadable images, in order of first appearance. A file reached
    through several paths (e.g. a symlink) is one image.
    """
    rows: dict[object, int] = {}
    images: list[ImageInput] = []

    def row(image: ImageInput) -> int:
        if isinstance(image, (str, os.PathLike)):
            key: object = os.path.realpath(image)  # never raises, also for a symlink loop
        else:  # EncodedImage compares by value; PIL images are told apart by content in embed_images
            key = image if isinstance(image, EncodedImage) else id(image)
        if key not in rows:
            rows[key] = len(images)
            images.append(image)
        return rows[key]

    refs = torch.tensor([row(ref) for ref, _ in pairs], dtype=torch.long)
    gens = torch.tensor([row(gen) for _, gen in pairs], dtype=torch.long)
    embeddings, failed = embed_images(scorers, images, **embed_kwargs)
    bad = torch.zeros(len(images), dtype=torch.bool)
    bad[list(failed)] = True
    scored = ~(bad[refs] | bad[gens])
    return embeddings, refs, gens, scored, {str(images[i]): reason for i, reason in sorted(failed.items())}


def score_pairs(
    scorers: Sequence[Scorer],
    pairs: Sequence[tuple[ImageInput, ImageInput]],
    *,
    batch_size: int | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    distributed: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, str]]:
    """Cosines of (reference, generation) pairs for several scorers, each distinct image embedded once.

    Images with the same content are decoded and embedded once (:func:`embed_pairs`,
    :func:`embed_images`, which also take ``batch_size``, ``num_workers``, ``progress``,
    ``cache_dir`` and ``distributed``). Returns one float32 tensor [P] per scorer (NaN for a pair
    with an unreadable side), the mask [P] of scored pairs (the same for every scorer) and
    ``{image: reason}`` for the unreadable images, in order of first appearance.
    """
    embeddings, refs, gens, scored, failures = embed_pairs(
        scorers, pairs, batch_size=batch_size, num_workers=num_workers, progress=progress, cache_dir=cache_dir,
        distributed=distributed)
    scores = [torch.where(scored, (emb[refs] * emb[gens]).sum(-1), float("nan")) for emb in embeddings]
    return scores, scored, failures


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")


def signature(kind: str, checkpoint: Checkpoint, precision: str, weights_file: str = "model.safetensors",
              detail: str | None = None) -> str:
    """``kind:source@revision|sha256:<12 hex of the weights file>|[detail|]precision|v<package version>``.

    ``detail``: what else defines the numbers, e.g. the folder layout read and the resize / crop
    (``transformers:shortest256-crop224x224-bicubic-crop_floor``).
    """
    digest = checkpoint_sha256(checkpoint.folder / weights_file)[:12]
    middle = f"{detail}|" if detail else ""
    return f"{kind}:{checkpoint.source}@{checkpoint.revision}|sha256:{digest}|{middle}{precision}|v{__version__}"


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def describe_image(images: Images, index: int) -> str:
    """How errors name ``images[index]``: its path or name, else ``image <index>``."""
    item = images[index] if not isinstance(images, torch.Tensor) else None
    return str(item) if isinstance(item, (str, os.PathLike, EncodedImage)) else f"image {index}"
