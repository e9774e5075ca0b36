"""DINO v1 (``dino-vits16`` / ``dino-vits8``), ``dinov2-small`` and explicit preprocessing, against the references.

Pixels: the benchmarks' torchvision compositions (``Resize(256, bicubic)`` + ``CenterCrop(224)``
+ ``ToTensor`` + ``Normalize``, RGB conversion first or, as CustomConcept101, after the crop) and
transformers' ``BitImageProcessor`` (``use_fast=False``), fed PIL images of odd and non-square
sizes in several modes: compared exactly. Embeddings: transformers ``ViTModel`` /
``Dinov2Model`` ``last_hidden_state[:, 0]`` on tiny random checkpoints written by
``save_pretrained`` (and, for timm's DINO layout, timm's ``save_for_hf``), read through
:func:`nearid_metric.create_scorer`; max abs difference of L2-normalised embeddings < 1e-5.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import random_image, randomize_
from PIL import Image
from test_paper_scorers import DINOV2_PREPROCESSOR, reference_processor, scorer_pixels, write_preprocessor

from nearid_metric import create_scorer
from nearid_metric.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    preprocess,
    torchvision_eval,
)

TOL = 1e-5
# (width, height), mode: odd and non-square both ways, a square below the resize; crop margins of .5 included
IMAGES = [((301, 517), "RGB"), ((517, 301), "L"), ((255, 255), "RGBA"), ((301, 517), "P"), ((517, 301), "CMYK"),
          ((255, 255), "P"), ((389, 260), "RGBA"), ((97, 131), "L"), ((640, 427), "RGB"), ((300, 225), "CMYK")]


def images() -> list[Image.Image]:
    return [random_image(200 + i, size, mode) for i, (size, mode) in enumerate(IMAGES)]


def torchvision_transform(mean, std, *, rgb_after_crop: bool = False, shortest: int = 256, crop: int = 224):
    """The benchmarks' eval transform, built from torchvision (image -> float32 [3, crop, crop])."""
    from torchvision import transforms as T

    steps = [T.Resize(shortest, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop)]
    if rgb_after_crop:
        steps.append(T.Lambda(lambda image: image.convert("RGB")))
    transform = T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
    return (lambda image: transform(image)) if rgb_after_crop else (lambda image: transform(image.convert("RGB")))


# --- preprocessing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("after_crop", [False, True], ids=["rgb-first", "rgb-after-crop"])
@pytest.mark.parametrize("mean, std, shortest, crop", [(IMAGENET_MEAN, IMAGENET_STD, 256, 224),
                                                       (CLIP_MEAN, CLIP_STD, 224, 224)], ids=["dino", "clip"])
def test_torchvision_eval_equals_torchvision(after_crop, mean, std, shortest, crop):
    """DINO's transform (DreamBooth, DreamBench++) and CustomConcept101's (RGB after the crop): identical pixels."""
    config = torchvision_eval(shortest, crop, mean, std, rgb_mode="after_crop" if after_crop else "convert")
    reference = torchvision_transform(mean, std, rgb_after_crop=after_crop, shortest=shortest, crop=crop)
    for image in images():
        got = preprocess(image, config)
        assert got.dtype == torch.float32 and torch.equal(got, reference(image)), (image.size, image.mode)


def test_rgb_after_crop_is_not_the_same_as_first():
    """The conversion order changes the pixels of palette and RGBA images (so the after-crop test is not vacuous)."""
    first, after = (torchvision_eval(256, 224, IMAGENET_MEAN, IMAGENET_STD, rgb_mode=mode)
                    for mode in ("convert", "after_crop"))
    differ = {image.mode for image in images() if not torch.equal(preprocess(image, first), preprocess(image, after))}
    assert {"P", "RGBA"} <= differ and "RGB" not in differ


