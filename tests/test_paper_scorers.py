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
from conftest import random_image
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
    old = PreprocessConfig.from_file(write_preprocessor(tmp_path / "old", CLIP_PREPROCESSOR) / "preprocessor_config.json")
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
    """An int size is a shortest edge for CLIP / BiT processors and a square for the others (as transformers reads it)."""
    assert PreprocessConfig.from_dict(CLIP_PREPROCESSOR).shortest_edge == 224
    siglip = {"image_processor_type": "SiglipImageProcessor", "size": 384, "resample": 2}
    assert (PreprocessConfig.from_dict(siglip).height, PreprocessConfig.from_dict(siglip).resize_mode) == (384, "squash")
