"""Issue 17, errors a user can act on: each mistake is one line on stderr and exit 2, with no traceback and
before any work; plus the small pairing, logging and wording fixes."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
from conftest import random_image

from nearid_metric.cli.score import main


def run_cli(*args) -> int:
    return main([str(a) for a in args] + ["--num-workers", "0", "--no-progress", "--ci", "none"])


def exit_code(*args) -> int:
    """The exit code, whether the command returns it or argparse raises SystemExit."""
    try:
        return run_cli(*args)
    except SystemExit as e:
        return e.code


def error_line(err: str) -> str:
    """The one error line (argparse prints its usage lines first); asserts there is no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture()
def pair(tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    random_image(1, (40, 40)).save(a)
    random_image(2, (40, 40)).save(b)
    return a, b


def test_unknown_scorer_lists_the_names_and_the_closest_match(pair, capsys):
    assert exit_code(*pair, "--model", "dino") == 2
    line = error_line(capsys.readouterr().err)
    assert "unknown scorer 'dino'" in line and "did you mean 'dinov2'" in line and "clip-i" in line


def test_missing_weights_folder_is_one_line(pair, tmp_path, capsys):
    assert exit_code(*pair, "--model", tmp_path / "no-such-checkpoint") == 2
    assert "no such checkpoint folder" in error_line(capsys.readouterr().err)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    assert exit_code(*pair, "--model", partial) == 2
    assert "lacks model.safetensors" in error_line(capsys.readouterr().err)


def test_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch, checkpoint_dir):
    """`ckpt/nearid-tny` (ckpt/ exists here) is a path, never a repo id: no download is even tried."""
    import huggingface_hub

    from nearid_metric.hub import resolve_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append(a) or 1 / 0)
    for name in ("ckpt/nearid-tny", "./nearid-tny", "~/no-such-nearid-checkpoint", "/no/such/folder"):
        with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
            resolve_checkpoint(name)
    assert calls == []


