"""`nearid-bench` end to end on tiny synthetic NearID / MTG data (parquet tables and image folders).

The data hold random pictures written here; the models are the tiny random checkpoints of
conftest. Nothing is downloaded.
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import random_image

from nearid_metric import bench, data
from nearid_metric.cli.bench import main
from nearid_metric.folders import read_nearid_folder
from nearid_metric.images import EncodedImage
from nearid_metric.protocol import pool_groups, score_mtg_samples, score_nearid_groups, score_nearid_samples

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
BROKEN = "broken"  # an image cell with empty bytes / a zero-byte file

# NearID: 3 samples, each view and distractor a seed (None = missing). Group "flux" stores its
# distractors as img1..3, "powerpaint" as nimg1..3 and has no row for s3 (kept, without distractors).
VIEWS = {"s1": (1, 2, 3), "s2": (4, 5, None), "s3": (7, BROKEN, 9)}
DISTRACTORS = {"flux": {"s1": (11, None, 13), "s2": (14, 15, 16), "s3": (17, 18, 19)},
               "powerpaint": {"s1": (21, 22, 23), "s2": (24, 25, 26)}}
PREFIX = {"flux": "img", "powerpaint": "nimg"}
N_IMAGES = 8 + 8 + 6  # distinct images to decode (the broken one included)
PAIRS = {
    **{f"sim_{i}{j}": ("view", i, "view", j) for i, j in ((0, 1), (0, 2), (1, 2))},
    **{f"cross_{i}{j}": ("view", i, "distractor", j) for i in range(3) for j in range(3)},
    **{f"neg_sim_{i}{j}": ("distractor", i, "distractor", j) for i, j in ((0, 1), (0, 2), (1, 2))},
}
LABELS = ["id", "group", "model", "signature", "mask"]


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    random_image(seed, (48 + seed % 5, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def content(seed) -> bytes | None:
    return None if seed is None else b"" if seed == BROKEN else png(seed)


def struct_column(values: list) -> pa.Array:
    return pa.array([None if v is None else {"bytes": content(v), "path": None} for v in values], type=IMAGE_STRUCT)


def nearid_tables(root: Path) -> list[str]:
    """positives.parquet, flux.parquet, powerpaint.parquet -> the CLI source flags."""
    root.mkdir(parents=True, exist_ok=True)
    ids = list(VIEWS)
    pq.write_table(pa.table({"id": ids, **{f"img{k + 1}": struct_column([VIEWS[i][k] for i in ids])
                                           for k in range(3)}}), root / "positives.parquet")
    for group, rows in DISTRACTORS.items():
        ids = list(rows)
        pq.write_table(pa.table({"id": ids, **{f"{PREFIX[group]}{k + 1}": struct_column([rows[i][k] for i in ids])
                                               for k in range(3)}}), root / f"{group}.parquet")
    return ["--positives", root / "positives.parquet", "--distractors", root / "flux.parquet",
            root / "powerpaint.parquet"]


def nearid_folders(root: Path) -> list[str]:
    """root/<group>/<sample>/view_K.png, distractor_K.png with the same pictures as the tables."""
    for group, rows in DISTRACTORS.items():
        for sample, views in VIEWS.items():
            for kind, seeds in (("view", views), ("distractor", rows.get(sample, (None,) * 3))):
                for k, seed in enumerate(seeds):
                    if seed is not None:
                        (root / group / sample).mkdir(parents=True, exist_ok=True)
                        (root / group / sample / f"{kind}_{k}.png").write_bytes(content(seed))
    return ["--nearid-folder", root]


def seed_of(group: str, sample: str, kind: str, k: int):
    return VIEWS[sample][k] if kind == "view" else DISTRACTORS[group].get(sample, (None,) * 3)[k]


def expected_similarities(scorer, rows: list[dict]) -> dict[tuple[int, str], float]:
    """(row number, column) -> scorer.score() of that pair, NaN where an image is missing or broken."""
    pairs, expected = [], {}
    for n, row in enumerate(rows):
        for column, (kind_a, a, kind_b, b) in PAIRS.items():
            seeds = seed_of(row["group"], row["id"], kind_a, a), seed_of(row["group"], row["id"], kind_b, b)
            if None in seeds or BROKEN in seeds:
                expected[n, column] = math.nan
            else:
                pairs.append(((n, column), seeds))
    refs = [EncodedImage(f"seed {a}", png(a)) for _, (a, _) in pairs]
    gens = [EncodedImage(f"seed {b}", png(b)) for _, (_, b) in pairs]
    for (key, _), value in zip(pairs, scorer.score(refs, gens).tolist()):
        expected[key] = value
    return expected


def run_bench(*args) -> int:
    return main([str(a) for a in args] + ["--num-workers", "0", "--no-progress"])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def columns_of(rows: list[dict]) -> dict[str, np.ndarray]:
    """CSV rows -> label columns (str) and float columns (empty cell = NaN)."""
    return {name: np.array([r[name] for r in rows]) if name in LABELS else
            np.array([float(r[name]) if r[name] else math.nan for r in rows]) for name in rows[0]}


def same(a, b) -> bool:
    """Equal, NaN (or None from JSON) equal to NaN."""
    def nan(x):
        return x is None or (isinstance(x, float) and math.isnan(x))
    return (nan(a) and nan(b)) or (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)


def assert_rows_equal(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        for key, value in want.items():
            assert same(got[key], value), (got["model"], got["group"], key, got[key], value)


# --- NearID -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["tables", "folders"])
def test_nearid_similarities_equal_score_and_table_equals_protocol(layout, tmp_path, checkpoint_dir, scorer, capsys):
    source = nearid_tables(tmp_path / "data") if layout == "tables" else nearid_folders(tmp_path / "data")
    out = tmp_path / "out"
    assert run_bench(*source, "--model", checkpoint_dir, "--out", out) == 0
    captured = capsys.readouterr()

    rows = read_csv(out / "similarities.csv")
    assert list(rows[0]) == LABELS + list(PAIRS)
    assert [(r["group"], r["id"]) for r in rows] == \
        [(g, s) for g in DISTRACTORS for s in VIEWS]  # groups in source order, samples in reading order
    assert {r["model"] for r in rows} == {"nearid"} and {r["signature"] for r in rows} == {scorer.signature}
    expected = expected_similarities(scorer, rows)
    for (n, column), value in expected.items():
        cell = rows[n][column]
        if math.isnan(value):
            assert cell == "", (rows[n]["group"], rows[n]["id"], column)  # NaN is an empty cell
        else:
            assert float(cell) == pytest.approx(value, abs=1e-6), (rows[n]["group"], rows[n]["id"], column)

    # the table is the protocol applied to the CSV columns, per model x group, then pooled
    columns = columns_of(rows)
    groups = score_nearid_groups(columns, by=("model", "group"))
    pooled = pool_groups(groups, by="model")
    table = json.loads((out / "table.json").read_text())
    assert table["benchmark"] == "nearid"
    assert [(r["model"], r["group"]) for r in table["rows"]] == [("nearid", "flux"), ("nearid", "powerpaint"),
                                                                 ("nearid", "all")]
    assert_rows_equal(table["rows"], groups + [pooled[0] | {"group": "all"}])
    assert table["rows"][1]["n_excluded"] == 1  # s3 has no powerpaint distractors
    assert table["rows"][2]["n_samples"] == 5 and table["rows"][2]["signature"] == scorer.signature
    flux = score_nearid_samples({k: v[:3] for k, v in columns.items()})
    assert table["rows"][0]["SSR"] == flux["SSR"] and table["rows"][0]["n_terms"] == flux["n_terms"]
    assert read_csv(out / "table.csv")[0].keys() == set(bench.NEARID_TABLE)

    # the broken image: named on stderr and in the summary; the others are scored
    summary = json.loads((out / "summary.json").read_text())
    names = [f["image"] for f in summary["failures"]]
    if layout == "tables":
        assert names == [f"{tmp_path / 'data' / 'positives.parquet'}#id=s3/img2"]  # decoded once for both groups
    else:
        assert names == [str(tmp_path / "data" / g / "s3" / "view_1.png") for g in DISTRACTORS]
    assert all("empty file" in f["reason"] for f in summary["failures"])
    assert all(name in captured.err for name in names)
    assert summary["groups"] == {"flux": 3, "powerpaint": 3} and summary["n_images"] == (
        N_IMAGES if layout == "tables" else N_IMAGES + 8)  # folders repeat the views per group
    assert summary["models"] == {"nearid": {"name": "nearid", "signature": scorer.signature}}

    # stdout: percent with 2 decimals, one line per model x group
    lines = captured.out.splitlines()
    assert lines[0].split() == ["model", "group", "SSR", "SSR_CI95", "PA", "PA_CI95", "H", "n_samples", "n_excluded"]
    all_row = table["rows"][2]
    assert lines[3].split() == ["nearid", "all", f"{all_row['SSR']:.2f}",
                                f"[{all_row['SSR_ci_low']:.2f},{all_row['SSR_ci_high']:.2f}]", f"{all_row['PA']:.2f}",
                                f"[{all_row['PA_ci_low']:.2f},{all_row['PA_ci_high']:.2f}]", f"{all_row['H']:.2f}",
                                "5", "1"]
    assert f"nearid: signature {scorer.signature}" in captured.out


def test_tables_and_folders_give_the_same_similarities(tmp_path, checkpoint_dir):
    assert run_bench(*nearid_tables(tmp_path / "t"), "--model", checkpoint_dir, "--out", tmp_path / "a") == 0
    assert run_bench(*nearid_folders(tmp_path / "f"), "--model", checkpoint_dir, "--out", tmp_path / "b") == 0
    a, b = (columns_of(read_csv(tmp_path / out / "similarities.csv")) for out in ("a", "b"))
    for name in PAIRS:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, err_msg=name)


def test_from_csv_reproduces_the_table_exactly(tmp_path, checkpoint_dir, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    assert run_bench(*nearid_tables(tmp_path / "data"), "--model", checkpoint_dir, "--out", first) == 0
    printed = capsys.readouterr().out
    assert run_bench("--from-csv", first / "similarities.csv", "--out", again) == 0
    assert capsys.readouterr().out == printed
    assert (again / "table.csv").read_bytes() == (first / "table.csv").read_bytes()
    assert (again / "table.json").read_text() == (first / "table.json").read_text()
    assert not (again / "similarities.csv").exists()
    summary = json.loads((again / "summary.json").read_text())
    assert summary["from_csv"] == [str(first / "similarities.csv")] and summary["n_rows"] == 6


def test_from_csv_of_a_judge_without_labels(tmp_path, capsys):
    """A judge's scores: no model/group/signature, two views only, extra columns, 'nan' and empty cells."""
    judge = tmp_path / "qwen-judge.csv"
    judge.write_text("id,sim_01,cross_00,cross_11,reasoning\n"
                     "a,0.9,0.2,0.5,\"same mug, other background\"\n"
                     "b,0.4,0.6,nan,x\n"
                     "c,0.7,,,y\n"
                     "d,0.3,0.1,0.2,z\n")
    other = tmp_path / "other.csv"
    other.write_text("model,group,sim_01,cross_00,cross_11\nvlm,g2,0.5,0.6,0.4\nvlm,g1,0.5,0.4,0.4\n")
    out = tmp_path / "out"
    assert run_bench("--from-csv", judge, other, "--out", out) == 0
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert [(r["model"], r["group"]) for r in rows] == [("qwen-judge", "default"), ("qwen-judge", "all"),
                                                        ("vlm", "g1"), ("vlm", "g2"), ("vlm", "all")]
    nan = math.nan
    expected = score_nearid_samples({"sim_01": [0.9, 0.4, 0.7, 0.3], "cross_00": [0.2, 0.6, nan, 0.1],
                                     "cross_11": [0.5, nan, nan, 0.2]})
    assert_rows_equal(rows[:2], [expected, expected])
    # a: 2 wins; b: 1 loss; c: no term (excluded); d: 2 wins -> SSR 2/3, PA (4 + 2) / (5 + 3)
    assert (rows[0]["SSR"], rows[0]["PA"], rows[0]["n_excluded"]) == (pytest.approx(200 / 3), 75.0, 1)
    assert rows[0]["signature"] == "" and rows[2]["n_samples"] == 1
    assert "qwen-judge: signature n/a" in capsys.readouterr().out

    mtg = tmp_path / "mtg-judge.csv"  # MTG without oracle columns: rates, but no MO
    mtg.write_text("sim_1_2,sim_1_1p,sim_1_2p,sim_2_2p,sim_2_1p\n0.9,0.5,0.4,0.3,0.2\n0.5,0.6,0.1,0.2,0.3\n")
    assert run_bench("--from-csv", mtg, "--out", out) == 0
    [row, _] = json.loads((out / "table.json").read_text())["rows"]
    # m1, m2: (+0.4, +0.6) and (-0.1, +0.3): SSR 1/2, PA 3 / 4 (MTG: term wins over terms, no mean trial)
    assert (row["SSR"], row["PA"], row["MO"], row["n_samples"]) == (50.0, 75.0, None, 2)
    assert "no oracle_1/oracle_2 columns" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        run_bench("--from-csv", judge, mtg)
    assert exit_info.value.code == 2
    assert "mtg similarities, but earlier files hold nearid ones" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("id,sim_01,cross_00\na,0.5,inf\n", "line 2: cross_00 = 'inf' is not a finite number"),
    ("id,sim_01,cross_00\na,0.5,high\n", "line 2: cross_00 = 'high' is not a finite number"),
    ("id,score\na,0.5\n", "no similarity columns to score"),
    ("id,model,sim_01,cross_00\na,m,0.5,0.1\na,m,0.4,0.2\n", "given twice"),
    ("model,sim_01,cross_00\n,0.5,0.1\n", "line 2: empty 'model'"),
    ("group,sim_01,cross_00\nall,0.5,0.1\n", "line 2: group 'all' is the name of the pooled row"),
    ("sim_01,cross_00,sim_1_2,sim_1_1p,sim_1_2p,sim_2_2p,sim_2_1p\n1,1,1,1,1,1,1\n", "both NearID and MTG"),
    ("id,sim_01,cross_00\n", "no rows under the header"),
    ("model,signature,sim_01,cross_00\nm,a,0.5,0.1\nm,b,0.4,0.2\n", "different signatures: 'm' (a, b)"),
])
def test_from_csv_bad_files_are_usage_errors(tmp_path, text, message, capsys):
    path = tmp_path / "sims.csv"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        run_bench("--from-csv", path)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "sims.csv" in err


