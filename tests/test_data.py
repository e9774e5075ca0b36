"""Benchmark data: NearID/MTG tables and folders as samples, and similarity columns from embeddings.

Tables are tiny parquet/Arrow files written here with pyarrow, image cells holding 4x4 PNGs
in a known colour; nothing is downloaded.
"""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nearid_metric.data import (
    MTGSample,
    NearIDSample,
    read_mtg_hf,
    read_mtg_parquet,
    read_nearid_hf,
    read_nearid_parquet,
)
from nearid_metric.folders import read_nearid_folder
from nearid_metric.images import EncodedImage, ImageLoadError, load_image
from nearid_metric.similarity import mtg_oracles, mtg_similarities, nearid_similarities, unique_images

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(value: int, size: tuple[int, int] = (4, 4), mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, value).save(buffer, format="PNG")
    return buffer.getvalue()


def value_of(source) -> int:
    """The grey level of a uniform test image."""
    return load_image(source).convert("L").getpixel((0, 0))


def image_column(values: list[int | None], cells: str) -> pa.Array:
    """Image cells holding PNGs of grey ``values`` (None = null cell), as HF structs or raw binary."""
    if cells == "binary":
        return pa.array([None if v is None else png(v) for v in values], type=pa.binary())
    return pa.array([None if v is None else {"bytes": png(v), "path": f"{v}.png"} for v in values], type=IMAGE_STRUCT)


