"""transformers ``CLIPModel`` checkpoints (``openai/clip-vit-*``) read into open_clip's image and text towers.

The image tower (``vision_model.*`` + ``visual_projection.weight``) becomes an open_clip
``VisionTransformer`` (:func:`load_clip_visual`), the text tower (``text_model.*`` +
``text_projection.weight``) an open_clip ``TextTransformer`` (:func:`load_clip_text`); each
reads only its own tensors, and any other tensor of its tower is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from open_clip.transformer import LayerNorm as OpenClipLayerNorm
from open_clip.transformer import QuickGELU, TextTransformer
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer

from nearid_metric.convert import KeyTable, convert_keys, load_strict, mlp_ratio, read_config, read_tensors

# transformers' CLIPVisionConfig / CLIPTextConfig defaults for fields a config.json may leave out.
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      eos_token_id=49407)
_ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": torch.nn.GELU}
LEGACY_EOS_TOKEN_ID = 2
"""The ``eos_token_id`` of older CLIP configs (the openai repos): transformers then pools at the largest token id."""

# CLIPEncoderLayer modules -> open_clip ResidualAttentionBlock modules (both towers).
_LAYER_RENAMES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _tower_keys(family: str, tower: str, renames: Mapping[str, str]) -> KeyTable:
    """A CLIP tower's table (``tower``: ``vision_model`` or ``text_model``): its own ``renames``, the encoder
    layers shared by both towers, and the ``position_ids`` buffer older checkpoints saved, skipped."""
    return KeyTable(family=family, renames=renames, layers=f"{tower}.encoder.layers.",
                    layer_target="transformer.resblocks.{layer}", layer_renames=_LAYER_RENAMES, qkv=_QKV,
                    qkv_target="attn.in_proj_{param}", skipped=(f"{tower}.embeddings.position_ids",))


VISION_KEYS = _tower_keys("CLIP", "vision_model", {
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm.weight": "ln_pre.weight",  # sic: transformers' spelling
    "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight",
    "vision_model.post_layernorm.bias": "ln_post.bias",
    "visual_projection.weight": "proj",
})
TEXT_KEYS = _tower_keys("CLIP text", "text_model", {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",
})
_TEXT_TOWER = ("text_model.", "text_projection.", "logit_scale")
_VISION_TOWER = ("vision_model.", "visual_projection.", "logit_scale")


def _transposed(tensor: torch.Tensor) -> torch.Tensor:
    """A projection [E, D] as open_clip multiplies on the right: [D, E]."""
    return tensor.T.contiguous()


def _tower_config(config: Mapping[str, Any], tower: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``{tower}_config`` of a ``CLIPConfig`` dict (``{tower}_config_dict``, in older files, wins, as transformers
    reads it), transformers' defaults filled in; refuses an activation open_clip lacks."""
    fields = {**defaults, **config.get(f"{tower}_config", {}), **config.get(f"{tower}_config_dict", {})}
    if fields["hidden_act"] not in _ACTIVATIONS:
        raise ValueError(f"unsupported CLIP hidden_act {fields['hidden_act']!r}; known: {sorted(_ACTIVATIONS)}")
    return fields


def clip_vision_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The vision fields of a transformers ``CLIPConfig`` dict, with transformers' defaults filled in."""
    vision = _tower_config(config, "vision", _VISION_DEFAULTS)
    if vision["num_channels"] != 3:
        raise ValueError(f"CLIP vision tower with {vision['num_channels']} input channels; only RGB is supported")
    return vision


def clip_text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The text fields of a transformers ``CLIPConfig`` dict, with transformers' defaults filled in."""
    return _tower_config(config, "text", _TEXT_DEFAULTS)


