"""The NearID network: a timm SigLIP ViT trunk with a multi-head attention-pooling (MAP) head.

Checkpoints store the weights under transformers' ``SiglipVisionModel`` names
(``backbone.vision_model.encoder.layers.0.self_attn.q_proj.weight``, ...). This module
builds the same network as a timm ``VisionTransformer`` from the checkpoint's
``vision_config`` and renames the weights to timm's layout (see docs/model.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer

from nearid_metric.hub import read_json

# transformers' activation names -> timm's.
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}

# Prefixes that precede the SiglipVisionModel-internal names, tried in order. NearID
# checkpoints use "backbone.vision_model." (transformers 4) or "backbone." (transformers 5);
# a plain SigLIP checkpoint uses "vision_model.".
_PREFIXES = ("backbone.vision_model.", "backbone.", "vision_model.", "")

# One-to-one renames, transformers name (after the prefix) -> timm name. Layer-indexed
# names use "{i}". The q/k/v projections and the head's stacked in_proj are handled apart.
_RENAMES = {
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
    "head.attention.out_proj.weight": "attn_pool.proj.weight",
    "head.attention.out_proj.bias": "attn_pool.proj.bias",
    "head.layernorm.weight": "attn_pool.norm.weight",
    "head.layernorm.bias": "attn_pool.norm.bias",
    "head.mlp.fc1.weight": "attn_pool.mlp.fc1.weight",
    "head.mlp.fc1.bias": "attn_pool.mlp.fc1.bias",
    "head.mlp.fc2.weight": "attn_pool.mlp.fc2.weight",
    "head.mlp.fc2.bias": "attn_pool.mlp.fc2.bias",
}
_LAYER_RENAMES = {
    "self_attn.out_proj": "attn.proj",
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# The parts of a full SigLIP image-text checkpoint that are not the vision tower.
_TEXT_TOWER = ("text_model.", "logit_scale", "logit_bias")
_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}
_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV_KEY = re.compile(r"\.self_attn\.[qkv]_proj\.(weight|bias)$")  # read as stored, cast while stacked


@dataclass(frozen=True)
class VisionConfig:
    """The SigLIP vision-tower hyper-parameters (transformers ``SiglipVisionConfig`` names)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> VisionConfig:
        """Read the fields this package needs; missing ones take transformers' defaults."""
        if config.get("vision_use_head") is False:
            raise ValueError("vision_config has vision_use_head=false: a NearID checkpoint needs the MAP head")
        names = cls.__dataclass_fields__
        config = {k: v for k, v in config.items() if k in names}
        if config.get("hidden_act", "gelu_pytorch_tanh") not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}; known: {sorted(_ACTIVATIONS)}")
        return cls(**config)


def build_trunk(config: VisionConfig, device: torch.device | str = "meta") -> VisionTransformer:
    """Build the timm ViT (no class token, MAP pooling, classifier removed) for ``config``.

    On the default ``meta`` device the module holds no memory; load weights into it with
    ``load_state_dict(..., assign=True)`` (see :func:`load_trunk`).
    """
    width = config.hidden_size
    # timm sizes MLPs as int(width * mlp_ratio); nudge the ratio so that it lands exactly.
    mlp_ratio = (config.intermediate_size + 0.5) / width
    with torch.device(device):
        trunk = VisionTransformer(
            img_size=config.image_size,
            patch_size=config.patch_size,
            in_chans=config.num_channels,
            num_classes=0,
            global_pool="map",
            embed_dim=width,
            depth=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            mlp_ratio=mlp_ratio,
            class_token=False,
            norm_layer=partial(LayerNorm, eps=config.layer_norm_eps),
            act_layer=_ACTIVATIONS[config.hidden_act],
            weight_init="skip",
        )
    return trunk


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if prefix + "embeddings.patch_embedding.weight" in state_dict:
            break
    else:
        raise KeyError("no 'embeddings.patch_embedding.weight' under any known prefix: not a SigLIP vision checkpoint")
    stripped = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    foreign = sorted(k for k in state_dict if not k.startswith(prefix))
    if foreign:
        raise KeyError(f"keys outside the '{prefix}' vision tower: {foreign[:5]}{' ...' if len(foreign) > 5 else ''}")
    return stripped


