"""transformers-format CLIP and DINOv2 checkpoints, read into open_clip and timm modules.

The paper's CLIP and DINOv2 baselines (and DreamBench++'s CLIP-I) are the Hub repos
``openai/clip-vit-*`` and ``facebook/dinov2-*``: a ``config.json`` and a ``model.safetensors``
under transformers' names. This module maps such a ``config.json`` to the open_clip / timm
constructor and renames the weights to that library's names, so transformers is not needed
at run time. Only the image tower is read (for CLIP also its visual projection); any tensor
that is neither mapped nor listed as skipped is an error. Key tables: docs/scorers.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm as OpenClipLayerNorm
from open_clip.transformer import QuickGELU
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from safetensors import safe_open
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer

# transformers' CLIPVisionConfig / Dinov2Config defaults for fields a config.json may leave out.
_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                             layer_norm_eps=1e-5)
_DINOV2_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, hidden_act="gelu",
                        layer_norm_eps=1e-6, image_size=224, patch_size=14, num_channels=3, qkv_bias=True,
                        layerscale_value=1.0, use_swiglu_ffn=False)
_CLIP_ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": torch.nn.GELU}

# CLIPModel names (after "vision_model.") -> open_clip VisionTransformer names; "{i}" is the layer.
_CLIP_RENAMES = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",  # sic: transformers' spelling
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_CLIP_LAYER_RENAMES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                       "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_CLIP_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_CLIP_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_CLIP_SKIPPED = ("embeddings.position_ids",)  # a buffer older checkpoints saved
_CLIP_TEXT_TOWER = ("text_model.", "text_projection.", "logit_scale")

# Dinov2Model names -> timm VisionTransformer names.
_DINOV2_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_DINOV2_LAYER_RENAMES = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
                         "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_DINOV2_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_DINOV2_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_DINOV2_SKIPPED = ("embeddings.mask_token",)  # masked-image-modelling token, unused at inference


def _read_config(folder: Path, model_type: str) -> dict[str, Any]:
    """``folder/config.json``, checked to be a transformers config of ``model_type`` (``clip``, ``dinov2``)."""
    path = folder / "config.json"
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("model_type") != model_type:
        raise ValueError(f"{path} has model_type {config.get('model_type')!r}, not {model_type!r}: not a "
                         f"transformers {model_type} checkpoint")
    return config


def _read_tensors(path: Path, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, except those whose names start with one of ``skip`` (not read)."""
    with safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys() if not (skip and name.startswith(skip))}


# --- CLIP -> open_clip ---------------------------------------------------------------------------


def clip_vision_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The vision fields of a transformers ``CLIPConfig`` dict, with transformers' defaults filled in.

    ``vision_config_dict`` (older files) overrides ``vision_config``, as transformers reads it.
    """
    vision = {**_CLIP_VISION_DEFAULTS, **config.get("vision_config", {}), **config.get("vision_config_dict", {})}
    if vision["hidden_act"] not in _CLIP_ACTIVATIONS:
        raise ValueError(f"unsupported CLIP hidden_act {vision['hidden_act']!r}; known: {sorted(_CLIP_ACTIVATIONS)}")
    if vision["num_channels"] != 3:
        raise ValueError(f"CLIP vision tower with {vision['num_channels']} input channels; only RGB is supported")
    return vision


def convert_clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``CLIPModel`` state dict's image tower to open_clip's ``VisionTransformer`` names.

    Reads ``vision_model.*`` and ``visual_projection.weight`` [E, D], which becomes ``proj`` [D, E]
    (open_clip multiplies on the right); q/k/v projections [D, D] are stacked into
    ``attn.in_proj_weight`` [3D, D] (q, k, v order). Pass it no text-tower tensors.
    Raises ``KeyError`` naming unknown or incomplete keys.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        name = key.removeprefix("vision_model.")
        if key == "visual_projection.weight":
            out["proj"] = tensor.T.contiguous()
        elif name != key and name in _CLIP_RENAMES:
            out[_CLIP_RENAMES[name]] = tensor
        elif name != key and (match := _CLIP_LAYER.match(name)):
            layer, module, kind = int(match[1]), match[2], match[3]
            prefix = f"transformer.resblocks.{layer}."
            if module in _CLIP_QKV:
                qkv.setdefault((layer, kind), {})[module] = tensor
            elif module in _CLIP_LAYER_RENAMES:
                out[f"{prefix}{_CLIP_LAYER_RENAMES[module]}.{kind}"] = tensor
            else:
                unknown.append(key)
        elif name not in _CLIP_SKIPPED:
            unknown.append(key)
    if unknown:
        raise KeyError(f"unexpected CLIP checkpoint keys: {sorted(unknown)[:5]}")
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = _stack(parts, _CLIP_QKV, f"layer {layer} {kind}")
    return out


def load_clip_visual(folder: Path, *, dtype: torch.dtype, device: torch.device | str) -> OpenClipVisionTransformer:
    """open_clip's image tower [B, 3, S, S] -> projected embedding [B, E] from a transformers CLIP folder.

    Reads ``config.json`` (``model_type: clip``) and ``model.safetensors`` without its text tower
    (``text_model.*``, ``text_projection.*``, ``logit_scale`` are not read); strict loading, eval
    mode, no gradients.
    """
    vision = clip_vision_config(_read_config(folder, "clip"))
    state = convert_clip_state_dict(_read_tensors(folder / "model.safetensors", skip=_CLIP_TEXT_TOWER))
    if "proj" not in state:
        raise KeyError(f"{folder / 'model.safetensors'} has no visual_projection.weight: not a CLIPModel checkpoint")
    width = vision["hidden_size"]
    with torch.device("meta"):
        model = OpenClipVisionTransformer(
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            width=width,
            layers=vision["num_hidden_layers"],
            heads=vision["num_attention_heads"],
            mlp_ratio=(vision["intermediate_size"] + 0.5) / width,  # open_clip sizes the MLP as int(width * ratio)
            output_dim=state["proj"].shape[1],
            act_layer=_CLIP_ACTIVATIONS[vision["hidden_act"]],
            norm_layer=partial(OpenClipLayerNorm, eps=vision["layer_norm_eps"]),
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# --- DINOv2 -> timm ------------------------------------------------------------------------------


def dinov2_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers ``Dinov2Config`` dict with transformers' defaults filled in; refuses what timm's ViT lacks."""
    config = {**_DINOV2_DEFAULTS, **config}
    if config["use_swiglu_ffn"]:
        raise ValueError("DINOv2 checkpoint uses a SwiGLU MLP (use_swiglu_ffn, e.g. dinov2-giant); not supported")
    if config["hidden_act"] != "gelu":
        raise ValueError(f"unsupported DINOv2 hidden_act {config['hidden_act']!r}; only 'gelu' is supported")
    if config["num_channels"] != 3:
        raise ValueError(f"DINOv2 with {config['num_channels']} input channels; only RGB is supported")
    return config


