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


# --- shortest-edge resize + centre crop (CLIP via open_clip, DINOv2 via timm) ----------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (width, height): odd and even long edges after the resize, crop offsets hitting .5, landscape and portrait
CROP_PICTURES = [(37, 23), (80, 61), (30, 30), (101, 47), (64, 90), (5, 130), (33, 32), (129, 64)]


def crop_pictures() -> list[Image.Image]:
    return [random_image(60 + i, size) for i, size in enumerate(CROP_PICTURES)]


@pytest.mark.parametrize("size, crop_pct, shortest_edge", [
    (224, 0.875, 256), (224, 0.9, 248), (224, 0.95, 235), (224, 1.0, 224),  # 248.9 -> 248, 235.8 -> 235
    (30, 0.875, 34), (30, 0.95, 31), (518, 1.0, 518),
])
def test_timm_shortest_edge_floors_size_over_crop_pct(size, crop_pct, shortest_edge):
    """timm's eval transform resizes the shortest edge to floor(size / crop_pct) (truncated, not rounded)."""
    from nearid_metric.preprocess import config_from_timm

    config = config_from_timm({"input_size": (3, size, size), "interpolation": "bicubic", "mean": IMAGENET_MEAN,
                               "std": IMAGENET_STD, "crop_pct": crop_pct, "crop_mode": "center"})
    assert (config.height, config.width, config.shortest_edge) == (size, size, shortest_edge)
    assert (config.resize_mode, config.rgb_mode, config.resample) == ("shortest", "convert", 3)
    assert config.image_mean == IMAGENET_MEAN and config.image_std == IMAGENET_STD


@pytest.mark.parametrize("crop_pct", [0.875, 0.95, 1.0])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_timm_config_pixels_match_timm_eval_transform(crop_pct, interpolation):
    """Bit-exact against timm's own eval transform for crop_pct < 1 too (the tiny DINOv2 uses crop_pct 1)."""
    from timm.data import create_transform

    from nearid_metric.preprocess import config_from_timm

    data_config = {"input_size": (3, 30, 30), "interpolation": interpolation, "mean": IMAGENET_MEAN,
                   "std": IMAGENET_STD, "crop_pct": crop_pct, "crop_mode": "center"}
    transform = create_transform(**data_config)
    config = config_from_timm(data_config)
    for image in crop_pictures():
        assert torch.equal(preprocess(image, config), transform(image)), (image.size, crop_pct, interpolation)


@pytest.mark.parametrize("change", [{"crop_mode": "squash"}, {"crop_mode": "border"}, {"input_size": (3, 30, 40)},
                                    {"interpolation": "nearest"}])
def test_timm_config_refuses_other_crops(change):
    from nearid_metric.preprocess import config_from_timm

    data_config = {"input_size": (3, 30, 30), "interpolation": "bicubic", "mean": IMAGENET_MEAN,
                   "std": IMAGENET_STD, "crop_pct": 0.875, "crop_mode": "center"}
    with pytest.raises(ValueError, match="unsupported timm data config"):
        config_from_timm({**data_config, **change})


@pytest.mark.parametrize("resize_mode, image_size", [("shortest", 30), ("squash", 30), ("squash", (24, 40))])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_open_clip_config_pixels_match_open_clip_transform(resize_mode, image_size, interpolation):
    """config_from_open_clip against open_clip's eval transform, both resize modes and a non-square squash."""
    import open_clip

    from nearid_metric.preprocess import config_from_open_clip

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    config = config_from_open_clip({"mean": mean, "std": std, "interpolation": interpolation,
                                    "resize_mode": resize_mode}, image_size)
    transform = open_clip.image_transform(image_size, is_train=False, mean=mean, std=std, resize_mode=resize_mode,
                                          interpolation=interpolation)
    assert config.rgb_mode == "convert"  # open_clip loaders convert("RGB"): alpha dropped, not composited on white
    for image in crop_pictures():
        ours = preprocess(image, config)
        assert torch.equal(ours, transform(image)), (image.size, resize_mode, interpolation)
    if image_size == (24, 40):
        assert ours.shape == (3, 24, 40)  # (height, width)


def test_center_crop_offsets_by_hand():
    """A 7 x 4 ramp resized to itself: the crop window starts at round-half-even((7 - 4) / 2) = 2, not 3 // 2 = 1."""
    config = PreprocessConfig(height=4, width=4, resample=2, resize_mode="shortest", shortest_edge=4,
                              rgb_mode="convert", do_normalize=False, do_rescale=False)
    ramp = np.repeat(np.arange(7, dtype=np.uint8)[None, :, None] * 30, 4, axis=0).repeat(3, axis=2)  # [H=4, W=7, 3]
    out = preprocess(Image.fromarray(ramp), config)
    assert out.shape == (3, 4, 4)
    assert out[0, 0].tolist() == [60.0, 90.0, 120.0, 150.0]  # columns 2..5
    tall = preprocess(Image.fromarray(np.ascontiguousarray(ramp.transpose(1, 0, 2))), config)  # 4 wide, 7 high
    assert tall[0, :, 0].tolist() == [60.0, 90.0, 120.0, 150.0]  # rows 2..5
    # 9 x 4: (9 - 4) / 2 = 2.5 rounds half to even -> 2 (torchvision), columns 2..5
    wide = np.repeat(np.arange(9, dtype=np.uint8)[None, :, None] * 20, 4, axis=0).repeat(3, axis=2)
    assert preprocess(Image.fromarray(wide), config)[0, 0].tolist() == [40.0, 60.0, 80.0, 100.0]
