"""``nearid-score --ref-masks / --gen-masks / --mask-fill`` and manifest mask columns: foreground-only scores
against known answers (the scorer on ``apply_mask``'d pictures), bad masks reported and their pairs never scored
unmasked, the settings in summary.json and the signature, and masked embeddings cached apart."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import random_image
from PIL import Image, ImageDraw

from nearid_metric.cli.score import main
from nearid_metric.images import load_image
from nearid_metric.masking import apply_mask

SIZE = (64, 48)  # width, height


def run_cli(*args) -> int:
    return main([str(a) for a in args] + ["--num-workers", "0", "--no-progress"])


def read_scores(out: Path) -> tuple[list[dict], dict]:
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out / "summary.json").read_text())


def box_mask(box: tuple[int, int, int, int], size: tuple[int, int] = SIZE, mode: str = "L") -> Image.Image:
    """A mask with the rectangle ``box`` (x0, y0, x1, y1) as subject, in ``mode`` ("1", "L", "P" or "RGB")."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=200)
    return mask.convert(mode)


def expected(scorer, refs: list[Image.Image], gens: list[Image.Image]) -> np.ndarray:
    return scorer.score(refs, gens).numpy()


@pytest.fixture()
def masked_folders(tmp_path):
    """refs/, gens/ and their masks for pairs a, b, sub/c; masks in several modes, one of another size."""
    refs, gens, ref_masks, gen_masks = (tmp_path / name for name in ("refs", "gens", "ref_masks", "gen_masks"))
    for folder in (refs, gens, ref_masks, gen_masks):
        (folder / "sub").mkdir(parents=True)
    names = ["a", "b", "sub/c"]
    for i, name in enumerate(names):
        random_image(i, SIZE).save(refs / f"{name}.png")
        random_image(50 + i, SIZE).save(gens / f"{name}.jpg", quality=95)
    box_mask((8, 6, 40, 30), mode="1").save(ref_masks / "a.png")
    box_mask((20, 10, 60, 44), mode="P").save(ref_masks / "b.gif")  # any extension and mode
    box_mask((4, 4, 16, 12), size=(32, 24)).save(ref_masks / "sub" / "c.png")  # half the image size: NEAREST
    box_mask((10, 10, 50, 40), mode="RGB").save(gen_masks / "a.jpg", quality=100)
    box_mask((0, 0, 30, 47)).save(gen_masks / "b.png")
    box_mask((30, 5, 63, 40)).save(gen_masks / "sub" / "c.bmp")
    return refs, gens, ref_masks, gen_masks, names


@pytest.mark.parametrize("fill", ["black", "white", "gray"])
def test_masked_scores_equal_the_scorer_on_masked_pictures(masked_folders, checkpoint_dir, scorer, tmp_path, fill):
    refs, gens, ref_masks, gen_masks, names = masked_folders
    out = tmp_path / "out"
    fill_args = [] if fill == "black" else ["--mask-fill", fill]  # black is the default
    assert run_cli(refs, gens, "--ref-masks", ref_masks, "--gen-masks", gen_masks, *fill_args,
                   "--model", checkpoint_dir, "--out", out) == 0
    rows, summary = read_scores(out)
    assert [(r["ref"], r["gen"]) for r in rows] == [(str(refs / f"{n}.png"), str(gens / f"{n}.jpg")) for n in names]
    masked_refs = [apply_mask(load_image(refs / f"{n}.png"), load_image(next(ref_masks.glob(f"{n}.*"))), fill)
                   for n in names]
    masked_gens = [apply_mask(load_image(gens / f"{n}.jpg"), load_image(next(gen_masks.glob(f"{n}.*"))), fill)
                   for n in names]
    np.testing.assert_allclose([float(r["nearid"]) for r in rows], expected(scorer, masked_refs, masked_gens),
                               atol=1e-6)
    unmasked = expected(scorer, [load_image(refs / f"{n}.png") for n in names],
                        [load_image(gens / f"{n}.jpg") for n in names])
    assert np.abs(np.array([float(r["nearid"]) for r in rows]) - unmasked).min() > 1e-3  # the masks did something
    assert summary["masks"] == {"ref": {"folder": str(ref_masks), "column": None},
                                "gen": {"folder": str(gen_masks), "column": None}, "fill": fill}
    assert summary["models"]["nearid"]["signature"] == f"{scorer.signature}|fg:ref+gen:{fill}"
    assert summary["failures"] == [] and summary["pairs_scored"] == 3


