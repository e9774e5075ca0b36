"""Fixed-shape arrays on disk keyed by image content: the embedding cache and the training feature cache.

A store holds one array per key (:func:`content_key`: the sha256 of an image's bytes) for one
*signature* (what made the arrays: model weights, preprocessing, precision), so an entry is
never returned to a different model. Layout under the root folder::

    root/<first 16 hex of sha256(signature)>/meta.json             format, signature, shape, dtype
    root/<...>/part-<writer>-<n>.safetensors                     one tensor "rows" [n, *shape]

Each part is a safetensors file holding one tensor, ``rows`` ([n, *shape], the store's dtype,
little-endian), whose header metadata (text) holds ``format`` (:data:`FORMAT`), ``keys`` (a
JSON list: row i is the array of ``keys[i]``), ``sha256`` (hex digest of the tensor bytes) and
``keys_sha256`` (of the ``keys`` text). Parts are append-only and written atomically (a
temporary ``*.tmp`` file, then a rename), so a killed run loses only the rows it had not
flushed, and several processes may write to one store at once (each writer names its own
parts). Reads are memory-mapped: ``safetensors.safe_open`` checks a part's structure and reads
its metadata, and the tensor bytes (after the 8-byte header length and the JSON header) are
mapped with ``numpy.memmap``, so a ``get`` reads only the rows it asks for.
With ``verify=True`` every part's checksums are checked when the store is opened: a damaged
part (unreadable header, wrong shape or dtype, truncated, checksum mismatch) is reported,
renamed ``*.corrupt`` and its keys count as missing (so they are recomputed).

A folder written in another format (format 1, from development versions, kept ``.npy`` parts
with ``.json`` key lists) is refused with an error that says to delete it: it is only a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from nearid_metric.images import (
    EncodedImage,
    ImageLoadError,
    ImageSource,
    read_image_file,
)
from nearid_metric.masking import MaskedImage, masked_key
from nearid_metric.options import available_cores

logger = logging.getLogger(__name__)

FORMAT = 2  # 1: .npy part + .json key list; 2: one safetensors file per part
TENSOR = "rows"  # the one tensor of a part
VERIFY_THREADS = min(8, available_cores())  # parts checked in parallel when a store is opened
RACY_SECONDS = 2.0  # a file changed this recently when hashed is not remembered (FileHashMemo)
HASH_MEMO = "file-hashes.sqlite"  # the FileHashMemo of a cache folder (embedding and feature caches)
PART_SUFFIX = ".safetensors"
# numpy dtype -> safetensors dtype name, for the dtypes a store may hold
_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
                       "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def content_key(image: ImageSource) -> str:
    """sha256 hex of an image file's bytes (or of :attr:`EncodedImage.data`); :class:`ImageLoadError` if unreadable.

    Only regular files are read (:func:`nearid_metric.images.read_image_file`). A
    :class:`~nearid_metric.masking.MaskedImage` is keyed by its image's and its mask's keys and its settings.
    """
    if isinstance(image, MaskedImage):
        return masked_key(image, content_key(image.image), content_key(image.mask))
    return hashlib.sha256((image if isinstance(image, EncodedImage) else read_image_file(image)).data).hexdigest()


def content_keys(images: Sequence[ImageSource], *, num_threads: int = 8,
                 memo: str | os.PathLike | None = None) -> tuple[list[str | None], dict[int, str]]:
    """:func:`content_key` of every image, hashed in ``num_threads`` threads.

    ``memo``: an SQLite file of hashes already computed (:class:`FileHashMemo`); a file whose
    path and ``stat`` are unchanged since is not read again. Returns the keys (None for an
    unreadable image) and ``{index: reason}`` for those.
    """
    memo_db = FileHashMemo(memo) if memo is not None else None
    states = memo_db.lookup(images) if memo_db is not None else [None] * len(images)
    read_at = [0] * len(images)  # when each file was read (the racy-clean guard of FileHashMemo.record)

    def one(n: int) -> str | ImageLoadError:
        if states[n] is not None and states[n].sha256 is not None:
            return states[n].sha256  # remembered
        read_at[n] = clock_ns()
        try:
            return content_key(images[n])
        except ImageLoadError as e:
            return e

    pool = ThreadPoolExecutor(max(1, num_threads))
    try:
        results = list(pool.map(one, range(len(images))))
    finally:  # Ctrl-C: do not wait for the files still queued
        pool.shutdown(wait=False, cancel_futures=True)
    if memo_db is not None:
        memo_db.record([(states[n], key, read_at[n]) for n, key in enumerate(results)
                        if states[n] is not None and states[n].sha256 is None and isinstance(key, str)])
    failures = {i: r.reason for i, r in enumerate(results) if isinstance(r, ImageLoadError)}
    return [None if isinstance(r, ImageLoadError) else r for r in results], failures


def clock_ns() -> int:
    """Wall-clock time in ns, the clock file timestamps are compared with (a seam for tests)."""
    return time.time_ns()


class FileState(NamedTuple):
    """A file as :meth:`FileHashMemo.lookup` found it."""

    path: str  # resolved
    stat: str  # device:inode:size:mtime_ns:ctime_ns
    changed_ns: int  # the later of mtime and ctime
    sha256: str | None  # remembered for exactly this stat, else None


class FileHashMemo:
    """sha256 of image files remembered across runs, in an SQLite file (stdlib ``sqlite3``).

    An entry is used only while the file's resolved path, device, inode, size, modification
    time and status-change time (``st_ctime_ns``, which any write updates and no tool can set
    back) are all as they were when it was hashed. A file changed within
    :data:`RACY_SECONDS` of being hashed is not remembered, so a write in the same clock tick
    as the hash cannot go unnoticed. Several processes may share one memo (SQLite locks it).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=120)
        db.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, stat TEXT NOT NULL, "
                   "sha256 TEXT NOT NULL)")
        return db

    def lookup(self, images: Sequence[ImageSource]) -> list[FileState | None]:
        """Per image: None (not a file, or cannot be stat-ed), else its :class:`FileState`."""
        out: list[FileState | None] = [None] * len(images)
        files: dict[str, list[int]] = {}
        for n, image in enumerate(images):
            if isinstance(image, (str, os.PathLike)):
                try:
                    path = os.path.realpath(image)
                    st = os.stat(path)
                except OSError:
                    continue  # hashing reports why
                stat = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
                out[n] = FileState(path, stat, max(st.st_mtime_ns, st.st_ctime_ns), None)
                files.setdefault(path, []).append(n)
        if not files:
            return out
        try:
            with closing(self._connect()) as db:
                paths = list(files)
                for start in range(0, len(paths), 500):
                    chunk = paths[start:start + 500]
                    rows = db.execute(f"SELECT path, stat, sha256 FROM hashes WHERE path IN "
                                      f"({','.join('?' * len(chunk))})", chunk).fetchall()
                    for path, stat, digest in rows:
                        for n in files[path]:
                            if out[n].stat == stat:
                                out[n] = out[n]._replace(sha256=digest)
        except (sqlite3.Error, OSError) as e:
            logger.warning("file hash memo %s is unusable (%s); hashing every file", self.path, e)
        return out

    def record(self, entries: Sequence[tuple[FileState, str, int]]) -> None:
        """Remember ``(file as found by lookup, its sha256, when it was read in ns)``, unless the file had changed
        within :data:`RACY_SECONDS` of that moment (a rewrite in the same timestamp tick would go unnoticed)."""
        rows = [(state.path, state.stat, digest) for state, digest, read_ns in entries
                if read_ns - state.changed_ns > RACY_SECONDS * 1e9]
        if not rows:
            return
        try:
            with closing(self._connect()) as db, db:
                db.executemany("INSERT OR REPLACE INTO hashes (path, stat, sha256) VALUES (?, ?, ?)", rows)
        except (sqlite3.Error, OSError) as e:
            logger.warning("cannot update the file hash memo %s (%s)", self.path, e)


