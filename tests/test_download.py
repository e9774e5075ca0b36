"""``nearid-score download`` and sha256 checks on load, against a fake Hugging Face cache; never the network.

The cache is a temporary ``models--org--tiny`` folder (conftest.hf_cache_layout) read by the real
huggingface_hub in offline mode; sockets are blocked while each test runs, so any attempt to
reach the Hub would fail the test. Registry entries are added to the loaded registry for the
duration of a test.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import hf_cache_layout, random_image

from nearid_metric import create_scorer, hub
from nearid_metric.cli.score import main
from nearid_metric.hub import RECORD_FILE, ChecksumError, file_sha256, recorded_sha256, resolve_checkpoint

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
REPO = "org/tiny"
FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


@pytest.fixture()
def cache(tmp_path, checkpoint_dir, monkeypatch):
    """A fresh offline Hub cache holding org/tiny at COMMIT (refs/main), and no network."""
    import huggingface_hub.constants as constants

    root = tmp_path / "hub"
    snapshot = hf_cache_layout(checkpoint_dir, root, REPO, COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError(f"a test tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return snapshot


def hashes_of(folder: Path) -> dict[str, str]:
    return {name: file_sha256(folder / name) for name in FILES}


def register(monkeypatch, sha256: dict[str, str], revision: str = "main", name: str = "tiny") -> None:
    monkeypatch.setitem(hub.registry(), name, {"repo_id": REPO, "revision": revision, "files": list(FILES),
                                               "sha256": sha256, "scorers": ["nearid"]})


def flip_byte(path: Path) -> None:
    """Flip one byte in the middle (same size, so only the content differs)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    if path.is_symlink():
        path.unlink()
    path.write_bytes(bytes(data))


def model_line(out: str) -> str:
    """The value after ``use --model`` on stdout."""
    match = re.search(r"use --model (\S+)$", out, re.MULTILINE)
    assert match, out
    return match.group(1).strip("'")


def test_download_verifies_recorded_hashes_and_prints_the_model_string(cache, monkeypatch, capsys, scorer):
    register(monkeypatch, hashes_of(cache))
    assert main(["download", "--model", "nearid=tiny"]) == 0
    out = capsys.readouterr().out
    assert f"nearid: {REPO}@{COMMIT} in {cache}" in out
    for name in FILES:
        assert re.search(rf"{re.escape(name)}\s+sha256 {file_sha256(cache / name)}  verified against the registry",
                         out), out
    assert "to pin" not in out
    spec = model_line(out)
    assert spec == f"nearid={cache}"
    loaded = create_scorer("nearid", pretrained=spec.split("=", 1)[1], device="cpu")
    assert loaded.signature.startswith(f"nearid:{REPO}@{COMMIT}|sha256:{file_sha256(cache / 'model.safetensors')[:12]}")
    # the registry name loads offline from the cache too, with the same signature and numbers
    by_name = create_scorer("nearid", pretrained="tiny", device="cpu")
    assert by_name.signature == loaded.signature
    images = [random_image(i, (40, 36)) for i in range(2)]
    assert torch.equal(by_name.embed(images), scorer.embed(images))


def test_tampered_file_is_refused_on_download_and_on_load(cache, monkeypatch, capsys):
    expected = hashes_of(cache)
    register(monkeypatch, expected)
    flip_byte(cache / "model.safetensors")
    found = file_sha256(cache / "model.safetensors")
    assert main(["download", "--model", "nearid=tiny"]) == 1
    captured = capsys.readouterr()
    assert "use --model" not in captured.out
    for text in (str(cache / "model.safetensors"), expected["model.safetensors"], found):
        assert text in captured.err
    # scoring with them: one clear line on stderr and exit code 1, no traceback
    with pytest.raises(SystemExit) as excinfo:
        main([str(cache), str(cache), "--model", "nearid=tiny", "--no-progress"])
    assert excinfo.value.code == 1
    err = capsys.readouterr().err
    assert "refusing" in err and found in err and "Traceback" not in err
    for source in ("tiny", REPO, cache):  # registry name, repo id, and the snapshot folder itself
        with pytest.raises(ChecksumError) as excinfo:
            create_scorer("nearid", pretrained=source, device="cpu")
        message = str(excinfo.value)
        assert "model.safetensors" in message and expected["model.safetensors"] in message and found in message
    assert isinstance(excinfo.value, ValueError)


def test_no_recorded_hash_prints_them_and_how_to_pin(cache, monkeypatch, capsys):
    register(monkeypatch, {})
    assert main(["download", "--model", "nearid=tiny"]) == 0
    out = capsys.readouterr().out
    assert out.count("not recorded in the registry") == 3
    pin = json.loads(re.search(r'set in the registry entry "tiny" \(weights/registry.json\): (\{.*\})', out).group(1))
    assert pin == {"revision": COMMIT, "sha256": hashes_of(cache)}
    assert model_line(out) == f"nearid={cache}"
    # a repo id that the registry does not know: the same, and it names the repo
    assert main(["download", "--model", REPO]) == 0
    assert f"in the registry entry of {REPO} (add one)" in capsys.readouterr().out


