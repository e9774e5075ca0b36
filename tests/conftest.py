"""Shared fixtures: tiny random SigLIP checkpoints in the released NearID folder format.

The checkpoints are written by transformers' ``SiglipVisionModel`` (the reference
implementation) with the exact key layout and float16 storage of the released weights,
and read back through the package's real loading code. Nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; set before huggingface_hub is imported

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

# Odd sizes on purpose: intermediate/hidden is not a whole number (as in so400m, 4304/1152).
TINY_VISION = dict(hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
                   image_size=56, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)

# Tiny baselines: an open_clip CLIP (ViT image tower) and a timm DINOv2 ViT.
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
TINY_CLIP = dict(embed_dim=16, quick_gelu=True,
                 vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=16, head_width=32),
                 text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1))
TINY_DINO = dict(embed_dim=48, depth=2, num_heads=4, img_size=56)


def preprocessor_dict(size: int, resample: int = 2) -> dict:
    """A SiglipImageProcessor config like the SigLIP2 base model's, at ``size`` px."""
    return {
        "image_processor_type": "SiglipImageProcessor",
        "processor_class": "SiglipProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": resample,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def make_reference_model(seed: int = 0, **overrides) -> SiglipVisionModel:
    """A random transformers SiglipVisionModel whose weights are exactly representable in fp16."""
    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(**{**TINY_VISION, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # what a float16 checkpoint upcast to fp32 holds
    return model.eval()


def write_checkpoint(model: SiglipVisionModel, folder: Path, *, key_layout: str = "transformers4",
                     resample: int = 2) -> Path:
    """Save ``model`` as a NearID release folder (config.json, model.safetensors fp16, preprocessor)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.half().contiguous() for k, v in nearid_state_dict(model, key_layout).items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = {
        "model_type": "nearid",
        "architectures": ["NearIDModel"],
        "auto_map": {"AutoConfig": "configuration_nearid.NearIDConfig", "AutoModel": "modeling_nearid.NearIDModel"},
        "vision_config": model.config.to_dict(),
        "embed_dim": model.config.hidden_size,
        "normalize_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    size = model.config.image_size
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_dict(size, resample), indent=2))
    return folder


def reference_embed(model: SiglipVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """The reference NearID embedding: pooler output (MAP head), L2-normalised, float32."""
    with torch.no_grad():
        pooled = model(pixel_values=pixels).pooler_output
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def random_image(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A smooth-ish random picture (so resizing filters matter) in ``mode``; size is (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 256, (max(2, h // 7), max(2, w // 7), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.integers(-20, 21, (h, w, 3))
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8))
    return convert_mode(image, mode, rng)


def convert_mode(image: Image.Image, mode: str, rng: np.random.Generator) -> Image.Image:
    if mode == "RGBA":
        alpha = rng.integers(0, 256, image.size[::-1], dtype=np.uint8)
        rgba = image.convert("RGBA")
        rgba.putalpha(Image.fromarray(alpha))
        return rgba
    if mode == "I;16":  # 16-bit greyscale spanning the full range
        grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        return Image.fromarray(grey)
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return image.convert(mode)


@pytest.fixture(scope="session")
def reference_model() -> SiglipVisionModel:
    return make_reference_model()


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory, reference_model) -> Path:
    return write_checkpoint(reference_model, tmp_path_factory.mktemp("ckpt") / "nearid-tiny")


@pytest.fixture(scope="session")
def scorer(checkpoint_dir):
    from nearid_metric import NearIDScore

    return NearIDScore.from_pretrained(checkpoint_dir, device="cpu")


# --- helpers for the model / preprocessing / hub tests -------------------------------------------


def reference_processor(config: dict):
    """transformers' PIL-backend SigLIP image processor (the paper's path) built from a config dict."""
    try:
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    except ImportError:  # transformers 4: the plain class is the PIL/numpy ("slow") processor
        from transformers import SiglipImageProcessor as SiglipImageProcessorPil
    return SiglipImageProcessorPil.from_dict(config)


def reference_pixels(images: list[Image.Image], config: dict) -> torch.Tensor:
    """Pixels [N, 3, H, W] float32 from the reference processor for the preprocessor ``config``."""
    return reference_processor(config)(images=images, return_tensors="pt")["pixel_values"]


def sample_pictures() -> list[Image.Image]:
    """Six pictures of odd sizes and modes (RGB, RGBA, L, P, CMYK, a wide strip)."""
    specs = [((37, 23), "RGB"), ((80, 61), "RGBA"), ((56, 56), "L"), ((101, 47), "P"),
             ((64, 90), "CMYK"), ((5, 130), "RGB")]
    return [random_image(10 + i, size, mode) for i, (size, mode) in enumerate(specs)]


def hf_cache_layout(checkpoint: Path, cache: Path, repo_id: str, commit: str) -> Path:
    """Copy a checkpoint folder into a Hugging Face cache layout; returns the snapshot folder.

    ``<cache>/models--org--name/snapshots/<commit>/<files>`` plus ``refs/main`` holding the
    commit hash (no trailing newline, as huggingface_hub writes it).
    """
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copyfile(checkpoint / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def vision_tower(model: SiglipVisionModel) -> torch.nn.Module:
    """The module holding embeddings/encoder/head: ``model.vision_model`` in transformers 4, the model in 5."""
    return getattr(model, "vision_model", model)


def nearid_state_dict(model: SiglipVisionModel, key_layout: str = "transformers4") -> dict[str, torch.Tensor]:
    """``model``'s weights under the released checkpoint's names, whatever transformers version built it.

    transformers 5's ``SiglipVisionModel`` has no ``vision_model.`` level in its state dict,
    transformers 4's has; this gives ``backbone.vision_model.<name>`` ("transformers4", the
    released layout) or ``backbone.<name>`` ("transformers5") in every version.
    """
    prefix = {"transformers4": "backbone.vision_model.", "transformers5": "backbone."}[key_layout]
    return {prefix + k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}


# --- tiny baseline checkpoints, each written by the library that defines it ---------------------


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with noise (norm scales around 1) so no block is a near-identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith(("gamma", "lambda1")):
                p.copy_(0.5 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


@pytest.fixture(scope="session")
def siglip_base(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny SigLIP image-text model saved as the google/siglip2 repos are (text tower included)."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(1)
    text = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=TINY_VISION)).eval()
    folder = tmp_path_factory.mktemp("siglip2-base")
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_dict(TINY_VISION["image_size"])))
    return folder, model.vision_model


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory) -> Path:
    import open_clip

    torch.manual_seed(2)
    model = open_clip.CLIP(**TINY_CLIP)
    randomize_(model, 2)
    folder = tmp_path_factory.mktemp("clip")
    preprocess_cfg = {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": preprocess_cfg}))
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    return folder


@pytest.fixture(scope="session")
def dino_folder(tmp_path_factory) -> Path:
    import timm
    from timm.models._hub import save_for_hf

    model = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0, **TINY_DINO)
    randomize_(model, 3)
    folder = tmp_path_factory.mktemp("dinov2")
    save_for_hf(model, folder, model_args=TINY_DINO, safe_serialization=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    return folder


@pytest.fixture(scope="session")
def clip_vocab(tmp_path_factory) -> Path:
    """A folder with OpenAI CLIP's vocab.json + merges.txt, made as the openai/clip-* repos' are."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    base = list(bytes_to_unicode().values())
    tokens = [*base, *(b + "</w>" for b in base), *("".join(m.split(" ")) for m in merges),
              "<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408
    folder = tmp_path_factory.mktemp("clip-vocab")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def record_tensor_reads(monkeypatch) -> tuple[list[str], list[str]]:
    """Make the package's ``safe_open`` record what it does: returns ``(read, held)``, the names of the tensors
    read with ``get_tensor`` and the names every opened file listed with ``keys``."""
    import nearid_metric.convert as convert

    read: list[str] = []
    held: list[str] = []
    real = convert.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.file = real(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            held.extend(self.file.keys())
            return self.file.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.file.get_tensor(key)

    monkeypatch.setattr(convert, "safe_open", Recording)
    return read, held