def test_pixels_outside_the_mask_do_not_count(tmp_path, checkpoint_dir, capsys):
    """Two pictures that differ only outside the subject score 1 with masks, clearly less without."""
    refs, gens, masks = tmp_path / "refs", tmp_path / "gens", tmp_path / "masks"
    for folder in (refs, gens, masks):
        folder.mkdir()
    subject = np.asarray(random_image(1, SIZE))
    background = np.asarray(random_image(2, SIZE))
    mask = np.asarray(box_mask((16, 8, 48, 40))) > 0
    Image.fromarray(subject).save(refs / "x.png")
    Image.fromarray(np.where(mask[..., None], subject, background)).save(gens / "x.png")
    box_mask((16, 8, 48, 40)).save(masks / "x.png")
    assert run_cli(refs, gens, "--model", checkpoint_dir, "--out", tmp_path / "plain") == 0
    assert run_cli(refs, gens, "--ref-masks", masks, "--gen-masks", masks, "--model", checkpoint_dir,
                   "--out", tmp_path / "fg") == 0
    plain, fg = (float(read_scores(tmp_path / name)[0][0]["nearid"]) for name in ("plain", "fg"))
    assert fg == pytest.approx(1.0, abs=1e-6) and plain < 0.99
    err = capsys.readouterr().err
    assert f"foreground only: references by the masks in {masks}; generations by the masks in {masks}" in err


def test_bad_masks_are_reported_and_their_pairs_not_scored(tmp_path, checkpoint_dir, scorer, capsys):
    refs, gens, masks = tmp_path / "refs", tmp_path / "gens", tmp_path / "masks"
    for folder in (refs, gens, masks):
        folder.mkdir()
    for i, name in enumerate(["good", "empty", "missing", "broken", "twice", "small"]):
        random_image(i, SIZE).save(refs / f"{name}.png")
        random_image(20 + i, SIZE).save(gens / f"{name}.png")
    box_mask((8, 8, 40, 40)).save(masks / "good.png")
    Image.new("L", SIZE, 0).save(masks / "empty.png")  # no pixel > 0
    (masks / "broken.png").write_text("not a picture")
    box_mask((8, 8, 40, 40)).save(masks / "twice.png")
    box_mask((8, 8, 40, 40)).save(masks / "twice.jpg")
    box_mask((2, 2, 10, 10), size=(16, 12)).save(masks / "small.png")  # another size: resized, scored
    out = tmp_path / "out"
    assert run_cli(refs, gens, "--gen-masks", masks, "--model", checkpoint_dir, "--out", out) == 0
    rows, summary = read_scores(out)
    assert [Path(r["gen"]).name for r in rows] == ["good.png", "small.png"]
    names = ["good", "small"]
    want = expected(scorer, [load_image(refs / f"{n}.png") for n in names],
                    [apply_mask(load_image(gens / f"{n}.png"), load_image(masks / f"{n}.png")) for n in names])
    np.testing.assert_allclose([float(r["nearid"]) for r in rows], want, atol=1e-6)
    assert (summary["pairs_total"], summary["pairs_scored"], summary["pairs_skipped"]) == (6, 2, 4)
    reasons = {Path(f["path"].split(" (masked by ")[0]).stem: f["reason"] for f in summary["failures"]}
    assert set(reasons) == {"empty", "missing", "broken", "twice"}
    assert reasons["empty"] == f"mask {masks / 'empty.png'}: is empty (no subject pixel > 0); the image is not scored"
    assert reasons["missing"].startswith(f"no mask for {gens / 'missing.png'}: expected {masks / 'missing'}.<png")
    assert reasons["broken"] == f"mask {masks / 'broken.png'}: not an image PIL can identify"
    assert "two masks" in reasons["twice"] and "never unmasked" in reasons["twice"]
    err = capsys.readouterr().err
    for failure in summary["failures"]:
        assert f"skipped {failure['path']}: {failure['reason']}" in err
    assert run_cli(refs, gens, "--gen-masks", masks, "--model", checkpoint_dir, "--strict") == 1


