"""The prompt of each generation, for CLIP-T: a prompt file, a manifest column, or DreamBench++'s ``text/`` folder.

A generation's prompt is looked up by its pairing name (its path relative to the generation
folder, without extension, as :func:`nearid_metric.pairing.image_key`), or by that path with
its extension. A generation without a prompt is reported by name, never given an empty one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from nearid_metric.pairing import image_key, read_manifest


def read_prompts(path: str | os.PathLike) -> dict[str, str]:
    """``{generation name: prompt}`` from a CSV with columns ``gen,prompt`` or a JSON object ``{gen: prompt}``
    (CustomConcept101's ``prompts.json``). ``ValueError`` naming the file and the problem."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(content, dict) or not all(isinstance(v, str) for v in content.values()):
            raise ValueError(f"{path}: prompts JSON must be an object of strings {{\"gen name\": \"prompt\"}}")
        return {str(k): v for k, v in content.items()}
    columns, rows = read_manifest(path)
    if not {"gen", "prompt"} <= set(columns):
        raise ValueError(f"{path}: a prompts CSV needs columns 'gen' and 'prompt' (columns: {', '.join(columns)})")
    prompts: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        gen = (row["gen"] or "").strip()
        if not gen:
            raise ValueError(f"{path}, line {line}: empty 'gen'")
        if gen in prompts and prompts[gen] != (row["prompt"] or ""):
            raise ValueError(f"{path}, line {line}: a second, different prompt for {gen!r}")
        prompts[gen] = row["prompt"] or ""
    return prompts


def lookup_prompts(gens: Sequence[Path], gen_root: Path, prompts: Mapping[str, str]) -> list[str | None]:
    """The prompt of each generation (None where ``prompts`` has none), by pairing name or relative path."""
    out: list[str | None] = []
    for gen in gens:
        name = image_key(gen, gen_root)
        relative = gen.relative_to(gen_root).as_posix() if gen_root.is_dir() else gen.name
        out.append(prompts.get(name, prompts.get(relative)))
    return out


def text_folder_prompts(gens: Sequence[Path], gen_root: Path, text_root: Path) -> list[str | None]:
    """DreamBench++'s layout: the prompt of ``gen_root/<p>.<ext>`` is the content of ``text_root/<p>.txt``
    (UTF-8, as read, as its ``clip_score.py`` does; the tokenizer collapses whitespace; None when missing)."""
    out: list[str | None] = []
    for gen in gens:
        path = text_root / f"{image_key(gen, gen_root)}.txt"
        try:
            out.append(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            out.append(None)
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: prompt file not readable ({e})") from None
    return out
