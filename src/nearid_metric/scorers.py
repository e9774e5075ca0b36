"""The scorer registry: :func:`create_scorer` builds NearID and the baselines behind one interface.

Every scorer is a :class:`~nearid_metric.scorer.Scorer`: an encoder (normalised pixels ->
pooled features), the preprocessing that travels with its weights, and a signature. The
encoders come from the libraries that define them, loaded from safetensors only:

- ``nearid``: the NearID release (timm SigLIP trunk + retrained MAP head, :mod:`nearid_metric.model`);
- ``siglip2-map`` / ``siglip2-mean``: the SigLIP2 so400m/14 base model through the same
  trunk code, read out by its own MAP head or by the mean of its final patch tokens;
- ``clip-i``: an open_clip CLIP image tower (``local-dir:`` loading of ``open_clip_config.json``
  + ``open_clip_model.safetensors``), its projected image embedding;
- ``dinov2``: a timm DINOv2 ViT (``local-dir:`` loading of timm's ``config.json`` +
  ``model.safetensors``), its final-LayerNorm class token.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from nearid_metric.hub import CHECKPOINT_FILES, resolve_checkpoint
from nearid_metric.model import TokenMean, load_checkpoint_trunk
from nearid_metric.preprocess import (
    PreprocessConfig,
    config_from_open_clip,
    config_from_timm,
)
from nearid_metric.scorer import (
    PRECISIONS,
    Scorer,
    check_precision,
    pick_device,
    signature,
)

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "nearid"
"""The registry entry of the released NearID weights."""

# (encoder on device in dtype, preprocessing, embedding width)
Built = tuple[torch.nn.Module, PreprocessConfig, int]


@dataclass(frozen=True)
class ScorerInfo:
    """What a scorer is: its default weights (a registry name), what a weights folder holds, and how it reads out."""

    name: str
    weights: str
    files: tuple[str, ...]
    weights_file: str
    backbone: str
    readout: str
    library: str
    build: Callable[[Path, torch.dtype, torch.device], Built]


def _fused_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Make timm's attention layers call ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels)."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return model


def _build_siglip(readout: str) -> Callable[[Path, torch.dtype, torch.device], Built]:
    def build(folder: Path, dtype: torch.dtype, device: torch.device) -> Built:
        trunk = _fused_attention(load_checkpoint_trunk(folder, dtype=dtype, device=device, drop_text_tower=True))
        encoder = trunk if readout == "map" else TokenMean(trunk)
        return encoder, PreprocessConfig.from_file(folder / "preprocessor_config.json"), trunk.num_features

    return build


def _build_open_clip(folder: Path, dtype: torch.dtype, device: torch.device) -> Built:
    import open_clip

    model = open_clip.create_model(f"local-dir:{folder}", device=device)
    visual = model.visual.to(dtype).eval().requires_grad_(False)
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    config = config_from_open_clip(preprocess_cfg, preprocess_cfg.get("size", visual.image_size))
    return visual, config, visual.output_dim


def _build_timm(folder: Path, dtype: torch.dtype, device: torch.device) -> Built:
    import timm
    from timm.data import resolve_data_config

    model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0, global_pool="token")
    model = _fused_attention(model.to(device=device, dtype=dtype).eval().requires_grad_(False))
    return model, config_from_timm(resolve_data_config({}, model=model)), model.num_features


SCORERS: dict[str, ScorerInfo] = {
    info.name: info
    for info in (
        ScorerInfo("nearid", "nearid", CHECKPOINT_FILES, "model.safetensors",
                   "SigLIP2 so400m/14 (frozen)", "NearID MAP head (retrained)", "timm", _build_siglip("map")),
        ScorerInfo("siglip2-map", "siglip2-so400m", CHECKPOINT_FILES, "model.safetensors",
                   "SigLIP2 so400m/14", "its own MAP head (pooler output)", "timm", _build_siglip("map")),
        ScorerInfo("siglip2-mean", "siglip2-so400m", CHECKPOINT_FILES, "model.safetensors",
                   "SigLIP2 so400m/14", "mean of final post-LayerNorm patch tokens", "timm", _build_siglip("mean")),
        ScorerInfo("clip-i", "clip-vit-b-32-openai", ("open_clip_config.json", "open_clip_model.safetensors"),
                   "open_clip_model.safetensors", "CLIP ViT (default ViT-B/32, OpenAI)", "projected image embedding",
                   "open_clip", _build_open_clip),
        ScorerInfo("dinov2", "dinov2-vitl14", ("config.json", "model.safetensors"), "model.safetensors",
                   "DINOv2 ViT-L/14", "class token after the final LayerNorm", "timm", _build_timm),
    )
}


def list_scorers() -> list[str]:
    """Names accepted by :func:`create_scorer`."""
    return list(SCORERS)


def scorer_info(name: str) -> ScorerInfo:
    """Metadata of a scorer name (see :data:`SCORERS`)."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}")
    return SCORERS[name]


