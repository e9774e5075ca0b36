"""The scorers as the paper computed them: transformers-format CLIP and DINOv2 against transformers.

Tiny random ``CLIPModel`` (ViT-B/32- and ViT-L/14-shaped, quick_gelu as OpenAI CLIP) and
``Dinov2Model`` checkpoints are written by transformers' ``save_pretrained``, next to the
``preprocessor_config.json`` of the Hub repos the references used (same content, so the real
input sizes: CLIP 224 shortest edge + 224 crop, DINOv2 256 + 224 crop), and read back through
:func:`nearid_metric.create_scorer`. The references are transformers' PIL-backend processors
(``use_fast=False``) fed the raw images, and ``CLIPModel.get_image_features`` /
``Dinov2Model(...).last_hidden_state[:, 0]``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import random_image, randomize_, record_tensor_reads
from PIL import Image

from nearid_metric.preprocess import PreprocessConfig, preprocess

# The preprocessor_config.json of openai/clip-vit-base-patch32 and openai/clip-vit-large-patch14
# (the older feature-extractor form: int size and crop_size, no rescale fields) and of facebook/dinov2-large.
CLIP_PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}
DINOV2_PREPROCESSOR = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor", "image_std": [0.229, 0.224, 0.225], "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256},
}
# (width, height) and mode: odd, non-square, both orientations, a thin strip; the resized long edge
# minus the crop is odd for several (crop offsets x.5, where floor and round-half-even part ways).
PICTURES = [((37, 23), "RGB"), ((80, 61), "RGBA"), ((56, 56), "L"), ((101, 47), "P"), ((64, 90), "CMYK"),
            ((5, 130), "RGB"), ((33, 32), "RGBA"), ((129, 64), "P"), ((61, 80), "L"), ((300, 227), "CMYK")]


def pictures() -> list[Image.Image]:
    return [random_image(90 + i, size, mode) for i, (size, mode) in enumerate(PICTURES)]


def reference_processor(folder: Path):
    """transformers' PIL-backend processor from the folder's preprocessor_config.json (the paper's path)."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folder, use_fast=False)
    assert getattr(processor, "backend", "pil") == "pil"
    return processor


def write_preprocessor(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    return folder


# --- preprocessing: CLIPImageProcessor / BitImageProcessor (PIL path) -----------------------------


@pytest.mark.parametrize("config, kind", [(CLIP_PREPROCESSOR, "CLIPImageProcessorPil"),
                                          (DINOV2_PREPROCESSOR, "BitImageProcessorPil")], ids=["clip", "dinov2"])
def test_pixels_equal_transformers_processor(tmp_path, config, kind):
    """Bit-identical to the processor fed the raw image (any mode): transformers converts to RGB itself."""
    folder = write_preprocessor(tmp_path, config)
    processor = reference_processor(folder)
    assert type(processor).__name__ in (kind, kind.removesuffix("Pil"))  # transformers 5 / 4
    ours = PreprocessConfig.from_file(folder / "preprocessor_config.json")
    assert (ours.height, ours.width, ours.resize_mode, ours.crop_offset) == (224, 224, "shortest", "floor")
    floor_mattered = False
    for image in pictures():
        expected = processor(images=[image], return_tensors="pt")["pixel_values"][0]
        got = preprocess(image, ours)
        assert got.dtype == torch.float32 and torch.equal(got, expected), (image.size, image.mode)
        floor_mattered |= not torch.equal(preprocess(image, dataclasses.replace(ours, crop_offset="round")), got)
    assert floor_mattered  # the pictures exercise transformers' floored crop offsets


def test_processor_defaults_after_save_pretrained(tmp_path):
    """The modern form transformers writes (dict sizes, rescale fields) reads the same as the Hub's older form."""
    old = PreprocessConfig.from_dict(CLIP_PREPROCESSOR)
    write_preprocessor(tmp_path / "old", CLIP_PREPROCESSOR)
    reference_processor(tmp_path / "old").save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "preprocessor_config.json").read_text())
    assert saved["size"] == {"shortest_edge": 224} and saved["crop_size"] == {"height": 224, "width": 224}
    assert PreprocessConfig.from_dict(saved) == old


