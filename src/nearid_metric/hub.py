"""Where checkpoints come from: the registry of released weights, the Hub, local folders; their hashes.

A registry entry may record the sha256 of each file (``weights/registry.json``, ``"sha256"``);
a folder written by :func:`download_checkpoint` with ``to=`` records them in
``nearid-weights.json``. Every load checks the files against what is recorded and refuses a
file that differs (:class:`ChecksumError`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# What a NearID (or SigLIP) checkpoint folder holds.
CHECKPOINT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")

RECORD_FILE = "nearid-weights.json"
"""Written next to the files by ``download_checkpoint(..., to=DIR)``: repo id, commit and sha256 per file."""

_COMMIT = re.compile(r"[0-9a-f]{40}")


class ChecksumError(ValueError):
    """A checkpoint file whose sha256 differs from the one recorded for it (registry or download record)."""


class HubUnreachableError(FileNotFoundError):
    """Weights that are neither local nor in the Hugging Face cache while the Hub cannot be reached."""


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

    ``files``: what the folder must hold. A registry entry names the files its repo provides
    (its ``files``): all of them are fetched, and those of them in ``files`` are required (so
    one entry serves scorers that read different parts of it, e.g. ``clip-i`` and ``clip-t``).
    Hub downloads go through ``huggingface_hub.snapshot_download`` (its cache, revisions,
    ``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE``), fetching only those files, so no pickled weights are
    ever fetched.
    A folder inside the Hub cache (``.../models--org--name/snapshots/<commit>``) is
    recognised, so it gets the same source and revision as a download would; so is a folder
    written by :func:`download_checkpoint` (its ``nearid-weights.json``).

    Files with a recorded sha256 (:func:`recorded_sha256`, or a folder's ``nearid-weights.json``)
    are hashed and compared; a difference raises :class:`ChecksumError` naming the file, the
    expected and the found hash. Nothing here touches the network when ``HF_HUB_OFFLINE=1``.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} given for the local folder {path}; revisions apply to Hub repos")
        return _local_checkpoint(path, files)
    name = str(name_or_path)
    if looks_like_path(name):  # never sent to the Hub (with the user's token) as a repo id
        kind = "is not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"no such checkpoint folder: {name} {kind}")
    entry = registry().get(name)
    fetch = tuple(entry["files"]) if entry else files
    required = tuple(f for f in fetch if f in files) if entry else files
    repo_id = entry["repo_id"] if entry else name
    revision = revision or (entry["revision"] if entry else None)
    if repo_id.count("/") != 1 or os.path.isabs(repo_id):
        known = ", ".join(sorted(registry()))
        raise ValueError(f"{name!r} is not a folder, a registered name ({known}) or a Hub repo id 'org/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    logger.info("fetching %s (revision %s) from the Hugging Face Hub or its local cache", repo_id, revision or "main")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(fetch)))
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise HubUnreachableError(
            f"{repo_id} (revision {revision or 'main'}) is not a local folder, not in the local Hugging Face "
            f"cache, and the Hub cannot be reached ({'HF_HUB_OFFLINE is set' if offline else 'no network'}: {e})."
        ) from None
    _check_files(folder, required)
    where = f"the registry (entry '{name}')" if entry else "the registry"
    verify_sha256(folder, recorded_sha256(repo_id, folder.name, revision), where, fetch)
    return Checkpoint(folder, repo_id, folder.name)


def looks_like_path(name: str) -> bool:
    """Whether a weights name is a local path rather than a Hub repo id: it starts with ``.``, ``/`` or ``~``,
    is a path object's text (``os.sep``), or has several components of which the first exists locally."""
    if name.startswith((".", "/", "~")) or os.path.isabs(name) or (os.sep != "/" and os.sep in name):
        return True
    first, _, rest = name.partition("/")
    return bool(rest) and os.path.lexists(first)


def _local_checkpoint(folder: Path, files: tuple[str, ...]) -> Checkpoint:
    _check_files(folder, files)
    record = folder / RECORD_FILE
    if record.is_file():
        repo_id, commit, hashes = _read_record(record)
        verify_sha256(folder, hashes, f"the download record {record}", files)  # checked against the registry then
        return Checkpoint(folder, repo_id, commit)
    cache_repo = folder.parent.parent
    if folder.parent.name == "snapshots" and cache_repo.name.startswith("models--"):
        repo_id = cache_repo.name[len("models--"):].replace("--", "/")
        verify_sha256(folder, recorded_sha256(repo_id, folder.name, cache_repo=cache_repo), "the registry", files)
        return Checkpoint(folder, repo_id, folder.name)
    return Checkpoint(folder, f"local:{folder.resolve().name}", "local")


def recorded_sha256(repo_id: str, commit: str, revision: str | None = None, *,
                    cache_repo: Path | None = None) -> dict[str, str]:
    """The sha256 per file that the registry records for ``repo_id`` at ``commit`` (``{}`` when none).

    An entry's hashes hold for the revision it names: when that is a commit, only for that
    commit; when it is a branch or tag, for a download of that revision (``revision``, None
    meaning ``main``) or, for a folder in the Hub cache (``cache_repo``, the ``models--org--name``
    folder), when the cache's ref of that branch points at ``commit``.
    """
    for entry in registry().values():
        if entry.get("repo_id") != repo_id or not entry.get("sha256"):
            continue
        pinned = entry.get("revision") or "main"
        if _COMMIT.fullmatch(pinned):
            applies = commit == pinned
        elif cache_repo is not None:
            ref = cache_repo / "refs" / pinned
            applies = ref.is_file() and ref.read_text(encoding="utf-8").strip() == commit
        else:
            applies = (revision or "main") == pinned
        if applies:
            return {name: str(value).lower() for name, value in entry["sha256"].items()}
    return {}