def test_two_models_in_one_pass_equal_separate_runs(tmp_path, checkpoint_dir, clip_folder, monkeypatch):
    """Each distinct image is decoded once for all models; each model's rows equal its own run."""
    import nearid_metric.loading as loading_module

    source = nearid_tables(tmp_path / "data")
    models = {"nearid": checkpoint_dir, "clip-i": clip_folder}
    separate = {}
    for name, folder in models.items():
        assert run_bench(*source, "--model", f"{name}={folder}", "--out", tmp_path / name) == 0
        separate[name] = read_csv(tmp_path / name / "similarities.csv")

    opened = []
    real = loading_module.read_and_decode
    monkeypatch.setattr(loading_module, "read_and_decode", lambda p: opened.append(str(p)) or real(p))
    spec = ",".join(f"{name}={folder}" for name, folder in models.items())
    assert run_bench(*source, "--model", spec, "--out", tmp_path / "both") == 0
    assert len(opened) == len(set(opened)) == N_IMAGES

    rows = read_csv(tmp_path / "both" / "similarities.csv")
    assert [r["model"] for r in rows] == ["nearid"] * 6 + ["clip-i"] * 6  # model after model
    for name in models:
        mine = [r for r in rows if r["model"] == name]
        assert len(mine) == len(separate[name])
        for got, want in zip(mine, separate[name]):
            assert got.keys() == want.keys()
            for key in want:
                assert got[key] == want[key] if key in LABELS or not want[key] else \
                    float(got[key]) == pytest.approx(float(want[key]), abs=1e-6)
    table = read_csv(tmp_path / "both" / "table.csv")
    assert [(r["model"], r["group"]) for r in table] == [(m, g) for m in models for g in ("flux", "powerpaint", "all")]
    assert list(json.loads((tmp_path / "both" / "summary.json").read_text())["models"]) == list(models)