def convert_siglip_state_dict(state_dict: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                              device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Rename a transformers ``SiglipVisionModel`` state dict to the timm trunk's names.

    Accepts the NearID prefixes (``backbone.vision_model.``, ``backbone.``) and plain
    ``vision_model.``. q/k/v projections are stacked into timm's ``qkv``; the head's
    stacked ``in_proj`` [3D, D] is split into ``q`` (first D rows) and ``kv`` (last 2D).
    ``dtype`` / ``device``: the stacked ``qkv`` tensors are written straight in that dtype on
    that device (one pass over the parts); the other tensors are returned as given.
    Raises ``KeyError`` for any key it does not know, so nothing is silently dropped.
    """
    src = _strip_prefix(state_dict)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in src.items():
        if name in _RENAMES:
            out[_RENAMES[name]] = tensor
        elif name == "embeddings.position_embedding.weight":
            out["pos_embed"] = tensor.unsqueeze(0)  # [N, D] -> [1, N, D]
        elif name == "head.probe":
            out["attn_pool.latent"] = tensor
        elif name in ("head.attention.in_proj_weight", "head.attention.in_proj_bias"):
            kind = name.rsplit("_", 1)[1]
            width = tensor.shape[0] // 3
            out[f"attn_pool.q.{kind}"] = tensor[:width]
            out[f"attn_pool.kv.{kind}"] = tensor[width:]
        elif match := _LAYER_KEY.match(name):
            layer, module, kind = int(match[1]), match[2], match[3]
            if module in _QKV:
                qkv.setdefault((layer, kind), {})[_QKV[module]] = tensor
            elif module in _LAYER_RENAMES:
                out[f"blocks.{layer}.{_LAYER_RENAMES[module]}.{kind}"] = tensor
            else:
                unknown.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise KeyError(f"unexpected checkpoint keys: {sorted(unknown)[:5]}")
    for (layer, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise KeyError(f"layer {layer}: incomplete q/k/v {kind} (have {sorted(parts)})")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = _stack([parts["q"], parts["k"], parts["v"]], dtype, device)
    return out


def _stack(parts: list[torch.Tensor], dtype: torch.dtype | None, device: torch.device | str | None) -> torch.Tensor:
    """``torch.cat(parts)`` in ``dtype`` on ``device`` (the first part's when None), converting as it copies."""
    device = parts[0].device if device is None else device
    out = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=dtype or parts[0].dtype, device=device)
    start = 0
    for part in parts:
        out[start:start + len(part)].copy_(part.to(device=device))  # on a GPU: moved in the file's dtype, converted there
        start += len(part)
    return out


def load_trunk(
    config: VisionConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> VisionTransformer:
    """Build the trunk for ``config`` and fill it with a SigLIP-named ``state_dict``.

    Weights are cast to ``dtype`` (fp16 checkpoints are upcast to fp32 by default, as the
    reference does) on ``device``; the module never shares memory with ``state_dict``. All
    trunk parameters must be present (strict loading). Returns the module in eval mode with
    gradients off.
    """
    weights = {k: v.to(device=device, dtype=dtype, copy=True) for k, v in convert_siglip_state_dict(state_dict).items()}
    return _filled_trunk(config, weights)


def _filled_trunk(config: VisionConfig, weights: dict[str, torch.Tensor]) -> VisionTransformer:
    """The trunk for ``config`` holding ``weights`` (timm names, already cast and placed) themselves."""
    trunk = build_trunk(config)
    trunk.load_state_dict(weights, strict=True, assign=True)
    return trunk.eval().requires_grad_(False)


def _cast(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device`` in ``dtype``: moved first, then converted (on a GPU, half the bytes cross the bus
    and the GPU converts), without a copy when it is already both."""
    return tensor.to(device=device).to(dtype=dtype)


def load_checkpoint_trunk(folder: Path, *, dtype: torch.dtype, device: torch.device | str,
                          drop_text_tower: bool = False) -> VisionTransformer:
    """Read ``config.json`` + ``model.safetensors`` from a checkpoint folder into the timm trunk.

    Each tensor is cast to ``dtype`` on ``device`` as it is read (:func:`_cast`; the q/k/v
    projections as they are stacked), so the file's float16 copy of the weights never exists
    next to the cast one, and the module keeps the cast tensors themselves.
    ``drop_text_tower``: skip the ``text_model.*`` / ``logit_*`` tensors of a full SigLIP
    image-text checkpoint (e.g. the SigLIP2 base model) without reading them; any other
    tensor outside the vision tower is still an error.
    """
    config = read_json(folder / "config.json")
    if not isinstance(config, dict) or "vision_config" not in config:
        raise ValueError(f"{folder / 'config.json'} has no vision_config: not a NearID/SigLIP checkpoint")
    if config.get("normalize_embeddings") is False:
        raise ValueError(f"{folder / 'config.json'} sets normalize_embeddings=false; NearID scores normalised cosines")
    try:
        vision = VisionConfig.from_dict(config["vision_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder / 'config.json'}: unusable vision_config ({type(e).__name__}: {e})") from None
    weights = folder / "model.safetensors"
    try:
        with safe_open(weights, framework="pt") as f:
            names = [k for k in f.keys() if not (drop_text_tower and k.startswith(_TEXT_TOWER))]
            state_dict = {k: f.get_tensor(k) if _QKV_KEY.search(k) else _cast(f.get_tensor(k), dtype, device)
                          for k in names}
    except SafetensorError as e:
        raise ValueError(f"{weights} is not a readable safetensors file ({e}); fetch the checkpoint again") from None
    try:
        return _filled_trunk(vision, convert_siglip_state_dict(state_dict, dtype=dtype, device=device))
    except (KeyError, RuntimeError) as e:  # missing, extra or misshapen tensors
        raise ValueError(f"{weights} does not match {folder / 'config.json'} ({type(e).__name__}: {e})") from None


class TokenMean(torch.nn.Module):
    """SigLIP readout without the head: mean of the final (post-LayerNorm) patch tokens, [B, D]."""

    def __init__(self, trunk: VisionTransformer):
        super().__init__()
        self.trunk = trunk
        self.num_features = trunk.num_features

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(pixels).mean(dim=1)


def to_siglip_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse of :func:`convert_siglip_state_dict`: a timm trunk's state dict under transformers'
    ``SiglipVisionModel`` names (without prefix): ``qkv`` split back into ``q/k/v_proj``, the head's
    ``q`` [D, D] and ``kv`` [2D, D] stacked into ``in_proj`` [3D, D], ``pos_embed`` [1, N, D]
    squeezed to [N, D]. Tensors are not copied."""
    renames = {timm: siglip for siglip, timm in _RENAMES.items()}
    layer_renames = {timm: siglip for siglip, timm in _LAYER_RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in renames:
            out[renames[name]] = tensor
        elif name == "pos_embed":
            out["embeddings.position_embedding.weight"] = tensor.squeeze(0)  # [1, N, D] -> [N, D]
        elif name == "attn_pool.latent":
            out["head.probe"] = tensor
        elif name.startswith("attn_pool.q."):
            kind = name.rsplit(".", 1)[1]
            out[f"head.attention.in_proj_{kind}"] = torch.cat([tensor, state[f"attn_pool.kv.{kind}"]])
        elif not name.startswith("attn_pool.kv."):  # kv went into in_proj with q
            layer, module, kind = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name).groups()
            if module == "attn.qkv":
                for part, chunk in zip(("q", "k", "v"), tensor.chunk(3)):
                    out[f"encoder.layers.{layer}.self_attn.{part}_proj.{kind}"] = chunk
            else:
                out[f"encoder.layers.{layer}.{layer_renames[module]}.{kind}"] = tensor
    return out
