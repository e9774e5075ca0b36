"""`nearid-score --protocol dreambooth | dreambench | customconcept101` end to end on small synthetic trees in each
benchmark's exact layout, with tiny random checkpoints in the real formats. The benchmark columns are checked
against figures computed independently with transformers (CLIPModel, CLIPProcessor) and torchvision transforms,
combined by hand as each benchmark's code does; missing prompts, empty subjects and one-sided subjects are
reported by name."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import random_image, randomize_
from PIL import Image
from test_clip_text import save_clip_with_text, text_features
from test_dino_scorers import save_vit, vit_config
from test_paper_scorers import DINOV2_PREPROCESSOR, TINY_DINOV2, image_features, write_preprocessor

from nearid_metric import create_scorer
from nearid_metric.cli.score import main

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, checkpoint_dir, clip_vocab):
    """Tiny checkpoints of every preset scorer, in their Hub repos' formats."""
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("protocol-weights")
    save_vit(root / "dino16", vit_config(16), pooler=True, seed=31)
    save_vit(root / "dino8", vit_config(8), pooler=False, seed=32)
    dinov2 = Dinov2Model(Dinov2Config(**TINY_DINOV2))
    randomize_(dinov2, 33)
    dinov2.eval().save_pretrained(root / "dinov2")
    write_preprocessor(root / "dinov2", DINOV2_PREPROCESSOR)
    clip = save_clip_with_text(root / "clip", 2, clip_vocab, seed=34)
    folders = {"nearid": checkpoint_dir, "dino-vits16": root / "dino16", "dino-vits8": root / "dino8",
               "dinov2-small": root / "dinov2", "clip-i": root / "clip", "clip-t": root / "clip"}
    return folders, clip


def model_flag(folders, names):
    return ",".join(f"{name}={folders[name]}" for name in names)


def run(*args):
    return main([str(a) for a in args] + ["--num-workers", "0", "--no-progress", "--ci-resamples", "100"])


def clip_text_cosine(clip, folder, images, prompts):
    """transformers' CLIP-T: CLIPImageProcessor (PIL path) + CLIPTokenizer, get_*_features, cosine."""
    from transformers import CLIPImageProcessor

    pixels = CLIPImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    return (text_features(clip, folder, prompts) * image_features(clip, pixels)).sum(-1).numpy()


def open_rgb(path):
    return Image.open(path).convert("RGB")


# --- DreamBooth -------------------------------------------------------------------------------------


@pytest.fixture()
def dreambooth(tmp_path):
    dataset, gens = tmp_path / "dataset", tmp_path / "generations"
    seed = 0
    for subject, n_ref, n_gen in (("backpack", 2, 2), ("dog", 3, 1), ("cat", 2, 0), ("fox", 0, 1)):
        if n_ref:
            (dataset / subject).mkdir(parents=True)
        if n_gen or subject == "cat":
            (gens / subject).mkdir(parents=True)  # cat: an empty subject folder
        for i in range(n_ref):
            random_image(seed, (120 + 7 * seed, 90 + 3 * seed)).save(dataset / subject / f"{i:02d}.jpg", quality=95)
            seed += 1
        for i in range(n_gen):
            random_image(seed, (128, 128)).save(gens / subject / f"p{i}.png")
            seed += 1
    prompts = tmp_path / "prompts.csv"
    with open(prompts, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["gen", "prompt"], ["backpack/p0", "a sks backpack on a mountain"],
                                 ["dog/p0.png", "a sks dog, swimming"], ["fox/p0", "a fox"]])  # backpack/p1: none
    return dataset, gens, prompts


