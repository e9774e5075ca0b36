"""The scorer registry: :func:`create_scorer` builds NearID and the baselines behind one interface.

Every scorer is a :class:`~nearid_metric.scorer.Scorer`: an encoder (normalised pixels ->
pooled features), the preprocessing that travels with its weights, and a signature. The
encoders come from the libraries that define them, loaded from safetensors only:

- ``nearid``: the NearID release (timm SigLIP trunk + retrained MAP head, :mod:`nearid_metric.model`);
- ``siglip2-map`` / ``siglip2-mean``: the SigLIP2 so400m/14 base model through the same
  trunk code, read out by its own MAP head or by the mean of its final patch tokens;
- ``clip-i`` / ``clip-l14``: an open_clip CLIP image tower, its projected image embedding: by
  default from OpenAI's transformers-format repos (``openai/clip-vit-base-patch32``, as
  DreamBench++; ``openai/clip-vit-large-patch14``, the paper's "CLIP"), converted by
  :mod:`nearid_metric.convert`; an open_clip folder (``open_clip_config.json`` +
  ``open_clip_model.safetensors``) is read by open_clip's ``local-dir:`` loader;
- ``dinov2``: ``facebook/dinov2-large`` (the paper's "DINOv2", its ``BitImageProcessor``
  preprocessing) in a timm ViT, its final-LayerNorm class token; ``dinov2-small``: the same for
  ``facebook/dinov2-small`` (DreamBench++'s DINOv2); ``dinov2-518``: timm's own DINOv2 release
  (``local-dir:`` loading) at its native 518 px, not the paper's;
- ``dino-vits16`` / ``dino-vits8``: DINO v1 ViT-S/16 and ViT-S/8 (``facebook/dino-vits*``, or timm's
  ``vit_small_patch*_224.dino`` folders), the class token after the final norm, with DINO's eval
  transform as the benchmarks run it (not the repo's preprocessor config).

``create_scorer(..., preprocess=...)`` replaces the weights' own preprocessing (e.g. a
benchmark's torchvision transform, :func:`~nearid_metric.preprocess.torchvision_eval`).

A scorer's folder layouts are tried in order; the first whose files the folder holds is read.

Importing this module does not import torch or the model libraries (the commands list the scorers
in their ``--help``): the builders and :func:`create_scorer` import them when they run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from nearid_metric.hub import (
    CHECKPOINT_FILES,
    Checkpoint,
    read_json,
    registry,
    resolve_checkpoint,
    start_checkpoint_sha256,
)
from nearid_metric.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    config_from_open_clip,
    config_from_timm,
    torchvision_eval,
)

if TYPE_CHECKING:
    import torch

    from nearid_metric.scorer import Scorer

    # (encoder on device in dtype, preprocessing, embedding width)
    Built = tuple[torch.nn.Module, PreprocessConfig, int]
    # (folder, dtype, device, the preprocessing to use instead of the weights' own, or None) -> Built
    Builder = Callable[[Path, torch.dtype, torch.device, "PreprocessConfig | None"], Built]

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "nearid"
"""The registry entry of the released NearID weights."""

DINO_EVAL = torchvision_eval(256, 224, IMAGENET_MEAN, IMAGENET_STD)
"""DINO's eval transform as the benchmarks run it: Resize(256, bicubic) + CenterCrop(224) on RGB, ImageNet mean/std."""


@dataclass(frozen=True)
class Layout:
    """A checkpoint folder format: its ``name``, the files it holds, which of them is the weights, and its builder.

    ``accepts``: for layouts whose files share names with another's, whether a folder holding
    the files (all but the weights) is in this one (e.g. from its ``config.json``).
    """

    name: str
    files: tuple[str, ...]
    weights_file: str
    build: Builder
    accepts: Callable[[Path], bool] | None = None

    def holds(self, folder: Path, *, weights: bool = True) -> bool:
        """Whether ``folder`` is in this layout: it holds the files (the weights too, unless ``weights=False``)."""
        files = [f for f in self.files if weights or f != self.weights_file]
        return all((folder / f).is_file() for f in files) and (self.accepts is None or self.accepts(folder))