@pytest.mark.parametrize("change, message", [
    ({"do_center_crop": False}, "centre-crop"),
    ({"size": {"shortest_edge": 200}}, "below the crop"),
    ({"crop_size": {"height": 224}}, "crop_size"),
    ({"resample": None}, "resample"),
    ({"image_mean": None}, "image_mean"),
])
def test_shortest_edge_configs_refused_when_not_reproduced(change, message):
    config = {k: v for k, v in {**DINOV2_PREPROCESSOR, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        PreprocessConfig.from_dict(config)


def test_int_size_follows_the_processor_class():
    """An int size is a shortest edge for CLIP / BiT processors, a square for the others (as transformers reads it)."""
    assert PreprocessConfig.from_dict(CLIP_PREPROCESSOR).shortest_edge == 224
    siglip = {"image_processor_type": "SiglipImageProcessor", "size": 384, "resample": 2}
    square = PreprocessConfig.from_dict(siglip)
    assert (square.height, square.width, square.resize_mode) == (384, 384, "squash")


# --- tiny transformers checkpoints ----------------------------------------------------------------

# Tiny towers at the real input sizes: ViT-B/32-shaped (7 x 7 patches) and ViT-L/14-shaped (16 x 16,
# an MLP width that is no whole multiple of the width), both quick_gelu as OpenAI's CLIP.
CLIP_SHAPES = {
    "clip-i": dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, patch_size=32, projection=16),
    "clip-l14": dict(hidden_size=48, intermediate_size=100, num_attention_heads=4, patch_size=14, projection=24),
}
# DINOv2 as facebook/dinov2-large: a 518-px position grid (37 x 37), read at the 224-px crop (16 x 16).
TINY_DINOV2 = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, image_size=518,
                   patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu")
TOL = 1e-5


def image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """``get_image_features`` L2-normalised (a tensor in transformers 4, an output with ``pooler_output`` in 5)."""
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
    return torch.nn.functional.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)


def save_clip(folder: Path, shape: dict, hidden_act: str = "quick_gelu", seed: int = 5):
    """A tiny random CLIPModel of ``shape`` saved as openai/clip-vit-* are (text tower included); returns it."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(num_hidden_layers=2, image_size=224, hidden_act=hidden_act, **shape)
    projection = vision.pop("projection")
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
    randomize_(model, seed)
    model.eval().save_pretrained(folder)
    write_preprocessor(folder, CLIP_PREPROCESSOR)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}
    return model


@pytest.fixture(scope="module", params=sorted(CLIP_SHAPES))
def hf_clip(request, tmp_path_factory):
    """(scorer name, folder, CLIPModel): a tiny OpenAI-style CLIP of that scorer's shape."""
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, save_clip(folder, CLIP_SHAPES[request.param])


@pytest.fixture(scope="module")
def hf_dinov2(tmp_path_factory):
    """(folder, Dinov2Model): a tiny DINOv2 saved as facebook/dinov2-large is."""
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**TINY_DINOV2))
    randomize_(model, 6)
    folder = tmp_path_factory.mktemp("dinov2-hf")
    model.eval().save_pretrained(folder)
    write_preprocessor(folder, DINOV2_PREPROCESSOR)
    return folder, model


def scorer_pixels(scorer, images: list[Image.Image]) -> torch.Tensor:
    """The normalised pixels the scorer feeds its encoder: [N, 3, H, W] float32."""
    from nearid_metric.preprocess import normalization_table, normalize_uint8, resize_to_uint8

    uint8 = torch.stack([resize_to_uint8(image, scorer.preprocess_config) for image in images])
    return normalize_uint8(uint8, normalization_table(scorer.preprocess_config))


# --- parity through create_scorer ---------------------------------------------------------------


