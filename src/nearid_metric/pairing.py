"""Pairing reference images with generated images: by name, all-vs-all, or from a manifest.

Nothing is dropped silently: files without a partner, names shared by several files and
non-image files are all reported in the returned :class:`Pairing`.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from nearid_metric.images import list_images


@dataclass
class Pairing:
    """Pairs to score, and everything that could not be paired."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    unmatched_refs: list[Path] = field(default_factory=list)
    unmatched_gens: list[Path] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)  # one message per name shared by several files
    ignored: list[Path] = field(default_factory=list)  # files without an image extension


def image_key(path: Path, root: Path) -> str:
    """The pairing name of ``path``: its path relative to ``root`` without extension ('' for a file root)."""
    relative = path.relative_to(root) if root.is_dir() else Path()
    return relative.with_suffix("").as_posix() if relative.parts else ""


def _index_by_key(root: Path, pairing: Pairing) -> dict[str, Path]:
    images, ignored = list_images(root)
    pairing.ignored.extend(ignored)
    by_key: dict[str, list[Path]] = defaultdict(list)
    for path in images:
        by_key[image_key(path, root)].append(path)
    unique = {}
    for key, paths in by_key.items():
        if len(paths) > 1:
            pairing.ambiguous.append(f"name '{key}' is shared by {', '.join(map(str, paths))}; none of them is scored")
        else:
            unique[key] = paths[0]
    return unique


def pair_by_name(ref_root: str | os.PathLike, gen_root: str | os.PathLike) -> Pairing:
    """Pair files with the same relative path without extension (``a/b.png`` with ``a/b.jpg``).

    Two single files are one pair. Files whose name has no partner go to the unmatched lists.
    """
    pairing = Pairing()
    refs = _index_by_key(Path(ref_root), pairing)
    gens = _index_by_key(Path(gen_root), pairing)
    pairing.pairs = [(refs[k], gens[k]) for k in sorted(refs.keys() & gens.keys())]
    pairing.unmatched_refs = [refs[k] for k in sorted(refs.keys() - gens.keys())]
    pairing.unmatched_gens = [gens[k] for k in sorted(gens.keys() - refs.keys())]
    return pairing


def pair_all(ref_root: str | os.PathLike, gen_root: str | os.PathLike) -> Pairing:
    """Every reference image with every generated image (e.g. one subject photo vs many generations)."""
    pairing = Pairing()
    refs, ignored_refs = list_images(ref_root)
    gens, ignored_gens = list_images(gen_root)
    pairing.ignored = ignored_refs + ignored_gens
    pairing.pairs = [(r, g) for r in refs for g in gens]
    return pairing


def pair_from_manifest(manifest: str | os.PathLike, ref_root: str | os.PathLike,
                       gen_root: str | os.PathLike) -> Pairing:
    """Pairs listed in a CSV with columns ``ref`` and ``gen`` (other columns are ignored).

    Relative paths are resolved against ``ref_root`` and ``gen_root``; absolute paths are
    used as they are. Raises ``ValueError`` naming the manifest and line for bad rows.
    """
    ref_root, gen_root = Path(ref_root), Path(gen_root)
    pairing = Pairing()
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"ref", "gen"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{manifest}: the manifest needs columns 'ref' and 'gen' (missing {sorted(missing)})")
        for line, row in enumerate(reader, start=2):
            ref, gen = (row["ref"] or "").strip(), (row["gen"] or "").strip()
            if not ref or not gen:
                raise ValueError(f"{manifest}, line {line}: empty 'ref' or 'gen'")
            pairing.pairs.append((ref_root / ref, gen_root / gen))
    return pairing
