"""Where checkpoints come from: the registry of released weights, the Hub, local folders."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

# What a NearID (or SigLIP) checkpoint folder holds.
CHECKPOINT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder on disk and where it came from.

    ``source`` is the Hub repo id (or ``local:<folder name>``); ``revision`` is the
    resolved commit hash for Hub downloads, ``local`` for plain folders.
    """

    folder: Path
    source: str
    revision: str


@cache
def registry() -> dict[str, dict]:
    """The released weights (``weights/registry.json``), by short name."""
    with resources.files("nearid_metric").joinpath("registry.json").open(encoding="utf-8") as f:
        return json.load(f)


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None,
                       files: tuple[str, ...] = CHECKPOINT_FILES) -> Checkpoint:
    """Find a checkpoint folder: a local folder, a registry name, or a Hub repo id.

    ``files``: what the folder must hold (a registry entry names its own). Hub downloads go
    through ``huggingface_hub.snapshot_download`` (its cache, revisions, ``HF_HUB_OFFLINE`` /
    ``HF_HUB_CACHE``), fetching only those files, so no pickled weights are ever fetched.
    A folder inside the Hub cache (``.../models--org--name/snapshots/<commit>``) is
    recognised, so it gets the same source and revision as a download would.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} given for the local folder {path}; revisions apply to Hub repos")
        return _local_checkpoint(path, files)
    name = str(name_or_path)
    entry = registry().get(name)
    files = tuple(entry["files"]) if entry else files
    repo_id = entry["repo_id"] if entry else name
    revision = revision or (entry["revision"] if entry else None)
    if repo_id.count("/") != 1 or os.path.isabs(repo_id):
        known = ", ".join(sorted(registry()))
        raise ValueError(f"{name!r} is not a folder, a registered name ({known}) or a Hub repo id 'org/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(files)))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id} (revision {revision or 'main'}) is not a local folder, not in the local Hugging Face "
            f"cache, and the Hub cannot be reached (offline mode or no network). Download it once where the "
            f"Hub is reachable, or pass a local checkpoint folder. ({e})"
        ) from None
    _check_files(folder, files)
    return Checkpoint(folder, repo_id, folder.name)


def _local_checkpoint(folder: Path, files: tuple[str, ...]) -> Checkpoint:
    _check_files(folder, files)
    cache_repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and cache_repo.startswith("models--"):
        return Checkpoint(folder, cache_repo[len("models--"):].replace("--", "/"), folder.name)
    return Checkpoint(folder, f"local:{folder.resolve().name}", "local")


def _check_files(folder: Path, files: tuple[str, ...]) -> None:
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint folder {folder} lacks {', '.join(missing)}")


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
