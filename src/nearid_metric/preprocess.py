"""Image preprocessing, read from the configuration that travels with each model's weights.

For transformers-format checkpoints (``preprocessor_config.json``) this reproduces the
PIL backend of transformers' image processors (``use_fast=False``), the path the paper's
numbers used: convert to RGB (images with transparency composited on white), then either
resize straight to (height, width) with the PIL filter named in the file (SigLIP, for NearID
and SigLIP2) or resize the shortest edge and centre-crop (CLIP's ``CLIPImageProcessor``,
DINOv2's ``BitImageProcessor``; crop offsets floored as transformers does), then rescale
and normalise.
For open_clip and timm folders it reproduces their eval transforms (``open_clip_config.json``
/ timm's ``pretrained_cfg``): plain ``convert("RGB")``, resize the shortest edge, centre crop
(offsets rounded as torchvision does), then ``ToTensor`` + ``Normalize``; :func:`torchvision_eval`
gives the same for a benchmark's own torchvision transform (DINO's eval transform; with
``rgb_mode="after_crop"`` CustomConcept101's, which converts to RGB after the crop).

Resizing happens on uint8 PIL images (in data-loader workers); rescale + normalise is a
per-channel 256-entry lookup table applied on the device, which gives the reference's
float32 values bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from nearid_metric.hub import read_json

if TYPE_CHECKING:
    import torch

RESIZE_MODES = ("squash", "shortest")
RGB_MODES = ("white", "convert", "after_crop")
CROP_OFFSETS = ("round", "floor")
# transformers processors that read an int ``size`` as the shortest edge (``default_to_square=False``);
# the others read it as a square. Older files (e.g. openai/clip-*) name the class as a feature extractor.
_SHORTEST_EDGE_PROCESSORS = frozenset({"CLIPImageProcessor", "CLIPFeatureExtractor", "BitImageProcessor"})
MAX_SIDE = 8192  # largest model input side accepted from a preprocessor config
_RESAMPLE_CODES = tuple(int(f) for f in Image.Resampling)  # 0 nearest .. 5 hamming
_PIL_FILTERS = {"bilinear": int(Image.Resampling.BILINEAR), "bicubic": int(Image.Resampling.BICUBIC)}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet per-channel mean / std of [0, 1] pixels (DINO, DINOv2)."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's per-channel mean / std of [0, 1] pixels."""


