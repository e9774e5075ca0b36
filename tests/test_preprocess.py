"""Preprocessing against transformers' PIL-backend SigLIP image processor (the paper's path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import preprocessor_dict, random_image, reference_pixels
from PIL import Image

from nearid_metric.images import load_image
from nearid_metric.preprocess import PreprocessConfig, normalization_table, preprocess, to_rgb

SIZES = [(37, 23), (5, 301), (640, 481), (56, 56)]  # (width, height)
MODES = ["RGB", "L", "RGBA", "P", "P+transparency", "CMYK", "I;16", "LA"]


def make_picture(seed: int, size: tuple[int, int], mode: str) -> Image.Image:
    if mode == "P+transparency":
        image = random_image(seed, size, "P")
        # Make the most common palette entry transparent, so that compositing visibly matters.
        index = int(np.bincount(np.asarray(image).ravel()).argmax())
        image.info["transparency"] = index
        return image
    return random_image(seed, size, mode)


def ours_vs_reference(image: Image.Image, config: dict) -> float:
    ours = preprocess(image, PreprocessConfig.from_dict(config))
    ref = reference_pixels([image], config)[0]
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape == (3, config["size"]["height"], config["size"]["width"])
    return (ours - ref).abs().max().item()


@pytest.mark.parametrize("resample", [2, 3], ids=["bilinear", "bicubic"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference_processor(size, mode, resample):
    image = make_picture(sum(size) + len(mode), size, mode)
    assert ours_vs_reference(image, preprocessor_dict(56, resample)) <= 1e-6  # measured: exactly 0


@pytest.mark.parametrize("mode", ["1", "I", "F", "YCbCr", "HSV", "LAB", "RGBX", "RGBa", "PA"])
def test_other_modes_match_reference_processor(mode):
    image = random_image(11, (37, 29)).convert(mode)
    assert image.mode == mode
    assert ours_vs_reference(image, preprocessor_dict(56, 3)) <= 1e-6


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_non_default_config_is_read_from_file(mode):
    """Mean, std, rescale factor and a non-square size all come from the config."""
    config = preprocessor_dict(56, 3)
    config.update(size={"height": 42, "width": 70}, image_mean=[0.48, 0.45, 0.40], image_std=[0.26, 0.26, 0.27],
                  rescale_factor=1 / 256)
    image = make_picture(7, (91, 33), mode)
    assert ours_vs_reference(image, config) <= 1e-6
    # the same size with the default mean/std/rescale gives other values: the agreement is not by chance
    default = {**preprocessor_dict(56, 3), "size": config["size"]}
    ours = preprocess(image, PreprocessConfig.from_dict(config))
    assert (ours - preprocess(image, PreprocessConfig.from_dict(default))).abs().max() > 0.05


def test_p_transparency_case_is_not_vacuous():
    image = make_picture(1, (37, 23), "P+transparency")
    transparent = np.asarray(image) == image.info["transparency"]
    assert transparent.any()
    rgb = np.asarray(to_rgb(image))
    assert (rgb[transparent] == 255).all()
    assert not np.array_equal(rgb, np.asarray(image.convert("RGB")))


def test_rgba_composited_on_white_by_hand():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0  # fully transparent
    rgba[0, 1, 3] = 255  # opaque
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out.shape == (9, 11, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == tuple(rgba[0, 1, :3])
    # over white: c * a + 255 * (1 - a), a = alpha / 255 (PIL rounds in integer arithmetic: allow 1 level)
    alpha = rgba[..., 3:].astype(np.float64) / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0


def test_rgb_is_unchanged():
    image = random_image(3, (20, 10))
    assert to_rgb(image) is image


@pytest.mark.parametrize(
    "change, message",
    [
        ({"do_resize": False}, "do_resize"),
        ({"do_center_crop": True, "crop_size": {"height": 56, "width": 56}}, "crop"),
        ({"size": {"shortest_edge": 56}}, "height and width"),
        ({"size": {"height": 56}}, "height and width"),
    ],
)
def test_config_refuses_what_it_cannot_reproduce(change, message):
    config = {**preprocessor_dict(56), **change}
    with pytest.raises(ValueError, match=message):
        PreprocessConfig.from_dict(config)


def test_config_fields_parsed():
    config = PreprocessConfig.from_dict({**preprocessor_dict(384, 3), "image_mean": 0.25})
    assert (config.height, config.width, config.resample) == (384, 384, 3)
    assert config.image_mean == (0.25, 0.25, 0.25)
    assert config.image_std == (0.5, 0.5, 0.5)


def test_normalization_table_values():
    table = normalization_table(PreprocessConfig.from_dict(preprocessor_dict(56)))
    assert table.shape == (3, 256) and table.dtype == torch.float32
    assert torch.all(table[:, 0] == -1.0)
    assert torch.all(table[:, 255] == 1.0)
    assert torch.all((table[:, 128] - (128 / 255 - 0.5) / 0.5).abs() <= 1e-7)
    expected = (np.arange(256) / 255 - 0.5) / 0.5
    assert np.abs(table.numpy() - expected[None]).max() <= 1e-6


def test_normalization_table_per_channel():
    config = {**preprocessor_dict(56), "image_mean": [0.48, 0.45, 0.40], "image_std": [0.26, 0.26, 0.27]}
    table = normalization_table(PreprocessConfig.from_dict(config)).numpy()
    levels = np.arange(256) / 255
    for c, (m, s) in enumerate(zip(config["image_mean"], config["image_std"])):
        assert np.abs(table[c] - (levels - m) / s).max() <= 1e-6


def test_exif_orientation_applied(tmp_path):
    image = random_image(5, (40, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    with Image.open(path) as raw:
        assert raw.size == (40, 24)  # stored as written
    loaded = load_image(path)
    assert loaded.size == (24, 40)
    assert 0x0112 not in loaded.getexif()  # orientation consumed, not applied twice downstream