def test_console_script_with_worker_processes(tmp_path, checkpoint_dir):
    """The installed `nearid-bench`, decoding table images in 2 worker processes, matches the in-process run."""
    source = [str(a) for a in nearid_tables(tmp_path / "data")]
    command = [str(Path(sys.executable).with_name("nearid-bench")), *source, "--model", str(checkpoint_dir),
               "--num-workers", "2", "--out", str(tmp_path / "workers")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "positives.parquet#id=s3/img2: empty file" in result.stderr
    assert run_bench(*source, "--model", checkpoint_dir, "--out", tmp_path / "inline") == 0
    workers, inline = (columns_of(read_csv(tmp_path / out / "similarities.csv")) for out in ("workers", "inline"))
    for name in PAIRS:
        np.testing.assert_allclose(workers[name], inline[name], atol=1e-6, err_msg=name)
    assert (tmp_path / "workers" / "table.csv").read_text() == (tmp_path / "inline" / "table.csv").read_text()


def test_python_api(tmp_path, scorer):
    nearid_folders(tmp_path / "data")
    samples = read_nearid_folder(tmp_path / "data")
    table, failures = bench.nearid_similarity_table(samples, {"mine": scorer})
    assert list(table)[:5] == LABELS and table["sim_01"].dtype == np.float64 and len(table["sim_01"]) == 6
    assert set(table["model"]) == {"mine"} and len(failures) == 2
    rows = bench.nearid_results(table)
    assert [(r["model"], r["group"]) for r in rows] == [("mine", "flux"), ("mine", "powerpaint"), ("mine", "all")]
    assert bench.format_table(rows, "nearid").splitlines()[3].split()[:2] == ["mine", "all"]


def test_strict_and_nothing_scored(tmp_path, checkpoint_dir, capsys):
    source = nearid_tables(tmp_path / "data")
    assert run_bench(*source, "--model", checkpoint_dir, "--strict") == 1  # one broken image
    assert run_bench(*source, "--model", checkpoint_dir) == 0
    (tmp_path / "empty" / "s").mkdir(parents=True)
    (tmp_path / "empty" / "s" / "view_0.png").write_bytes(png(1))
    (tmp_path / "empty" / "s" / "view_1.png").write_bytes(b"")
    (tmp_path / "empty" / "s" / "distractor_0.png").write_bytes(png(2))
    capsys.readouterr()
    assert run_bench("--nearid-folder", tmp_path / "empty", "--model", checkpoint_dir) == 1
    assert "nothing scored" in capsys.readouterr().err


def test_group_names_and_hf_flags(tmp_path, checkpoint_dir, monkeypatch):
    source = nearid_tables(tmp_path / "data")
    out = tmp_path / "out"
    assert run_bench(*source, "--group", "F", "P", "--distractor-prefix", "auto", "--model", checkpoint_dir,
                     "--out", out) == 0
    assert [r["group"] for r in read_csv(out / "table.csv")] == ["F", "P", "all"]

    calls = []

    def fake_hf(positives, distractors, **kwargs):
        calls.append((positives, distractors, kwargs))
        return data.read_nearid_parquet(tmp_path / "data" / "positives.parquet", tmp_path / "data" / "flux.parquet",
                                        group=kwargs["group"] or "hub")

    monkeypatch.setattr(data, "read_nearid_hf", fake_hf)
    assert run_bench("--hf", "--positives", "org/NearID", "--distractors", "org/NearID-Flux", "--split", "test",
                     "--data-revision", "v1", "--model", checkpoint_dir, "--out", out) == 0
    assert calls == [("org/NearID", "org/NearID-Flux",
                      {"distractor_prefix": "auto", "group": None, "select": None, "split": "test", "revision": "v1"})]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sources"] == [{"type": "nearid-hf", "positives": ["org/NearID"], "distractors": "org/NearID-Flux",
                                   "groups": ["hub"], "split": "test", "revision": "v1"}]