@dataclass(frozen=True)
class PreprocessConfig:
    """What turns a decoded image into model input pixels.

    ``resize_mode``: ``squash`` resizes straight to (height, width) (SigLIP); ``shortest``
    resizes the shortest edge to ``shortest_edge`` (aspect kept, as torchvision's
    ``Resize(int)``) then centre-crops (height, width) (CLIP, DINOv2).
    ``rgb_mode``: ``white`` composites non-RGB images on white through RGBA (transformers'
    processors); ``convert`` is PIL's plain ``convert("RGB")`` (open_clip, timm loaders);
    ``after_crop`` resizes and crops in the image's own mode, then calls ``convert("RGB")``
    (CustomConcept101's transform; palette images then resize with nearest, as PIL does for them).
    ``crop_offset``: how the centre crop's top-left corner is rounded when the margin is odd:
    ``round`` half to even (torchvision's ``CenterCrop``), ``floor`` (transformers'
    ``center_crop``, which never pads here: it needs ``shortest_edge`` >= the crop size).
    """

    height: int
    width: int
    resample: int  # PIL filter code: 2 = bilinear, 3 = bicubic
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resize_mode: str = "squash"
    shortest_edge: int | None = None
    rgb_mode: str = "white"
    crop_offset: str = "round"

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.rgb_mode not in RGB_MODES:
            raise ValueError(f"rgb_mode must be one of {RGB_MODES}, got {self.rgb_mode!r}")
        if (self.resize_mode == "shortest") != (self.shortest_edge is not None):
            raise ValueError("shortest_edge is given exactly when resize_mode is 'shortest'")
        if self.crop_offset not in CROP_OFFSETS:
            raise ValueError(f"crop_offset must be one of {CROP_OFFSETS}, got {self.crop_offset!r}")
        if self.crop_offset == "floor" and (self.shortest_edge or 0) < max(self.height, self.width):
            raise ValueError(f"shortest edge {self.shortest_edge} is below the crop {self.height}x{self.width}: "
                             f"transformers' centre crop would pad, which is not reproduced")
        if self.rgb_mode == "after_crop" and self.resize_mode == "shortest" and self.shortest_edge < max(
                self.height, self.width):
            raise ValueError(f"shortest edge {self.shortest_edge} is below the crop {self.height}x{self.width}: "
                             f"padding in the image's own mode (rgb_mode 'after_crop') is not reproduced")

    @classmethod
    def from_dict(cls, config: dict) -> PreprocessConfig:
        """Parse a transformers ``preprocessor_config.json`` dict; refuse settings this package does not reproduce.

        ``size`` as height and width (SigLIP): resize straight to it, no crop. ``size`` as
        ``shortest_edge`` (CLIP, BiT): resize the shortest edge, then ``do_center_crop`` to
        ``crop_size`` is required (a fixed input size); such a file must name its ``resample``,
        ``crop_size``, ``image_mean`` and ``image_std`` (class defaults are not guessed). An int
        ``size`` / ``crop_size`` is read as transformers does for the processor class the file names.
        """
        if not config.get("do_resize", True):
            raise ValueError("preprocessor config has do_resize=false; NearID batches need a fixed input size")
        size = _size_dict(config.get("size", {}), square=_processor_type(config) not in _SHORTEST_EDGE_PROCESSORS)
        if "shortest_edge" in size:
            return cls._from_shortest_edge(config, size["shortest_edge"])
        if config.get("do_center_crop"):
            raise ValueError("preprocessor config asks for a centre crop after a fixed-size resize; "
                             "only shortest-edge resizes are centre-cropped here")
        if not {"height", "width"} <= set(size):
            raise ValueError(f"size must give height and width, got {size!r}")
        return cls(
            height=_pixels(size["height"], "size.height"),
            width=_pixels(size["width"], "size.width"),
            resample=_resample(config.get("resample", int(Image.Resampling.BILINEAR))),
            **_rescale_normalize(config, mean=0.5, std=0.5),
        )

    @classmethod
    def _from_shortest_edge(cls, config: dict, shortest_edge: int) -> PreprocessConfig:
        if not config.get("do_center_crop"):
            raise ValueError("preprocessor config resizes the shortest edge but does not centre-crop: the input "
                             "would not have a fixed height and width")
        missing = [key for key in ("resample", "crop_size", "image_mean", "image_std") if key not in config]
        if missing:
            raise ValueError(f"preprocessor config lacks {', '.join(missing)}: a shortest-edge config must name them")
        crop = _size_dict(config["crop_size"], square=True)
        if not {"height", "width"} <= set(crop):
            raise ValueError(f"preprocessor config crop_size must give height and width, got {crop!r}")
        return cls(height=_pixels(crop["height"], "crop_size.height"), width=_pixels(crop["width"], "crop_size.width"),
                   resample=_resample(config["resample"]), resize_mode="shortest",
                   shortest_edge=_pixels(shortest_edge, "size.shortest_edge"), crop_offset="floor",
                   **_rescale_normalize(config))

    def describe(self, *, normalization: bool = False) -> str:
        """The resize and crop in a few characters: ``squash384x384-bilinear``, ``shortest256-crop224x224-bicubic``.

        The crop rounding and the RGB conversion follow when they are not the defaults
        (``-crop_floor``, ``-rgb_convert``, ``-rgb_after_crop``); ``normalization``: the rescale
        and mean / std too (``-mean0.485,0.456,0.406-std0.229,0.224,0.225``), so that any two
        configs giving different pixels are described differently.
        """
        names = {code: name for name, code in _PIL_FILTERS.items()}
        resample = names.get(self.resample, f"filter{self.resample}")
        if self.resize_mode == "squash":
            text = f"squash{self.height}x{self.width}-{resample}"
        else:
            text = f"shortest{self.shortest_edge}-crop{self.height}x{self.width}-{resample}"
            if self.crop_offset != "round":
                text += f"-crop_{self.crop_offset}"
        if self.rgb_mode != "white":
            text += f"-rgb_{self.rgb_mode}"
        if normalization:
            if not self.do_rescale or self.rescale_factor != 1 / 255:
                text += f"-rescale{self.rescale_factor if self.do_rescale else 1}"
            if self.do_normalize:
                text += f"-mean{','.join(map(str, self.image_mean))}-std{','.join(map(str, self.image_std))}"
            else:
                text += "-unnormalized"
        return text

    @classmethod
    def from_file(cls, path: str | Path) -> PreprocessConfig:
        """:meth:`from_dict` of a ``preprocessor_config.json``; ``ValueError`` naming the file and the field."""
        config = read_json(path)
        if not isinstance(config, dict):
            raise ValueError(f"{path}: a preprocessor config is a JSON object, got {type(config).__name__}")
        try:
            return cls.from_dict(config)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def config_from_open_clip(preprocess_cfg: Mapping, image_size: int | Sequence[int]) -> PreprocessConfig:
    """The eval transform open_clip builds from a model's ``preprocess_cfg`` (``shortest``/``squash`` modes).

    Shortest-edge mode on a square size resizes the shortest edge to that size, then crops.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    mode = preprocess_cfg.get("resize_mode", "shortest")
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    if mode not in RESIZE_MODES or interpolation not in _PIL_FILTERS:
        raise ValueError(f"unsupported open_clip preprocessing: resize_mode={mode!r}, interpolation={interpolation!r}")
    if mode == "shortest" and height != width:
        raise ValueError(f"open_clip shortest-edge resize needs a square image size, got {height}x{width}")
    return PreprocessConfig(
        height=height, width=width, resample=_PIL_FILTERS[interpolation],
        image_mean=_per_channel(preprocess_cfg["mean"]), image_std=_per_channel(preprocess_cfg["std"]),
        resize_mode=mode, shortest_edge=height if mode == "shortest" else None, rgb_mode="convert",
    )


def torchvision_eval(shortest_edge: int, crop: int, mean: Sequence[float], std: Sequence[float], *,
                     rgb_mode: str = "convert") -> PreprocessConfig:
    """torchvision's ``Resize(shortest_edge, bicubic)`` + ``CenterCrop(crop)`` + ``ToTensor`` + ``Normalize(mean, std)``
    on a PIL image, as benchmarks write their eval transform.

    ``rgb_mode``: ``convert`` (``convert("RGB")`` first, e.g. DINO's transform) or ``after_crop``
    (``convert("RGB")`` after the crop, CustomConcept101's). Sizes in pixels; mean / std per channel
    of [0, 1] pixels (e.g. :data:`IMAGENET_MEAN`).
    """
    if rgb_mode not in ("convert", "after_crop"):
        raise ValueError(f"rgb_mode must be 'convert' or 'after_crop' for a torchvision transform, got {rgb_mode!r}")
    side = _pixels(crop, "crop")
    return PreprocessConfig(
        height=side, width=side, resample=_PIL_FILTERS["bicubic"],
        image_mean=_per_channel(mean, "mean"), image_std=_per_channel(std, "std"), resize_mode="shortest",
        shortest_edge=_pixels(shortest_edge, "shortest_edge"), rgb_mode=rgb_mode, crop_offset="round",
    )


def config_from_timm(data_config: Mapping) -> PreprocessConfig:
    """timm's eval transform for a resolved data config (``timm.data.resolve_data_config``), centre-crop mode."""
    _, height, width = data_config["input_size"]
    interpolation = data_config.get("interpolation", "bicubic")
    if data_config.get("crop_mode", "center") != "center" or interpolation not in _PIL_FILTERS or height != width:
        raise ValueError(f"unsupported timm data config {dict(data_config)!r}: need square centre crop, "
                         f"bilinear or bicubic")
    return PreprocessConfig(
        height=height, width=width, resample=_PIL_FILTERS[interpolation],
        image_mean=_per_channel(data_config["mean"]), image_std=_per_channel(data_config["std"]),
        resize_mode="shortest", shortest_edge=math.floor(height / data_config.get("crop_pct", 1.0)),
        rgb_mode="convert",
    )


def _processor_type(config: Mapping) -> str:
    """The processor class a ``preprocessor_config.json`` names, without a ``Fast`` / ``Pil`` suffix."""
    name = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
    for suffix in ("Fast", "Pil"):
        name = name.removesuffix(suffix)
    return name


def _size_dict(size: int | Mapping, *, square: bool) -> dict:
    """transformers' reading of a ``size`` / ``crop_size`` entry: an int is a square or a shortest edge."""
    if isinstance(size, int):
        return {"height": size, "width": size} if square else {"shortest_edge": size}
    return dict(size)


def _resample(value: object) -> int:
    """A PIL filter code from a preprocessor config; ``ValueError`` for anything else."""
    if isinstance(value, bool) or value not in _RESAMPLE_CODES:
        raise ValueError(f"resample must be a PIL filter code ({_RESAMPLE_CODES}), got {value!r}")
    return int(value)


def _rescale_normalize(config: Mapping, **defaults: float) -> dict:
    """The rescale and normalise fields of a preprocessor config (``defaults``: mean / std when absent), checked:
    a positive finite rescale factor, one or three finite numbers for the mean and std, no std of 0."""
    factor = config.get("rescale_factor", 1 / 255)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"rescale_factor must be a positive number, got {factor!r}")
    std = _per_channel(config.get("image_std", defaults.get("std")), "image_std")
    if any(v == 0 for v in std):
        raise ValueError(f"image_std must not be 0, got {list(std)}")
    return dict(
        do_rescale=bool(config.get("do_rescale", True)),
        rescale_factor=float(factor),
        do_normalize=bool(config.get("do_normalize", True)),
        image_mean=_per_channel(config.get("image_mean", defaults.get("mean")), "image_mean"),
        image_std=std,
    )


def _per_channel(value: float | Sequence[float], field: str = "value") -> tuple[float, ...]:
    """One finite number or three, as three floats; ``ValueError`` naming ``field`` otherwise (e.g. a string)."""
    values = (value,) * 3 if isinstance(value, (int, float)) else value
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"{field} must be one number or 3 numbers, got {value!r}")
    return tuple(float(v) for v in values)


