"""The baseline scorers against their reference implementations, on tiny random weights.

Each tiny checkpoint is written in the real released format by the library that defines it
(transformers ``SiglipModel.save_pretrained``; an open_clip ``CLIP`` saved as
``open_clip_config.json`` + ``open_clip_model.safetensors``; timm's own ``save_for_hf``) and
read back through :func:`nearid_metric.create_scorer`, the code path of the full models.
The transformers-format CLIP and DINOv2 defaults are tested in ``test_paper_scorers.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP, TINY_VISION, preprocessor_dict, random_image, reference_pixels, sample_pictures
from PIL import Image
from safetensors.torch import save_file

from nearid_metric import NearIDScore, create_scorer, list_scorers
from nearid_metric.images import ImageLoadError
from nearid_metric.preprocess import normalization_table, normalize_uint8, resize_to_uint8
from nearid_metric.scorer import embed_images

TOL = 1e-5
# Sizes chosen so that the long edge after the shortest-edge resize is odd and even, and the
# centre-crop offset (long - crop) / 2 hits .5 (rounded half to even, as torchvision does).
CROP_SIZES = [(37, 23), (80, 61), (56, 56), (101, 47), (64, 90), (5, 130), (33, 32), (129, 64)]


def pictures() -> list[Image.Image]:
    extra = [random_image(40 + i, size) for i, size in enumerate(CROP_SIZES)]
    return sample_pictures() + extra


# --- SigLIP2 readouts ----------------------------------------------------------------------------


@pytest.mark.parametrize("readout", ["map", "mean"])
def test_siglip2_readouts_match_transformers(siglip_base, readout):
    folder, vision = siglip_base
    images = sample_pictures()
    pixels = reference_pixels(images, preprocessor_dict(TINY_VISION["image_size"]))
    with torch.no_grad():
        out = vision(pixel_values=pixels)
    pooled = out.pooler_output if readout == "map" else out.last_hidden_state.mean(dim=1)
    scorer = create_scorer(f"siglip2-{readout}", pretrained=folder, device="cpu")
    got = scorer.embed(images)
    assert (got - F.normalize(pooled, dim=-1)).abs().max() < TOL
    assert scorer.embed_dim == TINY_VISION["hidden_size"]
    assert scorer.signature.startswith(f"siglip2-{readout}:local:")


def test_siglip2_readouts_differ(siglip_base):
    images = sample_pictures()[:3]
    by_map = create_scorer("siglip2-map", pretrained=siglip_base[0], device="cpu").embed(images)
    by_mean = create_scorer("siglip2-mean", pretrained=siglip_base[0], device="cpu").embed(images)
    assert (by_map - by_mean).abs().max() > 0.1


def test_siglip2_refuses_unknown_tensors(siglip_base, tmp_path):
    """Only the text tower is skipped: any other stray tensor is still an error."""
    from safetensors.torch import load_file

    folder = tmp_path / "stray"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (folder / name).write_bytes((siglip_base[0] / name).read_bytes())
    weights = load_file(siglip_base[0] / "model.safetensors")
    save_file({**weights, "vision_model.extra.weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match="extra"):
        create_scorer("siglip2-map", pretrained=folder, device="cpu")


# --- CLIP-I (open_clip) --------------------------------------------------------------------------


def test_clip_pixels_match_open_clip_transform(clip_folder):
    """Equal to open_clip's eval transform on RGB input (images are converted at load, as loaders do).

    Given a raw non-RGB PIL image, open_clip's transform resizes before converting (palette
    images then resize with nearest); converting first is the documented choice here.
    """
    import open_clip

    _, _, transform = open_clip.create_model_and_transforms(f"local-dir:{clip_folder}")
    scorer = create_scorer("clip-i", pretrained=clip_folder, device="cpu")
    table = normalization_table(scorer.preprocess_config)
    for image in pictures():
        ours = normalize_uint8(resize_to_uint8(image, scorer.preprocess_config)[None], table)[0]
        assert torch.equal(ours, transform(image.convert("RGB"))), (image.size, image.mode)


def test_clip_embeddings_match_open_clip(clip_folder):
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{clip_folder}")
    images = pictures()
    with torch.no_grad():
        pixels = torch.stack([transform(im.convert("RGB")) for im in images])
        expected = model.eval().encode_image(pixels, normalize=True)
    scorer = create_scorer("clip-i", pretrained=clip_folder, device="cpu")
    assert (scorer.embed(images) - expected).abs().max() < TOL
    assert scorer.embed_dim == TINY_CLIP["embed_dim"]


def test_clip_needs_safetensors(clip_folder, tmp_path):
    """A folder with pickled weights only is refused (never unpickled)."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "open_clip_config.json").write_bytes((clip_folder / "open_clip_config.json").read_bytes())
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(FileNotFoundError, match="open_clip_model.safetensors") as excinfo:
        create_scorer("clip-i", pretrained=folder, device="cpu")
    assert "model.safetensors, preprocessor_config.json" in str(excinfo.value)  # nor in the transformers layout