@pytest.mark.parametrize("args, message", [
    ([], "no data: give"),
    (["--nearid-folder", "x", "--mtg", "y"], "one data source per run, got --nearid-folder and --mtg"),
    (["--positives", "p.parquet"], "--positives and --distractors go together"),
    (["--mtg", "m.parquet", "--distractor-prefix", "img"], "--distractor-prefix applies to"),
    (["--nearid-folder", "x", "--hf"], "--hf, --split and --data-revision apply to"),
    (["--mtg", "m.parquet", "--split", "test"], "--split and --data-revision need --hf"),
    (["--positives", "p", "--distractors", "a", "b", "--group", "g"], "--group needs one name per source: 1 name"),
    (["--from-csv", "s.csv", "--model", "nearid"], "--model does not apply"),
    (["--from-csv", "s.csv", "--group", "g"], "--group does not apply to --from-csv"),
    (["--from-csv", "missing.csv"], "missing.csv"),
    (["--nearid-folder", "missing"], "NearID folder not found"),
    (["--mtg", "missing.parquet"], "MTG table not found"),
])
def test_usage_errors(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_bench(*args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_reserved_and_repeated_group_names_are_usage_errors(tmp_path, capsys):
    source = nearid_tables(tmp_path / "data")
    for groups, message in ((["all", "p"], "a group is named 'all'"), (["g", "g"], "appear twice in one group")):
        with pytest.raises(SystemExit) as exit_info:
            run_bench(*source, "--group", *groups)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# --- MTG ------------------------------------------------------------------------------------------

MTG_IMAGES = ["image_1_original", "image_2_original", "image_1_inpainted", "image_2_inpainted"]
MTG_PAIRS = {"sim_1_2": (0, 1), "sim_1_1p": (0, 2), "sim_1_2p": (0, 3), "sim_2_2p": (1, 3), "sim_2_1p": (1, 2)}
# per sample: image seeds (1, 2, 1p, 2p), then (object box, part box) of view 1 and view 2 in a 10 x 10 mask
MTG = {
    "m1": ((31, 32, 33, 34), ((0, 0, 10, 10), (0, 0, 10, 1)), ((0, 0, 10, 5), (0, 0, 5, 5))),
    "m2": ((35, 36, 37, BROKEN), ((0, 0, 10, 4), (0, 0, 2, 2)), ((0, 0, 8, 8), (0, 0, 8, 1))),
    "m3": ((38, 39, 40, 41), ((0, 0, 5, 5), (0, 0, 5, 4)), ((0, 0, 10, 10), (0, 0, 3, 3))),
    "m4": ((42, 43, 44, 45), (None, (0, 0, 1, 1)), ((0, 0, 6, 6), (0, 0, 6, 3))),
}
BROKEN_MASK = ("m3", "image_1_part_mask")  # garbage bytes: oracle_1 of m3 is NaN


def mask_png(box) -> bytes:
    array = np.zeros((10, 10), dtype=np.uint8)
    if box:
        array[box[1]:box[3], box[0]:box[2]] = 255
    buffer = io.BytesIO()
    from PIL import Image

    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def area(box) -> int:
    return 0 if box is None else (box[2] - box[0]) * (box[3] - box[1])


def write_mtg(path: Path) -> Path:
    ids = list(MTG)
    columns = {name: struct_column([MTG[i][0][k] for i in ids]) for k, name in enumerate(MTG_IMAGES)}
    for view in (1, 2):
        for j, kind in enumerate(("object", "part")):
            name = f"image_{view}_{kind}_mask"
            cells = [b"not a png" if (i, name) == BROKEN_MASK else mask_png(MTG[i][view][j]) for i in ids]
            columns[name] = pa.array([{"bytes": c, "path": None} for c in cells], type=IMAGE_STRUCT)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, **columns}), path)
    return path