def verify_sha256(folder: Path, expected: dict[str, str], where: str, files: tuple[str, ...] | None = None) -> None:
    """Hash the files of ``folder`` that ``expected`` names (within ``files``); ChecksumError on a difference."""
    for name, want in expected.items():
        path = folder / name
        if (files is not None and name not in files) or not path.is_file():
            continue
        found = checkpoint_sha256(path)
        if found != want.lower():
            raise ChecksumError(
                f"refusing {path}: its sha256 is {found}, but {where} expects {want.lower()}. The file was changed "
                f"or corrupted, or the repository was updated since the hash was recorded. Delete it and fetch it "
                f"again (nearid-score download), or, if the new file is intended, record its hash instead."
            )
        logger.debug("sha256 of %s matches %s", path, where)


def _read_record(path: Path) -> tuple[str, str, dict[str, str]]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        repo_id, commit, hashes = record["repo_id"], record["revision"], record["sha256"]
        if not (isinstance(repo_id, str) and isinstance(commit, str) and isinstance(hashes, dict)):
            raise TypeError("repo_id and revision must be strings, sha256 an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid download record ({type(e).__name__}: {e}); "
                         f"delete it or download the weights again") from None
    return repo_id, commit, {str(k): str(v) for k, v in hashes.items()}


@dataclass(frozen=True)
class Download:
    """What :func:`download_checkpoint` fetched: the checkpoint, each file's sha256, and what was recorded."""

    checkpoint: Checkpoint
    sha256: dict[str, str]
    recorded: dict[str, str] = field(default_factory=dict)
    record_file: Path | None = None


def download_checkpoint(name: str, revision: str | None = None, files: tuple[str, ...] = CHECKPOINT_FILES,
                        to: str | os.PathLike | None = None) -> Download:
    """Fetch a registry name or Hub repo id into the Hugging Face cache, check it, and optionally copy it.

    The files are those of the registry entry (else ``files``), fetched by
    :func:`resolve_checkpoint` (so with ``HF_HUB_OFFLINE=1`` only the cache is read), and
    checked against the sha256 the registry records for that commit (ChecksumError if one
    differs). ``to``: also copy the files into that folder and write its
    ``nearid-weights.json`` (repo id, commit, sha256 of every file), which later loads of the
    folder check and take the signature's source and commit from. Returns the checkpoint (the
    ``to`` folder when given), every file's sha256 and the registry's recorded ones.
    """
    if Path(name).expanduser().is_dir():
        raise ValueError(f"{name} is a local folder; there is nothing to download")
    entry = registry().get(name)
    files = tuple(entry["files"]) if entry else files
    checkpoint = resolve_checkpoint(name, revision, files)
    hashes = {file: checkpoint_sha256(checkpoint.folder / file) for file in files}
    recorded = recorded_sha256(checkpoint.source, checkpoint.revision, revision or (entry or {}).get("revision"))
    if to is None:
        return Download(checkpoint, hashes, recorded)
    target = Path(to).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    for file in files:
        destination = target / file
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".partial")
        shutil.copyfile(checkpoint.folder / file, partial)
        os.replace(partial, destination)
    record = target / RECORD_FILE
    content = {"repo_id": checkpoint.source, "revision": checkpoint.revision, "sha256": hashes}
    record.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return Download(_local_checkpoint(target, files), hashes, recorded, record)


def _check_files(folder: Path, files: tuple[str, ...]) -> None:
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint folder {folder} lacks {', '.join(missing)}")


def read_json(path: str | os.PathLike) -> Any:
    """The content of a JSON file; ``ValueError`` naming the file when it is not valid UTF-8 JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fetch the checkpoint again") from None


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """:func:`file_sha256` of a checkpoint file, read once per process while the file is unchanged.

    A load verifies the weights and then names them in the scorer's signature; both need the
    hash of the same (about 1 GB) file. A file whose path, inode, size, mtime or ctime changed
    is hashed again. A hash started by :func:`start_checkpoint_sha256` is waited for, not repeated.
    """
    return _hash_future(path, background=False).result()


def start_checkpoint_sha256(path: str | os.PathLike) -> None:
    """Start :func:`checkpoint_sha256` of ``path`` in a background thread (``hashlib`` releases the GIL), so
    that hashing the weights overlaps loading them; the later :func:`checkpoint_sha256` waits for it."""
    _hash_future(path, background=True)


_HASHES: dict[tuple, Future] = {}  # (real path, *stat) -> the sha256, computed or being computed
_HASHES_LOCK = threading.Lock()


def _hash_future(path: str | os.PathLike, *, background: bool) -> Future:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _HASHES_LOCK:
        future = _HASHES.get(key)
        if future is not None:
            return future
        future = _HASHES[key] = Future()
    if background:
        threading.Thread(target=_fill, args=(future, key), name="nearid-sha256", daemon=True).start()
    else:
        _fill(future, key)
    return future


def _fill(future: Future, key: tuple) -> None:
    try:
        future.set_result(file_sha256(key[0]))
    except BaseException as e:  # raised to whoever waits for the hash; the next call hashes again
        with _HASHES_LOCK:
            _HASHES.pop(key, None)
        future.set_exception(e)