def _pixels(value: object, field: str) -> int:
    """An image side in pixels: an integer in 1..:data:`MAX_SIDE`; ``ValueError`` naming ``field`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIDE:
        raise ValueError(f"{field} must be an integer from 1 to {MAX_SIDE}, got {value!r}")
    return value


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB as the reference processor does.

    The reference converts every non-RGB image through RGBA and alpha-composites it onto
    white, so transparent pixels become white. Only images that can hold transparency (an
    alpha band, or a ``transparency`` entry) are composited here: for all others the result
    of PIL's ``convert("RGB")`` is the same to the bit, without an RGBA copy of the image.
    (Images wider than 8 bits are brought to 8 bits on decoding: :func:`nearid_metric.images.to_8bit`.)
    """
    if image.mode == "RGB":
        return image
    if "A" not in image.getbands() and "a" not in image.getbands() and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def resize_to_uint8(image: Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """PIL image (any mode) -> RGB, resized (and cropped) to the model's input: uint8 tensor [3, H, W].

    Converted to RGB first, or (``rgb_mode="after_crop"``) resized and cropped in its own mode and converted then.
    """
    import torch  # here, not at import: the commands read the scorer and protocol tables without torch

    if config.rgb_mode == "white":
        image = to_rgb(image)
    elif config.rgb_mode == "convert":
        image = image.convert("RGB")
    if config.resize_mode == "squash":
        size = (config.width, config.height)
    else:  # shortest edge -> shortest_edge, long edge truncated as torchvision does
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = int(config.shortest_edge * long / short)
        size = (config.shortest_edge, new_long) if w <= h else (new_long, config.shortest_edge)
    if image.size != size:
        image = image.resize(size, resample=config.resample, reducing_gap=None)
    if config.resize_mode == "shortest":
        image = _center_crop(image, config.height, config.width, config.crop_offset)
    rgb = image.convert("RGB") if config.rgb_mode == "after_crop" else image
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def _center_crop(image: Image.Image, height: int, width: int, offset: str) -> Image.Image:
    """Centre crop on PIL: ``offset="round"`` is torchvision's ``CenterCrop`` (offsets rounded half to even,
    zero padding if too small); ``"floor"`` is transformers' ``center_crop`` (offsets floored; never pads here)."""
    w, h = image.size
    if offset == "floor":
        top, left = (h - height) // 2, (w - width) // 2
        return image.crop((left, top, left + width, top + height))
    if w < width or h < height:
        padded = Image.new(image.mode, (max(w, width), max(h, height)))
        padded.paste(image, ((max(w, width) - w) // 2, (max(h, height) - h) // 2))
        image, (w, h) = padded, padded.size
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def normalization_table(config: PreprocessConfig) -> torch.Tensor:
    """The float32 value of every uint8 level in every channel after rescale + normalise: [3, 256].

    Computed with the reference's own arithmetic (rescale in float64, cast to float32,
    then ``(x - mean) / std`` in float32), so looking values up reproduces it exactly.
    """
    import torch

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
    import torch

    channel = torch.arange(3, device=pixels.device).view(1, 3, 1, 1)
    return table[channel, pixels.long()]


def preprocess(image: Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """One PIL image -> normalised float32 pixels [3, H, W] (the reference processor's output)."""
    return normalize_uint8(resize_to_uint8(image, config)[None], normalization_table(config))[0]
