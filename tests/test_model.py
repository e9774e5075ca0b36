"""The timm trunk + MAP head against transformers' SiglipVisionModel, and the NearIDScore API."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import (
    TINY_VISION,
    convert_mode,
    make_reference_model,
    nearid_state_dict,
    random_image,
    reference_embed,
    reference_pixels,
    sample_pictures,
    vision_tower,
    write_checkpoint,
)
from PIL import Image
from safetensors import safe_open
from transformers import SiglipVisionConfig, SiglipVisionModel

from nearid_metric import ImageLoadError, NearIDScore
from nearid_metric.model import VisionConfig, build_trunk, convert_siglip_state_dict, load_trunk


def read_preprocessor(folder) -> dict:
    return json.loads((folder / "preprocessor_config.json").read_text())


def reference_embeddings(model, folder, pictures) -> torch.Tensor:
    """Reference pipeline: transformers PIL-backend processor + SiglipVisionModel pooler, L2-normalised."""
    return reference_embed(model, reference_pixels(pictures, read_preprocessor(folder)))


def save_pngs(folder, pictures) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, picture in enumerate(pictures):
        path = folder / f"img{i}.png"
        picture.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def pictures():
    return sample_pictures()


# --- equivalence with the transformers reference -------------------------------------------------


@pytest.mark.parametrize("key_layout", ["transformers4", "transformers5"])
def test_embeddings_match_transformers(tmp_path, reference_model, pictures, key_layout):
    folder = write_checkpoint(reference_model, tmp_path / key_layout, key_layout=key_layout)
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys)
    prefix = {"transformers4": "backbone.vision_model.", "transformers5": "backbone.embeddings."}[key_layout]
    assert any(k.startswith(prefix) for k in keys)
    assert any(k.startswith("backbone.vision_model.") for k in keys) == (key_layout == "transformers4")

    scorer = NearIDScore.from_pretrained(folder, device="cpu")
    ours = scorer.embed(pictures)
    ref = reference_embeddings(reference_model, folder, pictures)

    assert ours.shape == ref.shape == (len(pictures), TINY_VISION["hidden_size"])
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert (ours - ref).abs().max().item() <= 1e-5  # measured ~1.2e-7
    assert (ours @ ours.T - ref @ ref.T).abs().max().item() <= 1e-5  # measured ~2.4e-7
    # the pictures are not all alike: the cosine check has something to check
    off_diagonal = (ref @ ref.T)[~torch.eye(len(pictures), dtype=torch.bool)]
    assert off_diagonal.min() < 0.99


def test_bicubic_checkpoint_matches_transformers(tmp_path, pictures):
    """A second random model, with bicubic resizing and another input size read from the files."""
    model = make_reference_model(seed=3, image_size=42, num_hidden_layers=1)
    folder = write_checkpoint(model, tmp_path / "bicubic", resample=3)
    ours = NearIDScore.from_pretrained(folder, device="cpu").embed(pictures)
    ref = reference_embeddings(model, folder, pictures)
    assert (ours - ref).abs().max().item() <= 1e-5


# --- the full-size architecture, on the meta device -----------------------------------------------

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=384, patch_size=14)


@pytest.mark.parametrize("key_layout", ["transformers4", "transformers5"])
def test_so400m_checkpoint_loads_into_trunk(key_layout):
    config = SiglipVisionConfig(**SO400M)
    with torch.device("meta"):
        reference = SiglipVisionModel(config)
    state = nearid_state_dict(reference, key_layout)  # "backbone." + the SiglipVisionModel names
    assert all(v.is_meta for v in state.values())
    converted = convert_siglip_state_dict(state)

    trunk = build_trunk(VisionConfig.from_dict(config.to_dict()))
    expected = trunk.state_dict()
    assert set(converted) == set(expected)
    mismatched = {k: (tuple(converted[k].shape), tuple(v.shape)) for k, v in expected.items()
                  if converted[k].shape != v.shape}
    assert not mismatched
    trunk.load_state_dict(converted, strict=True, assign=True)
    assert all(p.is_meta for p in trunk.parameters())

    total = sum(v.numel() for v in converted.values())
    head = sum(v.numel() for k, v in converted.items() if k.startswith("attn_pool."))
    assert total == sum(p.numel() for p in reference.parameters())
    assert 4.25e8 <= total <= 4.32e8  # ~428 M
    assert 1.4e7 <= head <= 1.6e7  # ~15 M
    assert tuple(trunk.pos_embed.shape) == (1, 729, 1152)  # 27 x 27 tokens, no class token
    assert trunk.cls_token is None and trunk.num_prefix_tokens == 0
    assert all(block.mlp.fc1.out_features == 4304 for block in trunk.blocks)
    assert len(trunk.blocks) == 27 and trunk.blocks[0].attn.num_heads == 16
    assert trunk.norm.eps == 1e-6


# --- conversion details on the tiny model ---------------------------------------------------------


def tiny_state(model) -> dict:
    return nearid_state_dict(model, "transformers4")


def tiny_config(model) -> VisionConfig:
    return VisionConfig.from_dict(model.config.to_dict())


def test_head_in_proj_splits_into_q_and_kv(reference_model):
    converted = convert_siglip_state_dict(tiny_state(reference_model))
    mha = vision_tower(reference_model).head.attention
    assert isinstance(mha, torch.nn.MultiheadAttention)
    d = mha.embed_dim
    # nn.MultiheadAttention stacks q, k, v in this order
    q_w, k_w, v_w = mha.in_proj_weight.split(d)
    q_b, k_b, v_b = mha.in_proj_bias.split(d)
    assert torch.equal(converted["attn_pool.q.weight"], q_w)
    assert torch.equal(converted["attn_pool.q.bias"], q_b)
    assert torch.equal(converted["attn_pool.kv.weight"], torch.cat([k_w, v_w]))
    assert torch.equal(converted["attn_pool.kv.bias"], torch.cat([k_b, v_b]))
    assert torch.equal(converted["attn_pool.latent"], vision_tower(reference_model).head.probe)
    # the encoder's separate projections are stacked the same way
    layer = vision_tower(reference_model).encoder.layers[1].self_attn
    assert torch.equal(converted["blocks.1.attn.qkv.weight"],
                       torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))


def test_head_alone_matches_reference_head(reference_model):
    """The MAP head on the same tokens: timm's attn_pool vs transformers' SiglipMultiheadAttentionPoolingHead."""
    trunk = load_trunk(tiny_config(reference_model), tiny_state(reference_model))
    tokens = torch.randn(3, 16, TINY_VISION["hidden_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = vision_tower(reference_model).head(tokens)
        ours = trunk.attn_pool(tokens)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-5


def test_unknown_key_raises(reference_model):
    state = tiny_state(reference_model)
    with pytest.raises(KeyError, match="head.extra"):
        convert_siglip_state_dict({**state, "backbone.vision_model.head.extra": torch.zeros(1)})
    with pytest.raises(KeyError, match="text_model"):
        convert_siglip_state_dict({**state, "text_model.embeddings.token_embedding.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="patch_embedding"):
        convert_siglip_state_dict({"backbone.foo.weight": torch.zeros(1)})


def test_missing_key_raises(reference_model):
    config = tiny_config(reference_model)
    state = tiny_state(reference_model)

    def without(name):
        assert name in state
        return {k: v for k, v in state.items() if k != name}

    with pytest.raises(RuntimeError, match="norm.weight"):
        load_trunk(config, without("backbone.vision_model.post_layernorm.weight"))
    with pytest.raises(RuntimeError, match="attn_pool.latent"):
        load_trunk(config, without("backbone.vision_model.head.probe"))
    with pytest.raises(KeyError, match="q/k/v"):
        load_trunk(config, without("backbone.vision_model.encoder.layers.0.self_attn.k_proj.bias"))
    load_trunk(config, state)  # and the complete one loads


# --- the NearIDScore API --------------------------------------------------------------------------


def test_batch_size_invariance(scorer, pictures):
    seven = pictures + [random_image(77, (45, 45))]
    assert len(seven) == 7
    one = scorer.embed(seven, batch_size=1)
    all_at_once = scorer.embed(seven, batch_size=7)
    three = scorer.embed(seven, batch_size=3)
    assert (one - all_at_once).abs().max().item() <= 1e-6
    assert (three - all_at_once).abs().max().item() <= 1e-6


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_reduced_precision(checkpoint_dir, scorer, pictures, precision, dtype):
    low = NearIDScore.from_pretrained(checkpoint_dir, device="cpu", precision=precision)
    assert next(low.trunk.parameters()).dtype == dtype
    assert f"|{precision}|" in low.signature
    emb = low.embed(pictures)
    full = scorer.embed(pictures)
    assert emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert (emb.norm(dim=-1) - 1).abs().max().item() <= 1e-5
    assert not torch.equal(emb, full)  # it really ran in reduced precision
    assert (emb * full).sum(-1).min().item() >= 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_checkpoint_loads_cast_as_read_like_load_trunk(checkpoint_dir, dtype):
    """Casting each tensor as it is read (q/k/v as they are stacked) gives load_trunk's weights exactly, in their own
    memory (not the file's float16 tensors)."""
    from safetensors.torch import load_file

    from nearid_metric.model import load_checkpoint_trunk

    config = VisionConfig.from_dict(json.loads((checkpoint_dir / "config.json").read_text())["vision_config"])
    stored = load_file(checkpoint_dir / "model.safetensors")
    expected = load_trunk(config, stored, dtype=dtype).state_dict()
    loaded = load_checkpoint_trunk(checkpoint_dir, dtype=dtype, device="cpu").state_dict()
    assert loaded.keys() == expected.keys()
    assert all(loaded[k].dtype == dtype and torch.equal(loaded[k], expected[k]) for k in expected)
    stacked = convert_siglip_state_dict(stored, dtype=dtype)  # the q/k/v stacks in dtype, the others as given
    assert all(torch.equal(stacked[k], v.to(dtype) if ".qkv." in k else v)
               for k, v in convert_siglip_state_dict(stored).items())


def test_unknown_precision_raises(checkpoint_dir):
    with pytest.raises(ValueError, match="precision"):
        NearIDScore.from_pretrained(checkpoint_dir, device="cpu", precision="int8")


def test_paths_pil_and_tensor_inputs_agree(tmp_path, scorer):
    same_size = [random_image(20 + i, (61, 45)) for i in range(3)]
    paths = save_pngs(tmp_path, same_size)
    tensor = torch.stack([torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1) for p in same_size])
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 3, 45, 61)

    from_pil = scorer.embed(same_size)
    from_paths = scorer.embed(paths)
    from_str = scorer.embed([str(p) for p in paths])
    from_tensor = scorer.embed(tensor)
    for other in (from_paths, from_str, from_tensor):
        assert (other - from_pil).abs().max().item() <= 1e-6
    assert from_pil.shape == (3, TINY_VISION["hidden_size"])
    assert (from_pil.norm(dim=-1) - 1).abs().max().item() <= 1e-6


