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

from nearid_metric.images import Listing, list_images


@dataclass
class Pairing:
    """Pairs to score, and everything that could not be paired."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    unmatched_refs: list[Path] = field(default_factory=list)
    unmatched_gens: list[Path] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)  # one message per name shared by several files
    ignored: list[Path] = field(default_factory=list)  # files without an image extension
    skipped_folders: dict[Path, str] = field(default_factory=dict)  # not searched (directory loops): why


    def add_listing(self, listing: Listing) -> list[Path]:
        """Record a root's ignored files and skipped folders; returns its images."""
        self.ignored.extend(listing.ignored)
        self.skipped_folders.update(listing.skipped)
        return listing.images


def image_key(path: Path, root: Path) -> str:
    """The pairing name of ``path``: its path relative to ``root`` without extension (its own name without
    extension when ``root`` is the file itself)."""
    relative = path.relative_to(root) if root.is_dir() else Path(path.name)
    return relative.with_suffix("").as_posix()


def _index_by_key(root: Path, pairing: Pairing) -> tuple[dict[str, Path], set[str]]:
    """``({name: file} of the names held by one file, the names shared by several)``; the shared ones are
    reported in ``pairing.ambiguous``."""
    images = pairing.add_listing(list_images(root))
    by_key: dict[str, list[Path]] = defaultdict(list)
    for path in images:
        by_key[image_key(path, root)].append(path)
    unique = {}
    for key, paths in by_key.items():
        if len(paths) > 1:
            pairing.ambiguous.append(f"name '{key}' is shared by {', '.join(map(str, paths))}; none of them is scored")
        else:
            unique[key] = paths[0]
    return unique, by_key.keys() - unique.keys()


def pair_by_name(ref_root: str | os.PathLike, gen_root: str | os.PathLike) -> Pairing:
    """Pair files with the same relative path without extension (``a/b.png`` with ``a/b.jpg``).

    Two single files are one pair; a single file against a folder pairs with the file of its name
    there. Files whose name has no partner go to the unmatched lists (not those whose partner's
    name is ambiguous: they are reported once, as ambiguous).
    """
    ref_root, gen_root = Path(ref_root), Path(gen_root)
    pairing = Pairing()
    if not ref_root.is_dir() and not gen_root.is_dir():
        pairing.pairs = [(ref_root, gen_root)]
        return pairing
    refs, ref_shared = _index_by_key(ref_root, pairing)
    gens, gen_shared = _index_by_key(gen_root, pairing)
    pairing.pairs = [(refs[k], gens[k]) for k in sorted(refs.keys() & gens.keys())]
    pairing.unmatched_refs = [refs[k] for k in sorted(refs.keys() - gens.keys() - gen_shared)]
    pairing.unmatched_gens = [gens[k] for k in sorted(gens.keys() - refs.keys() - ref_shared)]
    return pairing


def pair_all(ref_root: str | os.PathLike, gen_root: str | os.PathLike) -> Pairing:
    """Every reference image with every generated image (e.g. one subject photo vs many generations)."""
    pairing = Pairing()
    refs = pairing.add_listing(list_images(ref_root))
    gens = pairing.add_listing(list_images(gen_root))
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
    columns, rows = read_manifest(manifest)
    missing = {"ref", "gen"} - set(columns)
    if missing:
        raise ValueError(f"{manifest}: the manifest needs columns 'ref' and 'gen' (missing {sorted(missing)})")
    for line, row in enumerate(rows, start=2):
        ref, gen = (row["ref"] or "").strip(), (row["gen"] or "").strip()
        if not ref or not gen:
            raise ValueError(f"{manifest}, line {line}: empty 'ref' or 'gen'")
        pairing.pairs.append((ref_root / ref, gen_root / gen))
    return pairing


def read_manifest(manifest: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """A manifest CSV's columns and rows. UTF-8, with or without the byte-order mark Excel writes;
    ``ValueError`` naming the file for any other encoding."""
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or ()), rows
    except UnicodeDecodeError as e:
        raise ValueError(f"{manifest} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 "
                         f"(in Excel: CSV UTF-8)") from None
    except csv.Error as e:
        raise ValueError(f"{manifest}: not a readable CSV ({e})") from None
