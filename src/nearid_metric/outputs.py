"""Result files: JSON and CSV written atomically (a temporary file in the same folder, then renamed),
so an interrupted or failed write never leaves a truncated file in place of a finished one."""

from __future__ import annotations

import csv
import json
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: str | os.PathLike, *, newline: str | None = None) -> Iterator[IO[str]]:
    """Open a UTF-8 text file that replaces ``path`` only when the block ends without an exception."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # created as any new file (umask applies)
    try:
        with open(tmp, "x", encoding="utf-8", newline=newline) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``1 pair``, ``2 pairs`` (``plural_form`` where adding s is wrong)."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


def json_ready(value: Any) -> Any:
    """``value`` with every float NaN replaced by None (JSON ``null``), in nested dicts, lists and tuples."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def json_text(content: Any, *, indent: int = 2) -> str:
    """``content`` as indented JSON (NaN as null) with a final newline."""
    return json.dumps(json_ready(content), indent=indent, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, content: Any, *, indent: int = 2) -> None:
    """Write :func:`json_text` of ``content``, atomically."""
    text = json_text(content, indent=indent)
    with atomic_write(path) as f:
        f.write(text)


def csv_cell(value: Any) -> str:
    """CSV text of a value: floats as their shortest exact repr, NaN and None as an empty cell."""
    if value is None:
        return ""
    if isinstance(value, float) or hasattr(value, "dtype") and getattr(value.dtype, "kind", "") == "f":
        return "" if math.isnan(value) else repr(float(value))
    return str(value)


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a header and rows of cells (already text, or :func:`csv_cell` applied to each), atomically."""
    with atomic_write(path, newline="") as f:
        write_csv_rows(f, header, rows)


def write_csv_rows(f: IO[str], header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A header and rows of cells into an open text file (see :func:`write_csv`)."""
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows([cell if isinstance(cell, str) else csv_cell(cell) for cell in row] for row in rows)


def write_scores(out: str | os.PathLike, pairs: Sequence[tuple[str, str]], scores: Mapping[str, Sequence[float]],
                 summary: Mapping[str, Any], labels: Mapping[str, Sequence[str]] | None = None) -> None:
    """``nearid-score``'s files in ``out`` (created): ``scores.csv`` (ref, gen, the ``labels`` columns such as
    ``subject``, one column per model with 8 decimals, empty where a model has no score) and ``summary.json``.
    Both are written in full before either replaces a file, so a failed write (a full disk) leaves neither
    new file, never one without the other or a truncated one."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = labels or {}
    text = json_text(summary)

    def number(value: float) -> str:
        return "" if math.isnan(value) else f"{value:.8f}"

    with atomic_write(out / "summary.json") as summary_file, atomic_write(out / "scores.csv", newline="") as f:
        write_csv_rows(f, ["ref", "gen", *labels, *scores],
                       ([ref, gen, *(column[i] for column in labels.values()),
                         *(number(float(values[i])) for values in scores.values())]
                        for i, (ref, gen) in enumerate(pairs)))
        summary_file.write(text)