def test_dreambooth_preset(dreambooth, weights, tmp_path, capsys):
    dataset, gens, prompts = dreambooth
    folders, clip = weights
    out = tmp_path / "out"
    names = ["nearid", "dino-vits16", "clip-i", "clip-t"]
    assert run(dataset, gens, "--protocol", "dreambooth", "--model", model_flag(folders, names), "--prompts", prompts,
               "--ceiling", "--out", out, "--report", tmp_path / "r.html") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"]["name"] == "dreambooth" and summary["protocol"]["aggregation"] == "macro"
    assert all(summary["models"][m]["signature"].endswith("|protocol:dreambooth|scale:cosine|macro") for m in names)
    dino = create_scorer("dino-vits16", pretrained=folders["dino-vits16"], device="cpu")
    means = {}
    for subject in ("backpack", "dog"):
        refs, subject_gens = sorted((dataset / subject).iterdir()), sorted((gens / subject).iterdir())
        values = dino.score_matrix(refs, subject_gens).flatten()
        entry = summary["subjects"][subject]["dino-vits16"]
        assert entry["mean"] == pytest.approx(float(values.mean()), abs=1e-6) and entry["n"] == len(values)
        real = [float(dino.score([a], [b])[0]) for a in refs for b in refs if a != b]
        assert entry["ceiling"] == pytest.approx(sum(real) / len(real), abs=1e-6)
        means[subject] = float(values.mean())
    assert summary["models"]["dino-vits16"]["macro"]["mean"] == pytest.approx(sum(means.values()) / 2, abs=1e-6)
    # CLIP-T against transformers, once per generation; backpack/p1 has no prompt: reported, not scored
    with_prompt = [gens / "backpack/p0.png", gens / "dog/p0.png"]
    expected = clip_text_cosine(clip, folders["clip-t"], [open_rgb(p) for p in with_prompt],
                                ["a sks backpack on a mountain", "a sks dog, swimming"])
    clip_t = summary["models"]["clip-t"]
    assert clip_t["count"] == 2 and clip_t["mean"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert summary["missing_prompts"] == [str(gens / "backpack/p1.png")]
    problems = " ".join(summary["subject_problems"])
    assert "'cat'" in problems and "'fox'" in problems
    rows = list(csv.DictReader(open(out / "scores.csv", newline="")))
    assert {r["clip-t"] for r in rows if r["gen"].endswith("p1.png")} == {""}
    err = capsys.readouterr().err
    assert "no prompt for" in err and "backpack/p1.png" in err and "'fox'" in err
    assert err.count("loaded clip-i weights") == 1  # clip-i is clip-t's image tower: loaded once
    html = (tmp_path / "r.html").read_text()
    assert 'id="protocol"' in html and "Per subject" in html


def test_dreambooth_needs_prompts_and_refuses_conflicts(dreambooth, weights, capsys):
    dataset, gens, prompts = dreambooth
    folders, _ = weights
    flags = ["--model", model_flag(folders, ["nearid", "dino-vits16", "clip-i", "clip-t"])]
    for extra, message in ((["--pairing", "name"], "pairs by subject"),
                           ([], "give --prompts"),
                           (["--manifest", prompts], "drop --manifest")):
        with pytest.raises(SystemExit) as e:
            main([str(dataset), str(gens), "--protocol", "dreambooth", *map(str, flags), *map(str, extra)])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(dataset), str(gens), "--protocol", "dreambooth", "--model", "nearid", "--prompts", str(prompts)])
    assert e.value.code == 2 and "--model may only point" in capsys.readouterr().err


# --- DreamBench++ -------------------------------------------------------------------------------------


