"""nearid-train end to end on a synthetic identity task: the head learns, the cache changes nothing
but speed, a stopped or killed run resumes exactly, 2 gloo ranks equal 1 process, and the exported
folder scores like the model that was trained."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image, ImageDraw

from nearid_metric import NearIDScore, __version__
from nearid_metric.data import NearIDSample
from nearid_metric.folders import read_nearid_folder
from nearid_metric.model import load_checkpoint_trunk
from nearid_metric.preprocess import PreprocessConfig, preprocess
from nearid_metric.protocol import score_nearid_samples
from nearid_metric.cli.train import config_from_args, main
from nearid_metric.similarity import nearid_similarities, unique_images
from nearid_metric.train.config import TrainConfig, read_config_file
from nearid_metric.train.data import epoch_batches, mtg_as_nearid, split_samples
from nearid_metric.train.loop import train

# --- a synthetic identity task -------------------------------------------------------------------------
# An identity is a coloured shape; its 3 views put it at random places on 3 grey backgrounds, and
# distractor j draws the same shape in another colour on exactly view j's background. A head that
# reads the background (as the untrained one does) prefers the distractor; one that reads the
# object does not.

COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 30), (200, 60, 220), (30, 210, 220),
           (250, 140, 20), (120, 60, 20)]
SHAPES = ["square", "disc", "triangle", "cross", "bar", "diamond"]
SIZE = 56  # the tiny SigLIP's input size (conftest.TINY_VISION)


def draw(shape: str, colour: tuple[int, int, int], background: Image.Image, rng: np.random.Generator) -> Image.Image:
    image = background.copy()
    pen = ImageDraw.Draw(image)
    s = int(rng.integers(24, 31))
    x, y = (int(v) for v in rng.integers(2, SIZE - s - 2, 2))
    if shape == "square":
        pen.rectangle([x, y, x + s, y + s], fill=colour)
    elif shape == "disc":
        pen.ellipse([x, y, x + s, y + s], fill=colour)
    elif shape == "triangle":
        pen.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=colour)
    elif shape == "bar":
        pen.rectangle([x, y + s // 3, x + s, y + 2 * s // 3], fill=colour)
    elif shape == "diamond":
        pen.polygon([(x + s // 2, y), (x + s, y + s // 2), (x + s // 2, y + s), (x, y + s // 2)], fill=colour)
    else:
        t = s // 3
        pen.rectangle([x + t, y, x + 2 * t, y + s], fill=colour)
        pen.rectangle([x, y + t, x + s, y + 2 * t], fill=colour)
    return image


def grey_background(rng: np.random.Generator) -> Image.Image:
    coarse = np.repeat(rng.integers(60, 200, (4, 4, 1), dtype=np.uint8), 3, axis=2)
    smooth = np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.Resampling.BICUBIC), dtype=np.int64)
    return Image.fromarray(np.clip(smooth + rng.integers(-25, 26, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8))


def identity_images(shape: int, colour: int, rng: np.random.Generator) -> tuple[list, list]:
    views, distractors = [], []
    for _ in range(3):
        background = grey_background(rng)
        views.append(draw(SHAPES[shape], COLOURS[colour], background, rng))
        other = COLOURS[(colour + 1 + int(rng.integers(len(COLOURS) - 1))) % len(COLOURS)]
        distractors.append(draw(SHAPES[shape], other, background, rng))
    return views, distractors


def write_identities(root: Path, seed: int = 0) -> Path:
    """48 identities (6 shapes x 8 colours) in the NearID folder layout."""
    rng = np.random.default_rng(seed)
    for n, (shape, colour) in enumerate((s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS))):
        folder = root / f"id{n:02d}"
        folder.mkdir(parents=True)
        views, distractors = identity_images(shape, colour, rng)
        for j in range(3):
            views[j].save(folder / f"view_{j}.png")
            distractors[j].save(folder / f"distractor_{j}.png")
    return root


@pytest.fixture(scope="module")
def identities(tmp_path_factory) -> Path:
    return write_identities(tmp_path_factory.mktemp("synthetic") / "shapes")


def settings(base: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(out=str(out), base=str(base), nearid_folder=[str(data)], eval_fraction=0.3, epochs=6, batch_size=8,
                  lr=1e-2, warmup_steps=3, num_workers=0, progress=False, log_every=1)
    return TrainConfig(**{**values, **overrides})


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}


def head_of(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["head"]


# --- training learns, and the export is the trained model ---------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, siglip_base, identities) -> tuple[TrainConfig, dict]:
    config = settings(siglip_base[0], identities, tmp_path_factory.mktemp("run") / "out", export_dtype="fp32",
                      eval_every=7)
    return config, train(config)


def test_training_raises_held_out_ssr_above_the_untrained_head(trained):
    config, summary = trained
    before, after = summary["history"][0], summary["history"][-1]
    per_epoch = len(epoch_batches(summary["epoch_samples"], config.batch_size, config.seed, 0))
    # step 0, every eval_every steps, every epoch's end (once where the two meet)
    steps = sorted({0, *range(7, summary["steps"] + 1, 7), *range(per_epoch, summary["steps"] + 1, per_epoch)})
    assert [h["step"] for h in summary["history"]] == steps
    assert [h["epoch"] for h in summary["history"] if h["step"] % per_epoch == 0] == list(range(config.epochs + 1))
    assert before["n_samples"] == after["n_samples"] == summary["eval_samples"] >= 10
    assert after["SSR"] >= before["SSR"] + 20, (before, after)
    assert after["PA"] >= before["PA"] + 25, (before, after)
    assert summary["finished"] and summary["steps"] == config.epochs * per_epoch
    assert set(after["groups"]) == {"shapes"}  # per distractor source
    losses = step_losses(Path(config.out))
    first, last = np.mean(list(losses.values())[:4]), np.mean(list(losses.values())[-4:])
    assert last < first


def test_export_scores_like_the_trained_model(trained, siglip_base):
    config, summary = trained
    final = Path(summary["export"])
    assert {p.name for p in final.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json"}
    # the training model, rebuilt independently: base trunk + the checkpoint's head
    trunk = load_checkpoint_trunk(siglip_base[0], dtype=torch.float32, device="cpu", drop_text_tower=True)
    trunk.attn_pool.load_state_dict(head_of(Path(config.out)))
    processor = PreprocessConfig.from_file(siglip_base[0] / "preprocessor_config.json")
    samples = read_nearid_folder(config.nearid_folder[0])
    _, held_out = split_samples(samples, config.eval_fraction)
    images = unique_images(held_out)
    with torch.no_grad():
        expected = F.normalize(trunk(torch.stack([preprocess(Image.open(p), processor) for p in images])), dim=-1)
    scorer = NearIDScore.from_pretrained(final, device="cpu")
    embeddings = scorer.embed(images)
    torch.testing.assert_close(embeddings, expected, rtol=0, atol=1e-5)
    # the held-out rates logged for the last epoch are what the protocol gives for the exported model
    sims = nearid_similarities(held_out, embeddings, {image: n for n, image in enumerate(images)})
    rates = score_nearid_samples(sims)
    assert rates["SSR"] == pytest.approx(summary["history"][-1]["SSR"])
    assert rates["PA"] == pytest.approx(summary["history"][-1]["PA"])
    training = json.loads((final / "training.json").read_text())
    assert training["steps"] == summary["steps"] and training["config"] == dataclasses.asdict(config)
    assert training["version"] == __version__ and training["head"] == "final"
    assert training["resolved"] == {"precision": "fp32", "device": "cpu", "world_size": 1, "steps_per_epoch": 5}


def test_the_best_head_is_kept(trained, siglip_base):
    config, summary = trained
    best = max(summary["history"], key=lambda h: h["SSR"])  # the first of equals
    assert summary["best"] == {"step": best["step"], "epoch": best["epoch"], "SSR": best["SSR"]}
    kept = torch.load(Path(config.out) / "best.pt", weights_only=True)
    assert (kept["step"], kept["SSR"]) == (best["step"], best["SSR"])
    folder = Path(summary["export_best"])
    assert json.loads((folder / "training.json").read_text())["head"] == "best"
    trunk = load_checkpoint_trunk(folder, dtype=torch.float32, device="cpu")
    for name, value in kept["head"].items():  # exported in fp32 here
        torch.testing.assert_close(trunk.attn_pool.state_dict()[name], value, rtol=0, atol=0)


def test_default_export_is_float16_and_close(tmp_path, siglip_base, identities, trained):
    config = settings(siglip_base[0], identities, tmp_path / "out", epochs=1)
    summary = train(config)
    from safetensors import safe_open

    with safe_open(Path(summary["export"]) / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert "backbone.vision_model.head.attention.in_proj_weight" in f.keys()
    images = unique_images(read_nearid_folder(identities))[:12]
    exported = NearIDScore.from_pretrained(summary["export"], device="cpu").embed(images)
    trunk = load_checkpoint_trunk(siglip_base[0], dtype=torch.float32, device="cpu", drop_text_tower=True)
    trunk.attn_pool.load_state_dict(head_of(tmp_path / "out"))
    processor = PreprocessConfig.from_file(siglip_base[0] / "preprocessor_config.json")
    with torch.no_grad():
        expected = F.normalize(trunk(torch.stack([preprocess(Image.open(p), processor) for p in images])), dim=-1)
    assert (exported - expected).abs().max() < 5e-3  # head weights rounded to float16


# --- the feature cache -----------------------------------------------------------------------------------


def test_cached_features_give_the_uncached_loss_curve(tmp_path, siglip_base, identities, trained, caplog):
    config, summary = trained
    uncached = step_losses(Path(config.out))
    exact = settings(siglip_base[0], identities, tmp_path / "fp32", cache_dir=str(tmp_path / "cache32"),
                     cache_dtype="fp32", export_dtype="fp32", eval_every=7)
    cached_summary = train(exact)
    cached = step_losses(tmp_path / "fp32")
    assert cached.keys() == uncached.keys()
    np.testing.assert_allclose(list(cached.values()), list(uncached.values()), rtol=1e-5, atol=1e-6)
    assert [h["SSR"] for h in cached_summary["history"]] == [h["SSR"] for h in summary["history"]]
    for name, value in head_of(Path(config.out)).items():
        torch.testing.assert_close(head_of(tmp_path / "fp32")[name], value, rtol=1e-4, atol=1e-5)

    # the default float16 cache: the same curve to float16 round-off of the tokens
    half = settings(siglip_base[0], identities, tmp_path / "fp16", cache_dir=str(tmp_path / "cache16"),
                    max_steps=10)  # the schedule of the 6-epoch run
    train(half)
    curve = list(step_losses(tmp_path / "fp16").values())
    np.testing.assert_allclose(curve, list(uncached.values())[:len(curve)], rtol=2e-3)

    # a second run over the same images reads every token from the cache
    (tmp_path / "cache32").joinpath("x").touch()
    parts = sorted((tmp_path / "cache32").rglob("part-*.safetensors"))
    assert parts
    with caplog.at_level("INFO", logger="nearid_metric"):
        train(settings(siglip_base[0], identities, tmp_path / "again", cache_dir=str(tmp_path / "cache32"),
                       cache_dtype="fp32", epochs=1))
    assert sorted((tmp_path / "cache32").rglob("part-*.safetensors")) == parts
    assert "computing the trunk tokens" not in caplog.text


def test_cache_signature_separates_bases_and_precisions(tmp_path, siglip_base, checkpoint_dir, identities):
    cache = tmp_path / "cache"
    train(settings(siglip_base[0], identities, tmp_path / "a", cache_dir=str(cache), epochs=1))
    train(settings(checkpoint_dir, identities, tmp_path / "b", cache_dir=str(cache), epochs=1))
    train(settings(siglip_base[0], identities, tmp_path / "c", cache_dir=str(cache), epochs=1, precision="bf16"))
    fp16 = train(settings(siglip_base[0], identities, tmp_path / "d", cache_dir=str(cache), epochs=1,
                          precision="fp16"))
    signatures = [json.loads(p.read_text())["signature"] for p in cache.glob("*/meta.json")]
    assert len(signatures) == 4
    assert len({s.split("|")[1] for s in signatures}) == 2  # two bases
    assert sum("compute:bf16" in s for s in signatures) == sum("compute:fp16" in s for s in signatures) == 1
    records = [r for r in read_log(tmp_path / "d") if "loss" in r]
    assert fp16["finished"] and np.isfinite([r["loss"] for r in records]).all()
    assert all(r["loss_scale"] > 0 for r in records) and "loss_scale" not in read_log(tmp_path / "a")[-1]
    # the base head's loss, with trunk and head under fp16 autocast, is the fp32 one up to rounding
    assert records[0]["loss"] == pytest.approx(step_losses(tmp_path / "a")[1], rel=2e-3)


# --- stopping, killing and resuming -----------------------------------------------------------------------


def test_stopped_run_resumes_to_the_same_state(tmp_path, siglip_base, identities):
    """fp16 (the loss scaler's state resumes too; from the feature cache, as fp16 runs slowly on a CPU);
    evaluations every 3 steps."""
    common = dict(epochs=2, precision="fp16", eval_every=3, cache_dir=str(tmp_path / "cache"))
    whole = settings(siglip_base[0], identities, tmp_path / "whole", **common)
    expected = train(whole)
    parts = settings(siglip_base[0], identities, tmp_path / "parts", max_steps=7, **common)
    first = train(parts)
    assert first["steps"] == 7 and not first["finished"] and first["export"] is None
    with pytest.raises(ValueError, match="pass --resume"):
        train(parts)
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.01 -> 0.02\)"):
        train(settings(siglip_base[0], identities, tmp_path / "parts", resume=True, lr=2e-2, **common))
    with pytest.raises(ValueError, match=r"other settings \(epochs: 2 -> 3\)"):  # the cosine schedule's length
        train(settings(siglip_base[0], identities, tmp_path / "parts", resume=True, **{**common, "epochs": 3}))
    second = train(settings(siglip_base[0], identities, tmp_path / "parts", resume=True, **common))
    assert second["steps"] == expected["steps"] and second["finished"]
    assert second["history"] == expected["history"] and second["best"] == expected["best"]
    assert any(r.get("skipped") for r in read_log(tmp_path / "whole"))  # the scaler skipped an overflowing step
    assert step_losses(tmp_path / "parts") == step_losses(tmp_path / "whole")
    whole_state = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    parts_state = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    for name, value in whole_state["head"].items():
        assert torch.equal(parts_state["head"][name], value), name
    for key, value in whole_state["optimizer"]["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(parts_state["optimizer"]["state"][key][name], value[name]), (key, name)
    assert parts_state["scheduler"] == whole_state["scheduler"] and parts_state["scaler"] == whole_state["scaler"]
    assert whole_state["scheduler"]["last_epoch"] == expected["steps"] - sum(
        bool(r.get("skipped")) for r in read_log(tmp_path / "whole") if "loss" in r)


def test_killed_run_resumes(tmp_path, siglip_base, identities):
    config = tmp_path / "run.toml"
    config.write_text(f'''
base = "{siglip_base[0]}"
nearid_folder = "{identities}"
out = "{tmp_path / 'killed'}"
epochs = 1000
batch_size = 8
lr = 0.01
eval_fraction = 0.3
num_workers = 0
checkpoint_every = 1
log_every = 1
''')
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "nearid_metric.train", str(config), "--no-progress"],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["step"] >= 3:
                break
            time.sleep(0.05)
        assert process.poll() is None, log.read_text()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    reached = torch.load(checkpoint, weights_only=True)["step"]
    target = reached + 4
    assert main([str(config), "--resume", "--max-steps", str(target), "--no-progress"]) == 0
    assert main([str(config), "--out", str(tmp_path / "reference"), "--max-steps", str(target),
                 "--no-progress"]) == 0
    resumed, reference = (torch.load(p / "checkpoint.pt", weights_only=True)
                          for p in (tmp_path / "killed", tmp_path / "reference"))
    assert resumed["step"] == reference["step"] == target
    for name, value in reference["head"].items():
        assert torch.equal(resumed["head"][name], value), name
    assert torch.equal(resumed["optimizer"]["state"][0]["exp_avg"], reference["optimizer"]["state"][0]["exp_avg"])
    assert step_losses(tmp_path / "killed") == step_losses(tmp_path / "reference")


# --- bad data -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cached", [False, True])
def test_an_unreadable_image_is_masked_and_reported(tmp_path, siglip_base, identities, cached):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(identities, data)
    broken = data / "id05" / "distractor_1.png"
    broken.write_bytes(b"not a png")
    config = settings(siglip_base[0], data, tmp_path / "out", epochs=1, eval_fraction=0.0,
                      cache_dir=str(tmp_path / "cache") if cached else None)
    summary = train(config)
    assert summary["finished"] and summary["failures"] == {str(broken): "not an image PIL can identify"}


# --- 2 gloo ranks --------------------------------------------------------------------------------------------


def _rank(rank: int, world: int, port: int, config: TrainConfig) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(config)


def test_two_ranks_train_like_one_process(tmp_path, siglip_base, identities):
    from test_train import free_port

    config = settings(siglip_base[0], identities, tmp_path / "ranks", epochs=2, cache_dir=str(tmp_path / "cache"),
                      cache_dtype="fp32")
    mp.spawn(_rank, args=(2, free_port(), config), nprocs=2, join=True)
    train(dataclasses.replace(config, out=str(tmp_path / "single")))  # the same schedule (2 epochs), cache filled
    reference = step_losses(tmp_path / "single")
    losses = step_losses(tmp_path / "ranks")
    np.testing.assert_allclose(list(losses.values()), [reference[s] for s in losses], rtol=1e-4)
    summary = json.loads((tmp_path / "ranks" / "summary.json").read_text())
    assert summary["finished"] and summary["export"]
    assert summary["epoch_samples"] % config.batch_size == 1  # the last batch leaves rank 1 nothing


# --- settings -----------------------------------------------------------------------------------------------


def test_config_file_then_flags(tmp_path):
    toml = tmp_path / "a.toml"
    toml.write_text('out = "runs/x"\nnearid_folder = "data"\nlr = 3e-4\nepochs = 2\neval_groups = ["flux"]\n')
    config = config_from_args([str(toml), "--lr", "1e-3", "--batch-size", "64"])
    assert (config.lr, config.epochs, config.batch_size, config.nearid_folder) == (1e-3, 2, 64, ["data"])
    assert config.eval_groups == ["flux"] and config.temperature == 0.07 and config.alpha == 0.5
    yaml_file = tmp_path / "a.yaml"
    yaml_file.write_text("out: runs/y\nmtg: [m.parquet]\nlr: 1\nmax-steps: 5\n")
    assert read_config_file(yaml_file) == {"out": "runs/y", "mtg": ["m.parquet"], "lr": 1.0, "max_steps": 5}
    defaults = TrainConfig()
    assert (defaults.lr, defaults.epochs, defaults.batch_size, defaults.weight_decay) == (1e-4, 11, 128, 1e-4)
    assert (defaults.lr_schedule, defaults.warmup_steps, defaults.grad_clip, defaults.precision) == (
        "cosine", 100, 1.0, "auto")
    assert (defaults.shuffle_anchor, defaults.mtg_repeat, defaults.tier1_mean, defaults.eval_every) == (
        True, 4, "slots", 100)
    flags = config_from_args([str(toml), "--no-shuffle-anchor", "--tier1-mean", "rows", "--lr-schedule", "constant",
                              "--grad-clip", "0", "--no-progress", "--resume"])
    assert (flags.shuffle_anchor, flags.tier1_mean, flags.lr_schedule, flags.grad_clip) == (False, "rows", "constant", 0)
    assert (flags.progress, flags.resume, config.shuffle_anchor) == (False, True, True)


@pytest.mark.parametrize("text, message", [
    ("learning_rate = 1\n", "unknown setting 'learning_rate'"),
    ("epochs = 1.5\n", "setting 'epochs' must be int"),
    ("hf = 'yes'\n", "setting 'hf' must be bool"),
    ("epochs = [\n", "a.toml"),
    ("max_steps = 1\nmax-steps = 2\n", "given twice"),
])
def test_bad_config_files_are_named(tmp_path, text, message):
    path = tmp_path / "a.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        read_config_file(path)


def test_bad_settings_exit_2_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        config_from_args(["--out", str(tmp_path), "--nearid-folder", "d", "--precision", "fp64"])
    assert raised.value.code == 2 and "precision must be one of auto, fp32, bf16, fp16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config_from_args(["--nearid-folder", "d"])
    assert "out: an output folder is required" in capsys.readouterr().err


# --- samples ------------------------------------------------------------------------------------------------


def test_split_holds_out_identities_in_every_group_and_named_groups():
    samples = [NearIDSample(f"id{i}", group, ("v",) * 3, (None,) * 3) for i in range(200) for group in ("a", "b")]
    samples.append(NearIDSample("mtg:0", "a", ("v",) * 3, (None,) * 3))
    train_part, held = split_samples(samples, 0.25)
    held_ids = {s.id for s in held}
    assert 30 <= len(held_ids) <= 70 and not held_ids & {s.id for s in train_part}
    assert all(sum(s.id == i for s in held) == 2 for i in held_ids)  # both groups of a held-out identity
    assert "mtg:0" not in held_ids
    assert split_samples(list(reversed(samples)), 0.25)[1][::-1] == held  # the order does not matter
    _, with_group = split_samples(samples, 0.25, ["b"])
    assert {s.id for s in with_group if s.group == "a"} == held_ids and sum(s.group == "b" for s in with_group) == 200
    with pytest.raises(ValueError, match="eval_groups not in the data"):
        split_samples(samples, 0.1, ["c"])


def test_mtg_rows_become_training_samples():
    from nearid_metric.data import MTGSample

    row = MTGSample("7", "mtg", "1.png", "2.png", "1p.png", "2p.png", None, None, None, None)
    sample = mtg_as_nearid(row)
    assert (sample.id, sample.views, sample.distractors) == ("mtg:7", ("1.png", "2.png", None),
                                                             ("1p.png", "2p.png", None))


def test_epoch_order_depends_on_seed_and_epoch_only():
    a, b = epoch_batches(20, 8, 0, 3), epoch_batches(20, 8, 0, 3)
    assert [len(x) for x in a] == [8, 8, 4] and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(20))
    assert not np.array_equal(np.concatenate(a), np.concatenate(epoch_batches(20, 8, 0, 4)))