def test_describe_tells_apart_what_gives_other_pixels():
    base = torchvision_eval(256, 224, IMAGENET_MEAN, IMAGENET_STD)
    assert base.describe() == "shortest256-crop224x224-bicubic-rgb_convert"
    after_crop = dataclasses.replace(base, rgb_mode="after_crop")
    assert after_crop.describe() == "shortest256-crop224x224-bicubic-rgb_after_crop"
    assert PreprocessConfig.from_dict(DINOV2_PREPROCESSOR).describe() == "shortest256-crop224x224-bicubic-crop_floor"
    assert dataclasses.replace(base, rgb_mode="white").describe() == "shortest256-crop224x224-bicubic"
    assert base.describe(normalization=True) == base.describe() + "-mean0.485,0.456,0.406-std0.229,0.224,0.225"
    variants = [base, dataclasses.replace(base, rgb_mode="after_crop"), dataclasses.replace(base, rgb_mode="white"),
                dataclasses.replace(base, crop_offset="floor"), dataclasses.replace(base, image_std=CLIP_STD),
                dataclasses.replace(base, rescale_factor=1 / 256), dataclasses.replace(base, do_normalize=False),
                dataclasses.replace(base, do_rescale=False)]
    assert len({v.describe(normalization=True) for v in variants}) == len(variants)


def test_torchvision_eval_refuses_what_it_does_not_reproduce():
    with pytest.raises(ValueError, match="rgb_mode"):
        torchvision_eval(256, 224, IMAGENET_MEAN, IMAGENET_STD, rgb_mode="white")
    with pytest.raises(ValueError, match="padding"):
        torchvision_eval(200, 224, IMAGENET_MEAN, IMAGENET_STD, rgb_mode="after_crop")
    with pytest.raises(ValueError, match="mean"):
        torchvision_eval(256, 224, (0.5, 0.5), IMAGENET_STD)


# --- tiny checkpoints -----------------------------------------------------------------------------


def vit_config(patch: int, **changes):
    from transformers import ViTConfig

    return ViTConfig(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
                               image_size=224, patch_size=patch), **changes})


def save_vit(folder: Path, config, *, pooler: bool, seed: int):
    """A tiny random ViTModel saved as facebook/dino-vits* are (transformers' names, no preprocessing read)."""
    from transformers import ViTModel

    model = ViTModel(config, add_pooling_layer=pooler)
    randomize_(model, seed)
    model.eval().save_pretrained(folder)
    return model


# eps: transformers' default 1e-12 (as facebook/dino-vits* have it) or a large one, so that reading it matters
DINO_CASES = {"dino-vits16": dict(patch=16, changes={}, pooler=True),
              "dino-vits8": dict(patch=8, changes=dict(layer_norm_eps=0.1, qkv_bias=False), pooler=False)}


@pytest.fixture(scope="module", params=sorted(DINO_CASES))
def hf_dino(request, tmp_path_factory):
    """(scorer name, folder, ViTModel): a tiny DINO v1 of that scorer's patch size."""
    case = DINO_CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    model = save_vit(folder, vit_config(case["patch"], **case["changes"]), pooler=case["pooler"], seed=11)
    return request.param, folder, model


def class_token(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model(pixel_values=pixels).last_hidden_state[:, 0], dim=-1)


def test_dino_matches_transformers(hf_dino):
    """Pixels identical to DINO's torchvision transform; class tokens within 1e-5 of ViTModel's."""
    name, folder, model = hf_dino
    scorer = create_scorer(name, pretrained=folder, device="cpu")
    pictures = images()
    reference = torchvision_transform(IMAGENET_MEAN, IMAGENET_STD)
    expected_pixels = torch.stack([reference(image) for image in pictures])
    assert torch.equal(scorer_pixels(scorer, pictures), expected_pixels)
    assert (scorer.embed(pictures) - class_token(model, expected_pixels)).abs().max() < TOL
    assert scorer.embed_dim == 32
    assert "|transformers:shortest256-crop224x224-bicubic-rgb_convert|fp32|" in scorer.signature


def test_dino_reads_the_layer_norm_eps(tmp_path):
    """The same weights with another eps in config.json embed differently (the dino-vits8 case, eps 0.1, matches
    ViTModel above only because eps is read)."""
    save_vit(tmp_path / "large", vit_config(16, layer_norm_eps=0.1), pooler=False, seed=14)
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "model.safetensors").write_bytes((tmp_path / "large" / "model.safetensors").read_bytes())
    vit_config(16).save_pretrained(tmp_path / "default")
    pictures = images()[:3]
    large, default = (create_scorer("dino-vits16", pretrained=tmp_path / k, device="cpu").embed(pictures)
                      for k in ("large", "default"))
    assert (large - default).abs().max() > 1e-3