def write_table(path: Path, ids: list, images: dict[str, list[int | None]], cells: str = "struct") -> Path:
    """A table with ``id`` and one image column per entry of ``images``; ``.arrow`` writes an Arrow stream."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": ids, **{name: image_column(values, cells) for name, values in images.items()}})
    if path.suffix == ".arrow":
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        pq.write_table(table, path)
    return path


def nearid_columns(prefix: str, rows: list[tuple[int | None, int | None, int | None]]) -> dict[str, list]:
    return {f"{prefix}{k + 1}": [row[k] for row in rows] for k in range(3)}


# --- NearID tables -----------------------------------------------------------------------------


def test_parquet_join_struct_cells_nulls_and_mismatches(tmp_path, caplog):
    positives = write_table(tmp_path / "positives.parquet", ["a", "b", "c"],
                            nearid_columns("img", [(10, 11, 12), (20, 21, None), (30, 31, 32)]))
    distractors = write_table(tmp_path / "powerpaint.parquet", ["b", "a", "zz"],
                              nearid_columns("nimg", [(120, None, 122), (110, 111, 112), (1, 2, 3)]))
    with caplog.at_level(logging.WARNING, logger="nearid_metric.data"):
        samples = read_nearid_parquet(positives, distractors)

    assert [(s.id, s.group) for s in samples] == [("a", "powerpaint"), ("b", "powerpaint"), ("c", "powerpaint")]
    a, b, c = samples
    assert [value_of(v) for v in a.views] == [10, 11, 12]
    assert [value_of(d) for d in a.distractors] == [110, 111, 112]
    assert b.views[2] is None and b.distractors[1] is None
    assert value_of(b.distractors[2]) == 122
    assert c.distractors == (None, None, None)  # kept, with a warning
    assert isinstance(b.views[0], EncodedImage) and b.views[0].name == f"{positives}#id=b/img1"
    assert "1 positive sample(s) have no distractor row in" in caplog.text and "without distractors: c" in caplog.text
    assert "1 distractor row(s) have no positives in" in caplog.text and "dropped: zz" in caplog.text


def test_parquet_img_prefix_binary_cells_folder_and_list(tmp_path):
    pos = [write_table(tmp_path / "pos" / "part-0.parquet", [1, 2], nearid_columns("img", [(1, 2, 3), (4, 5, 6)])),
           write_table(tmp_path / "pos" / "part-1.parquet", [3], nearid_columns("img", [(7, 8, 9)]))]
    folder = tmp_path / "flux-fill"
    write_table(folder / "b.parquet", [3], nearid_columns("img", [(97, 98, 99)]), cells="binary")
    write_table(folder / "a.parquet", [1, 2], nearid_columns("img", [(91, 92, 93), (94, 95, None)]), cells="binary")
    (folder / "README.md").write_text("not a table")

    samples = read_nearid_parquet(pos, folder)

    assert [s.id for s in samples] == ["1", "2", "3"]  # ids become strings
    assert {s.group for s in samples} == {"flux-fill"}
    assert [[value_of(d) if d else None for d in s.distractors] for s in samples] == \
        [[91, 92, 93], [94, 95, None], [97, 98, 99]]
    assert [value_of(v) for v in samples[2].views] == [7, 8, 9]


def test_arrow_stream_files_and_struct_cells_with_only_a_path(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "v.png").write_bytes(png(77))
    cell = {"bytes": None, "path": "imgs/v.png"}
    table = pa.table({"id": ["x"], **{f"img{k}": pa.array([cell], type=IMAGE_STRUCT) for k in (1, 2, 3)}})
    positives = tmp_path / "positives.parquet"
    pq.write_table(table, positives)
    distractors = write_table(tmp_path / "NearID-PowerPaint" / "data-00000-of-00001.arrow", ["x"],
                              nearid_columns("img", [(5, 6, 7)]))

    [sample] = read_nearid_parquet(positives, distractors.parent)

    assert sample.group == "NearID-PowerPaint"
    assert sample.views[0] == tmp_path / "imgs" / "v.png"  # relative to the table's folder
    assert value_of(sample.views[0]) == 77
    assert [value_of(d) for d in sample.distractors] == [5, 6, 7]


def test_distractor_prefix_ambiguous_missing_or_explicit(tmp_path):
    positives = write_table(tmp_path / "pos.parquet", ["a"], nearid_columns("img", [(1, 2, 3)]))
    both = write_table(tmp_path / "both.parquet", ["a"],
                       {**nearid_columns("img", [(4, 5, 6)]), **nearid_columns("nimg", [(7, 8, 9)])})
    neither = write_table(tmp_path / "neither.parquet", ["a"], {"other": [1]})

    with pytest.raises(ValueError, match=r"both\.parquet: distractor table has both img1\.\.img3 and nimg1"):
        read_nearid_parquet(positives, both)
    with pytest.raises(ValueError, match=r"neither\.parquet: distractor table has neither .*other"):
        read_nearid_parquet(positives, neither)
    with pytest.raises(ValueError, match="distractor_prefix must be"):
        read_nearid_parquet(positives, both, distractor_prefix="neg")
    [sample] = read_nearid_parquet(positives, both, distractor_prefix="nimg", group="g")
    assert sample.group == "g" and [value_of(d) for d in sample.distractors] == [7, 8, 9]
    with pytest.raises(ValueError, match=r"pos\.parquet: missing column\(s\) nimg1, nimg2, nimg3"):
        read_nearid_parquet(both, positives, distractor_prefix="nimg")


def test_duplicate_ids_are_errors_naming_the_files(tmp_path):
    good = write_table(tmp_path / "pos.parquet", ["a", "b"], nearid_columns("img", [(1, 2, 3), (4, 5, 6)]))
    twice = write_table(tmp_path / "twice.parquet", ["a", "a"], nearid_columns("nimg", [(1, 2, 3), (4, 5, 6)]))
    other = write_table(tmp_path / "other.parquet", ["b"], nearid_columns("img", [(1, 2, 3)]))

    with pytest.raises(ValueError, match=r"distractors: 1 duplicate id\(s\).*'a' in .*twice\.parquet"):
        read_nearid_parquet(good, twice)
    with pytest.raises(ValueError, match=r"positives: 1 duplicate id\(s\).*'b' in .*pos\.parquet and .*other\.parquet"):
        read_nearid_parquet([good, other], other)
    shard = write_table(tmp_path / "shard.parquet", ["b"], nearid_columns("img", [(1, 2, 3)]))
    with pytest.raises(ValueError, match=r"1 id\(s\) of .*shard\.parquet already in an earlier distractor file: b"):
        read_nearid_parquet(good, [other, shard])


def test_errors_for_disjoint_ids_bad_columns_and_missing_files(tmp_path):
    positives = write_table(tmp_path / "pos.parquet", ["a"], nearid_columns("img", [(1, 2, 3)]))
    disjoint = write_table(tmp_path / "dis.parquet", ["b"], nearid_columns("img", [(1, 2, 3)]))
    with pytest.raises(ValueError, match=r"no id is in both the positives \(.*pos\.parquet\) and the distractors"):
        read_nearid_parquet(positives, disjoint)

    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"id": ["a"], "img1": ["x"], "img2": ["y"], "img3": ["z"]}), text)
    with pytest.raises(ValueError, match=r"text\.parquet: column 'img1' has type string"):
        read_nearid_parquet(text, disjoint)

    with pytest.raises(FileNotFoundError, match="positives table not found: .*nope"):
        read_nearid_parquet(tmp_path / "nope.parquet", disjoint)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no \.parquet or \.arrow files in this distractors folder"):
        read_nearid_parquet(positives, tmp_path / "empty")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"broken\.parquet: cannot read as a parquet file"):
        read_nearid_parquet(broken, disjoint)
    (tmp_path / "x").mkdir()
    elsewhere = write_table(tmp_path / "x" / "dis.parquet", ["a"], nearid_columns("img", [(1, 2, 3)]))
    with pytest.raises(ValueError, match="different folders.*pass group="):
        read_nearid_parquet(positives, [disjoint, elsewhere])


def test_missing_pyarrow_gives_an_install_hint(tmp_path, monkeypatch):
    positives = write_table(tmp_path / "pos.parquet", ["a"], nearid_columns("img", [(1, 2, 3)]))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"pip install 'nearid-metric\[data\]'"):
        read_nearid_parquet(positives, positives)


# --- MTG tables --------------------------------------------------------------------------------

MTG_FIELDS = ["image_1_original", "image_2_original", "image_1_inpainted", "image_2_inpainted"]


def mask_png(box: tuple[int, int, int, int] | None, mode: str = "L", size: int = 10) -> bytes:
    """A ``size``-square mask, 255 inside ``box`` (left, top, right, bottom; exclusive), else 0."""
    array = np.zeros((size, size), dtype=np.uint8)
    if box:
        array[box[1]:box[3], box[0]:box[2]] = 255
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_mtg(path: Path, with_id: bool) -> Path:
    def cells(blobs: list[bytes | None]) -> pa.Array:
        return pa.array([None if b is None else {"bytes": b, "path": None} for b in blobs], type=IMAGE_STRUCT)

    columns = {name: image_column([10 * k + 1, 10 * k + 2], "struct") for k, name in enumerate(MTG_FIELDS)}
    columns["image_1_object_mask"] = cells([mask_png((0, 0, 10, 5)), mask_png(None)])  # 50 px; empty
    columns["image_1_part_mask"] = cells([mask_png((0, 0, 10, 1), "RGB"), mask_png((0, 0, 2, 2))])  # 10 px; 4 px
    columns["image_2_object_mask"] = cells([mask_png((0, 0, 4, 5), "1"), None])  # 20 px; missing
    columns["image_2_part_mask"] = cells([mask_png((0, 0, 4, 5)), mask_png((0, 0, 1, 1))])  # 20 px
    table = pa.table({**({"id": ["m1", "m2"]} if with_id else {}), **columns})
    pq.write_table(table, path)
    return path


def test_read_mtg_parquet_ids_or_row_numbers(tmp_path):
    samples = read_mtg_parquet(write_mtg(tmp_path / "mtg.parquet", with_id=True))
    assert [(s.id, s.group) for s in samples] == [("m1", "mtg"), ("m2", "mtg")]
    first = samples[0]
    assert [value_of(i) for i in first.images] == [1, 11, 21, 31]  # 1, 2, 1p, 2p
    assert first.image_1.name.endswith("#id=m1/image_1_original")
    assert samples[1].object_mask_2 is None

    (tmp_path / "shards").mkdir()
    write_mtg(tmp_path / "shards" / "0.parquet", with_id=False)
    write_mtg(tmp_path / "shards" / "1.parquet", with_id=False)
    samples = read_mtg_parquet(tmp_path / "shards", group="mtg-test")
    assert [(s.id, s.group) for s in samples] == [("0", "mtg-test"), ("1", "mtg-test"), ("2", "mtg-test"),
                                                  ("3", "mtg-test")]
    with pytest.raises(ValueError, match="some files have an 'id' column and some do not"):
        read_mtg_parquet([tmp_path / "mtg.parquet", tmp_path / "shards" / "0.parquet"], group="g")


def test_read_mtg_parquet_missing_columns(tmp_path):
    path = tmp_path / "partial.parquet"
    pq.write_table(pa.table({name: image_column([1], "struct") for name in MTG_FIELDS}), path)
    with pytest.raises(ValueError, match=r"partial\.parquet: missing column\(s\) image_1_object_mask, "
                                         "image_2_object_mask, image_1_part_mask, image_2_part_mask"):
        read_mtg_parquet(path)


def test_mtg_oracles_from_masks(tmp_path):
    pytest.importorskip("nearid_metric.protocol")
    samples = read_mtg_parquet(write_mtg(tmp_path / "mtg.parquet", with_id=True))
    oracle_1, oracle_2 = mtg_oracles(samples)
    assert oracle_1.dtype == np.float64 and oracle_2.dtype == np.float64
    np.testing.assert_allclose(oracle_1, [1 - 10 / 50, 0.0])  # empty object mask -> ratio 1 -> 0
    assert oracle_2[0] == pytest.approx(0.0) and oracle_2[1] == 0.0  # missing object mask: 0, as the reference
    assert np.isnan(mtg_oracles(samples, missing=float("nan"))[1][1])  # the stricter variant

    bad = MTGSample("bad", "g", None, None, None, None, EncodedImage("obj", b"junk"), None,
                    EncodedImage("part", png(0)), None)
    with pytest.raises(ImageLoadError, match="obj"):
        mtg_oracles([bad])
    wrong = MTGSample("w", "g", None, None, None, None, EncodedImage("obj", mask_png(None, size=10)), None,
                      EncodedImage("part", mask_png(None, size=8)), None)
    with pytest.raises(ValueError, match="masks obj and part"):
        mtg_oracles([wrong])

    # collecting failures instead: each bad view is NaN and named, the good views keep their oracle
    failures: dict[str, str] = {}
    oracle_1, oracle_2 = mtg_oracles([bad, wrong, *samples], failures=failures)
    assert np.isnan(oracle_1[:2]).all() and (oracle_2[:2] == 0.0).all()  # view 2: no masks at all -> 0
    np.testing.assert_allclose(oracle_1[2:], [1 - 10 / 50, 0.0])
    assert set(failures) == {"obj", "part"}
    assert "masks obj and part" in failures["part"]


def test_mtg_similarities_are_dot_products():
    vectors = {"1": [1.0, 0.0], "2": [0.6, 0.8], "1p": [0.0, 1.0], "2p": [-1.0, 0.0]}
    sample = MTGSample("s", "g", "1", "2", "1p", "2p", None, None, None, None)
    partial = MTGSample("t", "g", "1", "2", None, "2p", None, None, None, None)
    images = unique_images([sample, partial])
    assert images == ["1", "2", "1p", "2p"]
    embeddings = np.array([vectors[i] for i in images], dtype=np.float32)
    columns = mtg_similarities([sample, partial], embeddings, {image: row for row, image in enumerate(images)})
    assert list(columns) == ["sim_1_2", "sim_1_1p", "sim_1_2p", "sim_2_2p", "sim_2_1p"]
    expected = {"sim_1_2": [0.6, 0.6], "sim_1_1p": [0.0, np.nan], "sim_1_2p": [-1.0, -1.0],
                "sim_2_2p": [-0.6, -0.6], "sim_2_1p": [0.8, np.nan]}
    for name, values in expected.items():
        assert columns[name].dtype == np.float64
        np.testing.assert_allclose(columns[name], values, atol=1e-7, err_msg=name)


# --- NearID folders ----------------------------------------------------------------------------


def save(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(value))


def test_folder_one_level_missing_slots_and_reports(tmp_path, caplog):
    root = tmp_path / "my-bench"
    for name in ("view_0.png", "view_1.JPG", "view_2.webp", "distractor_0.png", "distractor_2.png"):
        save(root / "cat" / name)
    save(root / "dog" / "view_0.png")
    save(root / "dog" / "Distractor_1.png")
    save(root / "dog" / "view_3.png")  # not a slot
    (root / "dog" / "notes.txt").write_text("x")
    (root / "empty").mkdir()
    (root / "README.md").write_text("x")

    with caplog.at_level(logging.WARNING, logger="nearid_metric.data"):
        samples = read_nearid_folder(root)

    cat, dog = samples
    assert (cat.id, cat.group, dog.id) == ("cat", "my-bench", "dog")
    assert cat.views == (root / "cat" / "view_0.png", root / "cat" / "view_1.JPG", root / "cat" / "view_2.webp")
    assert cat.distractors == (root / "cat" / "distractor_0.png", None, root / "cat" / "distractor_2.png")
    assert dog.views == (root / "dog" / "view_0.png", None, None)
    assert dog.distractors == (None, root / "dog" / "Distractor_1.png", None)
    assert "ignored 3 file(s)" in caplog.text and "view_3.png" in caplog.text and "notes.txt" in caplog.text
    assert "README.md" in caplog.text
    assert "skipped 1 folder(s)" in caplog.text and "empty" in caplog.text
    assert read_nearid_folder(root, group="mine")[0].group == "mine"


def test_folder_two_levels_are_groups(tmp_path, caplog):
    save(tmp_path / "flux" / "b" / "view_0.png")
    save(tmp_path / "flux" / "a" / "view_1.png")
    save(tmp_path / "powerpaint" / "a" / "distractor_0.png")
    (tmp_path / "unused").mkdir()
    with caplog.at_level(logging.WARNING, logger="nearid_metric.data"):
        samples = read_nearid_folder(tmp_path)
    assert [(s.group, s.id) for s in samples] == [("flux", "a"), ("flux", "b"), ("powerpaint", "a")]
    assert "unused" in caplog.text
    with pytest.raises(ValueError, match="holds group folders .*flux.*pass group=None"):
        read_nearid_folder(tmp_path, group="x")


def test_folder_errors(tmp_path):
    save(tmp_path / "dup" / "s" / "view_0.png")
    save(tmp_path / "dup" / "s" / "view_0.jpg")
    with pytest.raises(ValueError, match=r"dup[/\\]s: two files for view_0: view_0\.jpg and view_0\.png"):
        read_nearid_folder(tmp_path / "dup")

    save(tmp_path / "mixed" / "sample" / "view_0.png")
    save(tmp_path / "mixed" / "group" / "sample" / "view_0.png")
    with pytest.raises(ValueError, match="mixes sample folders \\(sample\\) and group folders \\(group\\)"):
        read_nearid_folder(tmp_path / "mixed")

    (tmp_path / "nothing" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="nothing: no NearID samples"):
        read_nearid_folder(tmp_path / "nothing")
    with pytest.raises(NotADirectoryError, match="missing"):
        read_nearid_folder(tmp_path / "missing")


# --- from embeddings to similarity columns -----------------------------------------------------


def test_unique_images_lists_each_image_once(tmp_path):
    positives = write_table(tmp_path / "pos.parquet", ["a", "b"], nearid_columns("img", [(1, 2, 3), (4, 5, 6)]))
    group_1 = write_table(tmp_path / "g1.parquet", ["a", "b"], nearid_columns("img", [(7, 8, 9), (7, 8, 9)]))
    group_2 = write_table(tmp_path / "g2.parquet", ["a"], nearid_columns("img", [(10, None, 12)]))
    samples = read_nearid_parquet(positives, group_1) + read_nearid_parquet(positives, group_2)

    images = unique_images(samples)

    # positives re-read for the second group are the same EncodedImages; equal bytes under other names are not
    assert len(images) == 6 + 6 + 2
    assert images[:3] == list(samples[0].views) and images[3:6] == list(samples[0].distractors)
    paths = [NearIDSample("x", "g", ("a.png", Path("a.png"), None), (Path("b.png"), None, "a.png"))]
    assert unique_images(paths) == ["a.png", Path("b.png")]


SAMPLES = [
    NearIDSample("s1", "g", ("a", "b", "c"), ("d", "e", "f")),
    NearIDSample("s2", "g", ("a", None, "b"), (None, "nan", "c")),
]
VECTORS = {"a": (1, 0), "b": (0, 1), "c": (0.6, 0.8), "d": (0.8, 0.6), "e": (-1, 0), "f": (0, -1),
           "nan": (np.nan, np.nan)}
EXPECTED = {  # dot products by hand; s2 only has views 0, 2 and distractor 2 (distractor 1's row is NaN)
    "sim_01": [0, np.nan], "sim_02": [0.6, 0], "sim_12": [0.8, np.nan],
    "cross_00": [0.8, np.nan], "cross_01": [-1, np.nan], "cross_02": [0, 0.6],
    "cross_10": [0.6, np.nan], "cross_11": [0, np.nan], "cross_12": [-1, np.nan],
    "cross_20": [0.96, np.nan], "cross_21": [-0.6, np.nan], "cross_22": [-0.8, 0.8],
    "neg_sim_01": [-0.8, np.nan], "neg_sim_02": [-0.6, np.nan], "neg_sim_12": [0, np.nan],
}


@pytest.mark.parametrize("as_tensor", [False, True])
def test_nearid_similarities_match_hand_computed_dot_products(as_tensor):
    images = unique_images(SAMPLES)
    assert images == ["a", "b", "c", "d", "e", "f", "nan"]
    rows = [6, 0, 5, 1, 4, 2, 3]  # the index decides the row, not the order of unique_images
    embeddings = np.zeros((7, 2), dtype=np.float32)
    for image, row in zip(images, rows, strict=True):
        embeddings[row] = VECTORS[image]
    if as_tensor:
        embeddings = torch.from_numpy(embeddings).to(torch.bfloat16)  # all values exact in bf16 except 0.6/0.8
    index = {Path(image) if image == "a" else image: row for image, row in zip(images, rows, strict=True)}

    columns = nearid_similarities(SAMPLES, embeddings, index)

    assert list(columns) == list(EXPECTED)
    for name, values in EXPECTED.items():
        assert columns[name].dtype == np.float64 and columns[name].shape == (2,)
        np.testing.assert_allclose(columns[name], values, atol=1e-2 if as_tensor else 1e-7, err_msg=name)


def test_nearid_similarities_errors():
    embeddings = np.eye(7)
    index = {image: row for row, image in enumerate(unique_images(SAMPLES))}
    with pytest.raises(KeyError, match="image f is not in the embedding index"):
        nearid_similarities(SAMPLES, embeddings, {k: v for k, v in index.items() if k != "f"})
    with pytest.raises(ValueError, match=r"index rows outside the 7 embeddings: nan -> 7"):
        nearid_similarities(SAMPLES, embeddings, {**index, "nan": 7})
    with pytest.raises(ValueError, match=r"2-D \[images, dim\].*\(7,\)"):
        nearid_similarities(SAMPLES, np.ones(7), index)
    with pytest.raises(ValueError, match="views needs 3 entries"):
        NearIDSample("x", "g", ("a", "b"), (None, None, None))


# --- Hugging Face datasets (only where the optional library is installed) ----------------------


def test_read_from_hugging_face_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    image_features = {f"img{k}": datasets.Image() for k in (1, 2, 3)}

    def cell(value: int | None) -> dict | None:
        return None if value is None else {"bytes": png(value), "path": None}

    positives = datasets.Dataset.from_dict(
        {"id": ["a", "b"], **{f"img{k}": [cell(k), cell(10 + k)] for k in (1, 2, 3)}},
        features=datasets.Features({"id": datasets.Value("string"), **image_features}))
    distractors = datasets.Dataset.from_dict(
        {"id": ["a"], **{f"nimg{k}": [cell(None if k == 2 else 100 + k)] for k in (1, 2, 3)}},
        features=datasets.Features({"id": datasets.Value("string"),
                                    **{f"nimg{k}": datasets.Image() for k in (1, 2, 3)}}))

    samples = read_nearid_hf(positives, distractors, group="hf")
    assert [(s.id, s.group) for s in samples] == [("a", "hf"), ("b", "hf")]
    assert [value_of(v) for v in samples[1].views] == [11, 12, 13]
    assert [d and value_of(d) for d in samples[0].distractors] == [101, None, 103]

    repo = tmp_path / "NearID-Local"
    (repo / "data").mkdir(parents=True)
    distractors.to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    samples = read_nearid_hf(positives, str(repo), split="train")
    assert samples[0].group == "NearID-Local"

    mtg = datasets.Dataset.from_dict(
        {name: [cell(k)] for k, name in enumerate([*MTG_FIELDS, "image_1_object_mask", "image_2_object_mask",
                                                    "image_1_part_mask", "image_2_part_mask"])})
    [sample] = read_mtg_hf(mtg, group="mtg")
    assert sample.id == "0" and value_of(sample.image_2p) == 3


def test_similarities_are_computed_in_float64_from_float32_embeddings():
    """x = 1 + 2^-12 is exact in float32, x * x = 1 + 2^-11 + 2^-24 is not (float32 rounds it to 1 + 2^-11)."""
    x = 1 + 2.0 ** -12
    exact = 1 + 2.0 ** -11 + 2.0 ** -24
    assert np.float32(x) * np.float32(x) == np.float32(1 + 2.0 ** -11)  # what float32 arithmetic would give
    sample = NearIDSample("s", "g", ("a", "b", None), ("c", None, None))
    mtg = MTGSample("t", "g", "a", "b", "c", None, None, None, None, None)
    embeddings = np.full((3, 1), x, dtype=np.float32)
    index = {"a": 0, "b": 1, "c": 2}
    nearid = nearid_similarities([sample], embeddings, index)
    assert nearid["sim_01"][0] == exact and nearid["cross_00"][0] == exact
    assert mtg_similarities([mtg], torch.from_numpy(embeddings), index)["sim_1_2"][0] == exact
