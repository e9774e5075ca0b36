"""The NearID and MTG benchmarks as samples of image sources: the table, dataset and folder readers.

A sample holds image *sources* (paths, or :class:`~nearid_metric.images.EncodedImage` for
images stored inside a table), never pixels. :mod:`nearid_metric.similarity` turns a run's
embeddings into the per-sample similarity columns the protocol scores.

Layouts
-------
NearID tables (:func:`read_nearid_parquet`, :func:`read_nearid_hf`):
  positives ``id, img1, img2, img3`` (view k-1 is ``imgk``; the reference readers' ``images1..3``
  are read too) and optional foreground masks ``masks1..masks3``; distractors, one table per
  inpainting generator/setting, ``id`` and ``img1..img3`` or ``nimg1..nimg3`` (distractor j is
  inpainted into the background of view j), joined on ``id``. A positive without distractors
  is kept with missing distractors, distractors without positives are dropped; both are
  logged as warnings. An id twice on one side is an error.
MTG tables (:func:`read_mtg_parquet`, :func:`read_mtg_hf`):
  ``image_{1,2}_original``, ``image_{1,2}_inpainted`` (the ``1p``/``2p`` images),
  ``image_{1,2}_object_mask``, ``image_{1,2}_part_mask``, and ``id`` if present (else the row
  number, counted across all files).
  In both, an image cell is a Hugging Face ``Image`` struct ``{bytes, path}`` (a struct without
  bytes uses its path, relative to the table's folder) or raw bytes; a null cell is a missing
  image. A table path is a ``.parquet`` file, an Arrow stream file (``.arrow``, what
  ``datasets``' ``save_to_disk`` writes), a folder of those (not recursive), or a list of them.
NearID image folders for your own benchmarks: :mod:`nearid_metric.folders`.

The group names the inpainting generator/setting; by default it is the distractor table's
file or folder name (the common folder of a list of files), the Hub repo's name, or the
folder-layout root's (or group folder's) name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nearid_metric.images import EncodedImage, ImageSource
from nearid_metric.selection import SampleSelection

logger = logging.getLogger(__name__)

TablePaths = str | os.PathLike | Sequence[str | os.PathLike]
Views = tuple[ImageSource | None, ImageSource | None, ImageSource | None]

_BATCH_ROWS = 64  # rows decoded from a table at a time (image bytes dominate memory)
_EXAMPLES = 5  # ids/files named in a warning or error before "..."
_PAIRS = ((0, 1), (0, 2), (1, 2))
_MTG_COLUMNS = {  # MTGSample field -> table column
    "image_1": "image_1_original",
    "image_2": "image_2_original",
    "image_1p": "image_1_inpainted",
    "image_2p": "image_2_inpainted",
    "object_mask_1": "image_1_object_mask",
    "object_mask_2": "image_2_object_mask",
    "part_mask_1": "image_1_part_mask",
    "part_mask_2": "image_2_part_mask",
}
_MASK_COLUMNS = ("masks1", "masks2", "masks3")  # foreground masks of the positive views, when a table has them


@dataclass(frozen=True)
class NearIDSample:
    """One identity: up to 3 positive views and 3 matched-context distractors (None = missing).

    Distractor j is a similar but different object inpainted into the background of view j.
    ``masks``: the foreground masks of the views (None = none); distractor j sits where view j's
    object was, so foreground-only scoring masks it with mask j too, as the reference does.
    """

    id: str
    group: str
    views: Views
    distractors: Views
    masks: Views = (None, None, None)

    def __post_init__(self) -> None:
        for name in ("views", "distractors", "masks"):
            value = tuple(getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"sample {self.id!r}: {name} needs 3 entries (None for missing), got {len(value)}")
            object.__setattr__(self, name, value)

    @property
    def images(self) -> tuple[ImageSource | None, ...]:
        """The 6 images to embed: views 0..2, then distractors 0..2."""
        return self.views + self.distractors


@dataclass(frozen=True)
class MTGSample:
    """One MTG pair: views ``1``, ``2``, the part-edited ``1p``, ``2p``, and their masks (None = missing)."""

    id: str
    group: str
    image_1: ImageSource | None
    image_2: ImageSource | None
    image_1p: ImageSource | None
    image_2p: ImageSource | None
    object_mask_1: ImageSource | None
    object_mask_2: ImageSource | None
    part_mask_1: ImageSource | None
    part_mask_2: ImageSource | None

    @property
    def images(self) -> tuple[ImageSource | None, ...]:
        """The 4 images to embed (masks are not embedded): ``1, 2, 1p, 2p``."""
        return self.image_1, self.image_2, self.image_1p, self.image_2p


# --- tables: parquet / Arrow files and Hugging Face datasets -----------------------------------


@dataclass(frozen=True)
class _Table:
    label: str  # names the table in messages and in EncodedImage names
    schema: Any  # pyarrow.Schema
    batches: Callable[[list[str]], Iterable[Any]]  # columns -> pyarrow RecordBatches or Tables
    base: Path | None  # folder that relative image paths in cells are resolved against


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ImportError("reading benchmark tables needs pyarrow: pip install 'nearid-metric[data]'") from None
    return pyarrow


def _table_files(paths: TablePaths, role: str) -> list[Path]:
    """The table files named by ``paths`` (a file, a folder of tables, or a list of those)."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ValueError(f"no {role} files given")
    files = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(f for f in item.iterdir()
                           if f.suffix in (".parquet", ".arrow") and not f.name.startswith("."))
            if not found:
                raise ValueError(f"{item}: no .parquet or .arrow files in this {role} folder")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{role} table not found: {item}")
    return files


