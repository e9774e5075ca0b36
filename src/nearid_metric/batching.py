"""Forward passes in batches sized to the device, backing off on out-of-memory errors.

On CUDA the first forward tries a large batch (:data:`CUDA_PIXELS` worth of input pixels)
and every out-of-memory error halves it and retries the same images, so scoring slows down
instead of crashing. On CPU small batches are the fastest per image (activations stay in
cache; see ``benchmarks/RESULTS.md``, finding 4), so the automatic size is about two
384 x 384 images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

CPU_PIXELS = 2 * 384 * 384  # input pixels per forward on CPU: 2 SigLIP images, 1 DINOv2 518 px image
CUDA_PIXELS = 128 * 384 * 384  # first try on CUDA: 128 SigLIP images; halved on each out-of-memory error


def auto_batch_size(device: torch.device, height: int, width: int) -> int:
    """Images of ``height`` x ``width`` pixels per forward pass on ``device`` (at least 1)."""
    budget = CUDA_PIXELS if device.type == "cuda" else CPU_PIXELS
    return max(1, budget // (height * width))


def forward_in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, size: int, *,
                      name: str = "model") -> tuple[torch.Tensor, int]:
    """``fn`` over row chunks of ``inputs`` [B, ...] of at most ``size`` rows: ``(outputs [B, ...], size that fit)``.

    An out-of-memory error (``torch.OutOfMemoryError``, CUDA's included) halves the size and
    retries the same chunk; chunks already done are kept. At size 1 it re-raises, saying so.
    The returned size is the one to start from next time.
    """
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    outputs, start = [], 0
    while start < len(inputs):
        chunk = inputs[start:start + size]
        try:
            out = fn(chunk)
        except torch.OutOfMemoryError as e:
            if size == 1:
                raise torch.OutOfMemoryError(
                    f"{name}: out of memory with one image per forward pass ({e}). Free device memory, use "
                    f"--precision bf16, or score on another device") from e
            out = None  # leave the except block first, so the failed attempt's tensors can be freed
        if out is None:
            _release_cached_memory()
            size = max(1, len(chunk) // 2)
            logger.warning("%s: out of memory at %d images per forward pass, retrying with %d", name, len(chunk), size)
            continue
        outputs.append(out)
        start += len(chunk)
    return torch.cat(outputs), size


def _release_cached_memory() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
