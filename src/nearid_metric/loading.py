"""From image inputs to uint8 model pixels in loader workers, surviving a decoder that crashes its process.

:class:`PreprocessedImages` decodes each input once (a file is read once: hashed and decoded from
the same bytes) and resizes it for every preprocessing; :func:`load_batches` runs it in
``torch.utils.data.DataLoader`` workers. When a worker dies (a segfault in a codec), the
batches that were in flight are decoded again one image at a time, each in a fresh process
that is restarted after a crash, so the image that kills its process is named and skipped and
every other image is still embedded.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import NamedTuple, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from nearid_metric.cache import content_key
from nearid_metric.images import (
    EncodedImage,
    ImageLoadError,
    ImageSource,
    decode_image,
    orient,
    read_image_file,
    to_8bit,
)
from nearid_metric.masking import MaskedImage, mask_image, masked_key
from nearid_metric.preprocess import PreprocessConfig, resize_to_uint8

ImageInput = Union[str, os.PathLike, EncodedImage, MaskedImage, Image.Image]
Images = Union[Sequence[ImageInput], torch.Tensor]
PREFETCH = 2  # DataLoader's prefetch_factor: batches in flight per worker


class PreprocessedItem(NamedTuple):
    """One :class:`PreprocessedImages` item."""

    index: int
    pixels: tuple[torch.Tensor, ...] | None  # uint8 [3, H, W] per config; None when it failed
    error: str | None
    key: str | None  # sha256 of the bytes that were decoded (files, EncodedImage); None for in-memory pictures


class PreprocessedBatch(NamedTuple):
    """A batch of :class:`PreprocessedImages` items (:func:`collate_preprocessed`)."""

    indices: torch.Tensor  # [b] the images that were read
    pixels: tuple[torch.Tensor, ...] | None  # per config uint8 [b, 3, H, W]; None when none was read
    failed: dict[int, str]  # index: reason
    keys: list[str | None]  # per read image: the content key of what was decoded


class PreprocessedImages(Dataset):
    """Decodes each input once and prepares it for every distinct preprocessing (items: :class:`PreprocessedItem`).

    A file is read once: its bytes are hashed (the item's key) and decoded from the same buffer,
    so the key always belongs to the picture that was embedded. The decompression-bomb limit
    (PIL's ``Image.MAX_IMAGE_PIXELS`` when the dataset is made) also holds in loader workers.
    """

    def __init__(self, images: Images, configs: Sequence[PreprocessConfig]):
        self.images = images
        self.configs = configs
        self.max_pixels = Image.MAX_IMAGE_PIXELS

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> PreprocessedItem:
        item = self.images[index]
        key = None
        try:
            Image.MAX_IMAGE_PIXELS = self.max_pixels  # a spawned worker starts with PIL's default
            if isinstance(item, torch.Tensor):
                image = Image.fromarray(item.permute(1, 2, 0).numpy())
            elif isinstance(item, Image.Image):
                image = to_8bit(orient(item), f"image {index}")
            else:
                image, key = read_and_decode(item)
            return PreprocessedItem(index, tuple(resize_to_uint8(image, config) for config in self.configs), None, key)
        except ImageLoadError as e:
            return PreprocessedItem(index, None, e.reason, None)
        except Exception as e:  # a bad in-memory image must not lose the other results
            return PreprocessedItem(index, None, f"cannot preprocess ({type(e).__name__}: {e})", None)


def read_and_decode(source: ImageSource | MaskedImage) -> tuple[Image.Image, str]:
    """``(decoded image, content key)`` of a file or :class:`EncodedImage`, both from one read of its bytes;
    of a :class:`~nearid_metric.masking.MaskedImage`, its image and mask read so and the mask applied (a mask that
    cannot be read, or is empty, fails as ``mask <name>: <reason>``)."""
    if isinstance(source, MaskedImage):
        image, image_key = read_and_decode(source.image)
        try:
            mask, mask_key = read_and_decode(source.mask)
            return mask_image(image, mask, source), masked_key(source, image_key, mask_key)
        except ImageLoadError as e:
            raise ImageLoadError(source, f"mask {source.mask}: {e.reason}") from None
    encoded = source if isinstance(source, EncodedImage) else read_image_file(source)
    return decode_image(encoded), content_key(encoded)


def collate_preprocessed(items: list[PreprocessedItem]) -> PreprocessedBatch:
    """A batch of :class:`PreprocessedImages` items; the failed ones only in ``failed``."""
    ok = [item for item in items if item.pixels is not None]
    indices = torch.tensor([item.index for item in ok], dtype=torch.long)
    pixels = tuple(torch.stack(group) for group in zip(*(item.pixels for item in ok))) if ok else None
    return PreprocessedBatch(indices, pixels, {item.index: item.error for item in items if item.error is not None},
                             [item.key for item in ok])


def load_batches(dataset: PreprocessedImages, batches: Sequence[list[int]],
                 handle: Callable[[PreprocessedBatch], None], *, num_workers: int = 0,
                 pin_memory: bool = False) -> dict[int, str]:
    """Call ``handle`` on every batch of ``dataset`` (``batches``: lists of indices), decoded in ``num_workers``
    processes (0: in this one; never more processes than batches). Returns ``{index: reason}`` of the images
    whose decoding killed its process. The workers decode the next batches while ``handle`` runs on this one.

    When a worker dies, the batches not yet handled that may have been in flight are decoded
    one image at a time in a separate process (:func:`_isolate`); the others go on in new workers.
    """
    if num_workers == 0:
        for batch in batches:
            handle(collate_preprocessed([dataset[i] for i in batch]))
        return {}
    crashed: dict[int, str] = {}
    pending = list(batches)
    while pending:
        workers = min(num_workers, len(pending))  # a worker without a batch would only cost its start
        done = 0
        try:
            for batch in DataLoader(dataset, batch_sampler=pending, num_workers=workers, prefetch_factor=PREFETCH,
                                    collate_fn=collate_preprocessed, pin_memory=pin_memory):
                handle(batch)
                done += 1
            return crashed
        except (RuntimeError, ConnectionResetError) as e:
            # torch's message when a worker process dies; or the reset of the socket a dying worker was
            # passing a tensor's file descriptor through
            if isinstance(e, RuntimeError) and "DataLoader worker" not in str(e):
                raise
        suspects = pending[done:done + workers * PREFETCH + 1]  # in flight, or being handled
        pending = pending[done + len(suspects):]
        items, died = _isolate(dataset, [i for batch in suspects for i in batch])
        crashed.update(died)
        for batch in suspects:
            handle(collate_preprocessed([items[i] for i in batch if i in items]))
    return crashed


def _isolate(dataset: PreprocessedImages, indices: list[int]) -> tuple[dict[int, PreprocessedItem], dict[int, str]]:
    """Decode ``indices`` one at a time in a child process, restarted after each crash:
    ``({index: item}, {index: reason} of those whose decoding killed the process)``."""
    context = multiprocessing.get_context()
    items: dict[int, PreprocessedItem] = {}
    died: dict[int, str] = {}
    todo = list(indices)
    while todo:
        parent, child = context.Pipe()
        process = context.Process(target=_serve, args=(dataset, child), daemon=True)
        process.start()
        child.close()
        try:
            for n, index in enumerate(todo):
                parent.send(index)
                try:
                    items[index] = parent.recv()
                except (EOFError, ConnectionResetError):  # the process died decoding this image (the pipe
                    # reads as closed, or as reset when the death races the reply)
                    process.join()
                    died[index] = f"the image decoder crashed ({_exit_reason(process.exitcode)})"
                    todo = todo[n + 1:]
                    break
            else:
                todo = []
                parent.send(None)
        finally:
            parent.close()
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    return items, died


def _serve(dataset: PreprocessedImages, connection: Connection) -> None:
    """The isolated decoding process: an index in, its item out, until None."""
    while (index := connection.recv()) is not None:
        connection.send(dataset[index])


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"its process exited with code {code}"