def _default_group(paths: TablePaths) -> str:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if len(items) == 1:
        path = Path(items[0]).resolve()
        return path.name if path.is_dir() else path.stem
    parents = {Path(p).resolve().parent for p in items}
    if len(parents) != 1:
        raise ValueError(f"{len(items)} table files in different folders name no group: pass group=")
    return parents.pop().name


def _open_file(path: Path) -> _Table:
    pa = _pyarrow()
    try:
        if path.suffix == ".arrow":
            with pa.memory_map(str(path)) as source:
                schema = pa.ipc.open_stream(source).schema
        else:
            schema = pa.parquet.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        kind = "an Arrow stream" if path.suffix == ".arrow" else "a parquet file"
        raise ValueError(f"{path}: cannot read as {kind} ({e})") from None

    def batches(columns: list[str]) -> Iterator[Any]:
        if path.suffix == ".arrow":
            with pa.memory_map(str(path)) as source:
                for batch in pa.ipc.open_stream(source):
                    yield batch.select(columns)
        else:
            yield from pa.parquet.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=columns)

    return _Table(str(path), schema, batches, path.parent)


def _check_columns(table: _Table, image_columns: Sequence[str], id_column: str | None) -> None:
    pa = _pyarrow()
    names = set(table.schema.names)
    missing = [c for c in (*([id_column] if id_column else []), *image_columns) if c not in names]
    if missing:
        raise ValueError(f"{table.label}: missing column(s) {', '.join(missing)} "
                         f"(it has {', '.join(table.schema.names) or 'none'})")
    for column in image_columns:
        kind = table.schema.field(column).type
        is_struct = pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
        if not (is_struct or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            raise ValueError(f"{table.label}: column {column!r} has type {kind}; expected image cells "
                             "(binary, or a struct {bytes, path} as Hugging Face datasets store images)")


def _image_cell(cell: Any, name: str, base: Path | None) -> ImageSource | None:
    """An image source from a table cell: raw bytes or a ``{bytes, path}`` struct; None if null."""
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return EncodedImage(name, cell["bytes"])
        if cell.get("path"):
            path = Path(cell["path"])
            return path if path.is_absolute() or base is None else base / path
        return None
    return None if cell is None else EncodedImage(name, cell)


def _read_rows(tables: Sequence[_Table], image_columns: Sequence[str], id_column: str | None,
               role: str, select: SampleSelection | None = None,
               optional: Sequence[str] = ()) -> dict[str, tuple[ImageSource | None, ...]]:
    """id -> image sources (in ``image_columns`` order), in table order; duplicate ids are an error.

    Without ``id_column`` the id is the row number counted over all ``tables``. ``select``: keep
    only the rows it names (by position over all ``tables`` or by id; a listed row or id that is
    not there is an error). ``optional``: more image columns, read where a table has them (None
    elsewhere), after ``image_columns``.
    """
    for table in tables:
        _check_columns(table, image_columns, id_column)
    rows: dict[str, tuple[ImageSource | None, ...]] = {}
    where: dict[str, str] = {}
    duplicates = []
    position = -1
    seen: list[str] = []
    for table in tables:
        present = [c for c in optional if c in table.schema.names]
        _check_columns(table, present, None)
        columns = [*([id_column] if id_column else []), *image_columns, *present]
        for batch in table.batches(columns):
            for row in batch.to_pylist():
                position += 1
                if id_column is None:
                    key = str(position)
                elif row[id_column] is None:
                    raise ValueError(f"{table.label}: a row has a null {id_column!r}")
                else:
                    key = str(row[id_column])
                if select is not None:
                    seen.append(key)
                    if not select.keeps(position, key):
                        continue
                if key in rows:
                    also = "" if where[key] == table.label else f" and {table.label}"
                    duplicates.append(f"{key!r} in {where[key]}{also}")
                    continue
                where[key] = table.label
                rows[key] = tuple(None if c not in row else _image_cell(row[c], f"{table.label}#id={key}/{c}",
                                                                           table.base)
                                  for c in (*image_columns, *optional))
    if select is not None:
        select.check_found(position + 1, seen, ", ".join(t.label for t in tables))
    if duplicates:
        raise ValueError(f"{role}: {len(duplicates)} duplicate id(s), each id must name one sample: "
                         + _examples(duplicates))
    return rows


def _examples(items: Sequence[str]) -> str:
    return ", ".join(items[:_EXAMPLES]) + (", ..." if len(items) > _EXAMPLES else "")


def _distractor_columns(table: _Table, prefix: str) -> list[str]:
    if prefix == "auto":
        found = [p for p in ("img", "nimg") if any(f"{p}{k}" in table.schema.names for k in (1, 2, 3))]
        if not found:
            raise ValueError(f"{table.label}: distractor table has neither img1..img3 nor nimg1..nimg3 columns "
                             f"(it has {', '.join(table.schema.names)})")
        if len(found) > 1:
            raise ValueError(f"{table.label}: distractor table has both img1..img3 and nimg1..nimg3 columns; "
                             "pass distractor_prefix='img' or 'nimg'")
        prefix = found[0]
    elif prefix not in ("img", "nimg"):
        raise ValueError(f"distractor_prefix must be 'auto', 'img' or 'nimg', not {prefix!r}")
    return [f"{prefix}{k}" for k in (1, 2, 3)]


def _positive_columns(tables: Sequence[_Table]) -> list[str]:
    """``img1..img3`` (the dataset card) or ``images1..images3`` (the reference readers), whichever all tables have."""
    for prefix in ("img", "images"):
        columns = [f"{prefix}{k}" for k in (1, 2, 3)]
        if all(set(columns) <= set(t.schema.names) for t in tables):
            return columns
    names = ", ".join(tables[0].schema.names) if tables else "none"
    raise ValueError(f"{', '.join(t.label for t in tables)}: positives need id and img1..img3 or images1..images3 "
                     f"columns (the first has {names})")


def _join_nearid(positives: Sequence[_Table], distractors: Sequence[_Table], prefix: str,
                 group: str, select: SampleSelection | None = None) -> list[NearIDSample]:
    views = _read_rows(positives, _positive_columns(positives), "id", "positives", select, optional=_MASK_COLUMNS)
    # only the distractor rows of the selected samples; one without distractors is reported below
    kept = None if select is None else SampleSelection(ids=frozenset(views), source="positives", required=False)
    negatives: dict[str, tuple[ImageSource | None, ...]] = {}
    for table in distractors:
        rows = _read_rows([table], _distractor_columns(table, prefix), "id", "distractors", kept)
        again = sorted(rows.keys() & negatives.keys())
        if again:
            raise ValueError(f"distractors: {len(again)} id(s) of {table.label} already in an earlier "
                             f"distractor file: {_examples(again)}")
        negatives.update(rows)
    positive_labels = ", ".join(t.label for t in positives)
    distractor_labels = ", ".join(t.label for t in distractors)
    if not views.keys() & negatives.keys():
        raise ValueError(f"no id is in both the positives ({positive_labels}) and the distractors "
                         f"({distractor_labels}): are they from the same benchmark split?")
    lonely = [k for k in views if k not in negatives]
    if lonely:
        logger.warning("group %s: %d positive sample(s) have no distractor row in %s and are kept "
                       "without distractors: %s", group, len(lonely), distractor_labels, _examples(lonely))
    orphans = [k for k in negatives if k not in views]
    if orphans:
        logger.warning("group %s: %d distractor row(s) have no positives in %s and are dropped: %s",
                       group, len(orphans), positive_labels, _examples(orphans))
    return [NearIDSample(key, group, images[:3], negatives.get(key, (None, None, None)), images[3:])
            for key, images in views.items()]


def read_nearid_parquet(positives: TablePaths, distractors: TablePaths, *,
                        distractor_prefix: Literal["auto", "img", "nimg"] = "auto",
                        group: str | None = None, select: SampleSelection | None = None) -> list[NearIDSample]:
    """NearID samples from a positives table and a distractor table, joined on ``id``.

    ``positives``/``distractors``: a ``.parquet`` or ``.arrow`` file, a folder of them, or a
    list. ``distractor_prefix``: which distractor columns hold the images (``img1..3`` or
    ``nimg1..3``; "auto" picks the one present). ``group`` defaults to the distractor file's or
    folder's name. ``select``: only the positives rows it names (positions over the positives
    files, or ids) and their distractors. Samples come in positives order; only the needed
    columns are read, and the image bytes of the samples read are kept in memory. Raises
    ``ValueError`` naming the file for missing columns, duplicate ids, no common ids, or a
    selected row or id that is not in the positives.
    """
    return _join_nearid([_open_file(f) for f in _table_files(positives, "positives")],
                        [_open_file(f) for f in _table_files(distractors, "distractors")],
                        distractor_prefix, group or _default_group(distractors), select)


def read_mtg_parquet(path: TablePaths, *, group: str | None = None,
                     select: SampleSelection | None = None) -> list[MTGSample]:
    """MTG samples from a table (``.parquet``/``.arrow`` file, folder or list); see the module docstring.

    ``group`` defaults to the file's or folder's name; ``select``: only the rows it names (row
    positions over the files, or ids). Raises ``ValueError`` naming the file for missing columns,
    duplicate ids, or a selected row or id that is not there.
    """
    return _mtg_samples([_open_file(f) for f in _table_files(path, "MTG")], group or _default_group(path), select)


def _mtg_samples(tables: Sequence[_Table], group: str, select: SampleSelection | None = None) -> list[MTGSample]:
    without_id = [t.label for t in tables if "id" not in t.schema.names]
    if without_id and len(without_id) < len(tables):
        raise ValueError(f"MTG: some files have an 'id' column and some do not ({_examples(without_id)})")
    id_column = None if without_id else "id"
    rows = _read_rows(tables, list(_MTG_COLUMNS.values()), id_column, "MTG", select)
    if not rows:
        raise ValueError(f"no MTG rows in {', '.join(t.label for t in tables)}")
    return [MTGSample(key, group, **dict(zip(_MTG_COLUMNS, images, strict=True))) for key, images in rows.items()]


# --- Hugging Face datasets ---------------------------------------------------------------------


def _hf_table(source: Any, split: str, revision: str | None) -> _Table:
    """A table over a ``datasets.Dataset``, loading ``source`` from the Hub first if it is a repo id."""
    try:
        import datasets
    except ImportError:
        raise ImportError("reading from the Hugging Face Hub needs the datasets library: "
                          "pip install 'nearid-metric[hf]'") from None
    label = source if isinstance(source, str) else (getattr(source.info, "dataset_name", None) or "dataset")
    if isinstance(source, str):
        source = datasets.load_dataset(source, split=split, revision=revision)
        label = f"{label}[{split}]"

    def batches(columns: list[str]) -> Iterator[Any]:
        yield from source.with_format("arrow", columns=columns).iter(batch_size=_BATCH_ROWS)

    return _Table(label, source.features.arrow_schema, batches, None)


def _hf_group(source: Any) -> str:
    if isinstance(source, str):
        return source.rstrip("/").rsplit("/", 1)[-1]
    name = getattr(source.info, "dataset_name", None)
    if not name:
        raise ValueError("the distractor dataset has no name to use as its group: pass group=")
    return name


def read_nearid_hf(positives: Any, distractors: Any, *, split: str = "train", revision: str | None = None,
                   distractor_prefix: Literal["auto", "img", "nimg"] = "auto",
                   group: str | None = None, select: SampleSelection | None = None) -> list[NearIDSample]:
    """NearID samples from Hugging Face datasets (needs ``pip install 'nearid-metric[hf]'``).

    ``positives``/``distractors``: a Hub repo id (or local dataset folder) loaded with
    ``datasets.load_dataset(..., split=split, revision=revision)``, or a loaded
    ``datasets.Dataset``. Columns, joining and ``select`` as in :func:`read_nearid_parquet`;
    ``group`` defaults to the distractor repo's name (e.g. ``NearID-PowerPaint``).
    """
    return _join_nearid([_hf_table(positives, split, revision)], [_hf_table(distractors, split, revision)],
                        distractor_prefix, group or _hf_group(distractors), select)


def read_mtg_hf(source: Any, *, split: str = "test", revision: str | None = None,
                group: str | None = None, select: SampleSelection | None = None) -> list[MTGSample]:
    """MTG samples from a Hub repo id (or local dataset folder) or a loaded ``datasets.Dataset``.

    ``split`` defaults to ``test``, the split the reference evaluates; ``select`` as in :func:`read_mtg_parquet`.
    """
    return _mtg_samples([_hf_table(source, split, revision)], group or _hf_group(source), select)
