"""nearid-bench as the reference ran it (issue 14): the images/masks columns, --ids, --pool paper,
--masks (with the reference's mask cleaning) and --score-scale."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from conftest import random_image
from PIL import Image, ImageDraw
from test_bench import content, nearid_tables, read_csv, run_bench, struct_column

from nearid_metric import bench, bench_files, data
from nearid_metric.folders import read_nearid_folder
from nearid_metric.images import EncodedImage
from nearid_metric.masking import MaskedImage, apply_mask, clean_mask, foreground_samples, load_masked
from nearid_metric.protocol import pool_results, score_nearid_samples
from nearid_metric.selection import SampleSelection, read_selection

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
cv2 = pytest.importorskip("cv2")
ndimage = pytest.importorskip("scipy.ndimage")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def blob_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """An L mask with one filled ellipse in ``box`` (x0, y0, x1, y1)."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return mask


# --- readers ------------------------------------------------------------------------------------


def write_reference_positives(path, ids, seeds, masks=None):
    """A positives table in the reference readers' spelling: images1..3 (and masks1..3)."""
    columns = {"id": ids, **{f"images{k + 1}": struct_column([s[k] for s in seeds]) for k in range(3)}}
    if masks is not None:
        columns.update({f"masks{k + 1}": pa.array([None if m[k] is None else {"bytes": m[k], "path": None}
                                                   for m in masks], type=struct_column([1]).type)
                        for k in range(3)})
    pq.write_table(pa.table(columns), path)


def test_positives_in_the_reference_spelling_with_masks(tmp_path):
    nearid_tables(tmp_path / "card")  # img1..3: the dataset card's spelling
    mask = png_bytes(blob_mask((48, 40), (5, 5, 30, 30)))
    write_reference_positives(tmp_path / "ref.parquet", ["s1", "s2", "s3"], [(1, 2, 3), (4, 5, None), (7, 8, 9)],
                              masks=[(mask, None, mask), (None, None, None), (mask, mask, mask)])
    card = data.read_nearid_parquet(tmp_path / "card" / "positives.parquet", tmp_path / "card" / "flux.parquet")
    ref = data.read_nearid_parquet(tmp_path / "ref.parquet", tmp_path / "card" / "flux.parquet")
    assert [s.id for s in ref] == [s.id for s in card]
    assert [v.data if v else None for v in ref[0].views] == [content(1), content(2), content(3)]
    assert ref[0].distractors == card[0].distractors  # joined on id, the same distractors
    assert [m.data if m else None for m in ref[0].masks] == [mask, None, mask]
    assert ref[1].masks == (None, None, None) and card[0].masks == (None, None, None)  # no masks columns
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"id": ["s1"], "pic1": struct_column([1])}), other)
    with pytest.raises(ValueError, match="img1..img3 or images1..images3"):
        data.read_nearid_parquet(other, tmp_path / "card" / "flux.parquet")


def test_folder_masks(tmp_path):
    sample = tmp_path / "g" / "a"
    sample.mkdir(parents=True)
    for name in ("view_0", "view_1", "distractor_0", "mask_0"):
        random_image(1, (20, 16)).save(sample / f"{name}.png")
    [found] = read_nearid_folder(tmp_path / "g")
    assert found.masks == (sample / "mask_0.png", None, None)
    assert found.views[:2] == (sample / "view_0.png", sample / "view_1.png")


# --- --ids --------------------------------------------------------------------------------------


def test_read_selection_formats(tmp_path):
    (tmp_path / "rows.json").write_text("[0, 2, 17]")
    assert read_selection(tmp_path / "rows.json") == SampleSelection(frozenset({0, 2, 17}), frozenset(),
                                                                     str(tmp_path / "rows.json"))
    (tmp_path / "mixed.json").write_text('[3, "s2"]')
    selection = read_selection(tmp_path / "mixed.json")
    assert selection.rows == {3} and selection.ids == {"s2"}
    assert selection.keeps(3, "x") and selection.keeps(0, "s2") and not selection.keeps(0, "s1")
    (tmp_path / "ids.txt").write_text("\ufeffs1\n# a comment\n\n 42 \n")  # a BOM, as Excel writes
    assert read_selection(tmp_path / "ids.txt").ids == {"s1", "42"}  # text lines are ids, even numeric ones
    for name, text, message in (("empty.json", "[]", "lists no sample"), ("neg.json", "[-1]", "row positions"),
                                ("bool.json", "[true]", "row positions"), ("bad.json", "[1,", "not a valid JSON"),
                                ("blank.txt", "\n# only\n", "lists no sample")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message) as error:
            read_selection(tmp_path / name)
        assert name in str(error.value)