def test_manifest_mask_columns(tmp_path, checkpoint_dir, scorer, capsys):
    refs, gens, masks = tmp_path / "refs", tmp_path / "gens", tmp_path / "masks"
    for folder in (refs, gens / "m", masks):
        folder.mkdir(parents=True)
    for i in range(3):
        random_image(i, SIZE).save(refs / f"r{i}.png")
        random_image(10 + i, SIZE).save(gens / f"g{i}.png")
    box_mask((4, 4, 30, 30)).save(gens / "m" / "g0.png")  # relative to GEN without --gen-masks
    box_mask((30, 10, 60, 40)).save(gens / "m" / "g1.png")
    box_mask((4, 4, 30, 30)).save(masks / "g0.png")  # relative to --gen-masks when given
    box_mask((10, 20, 50, 47)).save(masks / "elsewhere.png")
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("ref,gen,gen_mask\nr0.png,g0.png,m/g0.png\nr1.png,g1.png,m/g1.png\nr2.png,g2.png,\n")
    out = tmp_path / "out"
    assert run_cli(refs, gens, "--pairing", "manifest", "--manifest", manifest, "--mask-fill", "white",
                   "--model", checkpoint_dir, "--out", out) == 0
    rows, summary = read_scores(out)
    want = expected(scorer, [load_image(refs / f"r{i}.png") for i in range(2)],
                    [apply_mask(load_image(gens / f"g{i}.png"), load_image(gens / "m" / f"g{i}.png"), "white")
                     for i in range(2)])
    np.testing.assert_allclose([float(r["nearid"]) for r in rows], want, atol=1e-6)
    assert summary["masks"] == {"ref": None, "gen": {"folder": None, "column": "gen_mask"}, "fill": "white"}
    assert summary["failures"] == [{"path": str(gens / "g2.png"), "reason": f"{manifest}, line 4: empty gen_mask; "
                                    "the pair is not scored (never unmasked)"}]
    assert summary["models"]["nearid"]["signature"].endswith("|fg:gen:white")
    # with --gen-masks the column's paths are under that folder
    manifest.write_text("ref,gen,gen_mask\nr0.png,g0.png,g0.png\nr2.png,g2.png,elsewhere.png\n")
    assert run_cli(refs, gens, "--pairing", "manifest", "--manifest", manifest, "--gen-masks", masks,
                   "--model", checkpoint_dir, "--out", out) == 0
    rows, summary = read_scores(out)
    want = expected(scorer, [load_image(refs / "r0.png"), load_image(refs / "r2.png")],
                    [apply_mask(load_image(gens / "g0.png"), load_image(masks / "g0.png")),
                     apply_mask(load_image(gens / "g2.png"), load_image(masks / "elsewhere.png"))])
    np.testing.assert_allclose([float(r["nearid"]) for r in rows], want, atol=1e-6)
    assert summary["masks"]["gen"] == {"folder": str(masks), "column": "gen_mask"}


def test_ceiling_and_floor_pairs_are_scored_masked(tmp_path, checkpoint_dir, scorer):
    """--calibrate under masks: the real-vs-real and floor pairs use the masked references (never unmasked); a
    reference whose mask is missing is in neither."""
    refs, gens, masks = tmp_path / "refs", tmp_path / "gens", tmp_path / "masks"
    for folder in (refs / "dog", refs / "cat", gens / "dog", gens / "cat", masks / "dog", masks / "cat"):
        folder.mkdir(parents=True)
    for i, name in enumerate(["dog/a", "dog/b", "dog/c", "cat/x"]):
        random_image(i, SIZE).save(refs / f"{name}.png")
    for i, name in enumerate(["dog/g", "cat/h"]):
        random_image(30 + i, SIZE).save(gens / f"{name}.png")
    box_mask((8, 6, 40, 30)).save(masks / "dog" / "a.png")
    box_mask((20, 10, 60, 44)).save(masks / "dog" / "b.png")  # dog/c: no mask
    box_mask((0, 0, 30, 47)).save(masks / "cat" / "x.png")
    out = tmp_path / "out"
    assert run_cli(refs, gens, "--pairing", "subject", "--ref-masks", masks, "--calibrate", "--floor-pairs", "100",
                   "--model", checkpoint_dir, "--out", out, "--ci", "none") == 0
    _, summary = read_scores(out)
    masked = {n: apply_mask(load_image(refs / f"{n}.png"), load_image(masks / f"{n}.png")) for n in ("dog/a", "dog/b", "cat/x")}
    ceiling = float(expected(scorer, [masked["dog/a"], masked["dog/b"]], [masked["dog/b"], masked["dog/a"]]).mean())
    entry = summary["subjects"]["dog"]["nearid"]
    assert entry["ceiling_n"] == 2 and entry["ceiling"] == pytest.approx(ceiling, abs=1e-6)
    floor = float(expected(scorer, [masked["dog/a"], masked["dog/b"]], [load_image(gens / "cat/h.png")] * 2).mean())
    assert summary["models"]["nearid"]["calibration"]["subjects"]["cat"]["floor"] == pytest.approx(floor, abs=1e-6)
    assert summary["pairs_scored"] == 3 and any("dog/c.png" in f["path"] for f in summary["failures"])


