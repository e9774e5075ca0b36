"""Fixed-shape arrays on disk keyed by image content: the embedding cache and the training feature cache.

A store holds one array per key (:func:`content_key`: the sha256 of an image's bytes) for one
*signature* (what made the arrays: model weights, preprocessing, precision), so an entry is
never returned to a different model. Layout under the root folder::

    root/<first 16 hex of sha256(signature)>/meta.json        format, signature, shape, dtype
    root/<...>/part-<writer>-<n>.npy                        [rows, *shape] (numpy .npy)
    root/<...>/part-<writer>-<n>.json                       {"keys": [...], "sha256": of the .npy}

Parts are append-only and written atomically (temporary file, then rename; the .json last),
so a killed run loses only the rows it had not flushed, and several processes may write to
one store at once (each writer names its own parts). Reads are memory-mapped. With
``verify=True`` every part's checksum is checked when the store is opened: a damaged part is
reported, renamed ``*.corrupt`` and its keys count as missing (so they are recomputed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from nearid_metric.hub import file_sha256
from nearid_metric.images import EncodedImage, ImageLoadError, ImageSource

logger = logging.getLogger(__name__)

FORMAT = 1


def content_key(image: ImageSource) -> str:
    """sha256 hex of an image file's bytes (or of :attr:`EncodedImage.data`); :class:`ImageLoadError` if unreadable."""
    if isinstance(image, EncodedImage):
        return hashlib.sha256(image.data).hexdigest()
    try:
        return file_sha256(image)
    except FileNotFoundError:
        raise ImageLoadError(image, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(image, "is a directory") from None
    except OSError as e:
        raise ImageLoadError(image, f"cannot read ({e.strerror or e})") from None


def content_keys(images: Sequence[ImageSource], *, num_threads: int = 8) -> tuple[list[str | None], dict[int, str]]:
    """:func:`content_key` of every image, hashed in ``num_threads`` threads.

    Returns the keys (None for an unreadable image) and ``{index: reason}`` for those.
    """
    def one(image: ImageSource) -> str | ImageLoadError:
        try:
            return content_key(image)
        except ImageLoadError as e:
            return e

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        results = list(pool.map(one, images))
    failures = {i: r.reason for i, r in enumerate(results) if isinstance(r, ImageLoadError)}
    return [None if isinstance(r, ImageLoadError) else r for r in results], failures


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ArrayStore:
    """Arrays of one ``shape`` and ``dtype`` keyed by string, for one ``signature`` (see the module docs).

    ``put`` buffers rows and writes a part every ``part_rows`` rows (and on ``flush``/``close``);
    ``get`` serves flushed and buffered rows alike. Use as a context manager to flush on exit.
    """

    def __init__(self, root: str | os.PathLike, *, signature: str, shape: Sequence[int], dtype: Any = "float32",
                 part_rows: int = 4096, verify: bool = True):
        if part_rows < 1:
            raise ValueError(f"part_rows must be >= 1, got {part_rows}")
        self.signature = signature
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.part_rows = part_rows
        self.folder = Path(root) / hashlib.sha256(signature.encode()).hexdigest()[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._check_meta()
        self._writer = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._written = 0
        self._parts: list[Path] = []
        self._maps: dict[int, np.ndarray] = {}
        self._index: dict[str, tuple[int, int]] = {}  # key -> (part number, row)
        self._buffer: dict[str, np.ndarray] = {}
        self._verify = verify
        self.refresh()

    def _check_meta(self) -> None:
        meta = {"format": FORMAT, "signature": self.signature, "shape": list(self.shape), "dtype": self.dtype.str}
        path = self.folder / "meta.json"
        if not path.exists():
            _write_atomic(path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
            return
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable cache metadata ({e}); delete the folder to rebuild") from None
        if found != meta:
            raise ValueError(f"{path}: cache metadata {found} does not match this store's {meta}; "
                             f"delete the folder to rebuild")

    def refresh(self) -> None:
        """Pick up parts written since opening (e.g. by other processes)."""
        known = set(self._parts)
        for meta_path in sorted(self.folder.glob("part-*.json")):
            array_path = meta_path.with_suffix(".npy")
            if array_path in known:
                continue
            keys = self._read_part(meta_path, array_path)
            if keys is None:
                continue
            number = len(self._parts)
            self._parts.append(array_path)
            for row, key in enumerate(keys):
                self._index.setdefault(key, (number, row))

    def _read_part(self, meta_path: Path, array_path: Path) -> list[str] | None:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            keys = meta["keys"]
            array = np.load(array_path, mmap_mode="r")
            problem = None
            if array.shape != (len(keys), *self.shape) or array.dtype != self.dtype:
                problem = f"holds {array.dtype} {array.shape}, expected {self.dtype} {(len(keys), *self.shape)}"
            elif self._verify and file_sha256(array_path) != meta["sha256"]:
                problem = "checksum mismatch"
            del array
        except FileNotFoundError:
            return None  # moved aside by another process meanwhile
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"unreadable ({type(e).__name__}: {e})"
        if problem is None:
            return keys
        logger.warning("cache part %s is damaged (%s); its entries will be recomputed", array_path, problem)
        for path in (meta_path, array_path):
            try:
                os.replace(path, path.with_name(path.name + ".corrupt"))
            except FileNotFoundError:
                pass
        return None

    def __contains__(self, key: str) -> bool:
        return key in self._index or key in self._buffer

    def __len__(self) -> int:
        return len(self._index.keys() | self._buffer.keys())

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """The arrays of ``keys``: [n, *shape] in the store's dtype; ``KeyError`` naming a missing key."""
        out = np.empty((len(keys), *self.shape), dtype=self.dtype)
        by_part: dict[int, list[tuple[int, int]]] = {}
        for n, key in enumerate(keys):
            if key in self._buffer:
                out[n] = self._buffer[key]
            elif key in self._index:
                part, row = self._index[key]
                by_part.setdefault(part, []).append((row, n))
            else:
                raise KeyError(f"{key} is not in the cache {self.folder}")
        for part, pairs in by_part.items():
            if part not in self._maps:
                self._maps[part] = np.load(self._parts[part], mmap_mode="r")
            pairs.sort()
            rows, targets = zip(*pairs)
            out[list(targets)] = self._maps[part][list(rows)]
        return out

    def put(self, keys: Sequence[str], values: Any) -> None:
        """Add ``values`` [n, *shape] under ``keys`` (a torch tensor or array; cast to the store's dtype).

        Keys already stored are skipped (their arrays are kept).
        """
        if hasattr(values, "detach"):
            values = values.detach().cpu()
            values = (values.float() if str(values.dtype) == "torch.bfloat16" else values).numpy()  # numpy has no bf16
        values = np.asarray(values)
        if values.shape != (len(keys), *self.shape):
            raise ValueError(f"put: values of shape {values.shape} for {len(keys)} keys, expected "
                             f"{(len(keys), *self.shape)}")
        for key, value in zip(keys, values):
            if key not in self:
                self._buffer[key] = value.astype(self.dtype, copy=True)
        if len(self._buffer) >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one part."""
        if not self._buffer:
            return
        keys = list(self._buffer)
        array = np.stack([self._buffer[k] for k in keys])
        stem = f"part-{self._writer}-{self._written:05d}"
        array_path, meta_path = self.folder / f"{stem}.npy", self.folder / f"{stem}.json"
        _write_atomic(array_path, lambda f: np.save(f, array))
        meta = {"keys": keys, "sha256": file_sha256(array_path)}
        _write_atomic(meta_path, lambda f: f.write(json.dumps(meta).encode()))
        self._written += 1
        number = len(self._parts)
        self._parts.append(array_path)
        for row, key in enumerate(keys):
            self._index.setdefault(key, (number, row))
        self._buffer.clear()

    def close(self) -> None:
        """Flush and release the memory maps."""
        self.flush()
        self._maps.clear()

    def __enter__(self) -> ArrayStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers re-open the memory maps
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state
