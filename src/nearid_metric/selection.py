"""Scoring a subset of a benchmark: the sample ids or row positions listed in a file.

The reference evaluation scores the NearID test split as an index file over the ``train`` split
(``splits/test.json``: a JSON list of 0-based row positions into the unshuffled table). A
:class:`SampleSelection` holds such positions and/or sample ids; the readers of
:mod:`nearid_metric.data` keep only the rows it names, before any image bytes are held.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_EXAMPLES = 5  # listed entries named in an error message


@dataclass(frozen=True)
class SampleSelection:
    """Rows to keep: ``rows`` (0-based positions in reading order) and ``ids`` (sample ids), either matching.

    ``source`` names where the selection came from, in messages; ``required``: every listed
    row and id must be found (:meth:`check_found`).
    """

    rows: frozenset[int] = frozenset()
    ids: frozenset[str] = frozenset()
    source: str = "the selection"
    required: bool = True

    def keeps(self, row: int, sample_id: str) -> bool:
        """Whether the sample at position ``row`` with id ``sample_id`` is selected."""
        return row in self.rows or sample_id in self.ids

    def check_found(self, n_rows: int, ids: Iterable[str], where: str) -> None:
        """``ValueError`` naming :attr:`source` when a listed row is past ``n_rows`` or a listed id is not in
        ``ids`` (nothing when not :attr:`required`)."""
        if not self.required:
            return
        missing = sorted(str(r) for r in self.rows if r >= n_rows)
        missing += sorted(repr(i) for i in self.ids - set(ids))
        if missing:
            shown = ", ".join(missing[:_EXAMPLES]) + (", ..." if len(missing) > _EXAMPLES else "")
            raise ValueError(f"{self.source}: {len(missing)} listed sample(s) not in {where} ({n_rows} rows): {shown}")


def read_selection(path: str | os.PathLike) -> SampleSelection:
    """A selection file: a JSON list (integers are row positions, strings sample ids), or text with one
    sample id per line (blank lines and lines starting with ``#`` skipped).

    Raises ``ValueError`` naming the file for an empty list, or entries that are neither
    non-negative integers nor non-empty strings.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the selection file ({e.strerror or e})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid JSON list ({e})") from None
        bad = [e for e in entries if not (isinstance(e, str) and e.strip())
               and not (isinstance(e, int) and not isinstance(e, bool) and e >= 0)]
        if bad:
            raise ValueError(f"{path}: entries must be row positions (integers >= 0) or sample ids (strings), "
                             f"got {', '.join(map(repr, bad[:_EXAMPLES]))}")
        rows = frozenset(e for e in entries if isinstance(e, int))
        ids = frozenset(e.strip() for e in entries if isinstance(e, str))
    else:
        rows = frozenset()
        ids = frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not rows and not ids:
        raise ValueError(f"{path}: lists no sample")
    return SampleSelection(rows, ids, str(path))