def expected_oracle(sample: str, view: int) -> float:
    if (sample, f"image_{view}_part_mask") == BROKEN_MASK:
        return math.nan
    obj, part = MTG[sample][view]
    return 1.0 - (area(part) / area(obj) if area(obj) else 1.0)


def test_mtg_end_to_end_with_oracles_and_from_csv(tmp_path, checkpoint_dir, scorer, capsys):
    path = write_mtg(tmp_path / "data" / "mtg-test.parquet")
    out = tmp_path / "out"
    assert run_bench("--mtg", path, "--model", checkpoint_dir, "--out", out) == 0
    captured = capsys.readouterr()

    rows = read_csv(out / "similarities.csv")
    assert list(rows[0]) == LABELS + list(MTG_PAIRS) + ["oracle_1", "oracle_2"]
    assert [(r["id"], r["group"]) for r in rows] == [(i, "mtg-test") for i in MTG]
    pairs = [(n, c, (MTG[r["id"]][0][a], MTG[r["id"]][0][b])) for n, r in enumerate(rows)
             for c, (a, b) in MTG_PAIRS.items()]
    good = [(n, c, seeds) for n, c, seeds in pairs if BROKEN not in seeds]
    expected = scorer.score([EncodedImage("a", png(a)) for _, _, (a, _) in good],
                            [EncodedImage("b", png(b)) for _, _, (_, b) in good]).tolist()
    for (n, column, _), value in zip(good, expected):
        assert float(rows[n][column]) == pytest.approx(value, abs=1e-6), (rows[n]["id"], column)
    assert [rows[1][c] for c in ("sim_1_2p", "sim_2_2p")] == ["", ""]  # m2's 2p is broken
    for view in (1, 2):
        got = [float(r[f"oracle_{view}"]) if r[f"oracle_{view}"] else math.nan for r in rows]
        np.testing.assert_allclose(got, [expected_oracle(i, view) for i in MTG], atol=1e-12)

    columns = columns_of(rows)
    want = score_mtg_samples({c: columns[c] for c in MTG_PAIRS}, columns["oracle_1"], columns["oracle_2"])
    assert not math.isnan(want["MO"])  # enough rows for every correlation
    table = json.loads((out / "table.json").read_text())
    assert table["benchmark"] == "mtg" and [r["group"] for r in table["rows"]] == ["mtg-test", "all"]
    assert_rows_equal(table["rows"], [want, want])
    assert table["rows"][0]["undefined_r"] == []
    assert list(read_csv(out / "table.csv")[0]) == list(bench.MTG_TABLE)

    summary = json.loads((out / "summary.json").read_text())
    reasons = {f["image"].rsplit("/", 1)[-1]: f["reason"] for f in summary["failures"]}
    assert set(reasons) == {"image_2_inpainted", "image_1_part_mask"}
    assert "empty file" in reasons["image_2_inpainted"] and "not an image" in reasons["image_1_part_mask"]
    assert "id=m3/image_1_part_mask" in captured.err
    header = captured.out.splitlines()[0].split()
    assert header == ["model", "group", "SSR", "SSR_CI95", "PA", "PA_CI95", "H", "MO", "MO_strict", "n_samples",
                      "n_excluded"]
    assert captured.out.splitlines()[2].split()[7] == f"{want['MO']:.3f}"

    again = tmp_path / "again"
    assert run_bench("--from-csv", out / "similarities.csv", "--out", again) == 0
    assert (again / "table.csv").read_bytes() == (out / "table.csv").read_bytes()
    assert capsys.readouterr().out == captured.out


def test_mtg_two_models_each_get_the_oracles_of_their_samples(tmp_path, scorer, checkpoint_dir):
    """The oracle columns repeat the samples' oracles for every model block (model after model)."""
    from nearid_metric import create_scorer

    samples = data.read_mtg_parquet(write_mtg(tmp_path / "mtg.parquet"))
    other = create_scorer("nearid", pretrained=checkpoint_dir, device="cpu")
    table, failures = bench.mtg_similarity_table(samples, {"a": scorer, "b": other})
    assert table["model"].tolist() == ["a"] * 4 + ["b"] * 4
    assert table["id"].tolist() == list(MTG) * 2
    for view in (1, 2):
        expected = [expected_oracle(i, view) for i in MTG]
        np.testing.assert_allclose(table[f"oracle_{view}"], expected + expected, atol=1e-12, err_msg=f"oracle_{view}")
    assert len(failures) == 2  # the broken 2p image and the broken part mask, once each
    rows = {row["model"]: row for row in bench.mtg_results(table) if row["group"] == "all"}
    assert same(rows["a"]["MO"], rows["b"]["MO"]) and same(rows["a"]["r_1_1p"], rows["b"]["r_1_1p"])
