"""Export a trained trunk + head as a checkpoint folder in the released NearID format (spec section 1)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from nearid_metric.model import VisionConfig, build_trunk, to_siglip_state_dict

RELEASE_REPO = "Aleksandar/nearid-siglip2"
RELEASE_AUTO_MAP = {
    "AutoConfig": f"{RELEASE_REPO}--configuration_nearid.NearIDConfig",
    "AutoModel": f"{RELEASE_REPO}--modeling_nearid.NearIDModel",
}
"""``config.json``'s ``auto_map`` of an exported head: the release repo's configuration and modelling code."""


def export_checkpoint(
    trunk: VisionTransformer,
    folder: Path,
    *,
    vision_config: VisionConfig,
    preprocessor_config: Mapping[str, Any],
    key_layout: str = "transformers4",
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write ``trunk`` (e.g. with a trained MAP head) as a NearID checkpoint folder; returns ``folder``.

    The reverse of :func:`load_checkpoint_trunk`, in the released format (spec section 1):

    - ``model.safetensors``: every weight cast to ``dtype`` (float16 as released) under
      ``backbone.vision_model.`` (``key_layout="transformers4"``, the release) or ``backbone.``
      (``"transformers5"``) + transformers' ``SiglipVisionModel`` names
      (:func:`~nearid_metric.model.to_siglip_state_dict`).
    - ``config.json``: ``model_type: "nearid"``, ``architectures: ["NearIDModel"]``, an
      ``auto_map`` naming the release repo's code (:data:`RELEASE_AUTO_MAP`, the transformers
      form for code in another repo), ``torch_dtype``, ``vision_config`` (transformers'
      ``SiglipVisionConfig`` names, from ``vision_config``), ``embed_dim`` and
      ``normalize_embeddings: true``, as the release's file, so that the official quick-start
      ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` resolves an exported head
      (this package never reads ``auto_map`` and never runs code from it).
    - ``preprocessor_config.json``: ``preprocessor_config`` as given (pass the base
      checkpoint's file, so the preprocessing travels with the weights).

    Existing files in ``folder`` are overwritten. Raises ``ValueError`` when the trunk's
    weight names or shapes do not match ``vision_config``.
    """
    prefixes = {"transformers4": "backbone.vision_model.", "transformers5": "backbone."}
    if key_layout not in prefixes:
        raise ValueError(f"unknown key_layout {key_layout!r}; known: {sorted(prefixes)}")
    state = trunk.state_dict()
    expected = {k: tuple(v.shape) for k, v in build_trunk(vision_config).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        diff = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        raise ValueError(f"trunk does not match vision_config {vision_config}: differing weights {diff[:5]}")
    out = to_siglip_state_dict(state)
    prefix = prefixes[key_layout]
    weights = {prefix + k: v.detach().to(device="cpu", dtype=dtype, copy=True).contiguous() for k, v in out.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = {
        "model_type": "nearid",
        "architectures": ["NearIDModel"],
        "auto_map": dict(RELEASE_AUTO_MAP),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "vision_config": {"model_type": "siglip_vision_model", "vision_use_head": True, **asdict(vision_config)},
        "embed_dim": vision_config.hidden_size,
        "normalize_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(preprocessor_config), indent=2) + "\n",
                                                      encoding="utf-8")
    return folder
