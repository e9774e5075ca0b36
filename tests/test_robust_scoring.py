"""Issue 17, never crash on one entry: a decoder that kills its worker, ``NearIDMetric.update(on_error=)``, and
a fuzz run of damaged images through ``nearid-score``."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import ImageFile

from nearid_metric import ImageLoadError, NearIDMetric
from nearid_metric.cli.score import main

CRASH_SIZE = (13, 17)  # the picture whose decoding segfaults in the test below


def run_cli(*args) -> int:
    return main([str(a) for a in args] + ["--no-progress", "--ci", "none"])


def read_scores(out: Path) -> dict[tuple[str, str], float]:
    with open(out / "scores.csv", newline="") as f:
        return {(Path(r["ref"]).name, Path(r["gen"]).name): float(r["nearid"]) for r in csv.DictReader(f)}


def test_decoder_crash_in_a_worker_names_the_file_and_scores_the_rest(tmp_path, checkpoint_dir, monkeypatch):
    main_pid = os.getpid()
    real_load = ImageFile.ImageFile.load

    def segfaulting_load(self):
        if self.size == CRASH_SIZE and os.getpid() != main_pid:  # a codec bug, only ever in a child process
            os.kill(os.getpid(), signal.SIGSEGV)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", segfaulting_load)
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    for i in range(12):
        random_image(200 + i, (30, 30)).save(ref / f"{i:02d}.png")
        random_image(300 + i, CRASH_SIZE if i == 5 else (30, 30)).save(gen / f"{i:02d}.png")
    out = tmp_path / "out"
    assert run_cli(ref, gen, "--model", checkpoint_dir, "--out", out, "--num-workers", "2", "--batch-size", "2") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs_scored"] == 11
    assert [(Path(f["path"]).name, f["reason"]) for f in summary["failures"]] == [
        ("05.png", "the image decoder crashed (killed by SIGSEGV)")]
    monkeypatch.undo()
    clean = tmp_path / "clean"
    assert run_cli(ref, gen, "--model", checkpoint_dir, "--out", clean, "--num-workers", "0") == 0
    expected = {pair: score for pair, score in read_scores(clean).items() if pair[1] != "05.png"}
    assert read_scores(out).keys() == expected.keys()
    assert all(abs(read_scores(out)[pair] - score) <= 1e-6 for pair, score in expected.items())


def test_metric_update_skips_failed_inputs_and_scores_the_rest(tmp_path, scorer):
    good = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(good):
        random_image(400 + i, (30, 30)).save(path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")
    metric = NearIDMetric(scorer, ci=None)
    with pytest.raises(ImageLoadError):
        metric.update([good[0], broken], [good[1], good[2]])
    assert metric.compute()["n"] == 0  # on_error="raise" keeps nothing of the batch
    scores = metric.update([good[0], broken, good[1]], [good[1], good[2], good[2]], on_error="skip")
    assert torch.isnan(scores[1]) and not torch.isnan(scores[[0, 2]]).any()
    assert torch.allclose(scores[[0, 2]], scorer.score([good[0], good[1]], [good[1], good[2]]), atol=1e-6)
    assert metric.compute()["n"] == 2
    assert metric.failures == [{"pair": 1, "side": "ref", "input": str(broken), "reason": "empty file (0 bytes)"}]
    with pytest.raises(ValueError, match="on_error"):
        metric.update(good, good, on_error="ignore")


def damaged(data: bytes, rng: np.random.Generator) -> bytes:
    """A truncated copy, or one with a few bytes flipped (a header hit as often as pixel data)."""
    if rng.random() < 0.5:
        return data[: int(rng.integers(0, len(data)))]
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        at = int(rng.integers(0, min(len(out), 64))) if rng.random() < 0.5 else int(rng.integers(0, len(out)))
        out[at] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def test_fuzz_damaged_images_are_all_accounted_for_and_good_pairs_unchanged(tmp_path, checkpoint_dir):
    rng = np.random.default_rng(17)
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    good = []
    for i in range(210):
        name = f"{i:03d}"
        random_image(i, (12, 12)).save(ref / f"{name}.png")
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
        buffer = io.BytesIO()
        random_image(1000 + i, (int(rng.integers(1, 24)), int(rng.integers(1, 24)))).save(buffer, format=fmt)
        if i % 21 == 0:  # 10 good ones among 200 damaged
            good.append(f"{name}.{ext}")
            (gen / f"{name}.{ext}").write_bytes(buffer.getvalue())
        else:
            (gen / f"{name}.{ext}").write_bytes(damaged(buffer.getvalue(), rng))
    out = tmp_path / "out"
    assert run_cli(ref, gen, "--model", checkpoint_dir, "--out", out, "--num-workers", "2") in (0, 1)
    summary = json.loads((out / "summary.json").read_text())
    scored = read_scores(out)
    failed = {Path(f["path"]).name for f in summary["failures"]}
    assert summary["pairs_total"] == 210 and not summary["unmatched"]["ref"] and not summary["unmatched"]["gen"]
    assert {g for _, g in scored} | failed == {p.name for p in gen.iterdir()}  # every file accounted for
    assert not {g for _, g in scored} & failed and summary["pairs_scored"] == len(scored)

    clean_gen = tmp_path / "clean-gen"
    clean_gen.mkdir()
    for name in good:
        (clean_gen / name).write_bytes((gen / name).read_bytes())
    clean = tmp_path / "clean"
    assert run_cli(ref, clean_gen, "--model", checkpoint_dir, "--out", clean, "--num-workers", "0") == 0
    for (r, g), score in read_scores(clean).items():
        assert abs(scored[(r, g)] - score) <= 1e-6
