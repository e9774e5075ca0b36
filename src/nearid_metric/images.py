"""Finding and decoding image files, with one clear error per bad file."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


class ImageLoadError(Exception):
    """An image that could not be read; ``str()`` names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class EncodedImage:
    """An encoded image held in memory (e.g. a parquet cell); ``name`` identifies it in errors."""

    name: str
    data: bytes

    def __str__(self) -> str:
        return self.name


ImageSource = Union[str, os.PathLike, EncodedImage]


def load_image(path: ImageSource) -> Image.Image:
    """Open and fully decode an image file (or :class:`EncodedImage`), applying its EXIF orientation.

    The image keeps its mode (conversion to RGB is part of preprocessing). Images above
    PIL's ``Image.MAX_IMAGE_PIXELS`` are refused as possible decompression bombs.
    Raises :class:`ImageLoadError` naming the file for anything that cannot be decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(path.data) if isinstance(path, EncodedImage) else path) as image:
                image.load()
                return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a directory") from None
    except UnidentifiedImageError:
        size = _size_or_none(path)
        reason = "empty file (0 bytes)" if size == 0 else "not an image PIL can identify"
        raise ImageLoadError(path, reason) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, f"refused as a possible decompression bomb ({e})") from None
    except Exception as e:  # truncated data, broken EXIF, codec errors: all mean "unreadable"
        raise ImageLoadError(path, f"cannot decode ({type(e).__name__}: {e})") from None


def _size_or_none(path: ImageSource) -> int | None:
    if isinstance(path, EncodedImage):
        return len(path.data)
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def list_images(root: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """Image files under ``root`` (recursive, sorted, hidden entries skipped) and the other files.

    ``root`` may be a single file, which is returned as is whatever its extension.
    Returns ``(images, ignored)``: files with an image extension, and all other files.
    """
    root = Path(root)
    if not root.is_dir():
        return [root], []
    images, ignored = [], []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(folder, name)
            (images if path.suffix.lower() in IMAGE_EXTENSIONS else ignored).append(path)
    return images, ignored