def test_dreambench_preset(tmp_path, weights, capsys):
    folders, clip = weights
    run_dir = tmp_path / "dreambooth_sd"
    keys = ["object_backpack-0_0", "object_backpack-1_0", "live_subject_animal_cat-0_0", "style_ink-0_0"]
    for n, key in enumerate(keys):
        for side in ("src_image", "tgt_image"):
            (run_dir / side).mkdir(parents=True, exist_ok=True)
            random_image(40 + 2 * n + (side == "tgt_image"), (100 + 9 * n, 140 - 5 * n)).save(
                run_dir / side / f"{key}.{'jpg' if side == 'src_image' else 'png'}")
    (run_dir / "text").mkdir()
    for key in keys[:-1]:  # style_ink-0_0 has no prompt
        (run_dir / "text" / f"{key}.txt").write_text(f"a photo of {key.split('_')[-2]}", encoding="utf-8")
    out = tmp_path / "out"
    names = ["nearid", "dino-vits8", "dinov2-small", "clip-i", "clip-t"]
    assert run(run_dir, "--protocol", "dreambench", "--model", model_flag(folders, names), "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = list(csv.DictReader(open(out / "scores.csv", newline="")))
    for name in ("dino-vits8", "dinov2-small", "clip-i"):  # every benchmark image column: 100 x cosine
        plain = create_scorer(name, pretrained=folders[name], device="cpu")
        cosines = plain.score([row["ref"] for row in rows], [row["gen"] for row in rows]).numpy()
        np.testing.assert_allclose([float(row[name]) for row in rows], 100 * cosines, atol=1e-4)
        assert summary["models"][name]["scale"] == "100x"
    nearid = create_scorer("nearid", pretrained=folders["nearid"], device="cpu")
    np.testing.assert_allclose([float(row["nearid"]) for row in rows],  # NearID: always its plain cosine
                               nearid.score([row["ref"] for row in rows], [row["gen"] for row in rows]).numpy(), atol=1e-6)
    assert summary["models"]["dino-vits8"]["scale"] == "100x" and summary["models"]["nearid"]["scale"] == "cosine"
    gens = [run_dir / "tgt_image" / f"{k}.png" for k in sorted(keys[:-1])]
    texts = [(run_dir / "text" / f"{k}.txt").read_text() for k in sorted(keys[:-1])]
    expected = 100 * clip_text_cosine(clip, folders["clip-t"], [open_rgb(p) for p in gens], texts)
    assert summary["models"]["clip-t"]["mean"] == pytest.approx(float(expected.mean()), abs=1e-3)
    assert summary["missing_prompts"] == [str(run_dir / "tgt_image" / "style_ink-0_0.png")]
    categories = summary["categories"]
    assert categories["object"]["dino-vits8"]["n"] == 2 and categories["style"]["clip-t"]["n"] == 0
    by_key = {r["gen"].rsplit("/", 1)[-1][:-4]: float(r["dino-vits8"]) for r in rows}
    assert categories["object"]["dino-vits8"]["mean"] == pytest.approx(
        (by_key["object_backpack-0_0"] + by_key["object_backpack-1_0"]) / 2, abs=1e-6)
    assert "no prompt for" in capsys.readouterr().err


# --- CustomConcept101 ---------------------------------------------------------------------------------


def cc101_clip_features(clip, paths):
    """CustomConcept101's CLIP image transform (torchvision Resize 224 bicubic, CenterCrop 224, then RGB)."""
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(224), lambda image: image.convert("RGB"),
                                    transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])
    return image_features(clip, torch.stack([transform(Image.open(p)) for p in paths]))


def cc101_dino_features(model, paths):
    """CustomConcept101's DINO transform (torchvision Resize 256 bicubic, CenterCrop 224, then RGB): the class token."""
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(224), lambda image: image.convert("RGB"),
                                    transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with torch.no_grad():
        tokens = model(pixel_values=torch.stack([transform(Image.open(p)) for p in paths])).last_hidden_state[:, 0]
    return torch.nn.functional.normalize(tokens, dim=-1)