def resample_position_embeddings(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1, 1 + G*G, D] (class token first, a square G x G grid) -> [1, 1 + h*w, D] for ``grid`` = (h, w).

    What transformers' ``Dinov2Embeddings.interpolate_pos_encoding`` computes on every forward:
    bicubic, ``size=grid``, ``align_corners=False``, no antialiasing, in float32, cast back to
    the input's dtype; unchanged when ``grid`` is (G, G). (timm's own resampling antialiases.)
    """
    side = int(round((pos_embed.shape[1] - 1) ** 0.5))
    if side * side != pos_embed.shape[1] - 1:
        raise ValueError(f"position embeddings {list(pos_embed.shape)} are not a class token plus a square grid")
    if tuple(grid) == (side, side):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([cls_pos, patch_pos], dim=1)


def convert_dinov2_state_dict(state_dict: Mapping[str, torch.Tensor], grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Rename a ``Dinov2Model`` state dict to timm's ``VisionTransformer`` names, for an input of ``grid`` patches.

    query/key/value [D, D] are stacked into ``attn.qkv`` [3D, D]; ``layer_scale{1,2}.lambda1``
    [D] become ``ls{1,2}.gamma``; the position embeddings are resampled to ``grid`` (h, w)
    (:func:`resample_position_embeddings`). Raises ``KeyError`` naming unknown or incomplete keys.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for name, tensor in state_dict.items():
        if name in _DINOV2_RENAMES:
            out[_DINOV2_RENAMES[name]] = tensor
        elif name == "embeddings.position_embeddings":
            out["pos_embed"] = resample_position_embeddings(tensor, grid)
        elif match := _DINOV2_LAYER.match(name):
            layer, module, kind = int(match[1]), match[2], match[3]
            prefix = f"blocks.{layer}."
            if module in _DINOV2_QKV:
                qkv.setdefault((layer, kind), {})[module] = tensor
            elif module in ("layer_scale1", "layer_scale2") and kind == "lambda1":
                out[f"{prefix}ls{module[-1]}.gamma"] = tensor
            elif module in _DINOV2_LAYER_RENAMES:
                out[f"{prefix}{_DINOV2_LAYER_RENAMES[module]}.{kind}"] = tensor
            else:
                unknown.append(name)
        elif name not in _DINOV2_SKIPPED:
            unknown.append(name)
    if unknown:
        raise KeyError(f"unexpected DINOv2 checkpoint keys: {sorted(unknown)[:5]}")
    for (layer, kind), parts in qkv.items():
        out[f"blocks.{layer}.attn.qkv.{kind}"] = _stack(parts, _DINOV2_QKV, f"layer {layer} {kind}")
    return out


def load_dinov2(folder: Path, image_size: tuple[int, int], *, dtype: torch.dtype,
                device: torch.device | str) -> VisionTransformer:
    """timm ViT for (height, width) = ``image_size`` input [B, 3, H, W] -> class token after the final LayerNorm [B, D].

    Reads a transformers DINOv2 folder (``config.json`` with ``model_type: dinov2``,
    ``model.safetensors``); strict loading, eval mode, no gradients.
    """
    config = dinov2_config(_read_config(folder, "dinov2"))
    patch = config["patch_size"]
    grid = (image_size[0] // patch, image_size[1] // patch)
    state = convert_dinov2_state_dict(_read_tensors(folder / "model.safetensors"), grid)
    with torch.device("meta"):
        model = VisionTransformer(
            img_size=tuple(image_size),
            patch_size=patch,
            num_classes=0,
            global_pool="token",
            embed_dim=config["hidden_size"],
            depth=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            mlp_ratio=config["mlp_ratio"],
            qkv_bias=config["qkv_bias"],
            init_values=config["layerscale_value"],
            norm_layer=partial(LayerNorm, eps=config["layer_norm_eps"]),
            weight_init="skip",
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _stack(parts: Mapping[str, torch.Tensor], order: tuple[str, ...], where: str) -> torch.Tensor:
    """q, k, v projections [D, ...] each -> one [3D, ...] tensor in ``order``; KeyError if one is missing."""
    missing = [name for name in order if name not in parts]
    if missing:
        raise KeyError(f"{where}: incomplete q/k/v projections (missing {missing})")
    return torch.cat([parts[name] for name in order])