@dataclass(frozen=True)
class ScorerInfo:
    """What a scorer is: its default weights (a registry name), what a weights folder holds, and how it reads out.

    ``files`` / ``weights_file`` / ``build`` describe the default weights' folder layout
    (``layout``); ``also_reads`` lists other layouts accepted for ``pretrained=`` (see
    :attr:`layouts`). ``matches``: the published table or benchmark whose numbers this scorer
    reproduces. ``sign_preprocessing``: the signature also names the layout read and the
    resize / crop (the scorers whose numbers depend on which layout a folder is in).
    ``accepts``: as :attr:`Layout.accepts`, for the default weights' layout.
    """

    name: str
    weights: str
    files: tuple[str, ...]
    weights_file: str
    backbone: str
    readout: str
    library: str
    build: Builder
    layout: str = "transformers"
    matches: str = ""
    also_reads: tuple[Layout, ...] = ()
    sign_preprocessing: bool = False
    accepts: Callable[[Path], bool] | None = None
    higher_is_better: bool = True  # as Scorer.higher_is_better
    score_range: tuple[float, float] = (-1.0, 1.0)  # as Scorer.score_range

    @property
    def layouts(self) -> tuple[Layout, ...]:
        """Every folder layout this scorer reads, the default weights' first (the order they are tried in)."""
        return (Layout(self.layout, self.files, self.weights_file, self.build, self.accepts), *self.also_reads)

    @property
    def embed_dim(self) -> int:
        """Embedding width with the default weights (``weights/registry.json``)."""
        return int(registry()[self.weights]["embed_dim"])

    @property
    def input_size(self) -> int:
        """Model input side in pixels with the default weights (``weights/registry.json``)."""
        return int(registry()[self.weights]["image_size"])


def _fused_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Make timm's attention layers call ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels)."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    return model


def _input_size(folder: Path, config: PreprocessConfig, size: tuple[int, int] | int) -> PreprocessConfig:
    """``config`` if its output (height, width) is the encoder's fixed input ``size``; else ValueError."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if (config.height, config.width) != size:
        raise ValueError(f"{folder}: the preprocessing gives {config.height}x{config.width} pixels, but the encoder "
                         f"takes {size[0]}x{size[1]}")
    return config


def _build_siglip(readout: str) -> Builder:
    def build(folder: Path, dtype: torch.dtype, device: torch.device, preprocess: PreprocessConfig | None) -> Built:
        from nearid_metric.model import TokenMean, load_checkpoint_trunk

        trunk = _fused_attention(load_checkpoint_trunk(folder, dtype=dtype, device=device, drop_text_tower=True))
        encoder = trunk if readout == "map" else TokenMean(trunk)
        config = preprocess or PreprocessConfig.from_file(folder / "preprocessor_config.json")
        return encoder, _input_size(folder, config, trunk.patch_embed.img_size), trunk.num_features

    return build


def _build_open_clip(folder: Path, dtype: torch.dtype, device: torch.device,
                     preprocess: PreprocessConfig | None) -> Built:
    import open_clip

    model = open_clip.create_model(f"local-dir:{folder}", device=device)
    visual = model.visual.to(dtype).eval().requires_grad_(False)
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    config = preprocess or config_from_open_clip(preprocess_cfg, preprocess_cfg.get("size", visual.image_size))
    return visual, _input_size(folder, config, visual.image_size), visual.output_dim


def _build_clip(folder: Path, dtype: torch.dtype, device: torch.device, preprocess: PreprocessConfig | None) -> Built:
    from nearid_metric.convert_clip import load_clip_visual

    visual = load_clip_visual(folder, dtype=dtype, device=device)
    config = preprocess or PreprocessConfig.from_file(folder / "preprocessor_config.json")
    return visual, _input_size(folder, config, visual.image_size), visual.output_dim


def _build_dinov2(folder: Path, dtype: torch.dtype, device: torch.device,
                  preprocess: PreprocessConfig | None) -> Built:
    from nearid_metric.convert_vit import load_dinov2

    config = preprocess or PreprocessConfig.from_file(folder / "preprocessor_config.json")
    model = _fused_attention(load_dinov2(folder, (config.height, config.width), dtype=dtype, device=device))
    return model, config, model.num_features


def _build_dino(folder: Path, dtype: torch.dtype, device: torch.device, preprocess: PreprocessConfig | None) -> Built:
    from nearid_metric.convert_vit import load_dino

    model = _fused_attention(load_dino(folder, dtype=dtype, device=device))
    return model, _input_size(folder, preprocess or DINO_EVAL, model.patch_embed.img_size), model.num_features


def _load_timm(folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A timm folder (``config.json`` + ``model.safetensors``) by timm's ``local-dir:`` loader: pooled class token."""
    import timm

    model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0, global_pool="token")
    return _fused_attention(model.to(device=device, dtype=dtype).eval().requires_grad_(False))