def test_bad_inputs_raise(tmp_path, scorer):
    good = torch.zeros(2, 3, 20, 20, dtype=torch.uint8)
    four_channels = torch.zeros(2, 4, 20, 20, dtype=torch.uint8)
    for bad in (good.float(), good.permute(0, 2, 3, 1).contiguous(), good[0], four_channels):
        with pytest.raises(ValueError, match="uint8"):
            scorer.embed(bad)
    path = save_pngs(tmp_path, [random_image(1, (20, 20))])[0]
    for single in (path, str(path), random_image(1, (20, 20))):
        with pytest.raises(TypeError, match="sequence"):
            scorer.embed(single)


def test_score_and_score_matrix(reference_model, checkpoint_dir, scorer, pictures):
    refs, gens = pictures[:3], pictures[3:]
    e_refs, e_gens = scorer.embed(refs), scorer.embed(gens)

    scores = scorer.score(refs, gens)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert (scores - (e_refs * e_gens).sum(-1)).abs().max().item() <= 1e-6
    # and against the transformers reference's cosines
    r_refs = reference_embeddings(reference_model, checkpoint_dir, refs)
    r_gens = reference_embeddings(reference_model, checkpoint_dir, gens)
    assert (scores - (r_refs * r_gens).sum(-1)).abs().max().item() <= 1e-5

    matrix = scorer.score_matrix(refs, gens[:2])
    assert matrix.shape == (3, 2)
    assert (matrix - e_refs @ e_gens[:2].T).abs().max().item() <= 1e-6
    assert torch.allclose(torch.diagonal(scorer.score_matrix(refs, gens)), scores, atol=1e-6)

    with pytest.raises(ValueError, match="3 refs vs 2 gens"):
        scorer.score(refs, gens[:2])


