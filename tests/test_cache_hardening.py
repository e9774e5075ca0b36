"""Issue 17, never lose finished work and never a stale number: the embedding cache and the result files
when the disk is full, a permission is missing, a file changes while it is read, or the clock is coarse."""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import stat
import time
import types
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest
import torch
from conftest import random_image

import nearid_metric.cache as cache_module
from nearid_metric import NearIDScore
from nearid_metric.cache import ArrayStore, content_keys
from nearid_metric.cli.score import main

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def run_cli(*args) -> int:
    return main([str(a) for a in args] + ["--num-workers", "0", "--no-progress", "--ci", "none"])


@pytest.fixture()
def folders(tmp_path) -> tuple[Path, Path]:
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    for i, name in enumerate("abc"):
        random_image(100 + i, (40, 40)).save(ref / f"{name}.png")
        random_image(110 + i, (40, 40)).save(gen / f"{name}.png")
    return ref, gen


def scores_of(out: Path) -> list[str]:
    return (out / "scores.csv").read_text().splitlines()


def test_full_disk_at_the_cache_flush_is_one_warning_and_the_scores_are_written(folders, checkpoint_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    def full(*args, **kwargs):
        raise ENOSPC

    monkeypatch.setattr(cache_module, "save_file", full)
    out = tmp_path / "out"
    assert run_cli(*folders, "--model", checkpoint_dir, "--cache", tmp_path / "cache", "--out", out) == 0
    assert len(scores_of(out)) == 4
    warnings = [line for line in capsys.readouterr().err.splitlines() if "embedding cache" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_cache_that_cannot_be_opened_is_not_used(folders, checkpoint_dir, tmp_path, monkeypatch, capsys):
    def denied(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self.folder / "meta.json"))

    monkeypatch.setattr(ArrayStore, "_check_meta", denied)
    out = tmp_path / "out"
    assert run_cli(*folders, "--model", checkpoint_dir, "--cache", tmp_path / "cache", "--out", out) == 0
    assert len(scores_of(out)) == 4
    assert "cannot be used (" in capsys.readouterr().err


def test_shared_cache_parts_and_folders_follow_the_umask(tmp_path):
    """Parts are not 0600 (safetensors' own mode): with umask 002 a group shares folders, parts and metadata."""
    old = os.umask(0o002)
    try:
        with ArrayStore(tmp_path / "shared", signature="s", shape=(2,)) as store:
            store.put(["a"], [[1.0, 0.0]])
    finally:
        os.umask(old)
    (part,) = store.folder.glob("part-*.safetensors")
    assert stat.S_IMODE(store.folder.stat().st_mode) & 0o070 == 0o070  # group-writable folder
    for path in (part, store.folder / "meta.json"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, oct(mode)  # the group (and others, umask permitting) can read


def test_part_that_cannot_be_read_is_a_warning_naming_it_and_left_in_place(tmp_path, monkeypatch, caplog):
    with ArrayStore(tmp_path, signature="s", shape=(2,)) as store:
        store.put(["a"], [[1.0, 0.0]])
    (part,) = store.folder.glob("part-*.safetensors")
    real = cache_module.safe_open

    def denied(path, *args, **kwargs):
        if Path(path) == part:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "safe_open", denied)
    with caplog.at_level(logging.WARNING, logger="nearid_metric"):
        reopened = ArrayStore(tmp_path, signature="s", shape=(2,))
    assert "a" not in reopened and part.exists()  # another user's part: not renamed aside
    assert any(str(part) in r.getMessage() and "permission denied" in r.getMessage() for r in caplog.records)


def test_damaged_meta_json_is_rewritten_with_a_warning(tmp_path, caplog):
    with ArrayStore(tmp_path, signature="s", shape=(2,)) as store:
        store.put(["a"], [[1.0, 0.0]])
    (store.folder / "meta.json").write_text('{"format": 2, "signa')  # cut short by a full disk
    with caplog.at_level(logging.WARNING, logger="nearid_metric"):
        reopened = ArrayStore(tmp_path, signature="s", shape=(2,))
    assert "a" in reopened  # the parts check themselves
    assert json.loads((store.folder / "meta.json").read_text())["signature"] == "s"
    assert any("meta.json" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)


def test_failed_result_write_leaves_neither_file(tmp_path, monkeypatch):
    import builtins

    import nearid_metric.outputs as outputs

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise ENOSPC

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_on_full_disk(path, *args, **kwargs):
        f = builtins.open(path, *args, **kwargs)
        return FullDisk(f) if "summary.json" in str(path) else f

    monkeypatch.setattr(outputs, "open", open_on_full_disk, raising=False)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        outputs.write_scores(out, [("r.png", "g.png")], {"nearid": [0.5]}, {"pairs_scored": 1})
    assert sorted(p.name for p in out.iterdir()) == []  # no scores.csv without its summary, no temporary files


def test_file_rewritten_between_hash_and_decode_is_cached_under_what_was_decoded(tmp_path, checkpoint_dir,
                                                                                   monkeypatch):
    import nearid_metric.embedding_cache as embedding_cache

    path = tmp_path / "photo.png"
    first, second = random_image(120, (40, 40)), random_image(121, (40, 40))
    first.save(path)
    cache = tmp_path / "cache"
    real = embedding_cache.content_keys

    def rewrite_after_hashing(*args, **kwargs):
        keys = real(*args, **kwargs)
        second.save(path)  # another process rewrites the file between the hash and the decode
        return keys

    scorer = NearIDScore.from_pretrained(checkpoint_dir, device="cpu")
    monkeypatch.setattr(embedding_cache, "content_keys", rewrite_after_hashing)
    scorer.embed([path], cache_dir=cache)
    monkeypatch.undo()
    first.save(path)  # the first picture again: its key must not serve the second picture's embedding
    assert torch.allclose(scorer.embed([path], cache_dir=cache), scorer.embed([path]), atol=1e-6)


def test_racy_clean_guard_uses_the_moment_each_file_was_read(tmp_path, monkeypatch):
    """A file changed just before it was read is not remembered, however long the rest of the hashing takes
    (on a file system with 1-second timestamps a rewrite in that second would not change its stat)."""
    path = tmp_path / "a.png"
    path.write_bytes(b"just written")
    offset = [0]

    class SlowRun(ThreadPoolExecutor):
        def map(self, *args, **kwargs):
            results = list(super().map(*args, **kwargs))
            offset[0] += 10 * 10 ** 9  # hashing the other files of a big run took 10 s more
            return iter(results)

    monkeypatch.setattr(cache_module, "ThreadPoolExecutor", SlowRun)
    monkeypatch.setattr(cache_module, "time", types.SimpleNamespace(time_ns=lambda: time.time_ns() + offset[0]))
    memo = tmp_path / "memo.sqlite"
    content_keys([path], num_threads=1, memo=memo)
    with closing(sqlite3.connect(memo)) as db:
        assert db.execute("SELECT COUNT(*) FROM hashes").fetchone() == (0,)