def _build_timm(folder: Path, dtype: torch.dtype, device: torch.device, preprocess: PreprocessConfig | None) -> Built:
    from timm.data import resolve_data_config

    model = _load_timm(folder, dtype, device)
    config = preprocess or config_from_timm(resolve_data_config({}, model=model))
    return model, _input_size(folder, config, model.patch_embed.img_size), model.num_features


def _build_timm_dino(folder: Path, dtype: torch.dtype, device: torch.device,
                     preprocess: PreprocessConfig | None) -> Built:
    model = _load_timm(folder, dtype, device)
    return model, _input_size(folder, preprocess or DINO_EVAL, model.patch_embed.img_size), model.num_features


def _config_has(key: str, value: object = None) -> Callable[[Path], bool]:
    """Whether a folder's ``config.json`` is an object with ``key`` (equal to ``value`` unless None)."""

    def accepts(folder: Path) -> bool:
        try:
            config = read_json(folder / "config.json")
        except (OSError, ValueError):
            return False
        return isinstance(config, dict) and key in config and (value is None or config[key] == value)

    return accepts


_OPEN_CLIP = Layout("open_clip", ("open_clip_config.json", "open_clip_model.safetensors"),
                    "open_clip_model.safetensors", _build_open_clip)
_TIMM_FILES = ("config.json", "model.safetensors")
_TIMM_DINO = Layout("timm", _TIMM_FILES, "model.safetensors", _build_timm_dino, accepts=_config_has("architecture"))
_DINO = dict(readout="class token after the final norm", library="timm", build=_build_dino, also_reads=(_TIMM_DINO,),
             sign_preprocessing=True, accepts=_config_has("model_type", "vit"))