def test_bad_file_named_and_failures_kept(tmp_path, scorer):
    paths = save_pngs(tmp_path / "ok", [random_image(30 + i, (33, 40)) for i in range(4)])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.png"

    with pytest.raises(ImageLoadError) as excinfo:
        scorer.embed([paths[0], broken, paths[1]])
    assert excinfo.value.path == str(broken)
    assert str(broken) in str(excinfo.value)

    mixed = [paths[0], broken, paths[1], empty, paths[2], missing, paths[3]]
    with pytest.raises(ImageLoadError) as excinfo:
        scorer.embed(mixed, batch_size=3)
    for bad in (broken, empty, missing):
        assert str(bad) in str(excinfo.value)

    emb, failures = scorer.embed_with_failures(mixed, batch_size=3)
    assert set(failures) == {1, 3, 5}
    assert "0 bytes" in failures[3] and "not found" in failures[5]
    assert emb.shape == (7, TINY_VISION["hidden_size"])
    nan_rows = torch.isnan(emb).all(dim=1)
    assert nan_rows.tolist() == [False, True, False, True, False, True, False]
    assert not torch.isnan(emb[~nan_rows]).any()
    clean = scorer.embed(paths)
    assert (emb[[0, 2, 4, 6]] - clean).abs().max().item() <= 1e-6

    all_bad, failures = scorer.embed_with_failures([broken, missing])
    assert set(failures) == {0, 1}
    assert all_bad.shape == (2, TINY_VISION["hidden_size"]) and torch.isnan(all_bad).all()