def test_masked_embeddings_are_cached_apart(masked_folders, checkpoint_dir, tmp_path):
    refs, gens, ref_masks, gen_masks, _ = masked_folders
    cache = tmp_path / "cache"
    masked = ["--ref-masks", ref_masks, "--gen-masks", gen_masks]
    results = {}
    for name, extra, cache_args in (("fresh", masked, []), ("plain", [], ["--cache", cache]),
                                    ("black", masked, ["--cache", cache]),
                                    ("white", [*masked, "--mask-fill", "white"], ["--cache", cache]),
                                    ("black again", masked, ["--cache", cache])):
        assert run_cli(refs, gens, *extra, *cache_args, "--model", checkpoint_dir, "--out", tmp_path / name) == 0
        results[name] = [float(r["nearid"]) for r in read_scores(tmp_path / name)[0]]
    assert results["black"] == results["fresh"] == results["black again"]  # never the cached unmasked embeddings
    assert np.abs(np.subtract(results["black"], results["plain"])).min() > 1e-3
    assert np.abs(np.subtract(results["black"], results["white"])).min() > 1e-4


def test_mask_usage_errors(tmp_path, checkpoint_dir, capsys):
    (tmp_path / "r").mkdir(), (tmp_path / "g").mkdir()
    (tmp_path / "file.png").write_bytes(b"")
    for args, message in (([ "--ref-masks", tmp_path / "nowhere"], f"--ref-masks {tmp_path / 'nowhere'} is not a "
                                                                   "folder"),
                          (["--gen-masks", tmp_path / "file.png"], "is not a folder"),
                          (["--mask-fill", "white"], "--mask-fill is only used with"),
                          (["--ref-masks", tmp_path, "--mask-fill", "pink"], "invalid choice: 'pink'")):
        with pytest.raises(SystemExit) as excinfo:
            run_cli(tmp_path / "r", tmp_path / "g", *args, "--model", checkpoint_dir)
        assert excinfo.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_compare_refuses_masked_against_unmasked(masked_folders, checkpoint_dir, tmp_path, capsys):
    refs, gens, ref_masks, gen_masks, _ = masked_folders
    assert run_cli(refs, gens, "--model", checkpoint_dir, "--out", tmp_path / "plain") == 0
    assert run_cli(refs, gens, "--gen-masks", gen_masks, "--model", checkpoint_dir, "--out", tmp_path / "fg") == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "plain"), str(tmp_path / "fg")]) == 2
    err = capsys.readouterr().err
    assert "not comparable" in err and "|fg:gen:black" in err


def test_run_report_says_foreground_only():
    pytest.importorskip("matplotlib", reason="the report needs the 'report' extra (matplotlib)")
    from nearid_metric.report import render_report

    summary = {"models": {"nearid": {"count": 1, "mean": 0.5, "ci95": None, "signature": "s|fg:gen:white"}},
               "pairs_total": 1, "pairs_scored": 1, "ref": ".", "gen": ".",
               "masks": {"ref": None, "gen": {"folder": "m<1>", "column": None}, "fill": "white"}}
    text = render_report([("a.png", "b.png")], {"nearid": np.array([0.5])}, summary)
    assert ('<p class="bad" id="masks"><b>Foreground only</b>: generations by the masks in m&lt;1&gt;; background '
            "set to white. Not comparable with unmasked scores.</p>") in text
    assert 'id="masks"' not in render_report([("a.png", "b.png")], {"nearid": np.array([0.5])},
                                             {**summary, "masks": None})