SCORERS: dict[str, ScorerInfo] = {
    info.name: info
    for info in (
        ScorerInfo("nearid", "nearid", CHECKPOINT_FILES, "model.safetensors",
                   "SigLIP2 so400m/14 (frozen)", "NearID MAP head (retrained)", "timm", _build_siglip("map"),
                   matches="NearID paper, NearID rows: NearID and MTG benchmarks, DreamBench++ human alignment"),
        ScorerInfo("siglip2-map", "siglip2-so400m", CHECKPOINT_FILES, "model.safetensors",
                   "SigLIP2 so400m/14", "its own MAP head (pooler output)", "timm", _build_siglip("map"),
                   matches="NearID paper Table 1 and MTG 'SigLIP2' rows; its DreamBench++ 'SigLIP2 own MAP head'"),
        ScorerInfo("siglip2-mean", "siglip2-so400m", CHECKPOINT_FILES, "model.safetensors",
                   "SigLIP2 so400m/14", "mean of final post-LayerNorm patch tokens", "timm", _build_siglip("mean"),
                   matches="NearID paper DreamBench++ human-alignment 'SigLIP2' row"),
        ScorerInfo("clip-i", "clip-vit-b-32-openai", CHECKPOINT_FILES, "model.safetensors",
                   "CLIP ViT-B/32 (OpenAI)", "projected image embedding", "open_clip", _build_clip,
                   matches="DreamBench++ CLIP-I (openai/clip-vit-base-patch32 with CLIPProcessor)",
                   also_reads=(_OPEN_CLIP,), sign_preprocessing=True),
        ScorerInfo("clip-l14", "clip-vit-l-14-openai", CHECKPOINT_FILES, "model.safetensors",
                   "CLIP ViT-L/14 (OpenAI)", "projected image embedding", "open_clip", _build_clip,
                   matches="NearID paper Table 1 'CLIP' row (openai/clip-vit-large-patch14)",
                   also_reads=(_OPEN_CLIP,), sign_preprocessing=True),
        ScorerInfo("dinov2", "dinov2-large", CHECKPOINT_FILES, "model.safetensors",
                   "DINOv2 ViT-L/14", "class token after the final LayerNorm", "timm", _build_dinov2,
                   matches="NearID paper Table 1 'DINOv2' row (facebook/dinov2-large, 224-px crop)",
                   sign_preprocessing=True),
        ScorerInfo("dinov2-small", "dinov2-small", CHECKPOINT_FILES, "model.safetensors",
                   "DINOv2 ViT-S/14", "class token after the final LayerNorm", "timm", _build_dinov2,
                   matches="DreamBench++ DINOv2 (facebook/dinov2-small with its BitImageProcessor)",
                   sign_preprocessing=True),
        ScorerInfo("dino-vits16", "dino-vits16", _TIMM_FILES, "model.safetensors", "DINO ViT-S/16 (v1)",
                   matches="DreamBooth DINO (ViT-S/16, DINO's eval transform); CustomConcept101's DINO with its "
                           "RGB-after-crop preprocessing (preprocess=torchvision_eval(..., rgb_mode='after_crop'))",
                   **_DINO),
        ScorerInfo("dino-vits8", "dino-vits8", _TIMM_FILES, "model.safetensors", "DINO ViT-S/8 (v1)",
                   matches="DreamBench++ DINO (torch hub dino_vits8, dino_score.py's torchvision transform)", **_DINO),
        ScorerInfo("dinov2-518", "dinov2-vitl14", _TIMM_FILES, "model.safetensors",
                   "DINOv2 ViT-L/14", "class token after the final LayerNorm", "timm", _build_timm, layout="timm",
                   matches="none: timm's native 518-px DINOv2 (not the paper's 224-px 'DINOv2')",
                   sign_preprocessing=True),
    )
}