def test_download_to_a_folder_records_hashes_and_keeps_the_signature(cache, monkeypatch, tmp_path, capsys):
    register(monkeypatch, {})
    target = tmp_path / "weights" / "nearid"
    assert main(["download", "--model", "nearid=tiny", "--to", str(target)]) == 0
    out = capsys.readouterr().out
    assert out.count(f"recorded in {RECORD_FILE}") == 3
    assert model_line(out) == f"nearid={target}"
    record = json.loads((target / RECORD_FILE).read_text())
    assert record == {"repo_id": REPO, "revision": COMMIT, "sha256": hashes_of(cache)}
    assert all(not (target / name).is_symlink() and (target / name).is_file() for name in FILES)

    from_folder = create_scorer("nearid", pretrained=target, device="cpu")
    from_cache = create_scorer("nearid", pretrained=cache, device="cpu")
    assert from_folder.signature == from_cache.signature  # same repo, commit and file hash
    flip_byte(target / "model.safetensors")
    with pytest.raises(ChecksumError, match=re.escape(RECORD_FILE)):
        create_scorer("nearid", pretrained=target, device="cpu")
    (target / RECORD_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a valid download record"):
        resolve_checkpoint(target)


def test_which_revision_the_recorded_hashes_hold_for(cache, monkeypatch):
    good = hashes_of(cache)
    other = "f" * 40
    register(monkeypatch, good)  # pinned to the branch main
    assert recorded_sha256(REPO, COMMIT) == good
    assert recorded_sha256(REPO, COMMIT, "v2") == {}  # another branch asked for explicitly
    assert recorded_sha256(REPO, COMMIT, cache_repo=cache.parent.parent) == good  # refs/main points at COMMIT
    assert recorded_sha256(REPO, other, cache_repo=cache.parent.parent) == {}
    assert recorded_sha256("org/other", COMMIT) == {}
    register(monkeypatch, good, revision=COMMIT)  # pinned to the commit
    assert recorded_sha256(REPO, COMMIT, "anything") == good
    assert recorded_sha256(REPO, other) == {}
    # hashes for another commit do not apply to this one: the file loads
    register(monkeypatch, {name: "0" * 64 for name in FILES}, revision=other)
    assert resolve_checkpoint("tiny", revision=COMMIT).revision == COMMIT


def test_usage_errors_and_a_folder_named_download(cache, tmp_path, checkpoint_dir, monkeypatch, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["download", "refs/"])
    assert excinfo.value.code == 2 and "./download" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["download", "--model", "nearid,clip-i", "--to", str(tmp_path / "x")])
    assert "one model" in capsys.readouterr().err
    assert main(["download", "--model", f"nearid={checkpoint_dir}"]) == 1
    assert "local folder" in capsys.readouterr().err
    assert main(["download", "--model", "nearid=org/not-cached"]) == 1
    assert "not in the local Hugging Face cache" in capsys.readouterr().err
    # a reference folder named download is scored when written as ./download
    monkeypatch.chdir(tmp_path)
    Path("download").mkdir()
    Path("gen").mkdir()
    random_image(0, (40, 40)).save("download/a.png")
    random_image(1, (40, 40)).save("gen/a.png")
    assert main(["./download", "gen", "--model", str(checkpoint_dir), "--num-workers", "0", "--no-progress"]) == 0
    assert "count: 1" in capsys.readouterr().out


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys

    def no_network(*args, **kwargs):
        raise OSError("network use in an offline test")

    socket.socket.connect = no_network
    socket.create_connection = no_network
    from nearid_metric import create_scorer, hub
    from nearid_metric.cli.score import main

    hub.registry()["tiny"] = json.loads(sys.argv[1])
    code = main(["download", "--model", "nearid=tiny"])
    scorer = create_scorer("nearid", pretrained="tiny", device="cpu")
    print("RESULT " + json.dumps({"code": code, "signature": scorer.signature}))
    """
)


def test_fresh_process_offline_download_and_load(tmp_path, checkpoint_dir):
    """HF_HUB_OFFLINE=1 read at import by a new interpreter: download checks the cache, loading reads only it."""
    cache_root = tmp_path / "hub"
    snapshot = hf_cache_layout(checkpoint_dir, cache_root, REPO, COMMIT)
    entry = {"repo_id": REPO, "revision": "main", "files": list(FILES), "sha256": hashes_of(snapshot)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache_root), HF_HOME=str(tmp_path / "home"),
               HF_HUB_DISABLE_TELEMETRY="1")
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, json.dumps(entry)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["code"] == 0
    assert result["signature"].startswith(f"nearid:{REPO}@{COMMIT}|")
    assert "verified against the registry" in proc.stdout


def test_download_clip_t_fetches_the_tokenizer_files(tmp_path, clip_vocab, monkeypatch, capsys):
    import huggingface_hub.constants as constants
    from test_clip_text import save_clip_with_text

    save_clip_with_text(tmp_path / "clip", 2, clip_vocab)
    root = tmp_path / "hub"
    snapshot = hf_cache_layout(tmp_path / "clip", root, "org/clip", COMMIT)
    for name in ("vocab.json", "merges.txt"):  # the layout helper copies the image checkpoint's files only
        (snapshot / name).write_bytes((tmp_path / "clip" / name).read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["download", "--model", "clip-t=org/clip"]) == 0
    out = capsys.readouterr().out
    for file in ("config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt"):
        assert f"  {file}" in out
    assert model_line(out) == f"clip-t={snapshot}"