def test_device_without_cuda_is_one_line(pair, checkpoint_dir, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert exit_code(*pair, "--model", checkpoint_dir, "--device", "cuda") == 2
    assert "CUDA is not available" in error_line(capsys.readouterr().err)
    assert exit_code(*pair, "--model", checkpoint_dir, "--device", "gpu0") == 2
    assert "not a torch device" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("broken", ["model.safetensors", "config.json", "preprocessor_config.json"])
def test_broken_checkpoint_file_is_named(pair, checkpoint_dir, tmp_path, broken, capsys):
    folder = tmp_path / "broken"
    shutil.copytree(checkpoint_dir, folder)
    (folder / broken).write_bytes(b"\x00garbage{")
    assert exit_code(*pair, "--model", folder) == 2
    assert str(folder / broken) in error_line(capsys.readouterr().err)


def test_negative_num_workers_is_a_usage_error(pair, checkpoint_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main([*map(str, pair), "--model", str(checkpoint_dir), "--num-workers", "-1"])
    assert info.value.code == 2
    assert "--num-workers: must be at least 0" in error_line(capsys.readouterr().err)


def test_manifest_with_a_bom_is_read_and_latin1_is_one_line(tmp_path, checkpoint_dir, capsys):
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    random_image(3, (40, 40)).save(ref / "r.png")
    random_image(4, (40, 40)).save(gen / "g.png")
    manifest = tmp_path / "pairs.csv"
    manifest.write_bytes(b"\xef\xbb\xbfref,gen,prompt\nr.png,g.png,a dog\n")  # Excel's "CSV UTF-8"
    assert run_cli(ref, gen, "--pairing", "manifest", "--manifest", manifest, "--model", checkpoint_dir) == 0
    assert "count: 1" in capsys.readouterr().out
    manifest.write_bytes("ref,gen,prompt\nr.png,g.png,caf\xe9\n".encode("latin-1"))
    assert exit_code(ref, gen, "--pairing", "manifest", "--manifest", manifest, "--model", checkpoint_dir) == 2
    assert f"{manifest} is not UTF-8" in error_line(capsys.readouterr().err)


def test_out_or_report_that_cannot_be_written_fails_before_any_work(pair, checkpoint_dir, tmp_path, monkeypatch,
                                                                     capsys):
    import nearid_metric.cli.score as score_module

    monkeypatch.setattr(score_module, "run", lambda *a: pytest.fail("scored before checking the outputs"))
    taken = tmp_path / "taken"
    taken.write_text("a file")
    for flags, message in [(["--out", taken], "is an existing file"), (["--out", taken / "sub"], "is a file"),
                           (["--report", tmp_path], "is a folder"), (["--report", taken / "r.html"], "is an existing file")]:
        assert exit_code(*pair, "--model", checkpoint_dir, *flags) == 2
        assert message in error_line(capsys.readouterr().err)


def test_download_offline_does_not_say_to_run_download(monkeypatch, tmp_path, capsys):
    from nearid_metric.cli.download import main as download_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert download_main(["--model", "nearid=org/not-cached"]) == 1
    err = capsys.readouterr().err
    assert "cannot be reached" in err and "HF_HUB_OFFLINE" in err and "download --model" not in err


def test_scoring_offline_says_how_to_fetch_the_weights(pair, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert exit_code(*pair, "--model", "org/not-cached") == 2
    fetching, error = capsys.readouterr().err.splitlines()  # one line before any download, then the error
    assert "fetching org/not-cached" in fetching and "(nearid-score download --model" in error


def test_single_reference_file_pairs_by_name_with_a_folder(tmp_path, checkpoint_dir):
    ref, gen = tmp_path / "dog.png", tmp_path / "gen"
    gen.mkdir()
    random_image(5, (40, 40)).save(ref)
    random_image(6, (40, 40)).save(gen / "dog.jpg")
    random_image(7, (40, 40)).save(gen / "cat.png")
    out = tmp_path / "out"
    assert run_cli(ref, gen, "--model", checkpoint_dir, "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs_scored"] == 1
    assert [Path(p).name for p in summary["unmatched"]["gen"]] == ["cat.png"]


def test_log_lines_are_printed_once_with_a_root_handler(pair, checkpoint_dir, capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # what open_clip's import does
    root.addHandler(handler)
    try:
        assert run_cli(*pair, "--model", checkpoint_dir) == 0
    finally:
        root.removeHandler(handler)
    loaded = [line for line in capsys.readouterr().err.splitlines() if "loaded nearid weights" in line]
    assert len(loaded) == 1


def test_counts_are_singular_for_one(tmp_path, checkpoint_dir, capsys):
    from nearid_metric.report import describe_ci

    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    random_image(8, (40, 40)).save(ref / "a.png")
    random_image(9, (40, 40)).save(gen / "a.png")
    (ref / "notes.txt").write_text("not an image")
    assert run_cli(ref, gen, "--model", checkpoint_dir) == 0
    assert "ignored 1 file without" in capsys.readouterr().err
    info = {"n_units": 1, "unit": "pair", "resamples": 10, "seed": 0}
    assert "over 1 pair," in describe_ci(info)


def test_train_help_shows_the_defaults(capsys):
    from nearid_metric.cli.train import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "(default: 11)" in text and "(default: 0.0001)" in text and "(default: fp16)" in text


@pytest.mark.parametrize("command", ["bench", "dreambench"])
def test_unwritable_out_is_refused_before_any_work(command, tmp_path, capsys):
    """nearid-bench / nearid-dreambench --out under a file: a usage error before any data is read."""
    from nearid_metric.cli import bench, dreambench

    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "results"
    if command == "bench":
        csv_file = tmp_path / "sims.csv"
        csv_file.write_text("not read\n")
        argv, main = ["--from-csv", str(csv_file), "--out", str(out)], bench.main
    else:
        (tmp_path / "ratings").mkdir()
        argv, main = ["--ratings", str(tmp_path / "ratings"), "--scores", str(tmp_path / "ratings"),
                      "--out", str(out)], dreambench.main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a file" in err and "Traceback" not in err