def test_workers_match_in_process(tmp_path, scorer):
    paths = save_pngs(tmp_path, [random_image(40 + i, (30 + 7 * i, 50)) for i in range(5)])
    serial = scorer.embed(paths, batch_size=2, num_workers=0)
    parallel = scorer.embed(paths, batch_size=2, num_workers=2)
    assert (serial - parallel).abs().max().item() <= 1e-6
    # rows stay in input order
    assert (scorer.embed(paths[::-1], batch_size=2, num_workers=2) - serial.flip(0)).abs().max().item() <= 1e-6


def test_no_more_workers_than_batches(scorer, pictures, monkeypatch):
    """Two images in one forward batch start one decode worker, however many were asked for."""
    import nearid_metric.loading as loading

    started, real = [], loading.DataLoader
    monkeypatch.setattr(loading, "DataLoader", lambda *a, **k: started.append(k["num_workers"]) or real(*a, **k))
    emb = scorer.embed(pictures[:2], batch_size=2, num_workers=8)
    assert started == [1] and torch.allclose(emb, scorer.embed(pictures[:2], batch_size=2), atol=1e-6)


def test_embeddings_unit_norm_and_not_degenerate(scorer, pictures):
    emb = scorer.embed(pictures)
    assert emb.shape == (6, scorer.embed_dim) and scorer.embed_dim == TINY_VISION["hidden_size"]
    assert (emb.norm(dim=-1) - 1).abs().max().item() <= 1e-6
    assert not math.isclose((emb[0] @ emb[1]).item(), 1.0, abs_tol=1e-4)
    # a picture and its exact copy score 1
    same = scorer.score([pictures[0]], [pictures[0].copy()])
    assert abs(same.item() - 1.0) <= 1e-6


def test_mode_handling_matches_reference(reference_model, checkpoint_dir, scorer):
    """Transparent and palette pictures go through the same conversion as the reference (16-bit ones are rescaled,
    a documented deviation: test_images_hardening.py)."""
    rng = np.random.default_rng(0)
    base = random_image(50, (70, 52))
    images = [convert_mode(base, mode, rng) for mode in ("RGBA", "LA", "P")]
    images.append(Image.fromarray(np.zeros((20, 30, 4), dtype=np.uint8), "RGBA"))  # fully transparent
    ours = scorer.embed(images)
    ref = reference_embeddings(reference_model, checkpoint_dir, images)
    assert (ours - ref).abs().max().item() <= 1e-5