# --- dinov2-518: timm's DINOv2 folder at its native 518 px (tiny: 56 px) ------------------------


def timm_to_transformers_dinov2(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """timm DINOv2 weights under the names of the facebook/dinov2 checkpoints (written here, independently of the package)."""
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.mask_token": torch.zeros_like(state["cls_token"][0]),
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{src}attn.qkv.{kind}"].chunk(3)
            out |= {f"{dst}attention.attention.query.{kind}": q, f"{dst}attention.attention.key.{kind}": k,
                    f"{dst}attention.attention.value.{kind}": v,
                    f"{dst}attention.output.dense.{kind}": state[f"{src}attn.proj.{kind}"]}
            for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[f"{dst}{b}.{kind}"] = state[f"{src}{a}.{kind}"]
        out[f"{dst}layer_scale1.lambda1"] = state[f"{src}ls1.gamma"]
        out[f"{dst}layer_scale2.lambda1"] = state[f"{src}ls2.gamma"]
    return out


def test_dinov2_pixels_match_timm_transform(dino_folder):
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(f"local-dir:{dino_folder}", pretrained=True, num_classes=0)
    transform = create_transform(**resolve_data_config({}, model=model))
    scorer = create_scorer("dinov2-518", pretrained=dino_folder, device="cpu")
    table = normalization_table(scorer.preprocess_config)
    for image in pictures():
        ours = normalize_uint8(resize_to_uint8(image, scorer.preprocess_config)[None], table)[0]
        assert torch.equal(ours, transform(image.convert("RGB"))), (image.size, image.mode)


def test_dinov2_matches_transformers(dino_folder, tmp_path):
    """Against transformers' Dinov2Model loading the same weights from a facebook/dinov2-style folder."""
    from safetensors.torch import load_file
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, image_size=56,
                          patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu")
    config.save_pretrained(tmp_path)
    save_file(timm_to_transformers_dinov2(load_file(dino_folder / "model.safetensors"), 2),
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    reference, info = Dinov2Model.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # every weight matched, nothing left at random init
    reference.eval()
    scorer = create_scorer("dinov2-518", pretrained=dino_folder, device="cpu")
    images = pictures()
    table = normalization_table(scorer.preprocess_config)
    pixels = normalize_uint8(torch.stack([resize_to_uint8(im, scorer.preprocess_config) for im in images]), table)
    with torch.no_grad():
        expected = F.normalize(reference(pixel_values=pixels).pooler_output, dim=-1)
    assert (scorer.embed(images) - expected).abs().max() < TOL
    assert scorer.embed_dim == 48


# --- the registry and the shared interface -------------------------------------------------------


def test_list_scorers():
    assert list_scorers()[:1] == ["nearid"]
    expected = {"nearid", "siglip2-map", "siglip2-mean", "clip-i", "clip-l14", "dinov2", "dinov2-518"}
    assert expected <= set(list_scorers())


def test_nearid_through_create_scorer(checkpoint_dir, scorer):
    built = create_scorer("nearid", pretrained=checkpoint_dir, device="cpu")
    assert isinstance(built, NearIDScore) and built.signature == scorer.signature
    images = sample_pictures()
    assert torch.equal(built.embed(images), scorer.embed(images))


def test_unknown_scorer_names_the_known_ones():
    with pytest.raises(ValueError, match="clip-i") as excinfo:
        create_scorer("clip")
    assert "dinov2" in str(excinfo.value)


def test_bad_precision(clip_folder):
    with pytest.raises(ValueError, match="precision"):
        create_scorer("clip-i", pretrained=clip_folder, precision="fp8")


@pytest.mark.parametrize("name", ["clip-i", "dinov2-518"])
def test_bf16_close_to_fp32(name, clip_folder, dino_folder):
    folder = {"clip-i": clip_folder, "dinov2-518": dino_folder}[name]
    images = pictures()
    full = create_scorer(name, pretrained=folder, device="cpu").embed(images)
    half = create_scorer(name, pretrained=folder, device="cpu", precision="bf16").embed(images)
    assert half.dtype == torch.float32
    assert (full * half).sum(-1).min() > 0.99


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_embeddings_are_normalised_in_float32(precision, clip_folder):
    """The encoder runs in half precision, but the L2 normalisation happens in float32: unit norms to 1e-6.

    (Normalising in bf16/fp16 and casting afterwards leaves norms off by ~1e-3.)
    """
    images = pictures()
    emb = create_scorer("clip-i", pretrained=clip_folder, device="cpu", precision=precision).embed(images)
    assert emb.dtype == torch.float32
    assert (emb.double().norm(dim=-1) - 1).abs().max() < 1e-6


def test_embed_images_shares_one_decode(monkeypatch, tmp_path, checkpoint_dir, clip_folder, dino_folder, siglip_base):
    """Several scorers in one pass decode each file once and equal separate runs, failures included."""
    import nearid_metric.loading as loading_module

    paths = []
    for i, size in enumerate(CROP_SIZES[:5]):
        paths.append(tmp_path / f"{i}.png")
        random_image(70 + i, size).save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"")
    paths.insert(2, tmp_path / "bad.png")
    scorers = [create_scorer("nearid", pretrained=checkpoint_dir, device="cpu"),
               create_scorer("siglip2-mean", pretrained=siglip_base[0], device="cpu"),
               create_scorer("clip-i", pretrained=clip_folder, device="cpu"),
               create_scorer("dinov2-518", pretrained=dino_folder, device="cpu")]
    separate = [s.embed_with_failures(paths, batch_size=4) for s in scorers]

    calls = []
    real = loading_module.read_and_decode
    monkeypatch.setattr(loading_module, "read_and_decode", lambda p: calls.append(p) or real(p))
    together, failures = embed_images(scorers, paths, batch_size=4)
    assert sorted(map(str, calls)) == sorted(map(str, paths))  # each file opened exactly once
    assert failures == {2: "empty file (0 bytes)"}
    for (emb, fail), got in zip(separate, together):
        assert fail == failures
        assert torch.isnan(got[2]).all()
        assert torch.equal(torch.nan_to_num(emb), torch.nan_to_num(got))


def test_baseline_embed_names_bad_file(tmp_path, clip_folder):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(good)
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        create_scorer("clip-i", pretrained=clip_folder, device="cpu").embed([good, tmp_path / "broken.jpg"])


def test_registry_matches_scorers():
    """Each scorer's default weights are registered, with the files that scorer needs (an entry shared with a
    text scorer lists the text tower's files too), and cross-referenced."""
    from nearid_metric.hub import registry
    from nearid_metric.scorers import SCORERS
    from nearid_metric.text import TEXT_FILES, TEXT_SCORERS

    for name, info in SCORERS.items():
        entry = registry()[info.weights]
        assert tuple(entry["files"][:len(info.files)]) == info.files, name
        assert info.weights_file in info.files
        assert name in entry["scorers"], name
    for name, weights in TEXT_SCORERS.items():
        entry = registry()[weights]
        assert tuple(entry["files"]) == TEXT_FILES and entry["text_scorers"] == [name], name
    for key, entry in registry().items():
        assert all(SCORERS[name].weights == key for name in entry["scorers"]), key
        assert all(TEXT_SCORERS[name] == key for name in entry.get("text_scorers", [])), key
        assert set(entry["files"]) in ({*SCORERS[entry["scorers"][0]].files}, {*TEXT_FILES}), key
        assert (Path(__file__).parents[1] / entry["card"]).is_file(), entry["card"]


def test_score_pairs_reads_each_file_once(monkeypatch, tmp_path, scorer, clip_folder):
    """A file reached directly and through a symlink is decoded once; a pair with a bad side is NaN, unscored."""
    import nearid_metric.loading as loading_module
    from nearid_metric.scorer import score_pairs

    a, b, bad = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "bad.png"
    random_image(80, (50, 40)).save(a)
    random_image(81, (30, 60)).save(b)
    bad.write_bytes(b"")
    (tmp_path / "link.png").symlink_to(a)
    pairs = [(a, b), (tmp_path / "link.png", b), (b, bad), (a, a)]
    clip = create_scorer("clip-i", pretrained=clip_folder, device="cpu")
    opened = []
    real = loading_module.read_and_decode
    monkeypatch.setattr(loading_module, "read_and_decode", lambda p: opened.append(str(p)) or real(p))
    values, scored, failures = score_pairs([scorer, clip], pairs, batch_size=2)
    assert sorted(opened) == sorted(map(str, (a, b, bad)))
    assert scored.tolist() == [True, True, False, True]
    assert failures == {str(bad): "empty file (0 bytes)"}
    for built, got in zip((scorer, clip), values):
        assert torch.isnan(got[2])
        expected = built.score([a, a, a], [b, b, a])
        assert torch.allclose(got[[0, 1, 3]], expected, atol=1e-6)