def test_clip_matches_transformers(hf_clip):
    """clip-i (B/32-shaped) and clip-l14 (L/14-shaped): pixels identical, embeddings within 1e-5 (measured ~2e-7)."""
    from nearid_metric import create_scorer

    name, folder, model = hf_clip
    scorer = create_scorer(name, pretrained=folder, device="cpu")
    images = pictures()
    expected_pixels = reference_processor(folder)(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(scorer_pixels(scorer, images), expected_pixels)
    got = scorer.embed(images)
    assert (got - image_features(model, expected_pixels)).abs().max() < TOL
    assert scorer.embed_dim == CLIP_SHAPES[name]["projection"]


def test_clip_with_exact_gelu_matches_transformers(tmp_path):
    """Non-OpenAI CLIPs in the transformers format (e.g. LAION's) use exact GELU: read as such."""
    from nearid_metric import create_scorer

    model = save_clip(tmp_path, CLIP_SHAPES["clip-i"], hidden_act="gelu", seed=7)
    images = pictures()[:4]
    pixels = reference_processor(tmp_path)(images=images, return_tensors="pt")["pixel_values"]
    got = create_scorer("clip-i", pretrained=tmp_path, device="cpu").embed(images)
    assert (got - image_features(model, pixels)).abs().max() < TOL


def test_clip_config_read_as_transformers_reads_it():
    """Missing fields take CLIPVisionConfig's defaults; an older file's vision_config_dict wins over vision_config."""
    from nearid_metric.convert_clip import clip_vision_config

    config = clip_vision_config({"vision_config": {"hidden_size": 1024, "patch_size": 14},
                                 "vision_config_dict": {"patch_size": 16}})
    assert (config["hidden_size"], config["patch_size"], config["hidden_act"], config["layer_norm_eps"]) == (
        1024, 16, "quick_gelu", 1e-5)
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        clip_vision_config({"vision_config": {"hidden_act": "relu"}})


def test_dinov2_matches_transformers(hf_dinov2):
    """dinov2: pixels identical to BitImageProcessor, class tokens within 1e-5 of Dinov2Model (measured 0)."""
    from nearid_metric import create_scorer

    folder, model = hf_dinov2
    scorer = create_scorer("dinov2", pretrained=folder, device="cpu")
    images = pictures()
    expected_pixels = reference_processor(folder)(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(scorer_pixels(scorer, images), expected_pixels)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(pixel_values=expected_pixels).last_hidden_state[:, 0], dim=-1)
    assert (scorer.embed(images) - expected).abs().max() < TOL
    assert scorer.embed_dim == TINY_DINOV2["hidden_size"]


def test_bf16_close_to_fp32(hf_clip, hf_dinov2):
    from nearid_metric import create_scorer

    images = pictures()[:4]
    for name, folder in ((hf_clip[0], hf_clip[1]), ("dinov2", hf_dinov2[0])):
        full = create_scorer(name, pretrained=folder, device="cpu").embed(images)
        half = create_scorer(name, pretrained=folder, device="cpu", precision="bf16").embed(images)
        assert half.dtype == torch.float32 and (full * half).sum(-1).min() > 0.99, name


def test_dinov2_position_grid_resampled_as_transformers(hf_dinov2):
    """37 x 37 -> 16 x 16 exactly as Dinov2Embeddings does (bicubic, no antialiasing); timm's antialiased
    resampling would differ, so the choice is visible."""
    from timm.layers import resample_abs_pos_embed

    from nearid_metric.convert_vit import resample_position_embeddings

    _, model = hf_dinov2
    pos = model.embeddings.position_embeddings.detach()
    with torch.no_grad():
        expected = model.embeddings.interpolate_pos_encoding(torch.zeros(1, 257, 48), 224, 224)
    ours = resample_position_embeddings(pos, (16, 16))
    assert ours.shape == (1, 257, 48) and torch.equal(ours, expected)
    antialiased = resample_abs_pos_embed(pos, (16, 16), num_prefix_tokens=1)
    assert (antialiased - expected).abs().max() > 1e-3
    assert resample_position_embeddings(pos, (37, 37)) is pos  # the native grid is left alone


# --- layouts, signatures, metadata -----------------------------------------------------------------


def test_signature_names_layout_and_preprocessing(hf_clip, hf_dinov2, clip_folder, dino_folder):
    """One scorer from a transformers and from an open_clip folder, and dinov2 vs dinov2-518: distinct signatures."""
    from nearid_metric import create_scorer

    name, folder, _ = hf_clip
    from_hf = create_scorer(name, pretrained=folder, device="cpu").signature
    from_open_clip = create_scorer(name, pretrained=clip_folder, device="cpu").signature
    assert "|transformers:shortest224-crop224x224-bicubic-crop_floor|fp32|" in from_hf
    assert "|open_clip:shortest32-crop32x32-bicubic-rgb_convert|fp32|" in from_open_clip  # TINY_CLIP's 32 px
    dinov2 = create_scorer("dinov2", pretrained=hf_dinov2[0], device="cpu").signature
    dinov2_518 = create_scorer("dinov2-518", pretrained=dino_folder, device="cpu").signature
    assert dinov2.startswith("dinov2:local:") and "|transformers:shortest256-crop224x224-bicubic-crop_floor|" in dinov2
    assert dinov2_518.startswith("dinov2-518:local:") and "|timm:shortest56-crop56x56-bicubic-rgb_convert|" in dinov2_518


def test_text_tower_is_not_read(hf_clip, monkeypatch):
    """Only the image tower and the visual projection of the CLIPModel checkpoint are read."""
    from nearid_metric import create_scorer

    read, held = record_tensor_reads(monkeypatch)
    create_scorer(hf_clip[0], pretrained=hf_clip[1], device="cpu")
    assert any(key.startswith("text_model.") for key in held)
    assert read and all(key.startswith(("vision_model.", "visual_projection.")) for key in read)


def copy_folder(source: Path, target: Path, **config_changes) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    if config_changes:
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, **config_changes}))
    return target


