"""Image preprocessing read from a checkpoint's ``preprocessor_config.json``.

Reproduces transformers' PIL-backend ``SiglipImageProcessor`` (``use_fast=False``), the
path the paper's numbers used: convert to RGB (non-RGB modes through RGBA composited on
white), resize straight to (height, width) with the PIL filter named in the file, then
rescale and normalise. Resizing happens on uint8 PIL images (in data-loader workers);
rescale + normalise is a per-channel 256-entry lookup table applied on the device, which
gives the reference's float32 values bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class PreprocessConfig:
    """The fields of a ``SiglipImageProcessor`` config that define the pixels."""

    height: int
    width: int
    resample: int  # PIL filter code: 2 = bilinear, 3 = bicubic
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dict(cls, config: dict) -> PreprocessConfig:
        """Parse a ``preprocessor_config.json`` dict; refuse settings this package does not reproduce."""
        if not config.get("do_resize", True):
            raise ValueError("preprocessor config has do_resize=false; NearID batches need a fixed input size")
        if config.get("do_center_crop"):
            raise ValueError("preprocessor config asks for a centre crop; SigLIP processors resize without cropping")
        size = config.get("size", {})
        if not {"height", "width"} <= set(size):
            raise ValueError(f"preprocessor config size must give height and width, got {size!r}")
        return cls(
            height=int(size["height"]),
            width=int(size["width"]),
            resample=int(config.get("resample", Image.Resampling.BILINEAR)),
            do_rescale=bool(config.get("do_rescale", True)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            do_normalize=bool(config.get("do_normalize", True)),
            image_mean=_per_channel(config.get("image_mean", 0.5)),
            image_std=_per_channel(config.get("image_std", 0.5)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> PreprocessConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _per_channel(value: float | Sequence[float]) -> tuple[float, ...]:
    values = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
    if len(values) != 3:
        raise ValueError(f"expected 3 per-channel values, got {values!r}")
    return tuple(float(v) for v in values)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB as the reference processor does.

    Non-RGB images go through RGBA and are alpha-composited onto white, so transparent
    pixels become white. 16-bit and 32-bit greyscale values are clipped to 0..255 by PIL
    (not rescaled), exactly as in the reference.
    """
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def resize_to_uint8(image: Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """PIL image (any mode) -> RGB, resized to the model's input: uint8 tensor [3, H, W]."""
    rgb = to_rgb(image)
    if rgb.size != (config.width, config.height):
        rgb = rgb.resize((config.width, config.height), resample=config.resample, reducing_gap=None)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def normalization_table(config: PreprocessConfig) -> torch.Tensor:
    """The float32 value of every uint8 level in every channel after rescale + normalise: [3, 256].

    Computed with the reference's own arithmetic (rescale in float64, cast to float32,
    then ``(x - mean) / std`` in float32), so looking values up reproduces it exactly.
    """
    levels = np.arange(256, dtype=np.uint8)
    if config.do_rescale:
        x = (levels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    else:
        x = levels.astype(np.float32)
    table = np.stack([x] * 3)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(config.image_std, dtype=np.float32)[:, None]
        table = (table - mean) / std
    return torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))


def normalize_uint8(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, 3, H, W] through :func:`normalization_table` (same device)."""
    channel = torch.arange(3, device=pixels.device).view(1, 3, 1, 1)
    return table[channel, pixels.long()]


def preprocess(image: Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """One PIL image -> normalised float32 pixels [3, H, W] (the reference processor's output)."""
    return normalize_uint8(resize_to_uint8(image, config)[None], normalization_table(config))[0]