def timm_to_transformers_vit(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """timm ViT weights under facebook/dino-vits* names (written here, independently of the package)."""
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.position_embeddings": state["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{src}attn.qkv.{kind}"].chunk(3)
            out |= {f"{dst}attention.attention.query.{kind}": q, f"{dst}attention.attention.key.{kind}": k,
                    f"{dst}attention.attention.value.{kind}": v}
            for a, b in (("attn.proj", "attention.output.dense"), ("norm1", "layernorm_before"),
                         ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
                out[f"{dst}{b}.{kind}"] = state[f"{src}{a}.{kind}"]
    return out


@pytest.fixture(scope="module")
def timm_dino(tmp_path_factory) -> tuple[Path, Path]:
    """(timm folder, transformers folder) holding the same tiny DINO ViT/16: timm's save_for_hf, and the
    same weights under transformers' names (loaded into ViTModel with nothing missing or left over)."""
    import timm
    from safetensors.torch import load_file, save_file
    from timm.models._hub import save_for_hf
    from transformers import ViTModel

    args = dict(embed_dim=32, depth=2, num_heads=4)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **args)
    randomize_(model, 12)
    timm_folder = tmp_path_factory.mktemp("timm-dino")
    save_for_hf(model, timm_folder, model_args=args, safe_serialization=True)
    hf_folder = tmp_path_factory.mktemp("timm-dino-as-hf")
    vit_config(16, intermediate_size=128, layer_norm_eps=1e-6).save_pretrained(hf_folder)
    save_file(timm_to_transformers_vit(load_file(timm_folder / "model.safetensors"), 2),
              hf_folder / "model.safetensors", metadata={"format": "pt"})
    _, info = ViTModel.from_pretrained(hf_folder, add_pooling_layer=False, output_loading_info=True)
    assert not any(info.values()), info
    return timm_folder, hf_folder


def test_dino_timm_layout_matches_transformers(timm_dino):
    """A timm vit_small_patch16_224.dino folder: the same pixels, and within 1e-5 of ViTModel on those weights."""
    from transformers import ViTModel

    timm_folder, hf_folder = timm_dino
    reference = ViTModel.from_pretrained(hf_folder, add_pooling_layer=False).eval()
    from_timm = create_scorer("dino-vits16", pretrained=timm_folder, device="cpu")
    from_hf = create_scorer("dino-vits16", pretrained=hf_folder, device="cpu")
    assert from_timm.preprocess_config == from_hf.preprocess_config  # DINO's transform, not timm's crop_pct 0.9
    pictures = images()
    pixels = torch.stack([torchvision_transform(IMAGENET_MEAN, IMAGENET_STD)(image) for image in pictures])
    assert torch.equal(scorer_pixels(from_timm, pictures), pixels)
    expected = class_token(reference, pixels)
    assert (from_timm.embed(pictures) - expected).abs().max() < TOL
    assert (from_hf.embed(pictures) - expected).abs().max() < TOL
    assert "|timm:shortest256-crop224x224-bicubic-rgb_convert|" in from_timm.signature
    assert "|transformers:" in from_hf.signature


def test_dino_refuses_other_folders(hf_dino, tmp_path):
    """A DINOv2 folder is in neither of DINO's layouts; stray tensors and another input size are named."""
    from safetensors.torch import load_file, save_file
    from transformers import Dinov2Config, Dinov2Model

    name, folder, _ = hf_dino
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)).save_pretrained(
        tmp_path / "v2")
    with pytest.raises(FileNotFoundError, match="transformers, timm"):
        create_scorer(name, pretrained=tmp_path / "v2", device="cpu")
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "config.json").write_bytes((folder / "config.json").read_bytes())
    save_file({**load_file(folder / "model.safetensors"), "encoder.layer.0.extra.weight": torch.zeros(2)},
              stray / "model.safetensors")
    with pytest.raises(KeyError, match="encoder.layer.0.extra.weight"):
        create_scorer(name, pretrained=stray, device="cpu")
    with pytest.raises(ValueError, match="gives 196x196 pixels, but the encoder takes 224x224"):
        create_scorer(name, pretrained=folder, device="cpu",
                      preprocess=torchvision_eval(224, 196, IMAGENET_MEAN, IMAGENET_STD))


