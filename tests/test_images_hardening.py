"""Issue 17, never hang and never a silently wrong number: what reaches the decoder, and how it is decoded.

FIFOs, sockets and devices named like images, symlink loops, directory loops, EXIF orientation of
files and PIL images alike, 16-bit and float images, alpha compositing, the decompression-bomb
limit, preprocessor configs and non-finite embeddings.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_image, reference_pixels, sample_pictures, write_checkpoint
from PIL import Image

import nearid_metric
from nearid_metric.cli.score import main

SRC = str(Path(nearid_metric.__file__).resolve().parents[1])


def run_cli(*args) -> int:
    return main([str(a) for a in args] + ["--num-workers", "0", "--no-progress", "--ci", "none"])


def test_fifo_socket_and_devices_are_refused_without_hanging(tmp_path, checkpoint_dir):
    """A FIFO, a socket, a link to /dev/zero and /dev/null in a manifest: reported, never read."""
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    random_image(1, (40, 40)).save(ref / "r.png")
    random_image(2, (40, 40)).save(gen / "good.png")
    os.mkfifo(gen / "fifo.png")
    (gen / "zero.png").symlink_to("/dev/zero")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(gen / "socket.png"))
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("ref,gen\n" + "".join(f"r.png,{g}\n" for g in
                                              ("good.png", "fifo.png", "zero.png", "socket.png", "/dev/null")))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "nearid_metric.cli", ref, gen, "--pairing", "manifest", "--manifest", manifest,
               "--model", checkpoint_dir, "--out", out, "--num-workers", "0", "--no-progress", "--ci", "none"]
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    try:
        result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=120, env=env)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs_scored"] == 1 and summary["pairs_skipped"] == 4
    assert {Path(f["path"]).name: f["reason"] for f in summary["failures"]} == {
        name: "not a regular file" for name in ("fifo.png", "zero.png", "socket.png", "null")}


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    from nearid_metric.cli.common import run_command

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_command("nearid-score", interrupted) == 130
    assert capsys.readouterr().err == "nearid-score: interrupted\n"


def test_file_symlink_loop_is_an_unreadable_file(tmp_path, checkpoint_dir):
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    for name in ("a", "b", "c"):
        random_image(ord(name), (40, 40)).save(ref / f"{name}.png")
    random_image(5, (40, 40)).save(gen / "c.png")
    (gen / "a.png").symlink_to("b.png")
    (gen / "b.png").symlink_to("a.png")
    out = tmp_path / "out"
    assert run_cli(ref, gen, "--model", checkpoint_dir, "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs_scored"] == 1
    assert {Path(f["path"]).name: f["reason"] for f in summary["failures"]} == {
        "a.png": "symlink loop (too many levels of symbolic links)",
        "b.png": "symlink loop (too many levels of symbolic links)"}


def test_directory_loop_is_walked_once_and_reported(tmp_path, checkpoint_dir, scorer):
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    (gen / "sub").mkdir(parents=True)
    ref.mkdir()
    random_image(6, (40, 40)).save(ref / "r.png")
    for i, name in enumerate(["a.png", "b.png", "sub/c.png"]):
        random_image(10 + i, (40, 40)).save(gen / name)
    (gen / "sub" / "loop").symlink_to("..")
    out = tmp_path / "out"
    assert run_cli(ref, gen, "--pairing", "all", "--model", checkpoint_dir, "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs_total"] == summary["pairs_scored"] == 3
    assert summary["skipped_folders"] == [{"path": str(gen / "sub" / "loop"),
                                           "reason": "directory loop: a link to a folder already searched, "
                                                     "not followed"}]
    expected = scorer.score([ref / "r.png"] * 3, [gen / "a.png", gen / "b.png", gen / "sub/c.png"])
    assert summary["models"]["nearid"]["mean"] == pytest.approx(expected.mean().item(), abs=1e-6)


def test_exif_orientation_is_applied_to_files_and_pil_images_alike(tmp_path, scorer):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    random_image(20, (64, 40)).save(path, exif=exif, quality=95)
    with Image.open(path) as opened:
        from_pil = scorer.embed([opened])
    assert torch.allclose(scorer.embed([path]), from_pil, atol=1e-6)
    with Image.open(path) as opened:  # the same pixels without the tag are another picture
        opened.load()
        plain = Image.frombytes(opened.mode, opened.size, opened.tobytes())
    assert not torch.allclose(scorer.embed([plain]), from_pil, atol=1e-3)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wide_images_are_rescaled_to_8_bits_with_a_warning(tmp_path, scorer, mode, caplog):
    grey = np.asarray(random_image(21, (48, 40)).convert("L"))
    wide = {"I;16": Image.fromarray(grey.astype(np.uint16) * 257),
            "I": Image.fromarray(grey.astype(np.int32) * 257, mode="I"),
            "F": Image.fromarray(grey.astype(np.float32) / 255, mode="F")}[mode]
    path = tmp_path / f"wide.{'png' if mode == 'I;16' else 'tif'}"
    wide.save(path)
    with caplog.at_level(logging.WARNING, logger="nearid_metric"):
        emb = scorer.embed([path])
    assert torch.allclose(emb, scorer.embed([Image.fromarray(grey)]), atol=1e-6)
    assert any(str(path) in r.getMessage() and "8 bits" in r.getMessage() for r in caplog.records)


def test_only_images_with_alpha_are_composited_and_pixels_match_the_reference(monkeypatch):
    from nearid_metric.preprocess import PreprocessConfig, resize_to_uint8

    config = {"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 3, "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": False, "image_mean": 0.5, "image_std": 0.5}
    pictures = sample_pictures()
    palette = random_image(22, (30, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    pictures += [palette, random_image(23, (30, 30), "RGBA").convert("LA")]
    expected = reference_pixels(pictures, config)
    composited = []
    real = Image.alpha_composite
    monkeypatch.setattr(Image, "alpha_composite", lambda a, b: composited.append(b.size) or real(a, b))
    ours = torch.stack([resize_to_uint8(p, PreprocessConfig.from_dict(config)) for p in pictures]).float() / 255
    assert torch.equal(ours, expected)
    assert len(composited) == 3  # RGBA, P with transparency, LA: not RGB, L, P, CMYK


def test_max_pixels_lowers_and_raises_the_bomb_limit(tmp_path, checkpoint_dir):
    from test_cli import png_bomb

    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    random_image(24, (40, 40)).save(ref / "a.png")
    random_image(25, (40, 40)).save(gen / "a.png")
    random_image(26, (40, 40)).save(ref / "big.png")
    png_bomb(gen / "big.png", 12000, 12000)  # 144 M pixels: above PIL's default limit
    reasons = {}
    for flag in ([], ["--max-pixels", "1000"], ["--max-pixels", "200000000"]):
        out = tmp_path / f"out{len(reasons)}"
        run_cli(ref, gen, "--model", checkpoint_dir, "--out", out, *flag)
        summary = json.loads((out / "summary.json").read_text())
        reasons[tuple(flag)] = sorted((Path(f["path"]).parent.name, f["reason"].split(" (")[0])
                                      for f in summary["failures"])
    bomb = "refused as a possible decompression bomb"
    assert reasons[()] == [("gen", bomb)]
    assert reasons[("--max-pixels", "1000")] == [("gen", bomb), ("gen", bomb), ("ref", bomb), ("ref", bomb)]
    assert reasons[("--max-pixels", "200000000")] == [("gen", "cannot decode")]  # let through: a bogus PNG


@pytest.mark.parametrize("field, value", [("size", {"height": 0, "width": 32}), ("size", {"height": -3, "width": 32}),
                                          ("size", {"height": 10 ** 6, "width": 32}), ("resample", 9),
                                          ("image_mean", "0.5"), ("image_std", [0.5, 0, 0.5])])
def test_bad_preprocessor_config_is_refused_naming_file_and_field(tmp_path, field, value):
    from conftest import preprocessor_dict

    from nearid_metric.preprocess import PreprocessConfig

    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({**preprocessor_dict(32), field: value}))
    with pytest.raises(ValueError) as info:
        PreprocessConfig.from_file(path)
    assert str(path) in str(info.value) and field in str(info.value)


def test_nan_weights_are_refused_not_scored(tmp_path, reference_model, capsys):
    import copy

    broken = copy.deepcopy(reference_model)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    folder = write_checkpoint(broken, tmp_path / "nan-ckpt")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    random_image(27, (40, 40)).save(a)
    random_image(28, (40, 40)).save(b)
    assert run_cli(a, b, "--model", folder) == 2
    err = capsys.readouterr().err
    assert "non-finite embeddings" in err and "Traceback" not in err
