"""Foreground-only scoring: an image with every pixel outside its subject mask filled, before any
scorer's own preprocessing (the ``fg`` rows of the paper's tables; ``nearid-bench --masks``).

As the reference evaluation does it: the image is converted with PIL's ``convert("RGB")``; the
mask is converted to ``L``, optionally cleaned (:func:`clean_mask`: the reference's cleaning of
NearID masks, with OpenCV), resized to the image with NEAREST when its size differs, binarised
at > 0, and every pixel where it is 0 is set to the fill colour (black by default).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from nearid_metric.data import MTGSample, NearIDSample
from nearid_metric.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    ImageSource,
    load_image,
)

MASK_FILLS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
"""Fill colours of the background, by name."""

_CLEAN_KERNEL = 5  # Gaussian blur size and morphology kernel of the reference's mask cleaning
_CLEAN_THRESHOLD = 10  # blurred grey level above which a pixel is foreground


@dataclass(frozen=True)
class MaskedImage:
    """An image source to be scored foreground-only: ``image`` with the pixels outside ``mask`` set to ``fill``.

    ``clean``: clean the mask first (:func:`clean_mask`; needs OpenCV). Decoded by :func:`load_masked`;
    its content key (:func:`nearid_metric.cache.content_key`) covers the image, the mask and both settings.
    """

    image: ImageSource
    mask: ImageSource
    clean: bool = False
    fill: str = "black"

    def __post_init__(self) -> None:
        if self.fill not in MASK_FILLS:
            raise ValueError(f"mask fill must be one of {', '.join(MASK_FILLS)}, got {self.fill!r}")

    def __str__(self) -> str:
        return f"{self.image} (masked by {self.mask})"


def require_opencv() -> None:
    """``ImportError`` with the install command when OpenCV (the mask cleaning) is missing."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        raise ImportError("cleaning masks needs OpenCV: pip install 'nearid-metric[masks]'") from None


def clean_mask(mask: Image.Image) -> np.ndarray:
    """The reference's cleaning of a NearID foreground mask: ``[H, W]`` uint8, 0 or 255.

    Grey (``L``) -> 5x5 Gaussian blur (sigma from the size, as OpenCV's ``GaussianBlur(..., 0)``)
    -> threshold > 10 -> morphological close, then open, with a 5x5 kernel of ones -> only the
    largest external contour (by area), filled. An empty mask stays empty.
    """
    require_opencv()
    import cv2

    grey = np.asarray(mask.convert("L"))
    blurred = cv2.GaussianBlur(grey, (_CLEAN_KERNEL, _CLEAN_KERNEL), 0)
    _, binary = cv2.threshold(blurred, _CLEAN_THRESHOLD, 255, cv2.THRESH_BINARY)
    kernel = np.ones((_CLEAN_KERNEL, _CLEAN_KERNEL), np.uint8)
    binary = cv2.morphologyEx(cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel), cv2.MORPH_OPEN, kernel)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return binary
    largest = max(contours, key=cv2.contourArea)
    filled = np.zeros_like(binary)
    cv2.drawContours(filled, [largest], -1, 255, thickness=cv2.FILLED)
    return filled


def apply_mask(image: Image.Image, mask: Image.Image | np.ndarray, fill: str = "black") -> Image.Image:
    """``image`` as RGB with every pixel where ``mask`` (``L`` image or [H, W] array, > 0 = subject) is 0
    set to ``fill``; a mask of another size is resized to the image with NEAREST first."""
    rgb = image.convert("RGB")
    grey = (Image.fromarray(np.asarray(mask, dtype=np.uint8)) if isinstance(mask, np.ndarray) else mask).convert("L")
    if grey.size != rgb.size:
        grey = grey.resize(rgb.size, resample=Image.Resampling.NEAREST)
    pixels = np.array(rgb)
    pixels[np.asarray(grey) == 0] = MASK_FILLS[fill]
    return Image.fromarray(pixels, mode="RGB")


def load_masked(source: MaskedImage) -> Image.Image:
    """Decode ``source.image`` and ``source.mask`` (:func:`~nearid_metric.images.load_image`) and :func:`mask_image`."""
    return mask_image(load_image(source.image), load_image(source.mask), source)


def mask_image(image: Image.Image, mask: Image.Image, source: MaskedImage) -> Image.Image:
    """The decoded ``image`` with ``mask`` applied as ``source`` says (cleaned first when ``source.clean``).

    A mask with no subject pixel (all 0, after cleaning when ``clean``) is refused with
    :class:`~nearid_metric.images.ImageLoadError` naming the mask: scoring an all-``fill``
    picture would give every such image the same embedding.
    """
    grey = clean_mask(mask) if source.clean else np.asarray(mask.convert("L"))
    if not grey.any():
        raise ImageLoadError(source.mask, "is empty (no subject pixel > 0); the image is not scored")
    return apply_mask(image, grey, source.fill)


