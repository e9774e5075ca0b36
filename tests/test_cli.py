"""`nearid-score` end to end on temp folders with good and bad files (tiny random checkpoint)."""

from __future__ import annotations

import csv
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from conftest import random_image

from nearid_metric.cli.score import main


def png_bomb(path: Path, width: int = 20000, height: int = 20000) -> None:
    """A tiny file whose PNG header claims width x height pixels (PIL refuses it as a bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def truncated_png(path: Path, seed: int) -> None:
    buffer = io.BytesIO()
    random_image(seed, (64, 48)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.fixture()
def folders(tmp_path):
    """ref/ and gen/ with 2 good pairs, 5 pairs with a bad generated file, unmatched files on each side."""
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    (ref / "sub").mkdir(parents=True)
    (gen / "sub").mkdir(parents=True)
    for i, name in enumerate(["a", "b", "c", "sub/d", "e", "f", "g", "only_ref"]):
        random_image(i, (80 + i, 60 + 2 * i)).save(ref / f"{name}.png")
    (ref / "notes.txt").write_text("not an image")
    random_image(10, (90, 70)).save(gen / "a.jpg", quality=95)
    random_image(13, (50, 50)).save(gen / "sub" / "d.png")
    random_image(14, (50, 50)).save(gen / "only_gen.png")
    (gen / "b.png").write_bytes(b"")  # zero bytes
    truncated_png(gen / "c.png", seed=11)  # truncated
    (gen / "e.png").write_text("this is text, not a picture")  # non-image content
    (gen / "f.png").symlink_to(tmp_path / "does-not-exist.png")  # unreadable path
    png_bomb(gen / "g.png")  # decompression bomb
    return ref, gen


def run_cli(*args) -> int:
    return main([str(a) for a in args] + ["--num-workers", "0", "--no-progress"])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_name_pairing_scores_good_pairs_and_names_every_bad_file(folders, checkpoint_dir, scorer, tmp_path, capsys):
    ref, gen = folders
    out = tmp_path / "out"
    assert run_cli(ref, gen, "--model", checkpoint_dir, "--out", out) == 0
    captured = capsys.readouterr()

    rows = read_csv(out / "scores.csv")
    assert [(Path(r["ref"]).relative_to(ref).as_posix(), Path(r["gen"]).relative_to(gen).as_posix()) for r in rows] \
        == [("a.png", "a.jpg"), ("sub/d.png", "sub/d.png")]
    expected = scorer.score([ref / "a.png", ref / "sub/d.png"], [gen / "a.jpg", gen / "sub/d.png"])
    assert list(rows[0]) == ["ref", "gen", "nearid"]
    assert torch.allclose(torch.tensor([float(r["nearid"]) for r in rows]), expected, atol=1e-6)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs_scored"] == 2 and summary["pairs_total"] == 7 and summary["pairs_skipped"] == 5
    model = summary["models"]["nearid"]
    assert model["count"] == 2
    assert model["mean"] == pytest.approx(expected.mean().item(), abs=1e-6)
    assert model["std"] == pytest.approx(expected.std().item(), abs=1e-6)  # sample std (ddof=1)
    assert model["signature"] == scorer.signature
    reasons = {Path(f["path"]).name: f["reason"] for f in summary["failures"]}
    assert set(reasons) == {"b.png", "c.png", "e.png", "f.png", "g.png"}
    assert "empty file" in reasons["b.png"]
    assert "truncated" in reasons["c.png"]
    assert "not an image" in reasons["e.png"]
    assert "not found" in reasons["f.png"]
    assert "decompression bomb" in reasons["g.png"]
    assert [Path(p).name for p in summary["unmatched"]["ref"]] == ["only_ref.png"]
    assert [Path(p).name for p in summary["unmatched"]["gen"]] == ["only_gen.png"]
    assert [Path(p).name for p in summary["ignored_files"]] == ["notes.txt"]

    for name in ["b.png", "c.png", "e.png", "f.png", "g.png", "only_ref.png", "only_gen.png"]:
        assert name in captured.err, name  # one line per problem on stderr
    assert "count: 2" in captured.out
    assert f"nearid: mean {expected.mean().item():.6f}" in captured.out


def test_strict_fails_on_any_problem(folders, checkpoint_dir):
    ref, gen = folders
    assert run_cli(ref, gen, "--model", checkpoint_dir, "--strict") == 1


def test_nothing_scorable_exits_nonzero(tmp_path, checkpoint_dir, capsys):
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    random_image(0, (40, 40)).save(ref / "x.png")
    (gen / "x.png").write_bytes(b"")
    assert run_cli(ref, gen, "--model", checkpoint_dir) == 1
    assert "nothing scored" in capsys.readouterr().out


def test_all_pairing_equals_score_matrix(tmp_path, checkpoint_dir, scorer):
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    refs = [ref / f"subject{i}.png" for i in range(2)]
    gens = [gen / f"sample{j}.jpg" for j in range(3)]
    for i, p in enumerate(refs + gens):
        random_image(20 + i, (64, 64)).save(p)
    out = tmp_path / "out"
    assert run_cli(ref, gen, "--pairing", "all", "--model", checkpoint_dir, "--out", out) == 0
    rows = read_csv(out / "scores.csv")
    matrix = scorer.score_matrix(refs, gens)
    assert len(rows) == 6
    for r in rows:
        i, j = refs.index(Path(r["ref"])), gens.index(Path(r["gen"]))
        assert float(r["nearid"]) == pytest.approx(matrix[i, j].item(), abs=1e-6)


def test_manifest_pairing(tmp_path, checkpoint_dir, scorer, capsys):
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    random_image(30, (64, 64)).save(ref / "dog.png")
    random_image(31, (64, 64)).save(gen / "dog_seed0.png")
    random_image(32, (64, 64)).save(gen / "dog_seed1.png")
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("ref,gen,prompt\ndog.png,dog_seed0.png,a dog\ndog.png,dog_seed1.png,a dog\n")
    out = tmp_path / "out"
    assert run_cli(ref, gen, "--pairing", "manifest", "--manifest", manifest, "--model", checkpoint_dir,
                   "--out", out) == 0
    rows = read_csv(out / "scores.csv")
    expected = scorer.score([ref / "dog.png"] * 2, [gen / "dog_seed0.png", gen / "dog_seed1.png"])
    assert torch.allclose(torch.tensor([float(r["nearid"]) for r in rows]), expected, atol=1e-6)

    manifest.write_text("reference,generation\ndog.png,dog_seed0.png\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(ref, gen, "--pairing", "manifest", "--manifest", manifest, "--model", checkpoint_dir)
    assert exit_info.value.code == 2
    assert "needs columns 'ref' and 'gen'" in capsys.readouterr().err


def test_ambiguous_names_are_reported_not_guessed(tmp_path, checkpoint_dir, capsys):
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    random_image(40, (64, 64)).save(ref / "cat.png")
    random_image(41, (64, 64)).save(ref / "cat.jpg")
    random_image(42, (64, 64)).save(gen / "cat.png")
    random_image(43, (64, 64)).save(ref / "owl.png")
    random_image(44, (64, 64)).save(gen / "owl.webp")
    out = tmp_path / "out"
    assert run_cli(ref, gen, "--model", checkpoint_dir, "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs_scored"] == 1
    assert len(summary["ambiguous"]) == 1 and "cat" in summary["ambiguous"][0]
    assert summary["unmatched"] == {"ref": [], "gen": []}  # gen/cat.png's partner is ambiguous: reported once
    err = capsys.readouterr().err
    assert "ambiguous" in err and "unmatched" not in err


def test_two_single_files_are_one_pair(tmp_path, checkpoint_dir, scorer, capsys):
    a, b = tmp_path / "reference.png", tmp_path / "generated.jpg"
    random_image(50, (64, 64)).save(a)
    random_image(51, (64, 64)).save(b)
    assert run_cli(a, b, "--model", checkpoint_dir) == 0
    assert f"nearid: mean {scorer.score([a], [b]).item():.6f}" in capsys.readouterr().out


def test_missing_input_is_a_usage_error(tmp_path, checkpoint_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tmp_path / "nope", tmp_path, "--model", checkpoint_dir)
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_with_worker_processes(folders, checkpoint_dir, tmp_path):
    """The installed `nearid-score` command, decoding in 2 worker processes, matches the in-process run."""
    ref, gen = folders
    out_workers, out_inline = tmp_path / "workers", tmp_path / "inline"
    command = [Path(sys.executable).with_name("nearid-score"), ref, gen, "--model", checkpoint_dir]
    result = subprocess.run([str(c) for c in command] + ["--num-workers", "2", "--out", str(out_workers)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "count: 2" in result.stdout
    assert run_cli(ref, gen, "--model", checkpoint_dir, "--out", out_inline) == 0
    assert read_csv(out_workers / "scores.csv") == read_csv(out_inline / "scores.csv")
    failures = json.loads((out_workers / "summary.json").read_text())["failures"]
    assert len(failures) == 5


def test_several_models_in_one_pass(folders, checkpoint_dir, clip_folder, dino_folder, tmp_path, monkeypatch, capsys):
    """--model a,b,c decodes each file once and writes the same scores as one run per model."""
    import nearid_metric.loading as loading_module

    ref, gen = folders
    models = {"nearid": checkpoint_dir, "clip-i": clip_folder, "dinov2-518": dino_folder}
    separate = {}
    for name, folder in models.items():
        assert run_cli(ref, gen, "--model", f"{name}={folder}", "--out", tmp_path / name) == 0
        separate[name] = read_csv(tmp_path / name / "scores.csv")

    opened = []
    real = loading_module.read_and_decode
    monkeypatch.setattr(loading_module, "read_and_decode", lambda p: opened.append(str(p)) or real(p))
    spec = ",".join(f"{name}={folder}" for name, folder in models.items())
    assert run_cli(ref, gen, "--model", spec, "--out", tmp_path / "all") == 0
    rows = read_csv(tmp_path / "all" / "scores.csv")
    assert list(rows[0]) == ["ref", "gen", "nearid", "clip-i", "dinov2-518"]
    assert len(opened) == len(set(opened)) == 7 + 7  # every paired file (both sides), once
    for name in models:
        assert [(r["ref"], r["gen"], r[name]) for r in rows] == [(r["ref"], r["gen"], r[name]) for r in separate[name]]
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert list(summary["models"]) == list(models)
    assert summary["models"]["clip-i"]["signature"].startswith("clip-i:local:")
    assert "dinov2-518: mean" in capsys.readouterr().out


def test_model_spec_errors(folders, checkpoint_dir, capsys):
    ref, gen = folders
    for spec, message in [("clip=x", "unknown scorer 'clip'"), (f"nearid={checkpoint_dir},nearid={checkpoint_dir}",
                                                                "twice"), (" , ", "empty")]:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(ref, gen, "--model", spec)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(ref, gen, "--model", f"nearid={checkpoint_dir},dinov2", "--revision", "main")
    assert "--revision applies to one model" in capsys.readouterr().err


def test_two_nearid_checkpoints_get_distinct_columns(tmp_path, checkpoint_dir, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    random_image(60, (64, 64)).save(a)
    random_image(61, (64, 64)).save(b)
    out = tmp_path / "out"
    assert run_cli(a, b, "--model", f"{checkpoint_dir},nearid={checkpoint_dir}", "--out", out) == 0
    rows = read_csv(out / "scores.csv")
    assert list(rows[0])[2:] == [str(checkpoint_dir), f"nearid={checkpoint_dir}"]
    assert rows[0][str(checkpoint_dir)] == rows[0][f"nearid={checkpoint_dir}"]


def test_parse_models_columns_names_and_weights():
    """Bare scorer names load their default weights (None), NAME=WEIGHTS pins them, other items are NearID weights."""
    from nearid_metric.cli.common import parse_models

    assert parse_models("nearid") == [("nearid", "nearid", None)]
    assert parse_models(" clip-i , dinov2,siglip2-mean ") == [("clip-i", "clip-i", None), ("dinov2", "dinov2", None),
                                                              ("siglip2-mean", "siglip2-mean", None)]
    assert parse_models("clip-i=/w/clip,org/nearid-v2") == [("clip-i", "clip-i", "/w/clip"),
                                                            ("nearid", "nearid", "org/nearid-v2")]
    # one scorer twice: the columns are the items as written
    assert parse_models("nearid,nearid=/w/other") == [("nearid", "nearid", None),
                                                       ("nearid=/w/other", "nearid", "/w/other")]
    assert parse_models("siglip2-map=a,siglip2-map=b") == [("siglip2-map=a", "siglip2-map", "a"),
                                                           ("siglip2-map=b", "siglip2-map", "b")]


def test_parse_models_text_scorers_only_where_prompts_are_read():
    """clip-t scores a generation against its prompt: nearid-score takes it, the image-pair commands (text=False) refuse it."""
    from nearid_metric.cli.common import parse_models

    assert parse_models("nearid,clip-t") == [("nearid", "nearid", None), ("clip-t", "clip-t", None)]
    with pytest.raises(ValueError, match="clip-t scores a generation against its prompt"):
        parse_models("nearid,clip-t", text=False)
    assert parse_models("nearid,clip-i", text=False) == [("nearid", "nearid", None), ("clip-i", "clip-i", None)]


def test_clip_i_reuses_the_clip_t_tower_only_on_the_same_weights(monkeypatch, tmp_path):
    """clip-i beside clip-t is clip-t's image tower when both name the same weights, its own scorer otherwise."""
    from types import SimpleNamespace

    import nearid_metric.cli.common as common_module
    import nearid_metric.cli.score as cli
    import nearid_metric.text as text_module

    built = []

    def image_scorer(name, **kwargs):
        built.append((name, kwargs["pretrained"]))
        return SimpleNamespace(name=name, weights=kwargs["pretrained"])

    def text_scorer(name, **kwargs):
        built.append((name, kwargs["pretrained"]))
        return SimpleNamespace(name=name, weights=kwargs["pretrained"],
                               image_scorer=SimpleNamespace(name="clip-i", weights=kwargs["pretrained"]))

    monkeypatch.setattr(common_module, "create_scorer", image_scorer)
    monkeypatch.setattr(text_module, "create_text_scorer", text_scorer)
    parser = cli.build_parser()

    def load(spec):
        built.clear()
        args = parser.parse_args([str(tmp_path), str(tmp_path), "--model", spec, "--device", "cpu"])
        return cli.load_scorers(args, parser, text=True)

    same = load("clip-i=/w/a,clip-t=/w/a")
    assert same["clip-i"] is same["clip-t"].image_scorer and built == [("clip-t", "/w/a")]
    other = load("clip-i=/w/a,clip-t=/w/b")
    assert other["clip-i"].weights == "/w/a" and other["clip-t"].weights == "/w/b"
    assert sorted(built) == [("clip-i", "/w/a"), ("clip-t", "/w/b")]


