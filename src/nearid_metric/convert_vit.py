"""transformers ``Dinov2Model`` and ``ViTModel`` (DINO v1) checkpoints read into timm ``VisionTransformer``s.

``facebook/dinov2-*`` (:func:`load_dinov2`) and ``facebook/dino-vits16`` / ``-vits8``
(:func:`load_dino`): a timm ViT whose ``global_pool="token"`` output is the class token after
the final LayerNorm, transformers' ``last_hidden_state[:, 0]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer

from nearid_metric.convert import KeyTable, convert_keys, load_strict, mlp_ratio, read_config, read_tensors

# transformers' Dinov2Config / ViTConfig defaults for fields a config.json may leave out.
_DINOV2_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, hidden_act="gelu",
                        layer_norm_eps=1e-6, image_size=224, patch_size=14, num_channels=3, qkv_bias=True,
                        layerscale_value=1.0, use_swiglu_ffn=False)
_VIT_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                     qkv_bias=True)

# Names shared by Dinov2Model and ViTModel (the latter as its checkpoints store them).
_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.position_embeddings": "pos_embed",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")

DINOV2_KEYS = KeyTable(
    family="DINOv2", renames=_EMBEDDINGS, layers="encoder.layer.", layer_target="blocks.{layer}",
    layer_renames={"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj", "mlp.fc1": "mlp.fc1",
                   "mlp.fc2": "mlp.fc2", "layer_scale1": "ls1", "layer_scale2": "ls2"},
    qkv=_QKV, qkv_target="attn.qkv.{param}", param_renames={"lambda1": "gamma"},
    skipped=("embeddings.mask_token",),  # masked-image-modelling token, unused at inference
)
VIT_KEYS = KeyTable(
    family="ViT (DINO)", renames=_EMBEDDINGS, layers="encoder.layer.", layer_target="blocks.{layer}",
    layer_renames={"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
                   "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"},
    qkv=_QKV, qkv_target="attn.qkv.{param}",
    # the masked-image-modelling token and ViTModel's default tanh pooler: neither is the class-token readout
    skipped=("embeddings.mask_token", "pooler.dense.weight", "pooler.dense.bias"),
)


def _checked(config: Mapping[str, Any], family: str) -> None:
    """Refuse what timm's ViT as built here does not reproduce: an activation other than exact GELU, non-RGB input."""
    if config["hidden_act"] != "gelu":
        raise ValueError(f"unsupported {family} hidden_act {config['hidden_act']!r}; only 'gelu' is supported")
    if config["num_channels"] != 3:
        raise ValueError(f"{family} with {config['num_channels']} input channels; only RGB is supported")


def dinov2_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers ``Dinov2Config`` dict with transformers' defaults filled in; refuses what timm's ViT lacks."""
    config = {**_DINOV2_DEFAULTS, **config}
    if config["use_swiglu_ffn"]:
        raise ValueError("DINOv2 checkpoint uses a SwiGLU MLP (use_swiglu_ffn, e.g. dinov2-giant); not supported")
    _checked(config, "DINOv2")
    return config


def vit_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers ``ViTConfig`` dict with transformers' defaults filled in (``layer_norm_eps`` 1e-12)."""
    config = {**_VIT_DEFAULTS, **config}
    _checked(config, "ViT")
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
    return convert_keys(state_dict, DINOV2_KEYS, {"pos_embed": partial(resample_position_embeddings, grid=grid)})


def convert_vit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``ViTModel`` state dict (as ``facebook/dino-vits*`` store it) to timm's ``VisionTransformer`` names.

    query/key/value [D, D] are stacked into ``attn.qkv`` [3D, D]; ``intermediate.dense`` /
    ``output.dense`` are the MLP's ``fc1`` / ``fc2``; the pooler is not read. Raises ``KeyError``
    naming unknown or incomplete keys.
    """
    return convert_keys(state_dict, VIT_KEYS)


def _timm_vit(config: Mapping[str, Any], image_size: tuple[int, int], ratio: float,
              init_values: float | None) -> VisionTransformer:
    """A timm ViT on the meta device, class-token readout after the final LayerNorm, no classifier."""
    with torch.device("meta"):
        return VisionTransformer(
            img_size=tuple(image_size),
            patch_size=config["patch_size"],
            num_classes=0,
            global_pool="token",
            embed_dim=config["hidden_size"],
            depth=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            mlp_ratio=ratio,
            qkv_bias=config["qkv_bias"],
            init_values=init_values,
            norm_layer=partial(LayerNorm, eps=config["layer_norm_eps"]),
            weight_init="skip",
        )


def load_dinov2(folder: Path, image_size: tuple[int, int], *, dtype: torch.dtype,
                device: torch.device | str) -> VisionTransformer:
    """timm ViT for (height, width) = ``image_size`` input [B, 3, H, W] -> class token after the final LayerNorm [B, D].

    Reads a transformers DINOv2 folder (``config.json`` with ``model_type: dinov2``,
    ``model.safetensors``) straight onto ``device`` in ``dtype``; strict loading, eval mode, no gradients.
    """
    config = dinov2_config(read_config(folder, "dinov2"))
    patch = config["patch_size"]
    grid = (image_size[0] // patch, image_size[1] // patch)
    state = convert_dinov2_state_dict(read_tensors(folder / "model.safetensors", dtype=dtype, device=device), grid)
    return load_strict(_timm_vit(config, image_size, config["mlp_ratio"], config["layerscale_value"]), state)


def load_dino(folder: Path, *, dtype: torch.dtype, device: torch.device | str) -> VisionTransformer:
    """timm ViT: [B, 3, S, S] (S the config's ``image_size``) -> class token after the final LayerNorm [B, D].

    Reads a transformers ViT folder (``config.json`` with ``model_type: vit``, ``model.safetensors``),
    as ``facebook/dino-vits16`` / ``-vits8`` hold DINO v1, straight onto ``device`` in ``dtype``;
    the LayerNorm eps, widths and q/k/v bias come from the config. Strict loading, eval mode, no gradients.
    """
    config = vit_config(read_config(folder, "vit"))
    state = convert_vit_state_dict(read_tensors(folder / "model.safetensors", dtype=dtype, device=device))
    side = config["image_size"]
    ratio = mlp_ratio(config["intermediate_size"], config["hidden_size"])
    return load_strict(_timm_vit(config, (side, side), ratio, None), state)