def test_ids_score_a_subset_of_the_tables(tmp_path, checkpoint_dir):
    source = nearid_tables(tmp_path / "data")
    (tmp_path / "test.json").write_text("[0, 2]")  # row positions into the positives, as splits/test.json
    out = tmp_path / "rows"
    assert run_bench(*source, "--ids", tmp_path / "test.json", "--model", checkpoint_dir, "--out", out) == 0
    rows = read_csv(out / "similarities.csv")
    # powerpaint has no distractor row for s3: kept without distractors, as in a full run
    assert [(r["group"], r["id"]) for r in rows] == [("flux", "s1"), ("flux", "s3"), ("powerpaint", "s1"),
                                                     ("powerpaint", "s3")]
    assert json.loads((out / "summary.json").read_text())["selection"] == str(tmp_path / "test.json")

    full = tmp_path / "full"
    assert run_bench(*source, "--model", checkpoint_dir, "--out", full) == 0
    everything = {(r["group"], r["id"]): r for r in read_csv(full / "similarities.csv")}
    for row in rows:  # the same numbers as in the full run (up to float32 round-off of other batch sizes)
        for column, value in row.items():
            other = everything[row["group"], row["id"]][column]
            if column in ("id", "group", "model", "signature", "mask") or not value:
                assert value == other, column
            else:
                assert float(value) == pytest.approx(float(other), abs=1e-6), column

    (tmp_path / "ids.txt").write_text("s2\n")
    assert run_bench(*source, "--ids", tmp_path / "ids.txt", "--model", checkpoint_dir, "--out", out) == 0
    assert {r["id"] for r in read_csv(out / "similarities.csv")} == {"s2"}


@pytest.mark.parametrize("listed", ["[0, 5]", '["s1", "nope"]'])
def test_ids_not_in_the_data_are_a_usage_error(tmp_path, checkpoint_dir, listed, capsys):
    source = nearid_tables(tmp_path / "data")
    (tmp_path / "sel.json").write_text(listed)
    with pytest.raises(SystemExit) as exit_info:
        run_bench(*source, "--ids", tmp_path / "sel.json", "--model", checkpoint_dir)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "sel.json" in err and "1 listed sample(s) not in" in err


def test_ids_on_mtg_rows_and_folders(tmp_path):
    from test_bench import write_mtg

    path = write_mtg(tmp_path / "mtg.parquet")
    everything = data.read_mtg_parquet(path)
    chosen = data.read_mtg_parquet(path, select=SampleSelection(rows=frozenset({1})))
    assert [s.id for s in chosen] == [everything[1].id] and chosen[0] == everything[1]
    for sample in ("a", "b", "c"):
        (tmp_path / "f" / sample).mkdir(parents=True)
        random_image(2, (16, 16)).save(tmp_path / "f" / sample / "view_0.png")
    picked = read_nearid_folder(tmp_path / "f", select=SampleSelection(rows=frozenset({0}), ids=frozenset({"c"})))
    assert [s.id for s in picked] == ["a", "c"]
    with pytest.raises(ValueError, match="not in"):
        read_nearid_folder(tmp_path / "f", select=SampleSelection(ids=frozenset({"z"})))


def test_mtg_from_the_hub_reads_the_test_split_by_default(monkeypatch):
    calls = []
    monkeypatch.setattr(data, "read_mtg_hf", lambda path, **kwargs: calls.append(kwargs) or [])
    monkeypatch.setattr(bench, "_check_samples", lambda samples: None)
    bench.load_samples(mtg=["org/MTG"], hf=True)
    bench.load_samples(mtg=["org/MTG"], hf=True, split="train")
    assert [c["split"] for c in calls] == ["test", "train"]


# --- --pool paper ---------------------------------------------------------------------------------