TEXT_SCORERS: dict[str, str] = {"clip-t": "clip-vit-b-32-openai", "clip-t-l14": "clip-vit-l-14-openai"}
"""Text (CLIP-T) scorer name -> its default weights (a ``weights/registry.json`` name, shared with the image
scorer); built by :func:`nearid_metric.text.create_text_scorer`."""


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
    preprocess: PreprocessConfig | None = None,
) -> Scorer:
    """Build a scorer by name (:func:`list_scorers`), all sharing ``embed / score / score_matrix / signature``.

    ``pretrained``: where the weights come from, overriding the scorer's default: a local
    folder, a registry name (``weights/registry.json``) or a Hub repo id. The folder must
    hold the scorer's files (:attr:`ScorerInfo.files`, safetensors only; nothing else is
    downloaded). ``precision``: ``fp32`` (default), ``bf16`` or ``fp16``; embeddings are
    float32 either way. ``compile``: wrap the encoder in ``torch.compile`` (the first batches
    of each size are slow while it compiles; worth it for long runs on a GPU); it changes
    results only by floating-point rounding and does not enter the signature.
    ``preprocess``: the preprocessing to use instead of the weights' own (e.g. a benchmark's
    transform, :func:`~nearid_metric.preprocess.torchvision_eval`); its output size must be the
    encoder's input size, and the signature then names it in full (normalisation included).
    ``create_scorer("nearid", ...)`` returns a :class:`NearIDScore`.
    """
    import torch

    from nearid_metric.scorer import PRECISIONS, Scorer, check_precision, pick_device, signature

    info = scorer_info(name)
    check_precision(precision)
    checkpoint, layout = resolve_layout(name, pretrained, revision)
    device = pick_device(device)
    start_checkpoint_sha256(checkpoint.folder / layout.weights_file)  # for the signature, while the weights load
    try:
        encoder, preprocess_config, embed_dim = layout.build(checkpoint.folder, PRECISIONS[precision], device,
                                                             preprocess)
    except (SafetensorError, json.JSONDecodeError) as e:  # raised by open_clip / timm without the file name
        raise ValueError(f"{checkpoint.folder}: broken {name} checkpoint ({type(e).__name__}: {e}); "
                         f"fetch it again") from None
    if compile:
        encoder = torch.compile(encoder)
    logger.info("loaded %s weights %s from %s on %s", name, checkpoint.source, checkpoint.folder, device)
    cls = _near_id_score_class() if name == "nearid" else Scorer
    if preprocess is not None:
        detail: str | None = f"{layout.name}:{preprocess_config.describe(normalization=True)}"
    else:
        detail = f"{layout.name}:{preprocess_config.describe()}" if info.sign_preprocessing else None
    return cls(encoder, preprocess_config, name=name, embed_dim=embed_dim, device=device, precision=precision,
               signature=signature(name, checkpoint, precision, layout.weights_file, detail))


def resolve_layout(name: str, pretrained: str | os.PathLike | None = None,
                   revision: str | None = None) -> tuple[Checkpoint, Layout]:
    """Scorer ``name``'s checkpoint (``pretrained`` as in :func:`create_scorer`) and the layout it is in.

    The first of :attr:`ScorerInfo.layouts` that the folder (or Hub repo) is in (:meth:`Layout.holds`:
    its files, and what ``accepts`` checks); else FileNotFoundError naming what each lacks. With
    several layouts, a layout's small files are fetched (and checked) before its weights, so a Hub
    repo in another layout (e.g. timm's CLIP repos, which also hold a timm ``model.safetensors``)
    costs no download of weights that are not read.
    """
    info = scorer_info(name)
    source = pretrained if pretrained is not None else info.weights
    probe = len(info.layouts) > 1 and not Path(source).expanduser().is_dir()
    failures: list[FileNotFoundError] = []
    for layout in info.layouts:
        try:
            if probe:
                small = resolve_checkpoint(source, revision, tuple(f for f in layout.files if f != layout.weights_file))
                if not layout.holds(small.folder, weights=False):
                    failures.append(FileNotFoundError(f"{small.folder} is not in the {layout.name} layout"))
                    continue
            checkpoint = resolve_checkpoint(source, revision, layout.files)
        except FileNotFoundError as e:
            failures.append(e)
            continue
        if layout.holds(checkpoint.folder):  # a registry entry names its own files
            return checkpoint, layout
        failures.append(FileNotFoundError(f"{checkpoint.folder} is not in the {layout.name} layout"))
    if len(failures) == 1:
        raise failures[0]
    names = ", ".join(layout.name for layout in info.layouts)
    raise FileNotFoundError(f"no {info.name} checkpoint in the layouts it reads ({names}): "
                            + "; ".join(dict.fromkeys(map(str, failures))))


def _near_id_score_class() -> type[Scorer]:
    """:class:`NearIDScore`, the class: defined on first use, because its base class imports torch."""
    if "NearIDScore" in globals():
        return globals()["NearIDScore"]
    from nearid_metric.scorer import Scorer

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

    NearIDScore.__qualname__ = "NearIDScore"  # as if defined at module level (pickle, repr)
    globals()["NearIDScore"] = NearIDScore
    return NearIDScore


def __getattr__(name: str) -> type[Scorer]:
    """``NearIDScore`` (PEP 562): see :func:`_near_id_score_class`."""
    if name == "NearIDScore":
        return _near_id_score_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