def test_customconcept101_preset(tmp_path, weights):
    folders, clip = weights
    targets = [tmp_path / "targets" / "cat", tmp_path / "targets" / "chair"]
    for t, target in enumerate(targets):
        target.mkdir(parents=True)
        for i in range(2):
            # a palette and a translucent RGBA picture: converting to RGB after the resize and crop gives other pixels
            random_image(60 + 3 * t + i, (150 + 11 * i, 110), "RGBA" if i else "P").save(target / f"{i}.png")
    root = tmp_path / "run"
    (root / "samples").mkdir(parents=True)
    stems = ["s0", "s1", "s2"]
    for k, stem in enumerate(stems):
        random_image(70 + k, (140, 120)).save(root / "samples" / f"{stem}.png")
    prompts = {"s0": "a cat on a chair", "s1": "photo of a cat sitting on the chair", "s2": "a chair"}
    (root / "prompts.json").write_text(json.dumps(prompts), encoding="utf-8")
    out = tmp_path / "out"
    names = ["nearid", "clip-i", "dino-vits16", "clip-t"]
    assert run("+".join(map(str, targets)), root, "--protocol", "customconcept101", "--model",
               model_flag(folders, names), "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    samples = [root / "samples" / f"{s}.png" for s in stems]
    gen_features = cc101_clip_features(clip, samples)
    from transformers import ViTModel

    dino = ViTModel.from_pretrained(folders["dino-vits16"]).eval()
    for target in targets:
        refs = sorted(target.iterdir())
        matrix = gen_features @ cc101_clip_features(clip, refs).T  # the full (generation x reference) matrix
        entry = summary["subjects"][target.name]["clip-i"]
        assert entry["mean"] == pytest.approx(float(matrix.mean()), abs=1e-5) and entry["n"] == matrix.numel()
        dino_matrix = cc101_dino_features(dino, samples) @ cc101_dino_features(dino, refs).T
        entry = summary["subjects"][target.name]["dino-vits16"]
        assert entry["mean"] == pytest.approx(float(dino_matrix.mean()), abs=1e-5)
    text = text_features(clip, folders["clip-t"], [prompts[s] for s in stems])
    clipscore = 2.5 * np.clip((text * gen_features).sum(-1).numpy(), 0, None)
    assert summary["models"]["clip-t"]["count"] == 3  # once per sample, not once per (sample, target image)
    assert summary["models"]["clip-t"]["mean"] == pytest.approx(float(clipscore.mean()), abs=1e-5)
    assert summary["models"]["clip-t"]["scale"] == "clipscore"


def test_clip_t_prompts_from_a_manifest_column(tmp_path, weights):
    folders, clip = weights
    ref, gen = tmp_path / "ref", tmp_path / "gen"
    ref.mkdir()
    gen.mkdir()
    for i in range(3):
        random_image(80 + i, (100, 90)).save(ref / f"r{i}.png")
        random_image(90 + i, (110, 100)).save(gen / f"g{i}.png")
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("ref,gen,prompt\nr0.png,g0.png,a red mug\nr1.png,g1.png,\nr2.png,g2.png,a mug on a desk\n",
                        encoding="utf-8")
    out = tmp_path / "out"
    assert run(ref, gen, "--pairing", "manifest", "--manifest", manifest, "--model",
               model_flag(folders, ["clip-i", "clip-t"]), "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    expected = clip_text_cosine(clip, folders["clip-t"], [open_rgb(gen / "g0.png"), open_rgb(gen / "g2.png")],
                                ["a red mug", "a mug on a desk"])
    assert summary["models"]["clip-t"]["mean"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert summary["missing_prompts"] == [str(gen / "g1.png")] and summary["models"]["clip-i"]["count"] == 3
    assert summary["prompts"].endswith("(prompt column)")


def test_clip_t_under_masks_keeps_each_prompt_with_its_generation(tmp_path, weights):
    """--gen-masks with clip-t: a generation without a mask is not scored, and the others keep their own prompts
    (scored on the masked picture, as transformers' CLIP-T on the apply_mask'd image)."""
    from nearid_metric.images import load_image
    from nearid_metric.masking import apply_mask

    folders, clip = weights
    ref, gen, masks = tmp_path / "ref", tmp_path / "gen", tmp_path / "masks"
    for folder in (ref, gen, masks):
        folder.mkdir()
    for i in range(3):
        random_image(100 + i, (96, 80)).save(ref / f"p{i}.png")
        random_image(110 + i, (96, 80)).save(gen / f"p{i}.png")
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (10, 8, 70, 60))
    mask.save(masks / "p0.png")
    mask.save(masks / "p2.png")  # p1: no mask, not scored
    prompts = tmp_path / "prompts.csv"
    texts = ["a red mug", "a cat on a sofa", "a mug on a desk"]
    prompts.write_text("gen,prompt\n" + "".join(f"p{i},{t}\n" for i, t in enumerate(texts)), encoding="utf-8")
    out = tmp_path / "out"
    assert run(ref, gen, "--gen-masks", masks, "--model", model_flag(folders, ["clip-t"]), "--prompts", prompts,
               "--out", out) == 0
    rows = list(csv.DictReader((out / "scores.csv").read_text().splitlines()))
    assert [r["gen"] for r in rows] == [str(gen / "p0.png"), str(gen / "p2.png")]
    pictures = [apply_mask(load_image(gen / f"p{i}.png"), load_image(masks / f"p{i}.png")) for i in (0, 2)]
    expected = clip_text_cosine(clip, folders["clip-t"], pictures, [texts[0], texts[2]])
    np.testing.assert_allclose([float(r["clip-t"]) for r in rows], expected, atol=1e-5)
