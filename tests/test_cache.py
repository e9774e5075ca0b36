"""The on-disk array store (nearid_metric.cache): keys, parts, signatures, damage and resumption."""

import hashlib
import json
import logging
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from nearid_metric.cache import FORMAT, ArrayStore, content_key, content_keys
from nearid_metric.images import EncodedImage, ImageLoadError


def _rows(n, shape=(3, 4), seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def test_content_key_is_sha256_of_the_bytes(tmp_path):
    data = b"\x89PNG not really an image"
    (tmp_path / "a.png").write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert content_key(tmp_path / "a.png") == expected
    assert content_key(str(tmp_path / "a.png")) == expected
    assert content_key(EncodedImage("table/row 3", data)) == expected
    (tmp_path / "b.png").write_bytes(data + b"!")
    assert content_key(tmp_path / "b.png") != expected


def test_content_keys_report_unreadable_files_and_keep_the_rest(tmp_path):
    (tmp_path / "a.png").write_bytes(b"a")
    (tmp_path / "dir.png").mkdir()
    keys, failures = content_keys([tmp_path / "a.png", tmp_path / "missing.png", tmp_path / "dir.png"], num_threads=2)
    assert keys == [hashlib.sha256(b"a").hexdigest(), None, None]
    assert failures == {1: "file not found", 2: "is a directory"}
    with pytest.raises(ImageLoadError, match="missing.png: file not found"):
        content_key(tmp_path / "missing.png")


def test_put_get_round_trip_across_parts_and_reopen(tmp_path):
    values = _rows(10)
    keys = [f"k{i}" for i in range(10)]
    with ArrayStore(tmp_path, signature="model-a", shape=(3, 4), part_rows=4) as store:
        store.put(keys[:7], values[:7])  # one part of 7 rows is written at once (>= part_rows)
        store.put(keys[7:], torch.from_numpy(values[7:]))  # buffered
        assert len(store) == 10 and "k9" in store
        np.testing.assert_array_equal(store.get(["k9", "k0", "k5"]), values[[9, 0, 5]])
    assert len(list(store.folder.glob("part-*.safetensors"))) == 2
    reopened = ArrayStore(tmp_path, signature="model-a", shape=(3, 4))
    order = [3, 8, 0, 9, 1]
    np.testing.assert_array_equal(reopened.get([keys[i] for i in order]), values[order])
    with pytest.raises(KeyError, match="nope"):
        reopened.get(["k1", "nope"])
    assert reopened._maps and all(isinstance(m, np.memmap) for m in reopened._maps.values())  # rows read lazily


def test_a_part_is_one_safetensors_file(tmp_path):
    """Documented format: tensor "rows" [n, *shape]; metadata format, keys (JSON), sha256 of the tensor bytes."""
    values = _rows(3).astype(np.float16)
    with ArrayStore(tmp_path, signature="s", shape=(3, 4), dtype="float16") as store:
        store.put(["x", "y", "z"], values)
    (part,) = store.folder.glob("part-*")
    assert part.suffix == ".safetensors" and sorted(p.name for p in store.folder.iterdir()) == ["meta.json", part.name]
    tensors = load_file(part)
    assert list(tensors) == ["rows"] and tensors["rows"].dtype == np.float16
    np.testing.assert_array_equal(tensors["rows"], values)
    with safe_open(part, framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == str(FORMAT) and json.loads(meta["keys"]) == ["x", "y", "z"]
    assert meta["sha256"] == hashlib.sha256(values.tobytes()).hexdigest()
    assert json.loads((store.folder / "meta.json").read_text())["format"] == FORMAT


def test_a_folder_in_the_old_format_is_a_clear_error(tmp_path):
    store = ArrayStore(tmp_path, signature="s", shape=(2,))
    meta = json.loads((store.folder / "meta.json").read_text())
    (store.folder / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    (store.folder / "part-1-abc-00000.npy").write_bytes(b"old")
    with pytest.raises(ValueError, match=r"format 1 .*reads format 2\. Delete the folder"):
        ArrayStore(tmp_path, signature="s", shape=(2,))


def test_existing_keys_are_not_overwritten(tmp_path):
    store = ArrayStore(tmp_path, signature="s", shape=(2,))
    store.put(["a"], np.array([[1.0, 2.0]]))
    store.put(["a", "b"], np.array([[9.0, 9.0], [3.0, 4.0]]))
    store.close()
    again = ArrayStore(tmp_path, signature="s", shape=(2,))
    np.testing.assert_array_equal(again.get(["a", "b"]), [[1.0, 2.0], [3.0, 4.0]])
    assert len(again) == 2


def test_signatures_never_share_entries(tmp_path):
    with ArrayStore(tmp_path, signature="nearid|fp32", shape=(2,)) as store:
        store.put(["img"], np.ones((1, 2)))
    other = ArrayStore(tmp_path, signature="nearid|bf16", shape=(2,))
    assert "img" not in other and len(other) == 0
    assert "img" in ArrayStore(tmp_path, signature="nearid|fp32", shape=(2,))


def test_metadata_mismatch_is_a_clear_error(tmp_path):
    ArrayStore(tmp_path, signature="s", shape=(2,), dtype="float16").close()
    with pytest.raises(ValueError, match="does not match"):
        ArrayStore(tmp_path, signature="s", shape=(3,), dtype="float16")
    with pytest.raises(ValueError, match="does not match"):
        ArrayStore(tmp_path, signature="s", shape=(2,), dtype="float32")


def test_dtype_is_the_stores(tmp_path):
    store = ArrayStore(tmp_path, signature="s", shape=(2,), dtype="float16")
    store.put(["a"], torch.tensor([[1.0 / 3, 2.0]], dtype=torch.bfloat16))
    store.close()
    got = ArrayStore(tmp_path, signature="s", shape=(2,), dtype="float16").get(["a"])
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, np.array([[torch.tensor(1.0 / 3, dtype=torch.bfloat16).item(), 2.0]],
                                                np.float16))


def test_put_checks_the_shape(tmp_path):
    store = ArrayStore(tmp_path, signature="s", shape=(2,))
    with pytest.raises(ValueError, match=r"values of shape \(2, 3\) for 2 keys"):
        store.put(["a", "b"], np.zeros((2, 3)))


def test_damaged_part_is_reported_moved_aside_and_its_keys_recomputed(tmp_path, caplog):
    with ArrayStore(tmp_path, signature="s", shape=(3, 4), part_rows=3) as store:
        store.put(["a", "b", "c"], _rows(3))
        store.put(["d", "e", "f"], _rows(3, seed=1))
    parts = sorted(store.folder.glob("part-*.safetensors"))
    damaged = parts[0]
    with safe_open(damaged, framework="numpy") as f:
        damaged_keys = set(json.loads(f.metadata()["keys"]))
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte in the last stored value
    damaged.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="nearid_metric.cache"):
        store = ArrayStore(tmp_path, signature="s", shape=(3, 4))
    assert damaged.name in caplog.text and "checksum mismatch" in caplog.text
    assert not damaged.exists() and damaged.with_name(damaged.name + ".corrupt").exists()
    assert {k for k in "abcdef" if k not in store} == damaged_keys
    # recomputed entries are stored again and found after reopening
    store.put(sorted(damaged_keys), _rows(3))
    store.close()
    assert all(k in ArrayStore(tmp_path, signature="s", shape=(3, 4)) for k in "abcdef")


def test_truncated_part_is_detected_without_checksums(tmp_path, caplog):
    with ArrayStore(tmp_path, signature="s", shape=(3, 4)) as store:
        store.put(["a", "b"], _rows(2))
    (part,) = store.folder.glob("part-*.safetensors")
    part.write_bytes(part.read_bytes()[:-20])
    with caplog.at_level(logging.WARNING, logger="nearid_metric.cache"):
        store = ArrayStore(tmp_path, signature="s", shape=(3, 4), verify=False)
    assert "damaged" in caplog.text and "a" not in store


def test_damaged_key_list_is_detected(tmp_path, caplog):
    """A header edit that keeps it valid (another key for a row) fails the key checksum, not only the data's."""
    with ArrayStore(tmp_path, signature="s", shape=(2,)) as store:
        store.put(["aa", "bb"], np.ones((2, 2)))
    (part,) = store.folder.glob("part-*.safetensors")
    raw = part.read_bytes()
    assert raw.count(b'\\"bb\\"') == 1
    part.write_bytes(raw.replace(b'\\"bb\\"', b'\\"cc\\"'))
    with caplog.at_level(logging.WARNING, logger="nearid_metric.cache"):
        store = ArrayStore(tmp_path, signature="s", shape=(2,))
    assert "checksum mismatch (keys)" in caplog.text and len(store) == 0 and "cc" not in store


def test_unfinished_part_is_ignored(tmp_path, caplog):
    """A run killed while writing a part leaves only a temporary file, which is not read."""
    with ArrayStore(tmp_path, signature="s", shape=(2,)) as store:
        store.put(["a"], np.ones((1, 2)))
    (part,) = store.folder.glob("part-*.safetensors")
    unfinished = part.with_name(part.name + ".0123abcd.tmp")
    unfinished.write_bytes(part.read_bytes()[:-4])
    part.unlink()
    with caplog.at_level(logging.WARNING, logger="nearid_metric.cache"):
        assert len(ArrayStore(tmp_path, signature="s", shape=(2,))) == 0
    assert unfinished.exists() and not caplog.text


def test_two_writers_share_a_store(tmp_path):
    first = ArrayStore(tmp_path, signature="s", shape=(2,))
    second = ArrayStore(tmp_path, signature="s", shape=(2,))
    first.put(["a"], np.full((1, 2), 1.0))
    second.put(["b"], np.full((1, 2), 2.0))
    first.flush()
    second.flush()
    assert "b" not in first
    first.refresh()
    np.testing.assert_array_equal(first.get(["a", "b"]), [[1.0, 1.0], [2.0, 2.0]])
    assert len(list(first.folder.glob("part-*.safetensors"))) == 2


def test_store_survives_pickling_for_loader_workers(tmp_path):
    import pickle

    with ArrayStore(tmp_path, signature="s", shape=(2,)) as store:
        store.put(["a"], np.full((1, 2), 5.0))
    store.get(["a"])  # opens a memory map
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.get(["a"]), [[5.0, 5.0]])