def table_with_groups(groups: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """A NearID similarity table: ``n`` random two-view samples per group."""
    rng = np.random.default_rng(seed)
    names = [g for g, n in groups.items() for _ in range(n)]
    n = len(names)
    return {"model": np.array(["m"] * n, dtype=object), "group": np.array(names, dtype=object),
            "sim_01": rng.uniform(0.4, 1, n), "cross_00": rng.uniform(0.2, 1, n), "cross_11": rng.uniform(0.2, 1, n)}


def test_paper_pool_leaves_out_fluxc():
    groups = {"NearID-Flux": 6, "NearID-FluxC": 5, "fluxc_1024": 4, "powerpaint": 7, "FLUXC_1024x": 3}
    table = table_with_groups(groups)
    rows = bench.nearid_results(table, pool="paper", ci_resamples=None)
    assert [r["group"] for r in rows] == [*sorted(groups), "all", "paper"]
    by_group = {r["group"]: r for r in rows}
    kept = ["NearID-Flux", "powerpaint", "FLUXC_1024x"]  # only the two FluxC settings are held out, by name
    assert [g for g in groups if bench.in_paper_pool(g)] == kept
    expected = pool_results([by_group[g] for g in kept])
    union = np.isin(table["group"], kept)
    direct = score_nearid_samples({k: v[union] for k, v in table.items() if k.startswith(("sim", "cross"))})
    for key in ("SSR", "PA", "PA_terms", "H", "n_samples", "n_trials"):
        assert by_group["paper"][key] == pytest.approx(expected[key]) == pytest.approx(direct[key]), key
    assert by_group["all"]["n_samples"] == sum(groups.values()) and by_group["paper"]["n_samples"] == 16
    assert [r["group"] for r in bench.nearid_results(table, ci_resamples=None)][-1] == "all"  # default: no paper row
    with pytest.raises(ValueError, match="pool must be"):
        bench.nearid_results(table, pool="seven")


def test_paper_pool_on_the_command_line(tmp_path, capsys):
    table = table_with_groups({"NearID-Flux": 4, "NearID-FluxC": 4}, seed=3)
    path = tmp_path / "sims.csv"
    path.write_text("model,group,sim_01,cross_00,cross_11\n" + "\n".join(
        f"m,{g},{a},{b},{c}" for g, a, b, c in zip(table["group"], table["sim_01"], table["cross_00"],
                                                    table["cross_11"])))
    assert run_bench("--from-csv", path, "--pool", "paper", "--ci", "none", "--out", tmp_path / "out") == 0
    rows = read_csv(tmp_path / "out" / "table.csv")
    assert [r["group"] for r in rows] == ["NearID-Flux", "NearID-FluxC", "all", "paper"]
    assert rows[3]["SSR"] == rows[0]["SSR"] and rows[3]["n_samples"] == rows[0]["n_samples"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["pool"] == "paper"
    assert "paper" in capsys.readouterr().out


# --- --score-scale --------------------------------------------------------------------------------


def test_score_scale_divides_a_judges_ratings(tmp_path):
    ten = tmp_path / "judge.csv"
    ten.write_text("sim_01,cross_00,cross_11\n9,3,10\n2,5,1\n7,7,6\n")
    one = tmp_path / "unit.csv"
    one.write_text("sim_01,cross_00,cross_11\n0.9,0.3,1.0\n0.2,0.5,0.1\n0.7,0.7,0.6\n")
    _, scaled = bench_files.read_similarities([ten], scale=10)
    _, plain = bench_files.read_similarities([one])
    for column in ("sim_01", "cross_00", "cross_11"):
        np.testing.assert_allclose(scaled[column], plain[column], rtol=0, atol=1e-15)
    assert run_bench("--from-csv", ten, "--score-scale", "10", "--ci", "none", "--out", tmp_path / "a") == 0
    assert run_bench("--from-csv", one, "--ci", "none", "--out", tmp_path / "b") == 0
    a, b = read_csv(tmp_path / "a" / "table.csv"), read_csv(tmp_path / "b" / "table.csv")
    assert [(r["SSR"], r["PA"]) for r in a] == [(r["SSR"], r["PA"]) for r in b]
    mtg = tmp_path / "mtg.csv"  # oracles are not similarities: never scaled
    mtg.write_text("sim_1_2,sim_1_1p,sim_1_2p,sim_2_2p,sim_2_1p,oracle_1,oracle_2\n9,5,4,3,2,0.5,0.25\n")
    _, scaled = bench_files.read_similarities([mtg], scale=10)
    assert scaled["sim_1_2"][0] == pytest.approx(0.9) and scaled["oracle_1"][0] == 0.5
    for flags in (["--score-scale", "0"], ["--score-scale", "-2"]):
        with pytest.raises(SystemExit) as exit_info:
            run_bench("--from-csv", ten, *flags)
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        run_bench("--nearid-folder", tmp_path, "--score-scale", "10")


# --- --masks: the reference's mask cleaning -----------------------------------------------------


def independent_clean(mask: np.ndarray) -> np.ndarray:
    """The reference's cleaning recomputed with scipy in float64: 5x5 Gaussian (sigma 1.1, as OpenCV derives it
    for size 5), reflect-101 border, round to grey levels, > 10; close then open with a 5x5 square (pixels outside
    the image neither add to a dilation nor remove in an erosion, as OpenCV's default border); the largest
    8-connected component with its holes filled."""
    sigma = 0.3 * ((5 - 1) * 0.5 - 1) + 0.8
    taps = np.exp(-np.arange(-2, 3) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    blurred = ndimage.convolve1d(ndimage.convolve1d(mask.astype(np.float64), taps, axis=0, mode="mirror"),
                                 taps, axis=1, mode="mirror")
    binary = np.rint(blurred) > 10
    square = np.ones((5, 5), bool)
    closed = ndimage.binary_erosion(ndimage.binary_dilation(binary, square, border_value=0), square, border_value=1)
    opened = ndimage.binary_dilation(ndimage.binary_erosion(closed, square, border_value=1), square, border_value=0)
    labels, n = ndimage.label(opened, structure=np.ones((3, 3)))
    if n == 0:
        return opened
    filled = [ndimage.binary_fill_holes(labels == k) for k in range(1, n + 1)]
    return max(filled, key=lambda component: component.sum())


def noisy_two_blob_mask(seed: int = 0) -> np.ndarray:
    """[120, 160] uint8: a large ellipse with pepper holes, a small disc, salt noise and grey speckles."""
    canvas = Image.new("L", (160, 120), 0)
    draw = ImageDraw.Draw(canvas)
    draw.ellipse((60, 20, 140, 100), fill=255)  # the subject
    draw.ellipse((10, 10, 34, 34), fill=255)  # a smaller second blob
    mask = np.array(canvas)
    rng = np.random.default_rng(seed)
    inside = np.argwhere(mask == 255)
    for y, x in inside[rng.choice(len(inside), 30, replace=False)]:
        mask[y, x] = 0  # pepper: closing fills these
    for _ in range(40):  # salt and grey speckles far from the blobs: opening removes them
        y, x = rng.integers(50, 118), rng.integers(2, 50)
        mask[y, x] = rng.choice([255, 128, 40])
    return mask


def test_clean_mask_equals_an_independent_computation():
    mask = noisy_two_blob_mask()
    ours = clean_mask(Image.fromarray(mask)) > 0
    theirs = independent_clean(mask)
    # OpenCV blurs uint8 in fixed point: a pixel whose blurred value sits at the 10.5 boundary may round the
    # other way; allow that and nothing more (measured: 0 or 1 of ~5600 subject pixels over seeds 0-4)
    assert (ours != theirs).sum() <= 4
    assert ours[60, 100] and not ours[22, 22]  # the large blob is kept, the small one dropped
    assert not ours[50:, :50].any()  # the noise is gone
    assert ours[20:101, 60:141].sum() > 0.99 * theirs[20:101, 60:141].sum()  # holes filled
    assert set(np.unique(clean_mask(Image.fromarray(mask)))) <= {0, 255}
    assert not clean_mask(Image.new("L", (20, 20), 0)).any()


def test_apply_mask_resizes_with_nearest_and_fills():
    image = random_image(4, (40, 30))
    small = Image.new("L", (20, 15), 0)
    small.paste(255, (0, 0, 10, 15))  # left half
    out = np.asarray(apply_mask(image, small, "white"))
    assert (out[:, 20:] == 255).all() and (out[:, :20] == np.asarray(image.convert("RGB"))[:, :20]).all()
    grey = np.asarray(apply_mask(image, np.asarray(small.resize((40, 30), Image.NEAREST)), "gray"))
    assert (grey[:, 20:] == 128).all()


def test_masked_images_are_decoded_and_keyed_apart(tmp_path):
    from nearid_metric.cache import content_key
    from nearid_metric.images import ImageLoadError

    image = EncodedImage("img", png_bytes(random_image(5, (32, 24))))
    mask = EncodedImage("mask", png_bytes(blob_mask((32, 24), (4, 4, 20, 20))))
    masked = MaskedImage(image, mask, clean=True)
    expected = apply_mask(Image.open(io.BytesIO(image.data)), clean_mask(Image.open(io.BytesIO(mask.data))))
    assert np.array_equal(np.asarray(load_masked(masked)), np.asarray(expected))
    keys = {content_key(image), content_key(masked), content_key(MaskedImage(image, mask)),
            content_key(MaskedImage(image, mask, clean=True, fill="white"))}
    assert len(keys) == 4  # the cache never serves a masked embedding for the plain image, or across settings
    with pytest.raises(ImageLoadError, match="no subject pixel") as error:
        load_masked(MaskedImage(image, EncodedImage("empty-mask", png_bytes(Image.new("L", (32, 24), 0)))))
    assert error.value.path == "empty-mask"
    with pytest.raises(ValueError, match="mask fill"):
        MaskedImage(image, mask, fill="pink")


def test_foreground_samples_pair_each_image_with_its_mask():
    v = [f"v{k}" for k in range(3)]
    d = [f"d{k}" for k in range(3)]
    sample = data.NearIDSample("s", "g", tuple(v), (d[0], None, d[2]), ("m0", "m1", None))
    [out], dropped = foreground_samples([sample])
    assert out.views == (MaskedImage("v0", "m0", True), MaskedImage("v1", "m1", True), None)
    assert out.distractors == (MaskedImage("d0", "m0", True), None, None)  # distractor j takes view j's mask
    assert dropped == ["v2", "d2"]  # no mask 2: both become missing images, and are named
    mtg = data.MTGSample("t", "g", "1", "2", "1p", "2p", "o1", None, "p1", "p2")
    [masked_mtg], dropped = foreground_samples([mtg], fill="white")
    assert (masked_mtg.image_1, masked_mtg.image_1p) == (MaskedImage("1", "o1", False, "white"),
                                                         MaskedImage("1p", "o1", False, "white"))
    assert masked_mtg.image_2 is None and dropped == ["2", "2p"]
    assert masked_mtg.object_mask_1 == "o1" and masked_mtg.part_mask_2 == "p2"  # oracles keep their masks


def test_masks_end_to_end(tmp_path, checkpoint_dir, scorer):
    root = tmp_path / "data"
    root.mkdir()
    mask_a = png_bytes(blob_mask((48, 40), (4, 4, 40, 34)))
    mask_b = png_bytes(blob_mask((24, 20), (2, 2, 14, 18)))  # a smaller mask: resized to the image
    write_reference_positives(root / "pos.parquet", ["s1", "s2"], [(1, 2, 3), (4, 5, 6)],
                              masks=[(mask_a, mask_b, None), (mask_b, mask_a, mask_a)])
    pq.write_table(pa.table({"id": ["s1", "s2"], **{f"nimg{k + 1}": struct_column(seeds)
                                                     for k, seeds in enumerate(([11, 14], [12, 15], [13, 16]))}}),
                   root / "flux.parquet")
    out = tmp_path / "fg"
    code = run_bench("--positives", root / "pos.parquet", "--distractors", root / "flux.parquet", "--masks",
                     "--model", checkpoint_dir, "--ci", "none", "--out", out)
    assert code == 0
    rows = read_csv(out / "similarities.csv")
    assert {r["mask"] for r in rows} == {"fg"} and {r["mask"] for r in read_csv(out / "table.csv")} == {"fg"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mask"] == "fg" and len(summary["no_mask"]) == 2  # view 2 and distractor 2 of s1

    def masked(seed, mask) -> Image.Image:
        return apply_mask(Image.open(io.BytesIO(content(seed))), clean_mask(Image.open(io.BytesIO(mask))))

    masks = {"s1": (mask_a, mask_b, None), "s2": (mask_b, mask_a, mask_a)}
    views = {"s1": (1, 2, 3), "s2": (4, 5, 6)}
    distractors = {"s1": (11, 12, 13), "s2": (14, 15, 16)}
    for row in rows:
        m, v, d = masks[row["id"]], views[row["id"]], distractors[row["id"]]
        for i, j in ((0, 1), (0, 2), (1, 2)):
            pair = [masked(v[i], m[i]), masked(v[j], m[j])] if m[i] and m[j] else None
            expected = math.nan if pair is None else float(scorer.score([pair[0]], [pair[1]]))
            got = float(row[f"sim_{i}{j}"]) if row[f"sim_{i}{j}"] else math.nan
            assert got == pytest.approx(expected, abs=1e-6, nan_ok=True), (row["id"], i, j)
        for i in range(3):
            for j in range(3):
                ok = m[i] and m[j]
                expected = (float(scorer.score([masked(v[i], m[i])], [masked(d[j], m[j])])) if ok else math.nan)
                got = float(row[f"cross_{i}{j}"]) if row[f"cross_{i}{j}"] else math.nan
                assert got == pytest.approx(expected, abs=1e-6, nan_ok=True), (row["id"], "cross", i, j)
    plain = tmp_path / "full"
    assert run_bench("--positives", root / "pos.parquet", "--distractors", root / "flux.parquet", "--model",
                     checkpoint_dir, "--ci", "none", "--out", plain) == 0
    assert {r["mask"] for r in read_csv(plain / "table.csv")} == {"full"}
    assert read_csv(plain / "similarities.csv")[0]["sim_01"] != rows[0]["sim_01"]