def _process_umask() -> int:
    """The process's umask (read once, at import: setting it to read it is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_process_umask()
"""Mode of the files a store writes: as any new file (safetensors alone writes 0600, which locks out the other
users of a shared cache)."""


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary path)``, then fsync and rename it to ``path``: readers see the whole file or none."""
    tmp = path.with_name(path.name + f".{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "r+b") as f:  # writable: some systems refuse fsync on a read-only descriptor
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(array: np.ndarray) -> str:
    """Hex sha256 of an array's bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()


def _tensor_layout(path: Path) -> tuple[int, tuple[int, ...], str]:
    """``(byte offset of the data, shape, safetensors dtype name)`` of a part's tensor, from its header.

    The file starts with the header length (u64, little-endian), then the JSON header; data
    offsets in the header count from the end of the header.
    """
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(length))[TENSOR]
    return 8 + length + int(entry["data_offsets"][0]), tuple(entry["shape"]), entry["dtype"]


class ArrayStore:
    """Arrays of one ``shape`` and ``dtype`` keyed by string, for one ``signature`` (see the module docs).

    ``put`` buffers rows and writes a part every ``part_rows`` rows (and on ``flush``/``close``);
    ``get`` serves flushed and buffered rows alike. Use as a context manager to flush on exit.
    ``dtype``: float16/32/64, int8/16/32/64, uint8 or bool (this package uses float32 and float16).
    """

    def __init__(self, root: str | os.PathLike, *, signature: str, shape: Sequence[int], dtype: Any = "float32",
                 part_rows: int = 4096, verify: bool = True):
        if part_rows < 1:
            raise ValueError(f"part_rows must be >= 1, got {part_rows}")
        self.signature = signature
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype).newbyteorder("<")  # safetensors stores little-endian
        if self.dtype.name not in _SAFETENSORS_DTYPES:
            raise ValueError(f"ArrayStore cannot store {self.dtype.name}; use one of {', '.join(_SAFETENSORS_DTYPES)}")
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
            _write_atomic(path, lambda tmp: tmp.write_bytes(json.dumps(meta, indent=2).encode()))
            return
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(found, dict):
                raise ValueError(f"a JSON {type(found).__name__}, not an object")
        except ValueError as e:  # damaged (e.g. a disk that filled up): the parts check themselves when read
            logger.warning("cache metadata %s is damaged (%s); writing it again", path, e)
            _write_atomic(path, lambda tmp: tmp.write_bytes(json.dumps(meta, indent=2).encode()))
            return
        if found.get("format") != FORMAT:
            raise ValueError(f"{self.folder} is a cache in format {found.get('format')!r} (another nearid-metric "
                             f"version); this version reads format {FORMAT}. Delete the folder to rebuild it")
        if found != meta:
            raise ValueError(f"{path}: cache metadata {found} does not match this store's {meta}; "
                             f"delete the folder to rebuild")

    def refresh(self) -> None:
        """Pick up parts written since opening (e.g. by other processes)."""
        known = set(self._parts)
        new = [path for path in sorted(self.folder.glob(f"part-*{PART_SUFFIX}")) if path not in known]
        with ThreadPoolExecutor(min(VERIFY_THREADS, max(1, len(new)))) as pool:  # hashing releases the GIL
            found = list(pool.map(self._read_part, new))
        for path, keys in zip(new, found):
            if keys is not None:
                self._add_part(path, keys)

    def _add_part(self, path: Path, keys: Sequence[str]) -> None:
        """Index a part's rows (a key already indexed keeps its first row)."""
        number = len(self._parts)
        self._parts.append(path)
        for row, key in enumerate(keys):
            self._index.setdefault(key, (number, row))

    def _read_part(self, path: Path) -> list[str] | None:
        """The keys of a part; None (after warning and renaming it ``*.corrupt``) if it is damaged."""
        try:
            with safe_open(path, framework="numpy") as f:  # checks that the header covers the file exactly
                meta = f.metadata() or {}
            _, shape, dtype = _tensor_layout(path)
            keys = json.loads(meta["keys"])
            if not isinstance(keys, list):
                raise ValueError("the keys are not a list")
            expected = (len(keys), *self.shape)
            problem = None
            if meta.get("format") != str(FORMAT):
                problem = f"part format {meta.get('format')!r}, expected {FORMAT}"
            elif shape != expected or dtype != _SAFETENSORS_DTYPES[self.dtype.name]:
                problem = f"holds {dtype} {shape}, expected {_SAFETENSORS_DTYPES[self.dtype.name]} {expected}"
            elif self._verify:
                rows = self._map(path)
                if hashlib.sha256(meta["keys"].encode()).hexdigest() != meta["keys_sha256"]:
                    problem = "checksum mismatch (keys)"
                elif _sha256(rows) != meta["sha256"]:
                    problem = "checksum mismatch"
                del rows
        except FileNotFoundError:
            return None  # moved aside by another process meanwhile
        except PermissionError:  # another user's part (see docs/speed.md, shared caches): not damaged, left alone
            logger.warning("cannot read cache part %s (permission denied); its entries will be recomputed", path)
            return None
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            problem = f"unreadable ({type(e).__name__}: {e})"
        if problem is None:
            return keys
        logger.warning("cache part %s is damaged (%s); its entries will be recomputed", path, problem)
        try:
            os.replace(path, path.with_name(path.name + ".corrupt"))
        except FileNotFoundError:
            pass
        return None

    def _map(self, path: Path) -> np.ndarray:
        """A part's rows [n, *shape], memory-mapped read-only (nothing is read until indexed)."""
        offset, shape, _ = _tensor_layout(path)
        return np.memmap(path, dtype=self.dtype, mode="r", offset=offset, shape=shape)

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
                self._maps[part] = self._map(self._parts[part])
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
        keys_text = json.dumps(keys)
        meta = {"format": str(FORMAT), "keys": keys_text, "sha256": _sha256(array),
                "keys_sha256": hashlib.sha256(keys_text.encode()).hexdigest()}
        path = self.folder / f"part-{self._writer}-{self._written:05d}{PART_SUFFIX}"
        _write_atomic(path, lambda tmp: save_file({TENSOR: array}, tmp, metadata=meta))
        self._written += 1
        self._add_part(path, keys)
        self._buffer.clear()

    def close(self) -> None:
        """Flush and release the memory maps."""
        self.flush()
        self.discard()

    def discard(self) -> None:
        """Drop the rows not flushed and release the memory maps (after a write failed, say)."""
        self._buffer.clear()
        self._maps.clear()

    def __enter__(self) -> ArrayStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers re-open the memory maps
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state
