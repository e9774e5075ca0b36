"""Checkpoint resolution: local folders, the Hugging Face cache (offline), the registry, signatures.

Nothing here reaches the network: Hub look-ups run in a subprocess with HF_HUB_OFFLINE=1
and HF_HUB_CACHE pointing at a temporary cache (huggingface_hub reads both at import).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import hf_cache_layout, make_reference_model, random_image, write_checkpoint

import nearid_metric
from nearid_metric import NearIDScore
from nearid_metric.hub import CHECKPOINT_FILES, file_sha256, registry, resolve_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "org/tiny"


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def probe_images():
    return [random_image(60 + i, (50, 41)) for i in range(3)]


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory, checkpoint_dir):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    snapshot = hf_cache_layout(checkpoint_dir, cache, REPO, COMMIT)
    return cache, snapshot


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from conftest import random_image
    from nearid_metric import NearIDScore
    from nearid_metric.hub import resolve_checkpoint

    out = {}
    scorer = NearIDScore.from_pretrained("org/tiny", device="cpu")
    out["signature"] = scorer.signature
    out["embedding"] = scorer.embed([random_image(60 + i, (50, 41)) for i in range(3)]).tolist()
    checkpoint = resolve_checkpoint("org/tiny")
    out["resolved"] = [str(checkpoint.folder), checkpoint.source, checkpoint.revision]
    for name in ("org/not-cached", "nearid"):
        try:
            resolve_checkpoint(name)
            out[name] = None
        except Exception as e:
            out[name] = [type(e).__name__, isinstance(e, FileNotFoundError), str(e)]
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def offline_run(hf_cache, tmp_path_factory):
    """Run the Hub look-ups once in a fresh interpreter, offline, against the temporary cache."""
    cache, _ = hf_cache
    home = tmp_path_factory.mktemp("hf_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# --- local folders ---------------------------------------------------------------------------------


def test_local_folder(checkpoint_dir):
    checkpoint = resolve_checkpoint(checkpoint_dir)
    assert checkpoint.folder == checkpoint_dir
    assert checkpoint.source == f"local:{checkpoint_dir.name}" == "local:nearid-tiny"
    assert checkpoint.revision == "local"
    assert resolve_checkpoint(str(checkpoint_dir)) == checkpoint


@pytest.mark.parametrize("missing", CHECKPOINT_FILES)
def test_local_folder_missing_file(tmp_path, checkpoint_dir, missing):
    folder = tmp_path / "partial"
    shutil.copytree(checkpoint_dir, folder)
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(missing)) as excinfo:
        resolve_checkpoint(folder)
    assert str(folder) in str(excinfo.value)
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        NearIDScore.from_pretrained(folder, device="cpu")


def test_revision_with_local_folder_raises(checkpoint_dir):
    with pytest.raises(ValueError, match="revision"):
        resolve_checkpoint(checkpoint_dir, revision="main")


@pytest.mark.parametrize("name", ["not-a-model", "a/b/c"])
def test_unknown_name_lists_registered(name):
    assert "nearid" in registry()
    with pytest.raises(ValueError, match="registered name") as excinfo:
        resolve_checkpoint(name)
    for registered in registry():
        assert registered in str(excinfo.value)


def test_background_sha256_is_waited_for_not_repeated(tmp_path, monkeypatch):
    """start_checkpoint_sha256 hashes in a thread; checkpoint_sha256 then waits for that hash (the file is read once)."""
    import threading

    import nearid_metric.hub as hub

    release, read, real = threading.Event(), [], hub.file_sha256

    def slow(path):
        release.wait(10)
        read.append(threading.current_thread().name)
        return real(path)

    monkeypatch.setattr(hub, "file_sha256", slow)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"c" * 64)
    hub.start_checkpoint_sha256(weights)
    hub.start_checkpoint_sha256(weights)  # already running: not started twice
    threading.Timer(0.2, release.set).start()
    assert hub.checkpoint_sha256(weights) == hashlib.sha256(b"c" * 64).hexdigest()
    assert read == ["nearid-sha256"]


def test_failed_sha256_is_raised_and_tried_again(tmp_path, monkeypatch):
    import nearid_metric.hub as hub

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"d" * 64)
    real = hub.file_sha256
    monkeypatch.setattr(hub, "file_sha256", lambda path: (_ for _ in ()).throw(PermissionError(f"{path}: denied")))
    with pytest.raises(PermissionError, match="denied"):
        hub.checkpoint_sha256(weights)
    monkeypatch.setattr(hub, "file_sha256", real)
    assert hub.checkpoint_sha256(weights) == hashlib.sha256(b"d" * 64).hexdigest()


def test_registry_entry():
    entry = registry()["nearid"]
    assert entry["repo_id"] == "Aleksandar/nearid-siglip2"
    assert entry["embed_dim"] == 1152 and entry["image_size"] == 384


def test_checkpoint_sha256_reads_an_unchanged_file_once(tmp_path, monkeypatch):
    import nearid_metric.hub as hub

    read, real = [], hub.file_sha256
    monkeypatch.setattr(hub, "file_sha256", lambda path: read.append(path) or real(path))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    first = hub.checkpoint_sha256(weights)
    assert first == hashlib.sha256(b"a" * 64).hexdigest()
    assert hub.checkpoint_sha256(tmp_path / "." / "model.safetensors") == first and len(read) == 1
    weights.write_bytes(b"b" * 64)  # same size, new content and a new mtime: hashed again
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert hub.checkpoint_sha256(weights) == hashlib.sha256(b"b" * 64).hexdigest() and len(read) == 2


def test_file_sha256(tmp_path, checkpoint_dir):
    path = checkpoint_dir / "model.safetensors"
    assert file_sha256(path) == sha256_of(path)
    # several chunks, and a last partial one
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 41 + b"tail")
    assert file_sha256(blob, chunk_bytes=1000) == hashlib.sha256(blob.read_bytes()).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_sha256(empty) == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_signature_local(checkpoint_dir, scorer, precision):
    if precision == "fp32":
        loaded = scorer
    else:
        loaded = NearIDScore.from_pretrained(checkpoint_dir, device="cpu", precision=precision)
    digest = sha256_of(checkpoint_dir / "model.safetensors")[:12]
    version = nearid_metric.__version__
    assert loaded.signature == f"nearid:local:nearid-tiny@local|sha256:{digest}|{precision}|v{version}"
    assert nearid_metric.__version__ == "0.1.0"
    assert re.fullmatch(r"nearid:local:[^@|]+@local\|sha256:[0-9a-f]{12}\|(fp32|bf16|fp16)\|v\d+\.\d+\.\d+\S*",
                        loaded.signature)


def test_signature_changes_with_weights(tmp_path, checkpoint_dir):
    """The digest is of the weights file: other weights give another signature, the same weights the same."""
    other = write_checkpoint(make_reference_model(seed=1), tmp_path / "nearid-tiny")
    copy = tmp_path / "copy" / "nearid-tiny"
    shutil.copytree(checkpoint_dir, copy)
    base = NearIDScore.from_pretrained(checkpoint_dir, device="cpu").signature
    assert NearIDScore.from_pretrained(copy, device="cpu").signature == base
    assert NearIDScore.from_pretrained(other, device="cpu").signature != base


# --- the Hugging Face cache ------------------------------------------------------------------------


def test_snapshot_folder_gets_repo_and_commit(hf_cache):
    _, snapshot = hf_cache
    checkpoint = resolve_checkpoint(snapshot)
    assert (checkpoint.source, checkpoint.revision) == (REPO, COMMIT)
    assert checkpoint.folder == snapshot


def test_offline_cache_load(offline_run, hf_cache, checkpoint_dir, scorer):
    _, snapshot = hf_cache
    digest = sha256_of(snapshot / "model.safetensors")[:12]
    assert offline_run["signature"] == f"nearid:{REPO}@{COMMIT}|sha256:{digest}|fp32|v0.1.0"
    folder, source, revision = offline_run["resolved"]
    assert os.path.samefile(folder, snapshot)
    assert (source, revision) == (REPO, COMMIT)
    # the same numbers as loading the local folder in this process
    theirs = torch.tensor(offline_run["embedding"])
    ours = scorer.embed(probe_images())
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() <= 1e-6
    # and the snapshot folder given as a path gives the same signature
    assert NearIDScore.from_pretrained(snapshot, device="cpu").signature == offline_run["signature"]


def test_offline_repo_not_in_cache(offline_run):
    kind, is_fnf, message = offline_run["org/not-cached"]
    assert is_fnf, kind
    assert "org/not-cached" in message
    assert "not in the local Hugging Face cache" in message


def test_registered_name_resolves_to_release_repo(offline_run):
    kind, is_fnf, message = offline_run["nearid"]
    assert is_fnf, kind
    assert "Aleksandar/nearid-siglip2" in message
    assert "not in the local Hugging Face cache" in message
