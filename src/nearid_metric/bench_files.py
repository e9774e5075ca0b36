"""The files of a benchmark run: ``similarities.csv`` (written, and read back by ``nearid-bench --from-csv``,
also from other tools such as a VLM judge), ``table.csv`` and ``table.json`` (:mod:`nearid_metric.bench`)."""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nearid_metric.bench import (
    ALL,
    FULL,
    LABELS,
    MTG_TABLE,
    NEARID_REQUIRED,
    NEARID_TABLE,
    ORACLE_COLUMNS,
    Table,
    model_signatures,
)
from nearid_metric.outputs import write_csv, write_json
from nearid_metric.protocol import MTG_COLUMNS, NEARID_TERMS

_SHOWN = 5  # examples named in an error message


def write_similarities(path: str | Path, table: Mapping[str, Any]) -> None:
    """Write a similarity table as CSV: a header, one row per model x sample, NaN as an empty cell."""
    names = list(table)
    write_csv(path, names, zip(*(np.asarray(table[name]).tolist() for name in names)))


def write_results(out: Path, rows: Sequence[Mapping[str, Any]], benchmark: str) -> None:
    """``table.csv`` (floats exact, NaN empty, no ``undefined_r``) and ``table.json`` (NaN as null)."""
    keys = MTG_TABLE if benchmark == "mtg" else NEARID_TABLE
    write_csv(out / "table.csv", keys, ([row[key] for key in keys] for row in rows))
    write_json(out / "table.json", {"benchmark": benchmark, "rows": list(rows)})


def read_similarities(paths: Sequence[str | Path], *, scale: float = 1.0) -> tuple[str, Table]:
    """``(benchmark, table)`` from similarity CSV files (ours, or any with the needed columns).

    The benchmark is ``"mtg"`` when a file has all of ``sim_1_2, sim_1_1p, sim_1_2p, sim_2_2p,
    sim_2_1p``, else ``"nearid"`` when it has a ``sim_ij`` column with ``cross_ii`` or
    ``cross_jj``; every file must be of the same one. Read: those columns (absent NearID ones
    are NaN), ``oracle_1, oracle_2`` (MTG, optional), and the labels ``model`` (default: the
    file's name without extension), ``group`` (default ``"default"``), ``signature`` (default
    ""), ``id`` (default: the row number). Other columns are ignored. An empty cell, ``nan`` or
    ``NaN`` is a missing value. ``scale``: every similarity (not the oracles) is divided by it,
    e.g. 10 for a VLM judge's 1-10 ratings, as the reference's ``fix_vlm_scores`` does. Labels
    also include ``mask`` (default ``"full"``). Raises ``ValueError`` naming file and line for unreadable
    numbers, empty labels, the group ``"all"``, mixed benchmarks or a ``(model, group, id)``
    given twice.
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the score scale must be a positive number, got {scale!r}")
    benchmark, parts = None, []
    seen: set[tuple[str, str, str]] = set()
    for path in map(Path, paths):
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            records = list(reader)
        kind = _benchmark_of(header, path)
        if benchmark not in (None, kind):
            raise ValueError(f"{path}: {kind} similarities, but earlier files hold {benchmark} ones; "
                             "score one benchmark at a time")
        benchmark = kind
        if not records:
            raise ValueError(f"{path}: no rows under the header")
        numbers = MTG_COLUMNS + ORACLE_COLUMNS if kind == "mtg" else NEARID_REQUIRED
        part: dict[str, list] = {name: [] for name in (*LABELS, *numbers) if name in header}
        for line, record in enumerate(records, start=2):
            for name in part:
                cell = (record.get(name) or "").strip()
                if name not in LABELS:
                    value = _number(cell, path, line, name)
                    part[name].append(value if name in ORACLE_COLUMNS else value / scale)
                elif name == "group" and cell == ALL:
                    raise ValueError(f"{path}, line {line}: group {ALL!r} is the name of the pooled row; rename it")
                elif name == "mask":
                    part[name].append(cell or FULL)
                elif cell or name == "signature":
                    part[name].append(cell)
                else:
                    raise ValueError(f"{path}, line {line}: empty {name!r}")
        has_id = "id" in part
        defaults = {"id": [str(k) for k in range(len(records))], "group": ["default"] * len(records),
                    "model": [path.stem] * len(records), "signature": [""] * len(records),
                    "mask": [FULL] * len(records)}
        part = {name: part.get(name, defaults[name]) for name in LABELS} | part
        if has_id:  # without ids, a sample given twice cannot be recognised
            keys = list(zip(part["model"], part["group"], part["id"]))
            twice = sorted({key for key in keys if key in seen} | {key for key, n in Counter(keys).items() if n > 1})
            if twice:
                raise ValueError(f"{path}: {len(twice)} (model, group, id) row(s) given twice (here or in an earlier "
                                 f"file), e.g. {', '.join(map(str, twice[:_SHOWN]))}; score each sample once per "
                                 "model")
            seen.update(keys)
        parts.append(part)
    names = dict.fromkeys(name for part in parts for name in part)
    table = {name: np.concatenate([np.asarray(part[name], dtype=object) if name in LABELS
                                   else np.asarray(part.get(name, [math.nan] * len(part["model"])), dtype=np.float64)
                                   for part in parts]) for name in names}
    try:
        model_signatures(table)
    except ValueError as e:
        raise ValueError(f"{', '.join(map(str, paths))}: {e}") from None
    return benchmark, table


def _benchmark_of(header: Sequence[str], path: Path) -> str:
    mtg = all(name in header for name in MTG_COLUMNS)
    nearid = any(sim in header and cross in header for _, sim, cross in NEARID_TERMS)
    if mtg and nearid:
        raise ValueError(f"{path}: has both NearID and MTG similarity columns; keep one benchmark per file")
    if not (mtg or nearid):
        raise ValueError(f"{path}: no similarity columns to score: NearID needs a sim_ij column with cross_ii "
                         f"or cross_jj (e.g. sim_01, cross_00), MTG needs {', '.join(MTG_COLUMNS)}; "
                         f"the header is {', '.join(header) or 'empty'}")
    return "mtg" if mtg else "nearid"


def _number(cell: str, path: Path, line: int, name: str) -> float:
    try:
        value = float(cell) if cell else math.nan
    except ValueError:
        value = math.inf
    if math.isinf(value):
        raise ValueError(f"{path}, line {line}: {name} = {cell!r} is not a finite number "
                         "(leave the cell empty for a missing image)")
    return value
