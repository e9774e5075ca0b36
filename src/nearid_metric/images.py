"""Finding and decoding image files, with one clear error per bad file."""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

ORIENTATION = 0x0112  # the EXIF orientation tag
WIDE_MODES = ("I", "F")  # and I;16*: more than 8 bits per sample (see to_8bit)
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


def read_image_file(path: str | os.PathLike) -> EncodedImage:
    """A file's bytes, read once (hash and decode the same bytes), only if it is a regular file.

    The file is opened without blocking, so a FIFO, socket or device named like an image is
    refused (``not a regular file``) instead of hanging the run. Raises :class:`ImageLoadError`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise ImageLoadError(path, os_reason(e)) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ImageLoadError(path, "is a directory")
        if not stat.S_ISREG(mode):
            raise ImageLoadError(path, "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return EncodedImage(str(path), f.read())
    except OSError as e:
        raise ImageLoadError(path, os_reason(e)) from None
    finally:
        os.close(fd)


def os_reason(error: OSError) -> str:
    """The reason reported for a file that cannot be opened or read."""
    reasons = {errno.ENOENT: "file not found", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EISDIR: "is a directory", errno.ELOOP: "symlink loop (too many levels of symbolic links)",
               errno.ENXIO: "not a regular file"}
    return reasons.get(error.errno, f"cannot read ({error.strerror or error})")


def load_image(path: ImageSource) -> Image.Image:
    """Read (:func:`read_image_file`) and decode (:func:`decode_image`) an image file or :class:`EncodedImage`."""
    return decode_image(path if isinstance(path, EncodedImage) else read_image_file(path))


def decode_image(encoded: EncodedImage) -> Image.Image:
    """Fully decode an encoded image, then :func:`orient` it and bring it to 8 bits (:func:`to_8bit`).

    The image otherwise keeps its mode (conversion to RGB is part of preprocessing). Images
    above PIL's ``Image.MAX_IMAGE_PIXELS`` are refused as possible decompression bombs.
    Raises :class:`ImageLoadError` naming the image for anything that cannot be decoded.
    """
    name = encoded.name
    if not encoded.data:
        raise ImageLoadError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(encoded.data)) as image:
                image.load()
                return to_8bit(orient(image), name)
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not an image PIL can identify") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(name, f"refused as a possible decompression bomb ({e}; see --max-pixels)") from None
    except Exception as e:  # truncated data, broken EXIF, codec errors: all mean "unreadable"
        raise ImageLoadError(name, f"cannot decode ({type(e).__name__}: {e})") from None


def orient(image: Image.Image) -> Image.Image:
    """``image`` as displayed: its EXIF orientation applied (the rule for files and PIL images alike, as in
    transformers' ``load_image``, datasets and DreamBench++)."""
    return ImageOps.exif_transpose(image) if image.getexif().get(ORIENTATION, 1) != 1 else image


def to_8bit(image: Image.Image, name: str) -> Image.Image:
    """16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``) images as 8-bit greyscale (``L``), by their range.

    16-bit images and ``I`` images within 0..65535 are divided by 257 (65535 -> 255); ``F`` images
    within 0..1 are multiplied by 255; other ranges are stretched from their minimum to their
    maximum. A warning names the image. (The reference processor clips such images to 0..255,
    which turns most of them white or black.) Other modes are returned as they are.
    """
    if image.mode not in WIDE_MODES and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image, dtype=np.float64)
    values = np.where(np.isfinite(values), values, 0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F" and 0 <= low and high <= 1:
        scale, offset, how = 255.0, 0.0, "0..1 to 0..255"
    elif image.mode != "F" and 0 <= low and high <= 65535:
        scale, offset, how = 1 / 257, 0.0, "0..65535 to 0..255"
    else:
        scale, offset = 255.0 / (high - low) if high > low else 0.0, low
        how = f"its range {low:g}..{high:g} to 0..255"
    logger.warning("%s: %s image converted to 8 bits (%s)", name, image.mode, how)
    grey = np.clip(np.rint((values - offset) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L")


class Listing(NamedTuple):
    """What :func:`list_images` found under a root."""

    images: list[Path]  # files with an image extension
    ignored: list[Path]  # other files
    skipped: dict[Path, str]  # folders not walked (a link back to a folder already walked, unreadable): why


def list_images(root: str | os.PathLike) -> Listing:
    """Image files under ``root`` (recursive, sorted, hidden entries skipped), the other files, and the skipped folders.

    ``root`` may be a single file, which is returned as is whatever its extension. Symlinked
    folders are followed, but each real folder (device and inode) is walked once: a link back
    to a folder already walked (``sub/loop -> .``) is reported in ``skipped``, not followed.
    """
    root = Path(root)
    if not root.is_dir():
        return Listing([root], [], {})
    listing = Listing([], [], {})
    seen: set[tuple[int, int]] = set()

    def walk(folder: Path) -> None:
        try:
            st = folder.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen:
                listing.skipped[folder] = "directory loop: a link to a folder already searched, not followed"
                return
            seen.add(key)
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as e:
            listing.skipped[folder] = f"folder not searched ({os_reason(e)})"
            return
        entries = [entry for entry in entries if not entry.name.startswith(".")]
        folders = [entry for entry in entries if _is_dir(entry)]
        for entry in entries:  # a folder's files, then its subfolders (as os.walk)
            if entry not in folders:
                path = folder / entry.name
                (listing.images if path.suffix.lower() in IMAGE_EXTENSIONS else listing.ignored).append(path)
        for entry in folders:
            walk(folder / entry.name)

    walk(root)
    return listing


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether an entry is a folder, following links; a broken or looping link is a file (reading it says why)."""
    try:
        return entry.is_dir()
    except OSError:
        return False
