"""Pairing reference images with generated images: by name, all-vs-all, by subject, or from a manifest.

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
    subjects: list[str] | None = None  # the subject of each pair (subject pairing, a manifest column)
    subject_refs: dict[str, list[Path]] = field(default_factory=dict)  # every reference of each subject
    subject_problems: list[str] = field(default_factory=list)  # subjects on one side only, empty subjects

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


def subject_of(path: Path, root: Path) -> str | None:
    """The subject of ``path``: the first folder level of its path relative to ``root`` (None for a file
    directly in ``root``)."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def _subject_images(root: Path, side: str, pairing: Pairing) -> dict[str, list[Path]]:
    """``{subject: images}`` of the subject folders of ``root`` (each first-level folder, empty ones too); files
    directly in ``root`` belong to no subject and are reported."""
    by_subject: dict[str, list[Path]] = {entry.name: [] for entry in sorted(root.iterdir())
                                         if entry.is_dir() and not entry.name.startswith(".")}
    for path in pairing.add_listing(list_images(root)):
        subject = subject_of(path, root)
        if subject is None:
            pairing.subject_problems.append(f"{side} image {path} is not in a subject folder of {root}; not scored")
        else:
            by_subject.setdefault(subject, []).append(path)
    return by_subject


def pair_by_subject(ref_root: str | os.PathLike, gen_root: str | os.PathLike) -> Pairing:
    """Every generation with every reference of the same subject (``REF/<subject>/...`` x ``GEN/<subject>/...``).

    The subject is the first folder level under each root (DreamBooth's ``dataset/<subject>/NN.jpg``).
    Subjects on one side only and subject folders without images are reported in
    ``subject_problems`` (their images in the unmatched lists), never dropped silently.
    """
    ref_root, gen_root = Path(ref_root), Path(gen_root)
    for root in (ref_root, gen_root):
        if not root.is_dir():
            raise ValueError(f"{root}: subject pairing needs a folder with one subfolder per subject")
    pairing = Pairing(subjects=[])
    refs = _subject_images(ref_root, "reference", pairing)
    gens = _subject_images(gen_root, "generated", pairing)
    return pair_subject_lists(refs, gens, pairing, f"{ref_root}", f"{gen_root}")


def pair_subject_lists(refs: dict[str, list[Path]], gens: dict[str, list[Path]], pairing: Pairing,
                    ref_where: str, gen_where: str) -> Pairing:
    """Fill ``pairing`` with every (reference, generation) of each subject both sides hold (``{subject: images}``
    each), reporting subjects on one side only or without images (``ref_where`` / ``gen_where`` name the sides)."""
    for subject in sorted(refs.keys() | gens.keys()):
        ref_images, gen_images = refs.get(subject), gens.get(subject)
        if ref_images is None or gen_images is None:
            present, missing = (ref_where, gen_where) if gen_images is None else (gen_where, ref_where)
            pairing.subject_problems.append(f"subject {subject!r} is in {present} but not in {missing}; not scored")
            (pairing.unmatched_refs if gen_images is None else pairing.unmatched_gens).extend(ref_images or gen_images
                                                                                              or [])
            continue
        if not ref_images or not gen_images:
            empty = ref_where if not ref_images else gen_where
            pairing.subject_problems.append(f"subject {subject!r} has no images in {empty}; not scored")
            (pairing.unmatched_refs if not gen_images else pairing.unmatched_gens).extend(ref_images or gen_images)
            continue
        pairing.subject_refs[subject] = ref_images
        pairing.pairs += [(ref, gen) for gen in gen_images for ref in ref_images]
        pairing.subjects += [subject] * (len(gen_images) * len(ref_images))
    return pairing


def pair_subjects_from_manifest(manifest: str | os.PathLike, ref_root: str | os.PathLike,
                                gen_root: str | os.PathLike) -> Pairing:
    """Subject pairing from a CSV with a ``subject`` column and ``ref`` and / or ``gen`` cells: each row names
    one reference, one generation or both, of that subject; every generation of a subject is paired with
    every reference of it (:func:`pair_by_subject` for listed files). ``ValueError`` naming the line for bad rows."""
    ref_root, gen_root = Path(ref_root), Path(gen_root)
    columns, rows = read_manifest(manifest)
    if "subject" not in columns or not {"ref", "gen"} & set(columns):
        raise ValueError(f"{manifest}: subject pairing from a manifest needs a 'subject' column and 'ref' and/or "
                         f"'gen' columns (columns: {', '.join(columns)})")
    refs: dict[str, list[Path]] = {}
    gens: dict[str, list[Path]] = {}
    for line, row in enumerate(rows, start=2):
        subject = (row.get("subject") or "").strip()
        ref, gen = (row.get("ref") or "").strip(), (row.get("gen") or "").strip()
        if not subject or not (ref or gen):
            raise ValueError(f"{manifest}, line {line}: empty 'subject', or neither 'ref' nor 'gen'")
        for cell, root, side in ((ref, ref_root, refs), (gen, gen_root, gens)):
            if cell and root / cell not in side.get(subject, []):
                side.setdefault(subject, []).append(root / cell)
    return pair_subject_lists(refs, gens, Pairing(subjects=[]), f"{manifest} (ref)", f"{manifest} (gen)")


def pair_from_manifest(manifest: str | os.PathLike, ref_root: str | os.PathLike,
                       gen_root: str | os.PathLike) -> Pairing:
    """Pairs listed in a CSV with columns ``ref`` and ``gen`` (other columns are ignored).

    Relative paths are resolved against ``ref_root`` and ``gen_root``; absolute paths are
    used as they are. A ``subject`` column gives each pair's subject (per-subject summaries).
    Raises ``ValueError`` naming the manifest and line for bad rows.
    """
    ref_root, gen_root = Path(ref_root), Path(gen_root)
    pairing = Pairing()
    columns, rows = read_manifest(manifest)
    if "subject" in columns:
        pairing.subjects = []
    missing = {"ref", "gen"} - set(columns)
    if missing:
        raise ValueError(f"{manifest}: the manifest needs columns 'ref' and 'gen' (missing {sorted(missing)})")
    for line, row in enumerate(rows, start=2):
        ref, gen = (row["ref"] or "").strip(), (row["gen"] or "").strip()
        if not ref or not gen:
            raise ValueError(f"{manifest}, line {line}: empty 'ref' or 'gen'")
        pairing.pairs.append((ref_root / ref, gen_root / gen))
        if pairing.subjects is not None:
            subject = (row["subject"] or "").strip()
            if not subject:
                raise ValueError(f"{manifest}, line {line}: empty 'subject'")
            pairing.subjects.append(subject)
            pairing.subject_refs.setdefault(subject, [])
            if ref_root / ref not in pairing.subject_refs[subject]:
                pairing.subject_refs[subject].append(ref_root / ref)
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
