"""NearID benchmarks of your own, as image folders::

      root/<sample>/view_0.png  view_1.jpg  view_2.png  distractor_0.png ...  (one group)
      root/<group>/<sample>/view_0.png ...                                 (several groups)

Slot files are ``view_{0,1,2}``, ``distractor_{0,1,2}`` and (optional foreground masks of the
views) ``mask_{0,1,2}`` with any extension of ``IMAGE_EXTENSIONS`` (case-insensitive); a missing
file is a missing image. The layout is detected: ``root``'s sub-folders are samples if they hold
slot files, groups if their own sub-folders do; a mix is an error. Two files for one slot are an
error; other files and folders with no slot file are logged and skipped. Sample ids are folder
names; the group is the root's (or group folder's) name.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from nearid_metric.data import NearIDSample
from nearid_metric.images import IMAGE_EXTENSIONS
from nearid_metric.selection import SampleSelection

logger = logging.getLogger(__name__)

_SLOT = re.compile(r"(view|distractor|mask)_([012])")
_EXAMPLES = 5  # files named in a warning or error before "..."


def _examples(items: list[str]) -> str:
    return ", ".join(items[:_EXAMPLES]) + (", ..." if len(items) > _EXAMPLES else "")


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _slot(path: Path) -> tuple[str, int] | None:
    """``("view", k)`` or ``("distractor", k)`` for a slot image file, else None."""
    match = _SLOT.fullmatch(path.stem.lower())
    if match is None or path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
        return None
    return match[1], int(match[2])


def _is_sample_folder(folder: Path) -> bool:
    return folder.is_dir() and any(_slot(p) for p in _entries(folder))


def _folder_sample(folder: Path, group: str, ignored: list[Path]) -> NearIDSample | None:
    slots: dict[tuple[str, int], Path] = {}
    for path in _entries(folder):
        slot = _slot(path)
        if slot is None:
            ignored.append(path)
        elif slot in slots:
            raise ValueError(f"{folder}: two files for {slot[0]}_{slot[1]}: {slots[slot].name} and {path.name}; "
                             "keep one")
        else:
            slots[slot] = path
    if not slots:
        return None
    if not any(kind != "mask" for kind, _ in slots):
        return None
    return NearIDSample(folder.name, group, tuple(slots.get(("view", k)) for k in range(3)),
                        tuple(slots.get(("distractor", k)) for k in range(3)),
                        tuple(slots.get(("mask", k)) for k in range(3)))


def read_nearid_folder(root: str | os.PathLike, *, group: str | None = None,
                       select: SampleSelection | None = None) -> list[NearIDSample]:
    """NearID samples from ``root/<sample>/`` or ``root/<group>/<sample>/`` image folders.

    See the module docstring for the layout. ``group`` names the group of a one-level layout
    (default: ``root``'s name); in a two-level layout the group folders name the groups and
    ``group`` must be None. Samples are sorted by group folder, then sample folder.
    ``select``: only the samples it names, by id (folder name) or by position in each group's
    sorted samples. Raises ``ValueError`` for two files in one slot, a mixed layout, no sample
    at all, or a selected sample that is not in a group.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"NearID folder not found or not a folder: {root}")
    folders = [p for p in _entries(root) if p.is_dir()]
    sample_folders = [p for p in folders if _is_sample_folder(p)]
    group_folders = [p for p in folders if p not in sample_folders and any(map(_is_sample_folder, _entries(p)))]
    if sample_folders and group_folders:
        raise ValueError(f"{root}: mixes sample folders ({_examples([p.name for p in sample_folders])}) and "
                         f"group folders ({_examples([p.name for p in group_folders])}); use either "
                         "root/<sample>/view_0.png or root/<group>/<sample>/view_0.png")
    if group_folders and group is not None:
        raise ValueError(f"{root}: holds group folders ({_examples([p.name for p in group_folders])}), "
                         "which name the groups; pass group=None")
    layout = [(p.name, p) for p in group_folders] or [(group or root.resolve().name, root)]
    ignored = [p for p in _entries(root) if not p.is_dir()] if group_folders else []
    empty = [p for p in folders if p not in group_folders] if group_folders else []
    samples = []
    for name, folder in layout:
        found = []
        for path in _entries(folder):
            if not path.is_dir():
                ignored.append(path)
                continue
            sample = _folder_sample(path, name, ignored)
            if sample is None:
                empty.append(path)
            else:
                found.append(sample)
        if select is not None:
            select.check_found(len(found), [s.id for s in found], str(folder))
            found = [s for n, s in enumerate(found) if select.keeps(n, s.id)]
        samples += found
    if ignored:
        logger.warning("%s: ignored %d file(s) or folder(s) that are not view_K/distractor_K images (K = 0, 1, 2): %s",
                       root, len(ignored), _examples([str(p) for p in ignored]))
    if empty:
        logger.warning("%s: skipped %d folder(s) without any view_K/distractor_K image: %s",
                       root, len(empty), _examples([str(p) for p in empty]))
    if not samples:
        raise ValueError(f"{root}: no NearID samples (expected {root}/<sample>/view_0.png ... distractor_2.png)")
    return samples