# --- remembered file hashes (FileHashMemo) ------------------------------------------------------------------


def _count_hashing(monkeypatch) -> list:
    import nearid_metric.cache as cache_module

    read, real = [], cache_module.read_image_file
    monkeypatch.setattr(cache_module, "read_image_file", lambda path: read.append(path) or real(path))
    return read


def _age(path, seconds=3600):
    """Set a file's modification time back (its status-change time stays: only a write moves it)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def test_memo_skips_unchanged_files_and_rehashes_changed_ones(tmp_path, monkeypatch):
    import nearid_metric.cache as cache_module

    monkeypatch.setattr(cache_module, "RACY_SECONDS", 0.0)  # remember even just-written files
    files = [tmp_path / f"{i}.png" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 100)
    memo = tmp_path / "memo" / "hashes.sqlite"
    read = _count_hashing(monkeypatch)
    keys, _ = content_keys(files + [tmp_path / "missing.png"], memo=memo)
    assert keys == [hashlib.sha256(bytes([i]) * 100).hexdigest() for i in range(3)] + [None]
    assert sorted(p.name for p in read) == ["0.png", "1.png", "2.png", "missing.png"] and memo.exists()

    read.clear()
    again, failures = content_keys(files + [tmp_path / "missing.png"], memo=memo)
    assert again == keys and [p.name for p in read] == ["missing.png"] and failures == {3: "file not found"}
    read.clear()

    files[1].write_bytes(b"\x07" * 100)  # same size, new content, then an old modification time
    _age(files[1])
    changed, _ = content_keys(files, memo=memo)
    assert changed[1] == hashlib.sha256(b"\x07" * 100).hexdigest() and changed[0::2] == keys[0::2]
    assert [p.name for p in read] == ["1.png"]
    # a file moved into the place of a remembered one is another inode: hashed, not trusted
    (tmp_path / "other").write_bytes(bytes([0]) * 99 + b"\x01")
    os.replace(tmp_path / "other", files[0])
    read.clear()
    assert content_keys(files, memo=memo)[0][0] == hashlib.sha256(bytes([0]) * 99 + b"\x01").hexdigest()
    assert [p.name for p in read] == ["0.png"]


def test_memo_does_not_remember_files_changed_just_now(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"a")
    memo = tmp_path / "hashes.sqlite"
    read = _count_hashing(monkeypatch)
    content_keys([tmp_path / "a.png"], memo=memo)
    content_keys([tmp_path / "a.png"], memo=memo)
    assert len(read) == 2  # written within RACY_SECONDS of hashing: a same-tick rewrite could hide


def test_damaged_memo_is_reported_and_ignored(tmp_path, monkeypatch, caplog):
    import nearid_metric.cache as cache_module

    monkeypatch.setattr(cache_module, "RACY_SECONDS", 0.0)
    (tmp_path / "a.png").write_bytes(b"a")
    memo = tmp_path / "hashes.sqlite"
    memo.write_bytes(b"this is not an SQLite database" * 10)
    with caplog.at_level(logging.WARNING, logger="nearid_metric.cache"):
        keys, failures = content_keys([tmp_path / "a.png"], memo=memo)
    assert keys == [hashlib.sha256(b"a").hexdigest()] and failures == {}
    assert "file hash memo" in caplog.text