def masked_key(source: MaskedImage, image_key: str, mask_key: str) -> str:
    """The content key of a masked image: its image's and its mask's keys and both settings, hashed."""
    parts = f"masked|clean={source.clean}|fill={source.fill}|{image_key}|{mask_key}"
    return hashlib.sha256(parts.encode()).hexdigest()


def foreground_samples(samples: Sequence[NearIDSample | MTGSample], fill: str = "black"
                       ) -> tuple[list[NearIDSample | MTGSample], list[str]]:
    """The samples with every image scored foreground-only, as the reference's ``fg`` rows.

    NearID: view j and distractor j (inpainted where view j's object was) are masked by the
    cleaned mask j (:func:`clean_mask`). MTG: views 1 and 1p by the object mask of view 1, 2 and
    2p by that of view 2, uncleaned (the reference uses MTG's object masks as they are). An image
    whose mask is missing becomes a missing image (the reference skips it too); returns the
    samples and the names of those images.
    """
    dropped: list[str] = []

    def masked(image: ImageSource | None, mask: ImageSource | None, clean: bool) -> MaskedImage | None:
        if image is None:
            return None
        if mask is None:
            dropped.append(str(image))
            return None
        return MaskedImage(image, mask, clean=clean, fill=fill)

    out: list[NearIDSample | MTGSample] = []
    for s in samples:
        if isinstance(s, NearIDSample):
            out.append(replace(s, views=tuple(masked(v, m, True) for v, m in zip(s.views, s.masks)),
                               distractors=tuple(masked(d, m, True) for d, m in zip(s.distractors, s.masks))))
        else:
            out.append(replace(s, image_1=masked(s.image_1, s.object_mask_1, False),
                               image_1p=masked(s.image_1p, s.object_mask_1, False),
                               image_2=masked(s.image_2, s.object_mask_2, False),
                               image_2p=masked(s.image_2p, s.object_mask_2, False)))
    return out, dropped


def find_mask(image: str | os.PathLike, root: str | os.PathLike, masks: str | os.PathLike) -> Path:
    """The mask of ``image`` (a file under ``root``, or ``root`` itself): the file under ``masks`` with the same
    relative path, any image extension. ``FileNotFoundError`` naming both when there is none, ``ValueError`` when
    two files fit."""
    image, root, masks = Path(image), Path(root), Path(masks)
    relative = Path(image.name) if image == root or not image.is_relative_to(root) else image.relative_to(root)
    folder = masks / relative.parent
    stem = relative.with_suffix("").name
    found = sorted(p for p in (folder.iterdir() if folder.is_dir() else ())
                   if p.stem == stem and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not found:
        raise FileNotFoundError(f"no mask for {image}: expected {folder / stem}.<png|jpg|...> under {masks}")
    if len(found) > 1:
        raise ValueError(f"two masks for {image}: {found[0].name} and {found[1].name} in {folder}; keep one")
    return found[0]


def masked_pairs(pairs: Sequence[tuple[Path, Path]], *, ref_root: str | os.PathLike, gen_root: str | os.PathLike,
                 ref_masks: str | os.PathLike | None = None, gen_masks: str | os.PathLike | None = None,
                 fill: str = "black") -> tuple[list[tuple[ImageSource, ImageSource]], dict[int, str]]:
    """The pairs with their reference and / or generation scored foreground-only (:class:`MaskedImage`), each
    masked by its mask in ``ref_masks`` / ``gen_masks`` (:func:`find_mask`; uncleaned, > 0 = subject).

    Returns the pairs (the sides without a mask folder unchanged) and ``{pair index: reason}`` for the pairs
    whose mask is missing or ambiguous: those are never scored unmasked.
    """
    out: list[tuple[ImageSource, ImageSource]] = []
    problems: dict[int, str] = {}
    for n, (ref, gen) in enumerate(pairs):
        sides = []
        for image, root, masks in ((ref, ref_root, ref_masks), (gen, gen_root, gen_masks)):
            if masks is None:
                sides.append(image)
                continue
            try:
                sides.append(MaskedImage(image, find_mask(image, root, masks), fill=fill))
            except (OSError, ValueError) as e:
                problems[n] = str(e)
                break
        out.append((sides[0], sides[1]) if len(sides) == 2 else (ref, gen))
    return out, problems