def test_bare_model_names_build_default_weights(monkeypatch, tmp_path):
    """--model clip-i,dinov2 asks create_scorer for each scorer's default weights (pretrained=None)."""
    import nearid_metric.cli.common as common_module
    import nearid_metric.cli.score as cli

    calls = []
    monkeypatch.setattr(common_module, "create_scorer", lambda name, **kwargs: calls.append((name, kwargs)) or name)
    parser = cli.build_parser()
    args = parser.parse_args([str(tmp_path), str(tmp_path), "--model", "clip-i,dinov2=/w/dino", "--device", "cpu",
                              "--precision", "bf16", "--compile"])
    assert cli.load_scorers(args, parser) == {"clip-i": "clip-i", "dinov2": "dinov2"}
    common = {"revision": None, "device": "cpu", "precision": "bf16", "compile": True}
    assert calls == [("clip-i", {"pretrained": None, **common}), ("dinov2", {"pretrained": "/w/dino", **common})]


def test_unreadable_reference_skips_its_pairs(tmp_path, checkpoint_dir, scorer):
    """A bad file on the reference side drops every pair using it (not scored as NaN), like a bad generation."""
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir(), gen.mkdir()
    (ref / "broken.png").write_bytes(b"")
    random_image(70, (64, 48)).save(ref / "good.png")
    for i in range(2):
        random_image(71 + i, (50, 60)).save(gen / f"sample{i}.png")
    out = tmp_path / "out"
    assert run_cli(ref, gen, "--pairing", "all", "--model", checkpoint_dir, "--out", out) == 0
    rows = read_csv(out / "scores.csv")
    assert [(Path(r["ref"]).name, Path(r["gen"]).name) for r in rows] == [("good.png", "sample0.png"),
                                                                          ("good.png", "sample1.png")]
    expected = scorer.score([ref / "good.png"] * 2, [gen / "sample0.png", gen / "sample1.png"])
    assert torch.allclose(torch.tensor([float(r["nearid"]) for r in rows]), expected, atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["pairs_total"], summary["pairs_scored"], summary["pairs_skipped"]) == (4, 2, 2)
    assert summary["models"]["nearid"]["mean"] == pytest.approx(expected.mean().item(), abs=1e-6)
    failures = [(Path(f["path"]).name, f["reason"]) for f in summary["failures"]]
    assert failures == [("broken.png", "empty file (0 bytes)")]


def test_num_workers_auto_is_one_per_core_of_the_affinity_mask(monkeypatch, tmp_path):
    """--num-workers defaults to auto: the cores this process may run on (not the machine's), at most 16."""
    import nearid_metric.cli.score as cli
    from nearid_metric import options

    monkeypatch.setattr(options.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    parser = cli.build_parser()
    assert parser.parse_args([str(tmp_path), str(tmp_path)]).num_workers == 3
    assert parser.parse_args([str(tmp_path), str(tmp_path), "--num-workers", "auto"]).num_workers == 3
    assert parser.parse_args([str(tmp_path), str(tmp_path), "--num-workers", "5"]).num_workers == 5
    monkeypatch.setattr(options.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert options.auto_num_workers() == options.MAX_AUTO_WORKERS == 16