def test_refusals_name_the_problem(hf_clip, hf_dinov2, dino_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    from nearid_metric import create_scorer

    name, folder, _ = hf_clip
    with pytest.raises(ValueError, match="model_type 'dinov2', not 'clip'"):
        create_scorer(name, pretrained=hf_dinov2[0], device="cpu")
    stray = copy_folder(folder, tmp_path / "stray")
    save_file({**load_file(stray / "model.safetensors"), "vision_model.extra.weight": torch.zeros(2)},
              stray / "model.safetensors")
    with pytest.raises(KeyError, match="vision_model.extra.weight"):
        create_scorer(name, pretrained=stray, device="cpu")
    cropped = copy_folder(folder, tmp_path / "cropped")
    write_preprocessor(cropped, {**CLIP_PREPROCESSOR, "crop_size": 196})
    with pytest.raises(ValueError, match="gives 196x196 pixels, but the encoder takes 224x224"):
        create_scorer(name, pretrained=cropped, device="cpu")
    swiglu = copy_folder(hf_dinov2[0], tmp_path / "swiglu", use_swiglu_ffn=True)
    with pytest.raises(ValueError, match="SwiGLU"):
        create_scorer("dinov2", pretrained=swiglu, device="cpu")
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):  # a timm folder is dinov2-518's
        create_scorer("dinov2", pretrained=dino_folder, device="cpu")


def test_metadata_says_what_each_scorer_matches():
    from nearid_metric.hub import registry
    from nearid_metric.scorers import SCORERS, scorer_info

    for name, info in SCORERS.items():
        assert info.matches and info.higher_is_better and info.score_range == (-1.0, 1.0), name
        assert info.embed_dim > 0 and info.input_size > 0, name
    assert "Table 1 'CLIP'" in scorer_info("clip-l14").matches
    assert "Table 1 'DINOv2'" in scorer_info("dinov2").matches
    assert scorer_info("dinov2-518").matches.startswith("none")
    assert "DreamBench++ CLIP-I" in scorer_info("clip-i").matches
    repos = {name: registry()[scorer_info(name).weights]["repo_id"] for name in ("clip-i", "clip-l14", "dinov2")}
    assert repos == {"clip-i": "openai/clip-vit-base-patch32", "clip-l14": "openai/clip-vit-large-patch14",
                     "dinov2": "facebook/dinov2-large"}
    assert [layout.name for layout in scorer_info("clip-i").layouts] == ["transformers", "open_clip"]
    assert (scorer_info("clip-l14").embed_dim, scorer_info("dinov2").input_size,
            scorer_info("dinov2-518").input_size) == (768, 224, 518)


def test_dinov2_attention_runs_through_sdpa(hf_dinov2, monkeypatch):
    """The converted timm ViT calls F.scaled_dot_product_attention (as the other timm scorers)."""
    from nearid_metric import create_scorer

    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *args, **kwargs: calls.append(q.shape) or real(q, *args, **kwargs))
    create_scorer("dinov2", pretrained=hf_dinov2[0], device="cpu").embed([random_image(5, (40, 40))])
    assert len(calls) == TINY_DINOV2["num_hidden_layers"]


@pytest.fixture
def open_clip_hub_repo(clip_folder, tmp_path, monkeypatch) -> list[str]:
    """``timm/tiny-clip`` on a fake Hub, laid out as timm's CLIP repos: open_clip files plus a timm
    ``config.json`` + ``model.safetensors``. Returns the list of files fetched from it."""
    import huggingface_hub

    repo = copy_folder(clip_folder, tmp_path / "repo")
    (repo / "config.json").write_text(json.dumps({"architecture": "vit_base_patch32_clip_224"}))
    (repo / "model.safetensors").write_bytes(b"timm weights, never to be fetched")
    fetched: list[str] = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        assert repo_id == "timm/tiny-clip"
        snapshot = tmp_path / "cache" / ("0" * 40)
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in allow_patterns:
            if (repo / name).is_file():
                fetched.append(name)
                (snapshot / name).write_bytes((repo / name).read_bytes())
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return fetched


def test_hub_repo_in_the_open_clip_layout_fetches_no_unread_weights(open_clip_hub_repo):
    from nearid_metric import create_scorer

    scorer = create_scorer("clip-i", pretrained="timm/tiny-clip", device="cpu")
    assert "model.safetensors" not in open_clip_hub_repo and "open_clip_model.safetensors" in open_clip_hub_repo
    assert scorer.signature.startswith(f"clip-i:timm/tiny-clip@{'0' * 40}|") and "|open_clip:" in scorer.signature


def test_download_command_fetches_the_layout_the_repo_is_in(open_clip_hub_repo, tmp_path, capsys):
    from nearid_metric.cli.score import main

    assert main(["download", "--model", "clip-l14=timm/tiny-clip", "--to", str(tmp_path / "copy")]) == 0
    assert "model.safetensors" not in open_clip_hub_repo
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == [
        "nearid-weights.json", "open_clip_config.json", "open_clip_model.safetensors"]
    assert "clip-l14: use --model" in capsys.readouterr().out