def convert_clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``CLIPModel`` state dict's image tower to open_clip's ``VisionTransformer`` names.

    Reads ``vision_model.*`` and ``visual_projection.weight`` [E, D], which becomes ``proj`` [D, E]
    (open_clip multiplies on the right); q/k/v projections [D, D] are stacked into
    ``attn.in_proj_weight`` [3D, D] (q, k, v order). Pass it no text-tower tensors.
    Raises ``KeyError`` naming unknown or incomplete keys.
    """
    return convert_keys(state_dict, VISION_KEYS, {"proj": _transposed})


def convert_clip_text_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``CLIPModel`` state dict's text tower to open_clip's ``TextTransformer`` names.

    Reads ``text_model.*`` and ``text_projection.weight`` [E, D], which becomes ``text_projection``
    [D, E]; q/k/v stacked as for the image tower. Pass it no image-tower tensors.
    Raises ``KeyError`` naming unknown or incomplete keys.
    """
    return convert_keys(state_dict, TEXT_KEYS, {"text_projection": _transposed})


def _transformer_args(tower: Mapping[str, Any], output_dim: int) -> dict[str, Any]:
    """The constructor arguments open_clip's image and text towers share, from a tower's config fields."""
    return dict(width=tower["hidden_size"], layers=tower["num_hidden_layers"], heads=tower["num_attention_heads"],
                mlp_ratio=mlp_ratio(tower["intermediate_size"], tower["hidden_size"]), output_dim=output_dim,
                act_layer=_ACTIVATIONS[tower["hidden_act"]],
                norm_layer=partial(OpenClipLayerNorm, eps=tower["layer_norm_eps"]))


def load_clip_visual(folder: Path, *, dtype: torch.dtype, device: torch.device | str) -> OpenClipVisionTransformer:
    """open_clip's image tower [B, 3, S, S] -> projected embedding [B, E] from a transformers CLIP folder.

    Reads ``config.json`` (``model_type: clip``) and ``model.safetensors`` without its text tower
    (``text_model.*``, ``text_projection.*``, ``logit_scale`` are not read), straight onto
    ``device`` in ``dtype``; strict loading, eval mode, no gradients.
    """
    vision = clip_vision_config(read_config(folder, "clip"))
    weights = folder / "model.safetensors"
    state = convert_clip_state_dict(read_tensors(weights, dtype=dtype, device=device, skip=_TEXT_TOWER))
    if "proj" not in state:
        raise KeyError(f"{weights} has no visual_projection.weight: not a CLIPModel checkpoint")
    with torch.device("meta"):
        model = OpenClipVisionTransformer(image_size=vision["image_size"], patch_size=vision["patch_size"],
                                          **_transformer_args(vision, state["proj"].shape[1]))
    return load_strict(model, state)


def load_clip_text(folder: Path, *, dtype: torch.dtype, device: torch.device | str) -> TextTransformer:
    """open_clip's text tower: token ids [B, L] (L <= the context length) -> projected embedding [B, E].

    Reads ``config.json`` (``model_type: clip``) and ``model.safetensors`` without the image tower,
    straight onto ``device`` in ``dtype``; strict loading, eval mode, no gradients. Causal attention;
    the embedding is read at the end-of-text token as transformers' ``CLIPTextTransformer`` finds it:
    the largest id of each row when the config's ``eos_token_id`` is the legacy 2 (the openai repos),
    else the first ``eos_token_id``.
    """
    text = clip_text_config(read_config(folder, "clip"))
    weights = folder / "model.safetensors"
    state = convert_clip_text_state_dict(read_tensors(weights, dtype=dtype, device=device, skip=_VISION_TOWER))
    if "text_projection" not in state:
        raise KeyError(f"{weights} has no text_projection.weight: not a CLIPModel checkpoint")
    eos = text["eos_token_id"]
    with torch.device("meta"):
        model = TextTransformer(context_length=text["max_position_embeddings"], vocab_size=text["vocab_size"],
                                pool_type="argmax" if eos == LEGACY_EOS_TOKEN_ID else "eos", eos_id=eos,
                                **_transformer_args(text, state["text_projection"].shape[1]))
    with torch.device(device):
        model.attn_mask = model.build_causal_mask().to(dtype)  # a buffer no checkpoint holds
    return load_strict(model, state)