# --- dinov2-small -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dinov2_small(tmp_path_factory):
    """(folder, Dinov2Model): a tiny DINOv2 saved as facebook/dinov2-small is (518-px position grid)."""
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
                                     image_size=518, patch_size=14, layer_norm_eps=1e-6))
    randomize_(model, 13)
    folder = tmp_path_factory.mktemp("dinov2-small")
    model.eval().save_pretrained(folder)
    write_preprocessor(folder, DINOV2_PREPROCESSOR)  # facebook/dinov2-small's is the same as -large's
    return folder, model


def test_dinov2_small_matches_transformers(hf_dinov2_small):
    """Pixels identical to BitImageProcessor (use_fast=False) on the raw images; class tokens within 1e-5."""
    folder, model = hf_dinov2_small
    scorer = create_scorer("dinov2-small", pretrained=folder, device="cpu")
    pictures = images()
    expected_pixels = reference_processor(folder)(images=pictures, return_tensors="pt")["pixel_values"]
    assert torch.equal(scorer_pixels(scorer, pictures), expected_pixels)
    assert (scorer.embed(pictures) - class_token(model, expected_pixels)).abs().max() < TOL
    assert scorer.signature.startswith("dinov2-small:local:")
    assert "|transformers:shortest256-crop224x224-bicubic-crop_floor|" in scorer.signature


# --- explicit preprocessing ---------------------------------------------------------------------------


def test_explicit_preprocessing_replaces_the_weights_own(hf_dino, hf_dinov2_small):
    """CustomConcept101's DINO (RGB after the crop): pixels equal its torchvision transform; the signature says so."""
    name, folder, model = hf_dino
    after_crop = torchvision_eval(256, 224, IMAGENET_MEAN, IMAGENET_STD, rgb_mode="after_crop")
    default = create_scorer(name, pretrained=folder, device="cpu")
    custom = create_scorer(name, pretrained=folder, device="cpu", preprocess=after_crop)
    pictures = images()
    reference = torchvision_transform(IMAGENET_MEAN, IMAGENET_STD, rgb_after_crop=True)
    pixels = torch.stack([reference(image) for image in pictures])
    assert custom.preprocess_config == after_crop and torch.equal(scorer_pixels(custom, pictures), pixels)
    assert (custom.embed(pictures) - class_token(model, pixels)).abs().max() < TOL
    detail = "|transformers:shortest256-crop224x224-bicubic-rgb_after_crop-mean0.485,0.456,0.406-std0.229,0.224,0.225|"
    assert detail in custom.signature and custom.signature != default.signature
    # the DINOv2 position grid follows an explicit crop (224 -> 196: 14 x 14 patches)
    folder2, model2 = hf_dinov2_small
    small = create_scorer("dinov2-small", pretrained=folder2, device="cpu",
                          preprocess=torchvision_eval(224, 196, IMAGENET_MEAN, IMAGENET_STD))
    pixels2 = torch.stack([torchvision_transform(IMAGENET_MEAN, IMAGENET_STD, shortest=224, crop=196)(im)
                           for im in pictures[:4]])
    with torch.no_grad():
        expected = F.normalize(model2(pixel_values=pixels2).last_hidden_state[:, 0], dim=-1)
    assert (small.embed(pictures[:4]) - expected).abs().max() < TOL


def test_new_scorers_metadata():
    from nearid_metric.hub import registry
    from nearid_metric.scorers import scorer_info

    repos = {name: registry()[scorer_info(name).weights]["repo_id"] for name in ("dino-vits16", "dino-vits8",
                                                                               "dinov2-small")}
    assert repos == {"dino-vits16": "facebook/dino-vits16", "dino-vits8": "facebook/dino-vits8",
                     "dinov2-small": "facebook/dinov2-small"}
    assert [layout.name for layout in scorer_info("dino-vits8").layouts] == ["transformers", "timm"]
    assert "DreamBench++ DINO" in scorer_info("dino-vits8").matches
    assert "DreamBooth" in scorer_info("dino-vits16").matches
    assert all(scorer_info(n).embed_dim == 384 and scorer_info(n).input_size == 224
               for n in ("dino-vits16", "dino-vits8", "dinov2-small"))