def create_scorer(
    name: str = "nearid",
    *,
    pretrained: str | os.PathLike | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    compile: bool = False,
) -> Scorer:
    """Build a scorer by name (:func:`list_scorers`), all sharing ``embed / score / score_matrix / signature``.

    ``pretrained``: where the weights come from, overriding the scorer's default: a local
    folder, a registry name (``weights/registry.json``) or a Hub repo id. The folder must
    hold the scorer's files (:attr:`ScorerInfo.files`, safetensors only; nothing else is
    downloaded). ``precision``: ``fp32`` (default), ``bf16`` or ``fp16``; embeddings are
    float32 either way. ``compile``: wrap the encoder in ``torch.compile`` (the first batches
    of each size are slow while it compiles; worth it for long runs on a GPU); it changes
    results only by floating-point rounding and does not enter the signature.
    ``create_scorer("nearid", ...)`` returns a :class:`NearIDScore`.
    """
    info = scorer_info(name)
    check_precision(precision)
    device = pick_device(device)
    checkpoint = resolve_checkpoint(pretrained if pretrained is not None else info.weights, revision, info.files)
    try:
        encoder, preprocess_config, embed_dim = info.build(checkpoint.folder, PRECISIONS[precision], device)
    except (SafetensorError, json.JSONDecodeError) as e:  # raised by open_clip / timm without the file name
        raise ValueError(f"{checkpoint.folder}: broken {name} checkpoint ({type(e).__name__}: {e}); "
                         f"fetch it again") from None
    if compile:
        encoder = torch.compile(encoder)
    logger.info("loaded %s weights %s from %s on %s", name, checkpoint.source, checkpoint.folder, device)
    cls = NearIDScore if name == "nearid" else Scorer
    return cls(encoder, preprocess_config, name=name, embed_dim=embed_dim, device=device, precision=precision,
               signature=signature(name, checkpoint, precision, info.weights_file))


class NearIDScore(Scorer):
    """Identity similarity from a frozen SigLIP2 trunk and the NearID MAP head.

    Build it with :meth:`from_pretrained`. Scores are cosines of L2-normalised
    embeddings, in [-1, 1]; higher means the same identity is better preserved.
    """

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_CHECKPOINT,
        *,
        revision: str | None = None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        compile: bool = False,
    ) -> NearIDScore:
        """Load a checkpoint folder in the released format (same as ``create_scorer("nearid", pretrained=...)``).

        ``name_or_path``: a local folder, a registered name (``nearid``, the default) or a Hub repo id.
        ``precision``: ``fp32`` (default, as the reference), ``bf16`` or ``fp16`` weights
        and activations; embeddings are returned in float32 either way.
        ``compile``: run the encoder through ``torch.compile`` (see :func:`~nearid_metric.create_scorer`).
        """
        return create_scorer("nearid", pretrained=name_or_path, revision=revision, device=device,
                             precision=precision, compile=compile)

    @property
    def trunk(self) -> torch.nn.Module:
        """The timm ViT (SigLIP2 trunk + NearID MAP head)."""
        return self.encoder
