"""CLIP-T: image-text similarity from a CLIP checkpoint's text tower (prompt fidelity).

A :class:`TextScorer` embeds prompts with the text tower of a transformers-format CLIP folder
(``openai/clip-vit-base-patch32`` for ``clip-t``, as DreamBench++ and DreamBooth use;
``openai/clip-vit-large-patch14`` for ``clip-t-l14``), converted to open_clip's
``TextTransformer`` (:func:`nearid_metric.convert_clip.load_clip_text`) and tokenized by
:class:`nearid_metric.tokenizer.ClipTokenizer`. Its :attr:`TextScorer.image_scorer` is the
``clip-i`` / ``clip-l14`` scorer of the same folder, so image embeddings are shared with CLIP-I.
A score is the raw cosine (:func:`image_text_scores`); benchmarks scale it themselves
(DreamBench++ ``100 * cos``, CustomConcept101's CLIPScore ``2.5 * max(cos, 0)``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nearid_metric.batching import forward_in_chunks
from nearid_metric.convert_clip import load_clip_text
from nearid_metric.hub import CHECKPOINT_FILES, Checkpoint, resolve_checkpoint
from nearid_metric.preprocess import PreprocessConfig
from nearid_metric.scorer import PRECISIONS, Scorer, check_finite, check_precision, pick_device, signature
from nearid_metric.scorers import TEXT_SCORERS, create_scorer
from nearid_metric.tokenizer import ClipTokenizer

logger = logging.getLogger(__name__)

_IMAGE_SCORERS = {"clip-t": "clip-i", "clip-t-l14": "clip-l14"}
TOKENIZER_FILES = ("vocab.json", "merges.txt")
TEXT_FILES = (*CHECKPOINT_FILES, *TOKENIZER_FILES)
"""What a CLIP-T weights folder holds: the CLIP checkpoint (both towers, the image preprocessing) and its BPE files."""
TEXT_BATCH = 256  # prompts per forward pass when none is given


@dataclass(eq=False)
class TextScorer:
    """Prompts -> L2-normalised CLIP text embeddings [N, E], comparable with :attr:`image_scorer`'s image embeddings.

    Build it with :func:`create_text_scorer`. ``encoder`` maps token ids [B, L] (on ``device``)
    to projected embeddings [B, E]; ``tokenizer`` turns texts into those ids; ``image_scorer`` is
    the CLIP-I scorer of the same weights.
    """

    encoder: torch.nn.Module
    tokenizer: ClipTokenizer
    image_scorer: Scorer
    name: str
    signature: str
    device: torch.device
    precision: str = "fp32"

    @property
    def embed_dim(self) -> int:
        """Width E of the text (and image) embeddings."""
        return self.image_scorer.embed_dim

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> token ids [N, L] int64 (L = 77 for CLIP: start, tokens truncated, end, then 0s)."""
        return self.tokenizer(prompts)

    def embed_texts(self, prompts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """Prompts -> L2-normalised text embeddings [N, E], float32 on CPU (``batch_size`` prompts per forward pass)."""
        tokens = self.tokenize(prompts)
        if not len(tokens):
            return torch.zeros(0, self.embed_dim)

        def forward(ids: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.encoder(ids).float(), dim=-1)

        with torch.inference_mode():
            out, _ = forward_in_chunks(forward, tokens.to(self.device), batch_size or TEXT_BATCH, name=self.name)
        return check_finite(out.cpu(), self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.signature!r}, device={self.device})"


def image_text_scores(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosines of aligned (image, text) rows of L2-normalised embeddings [N, E] each: [N] float32, in [-1, 1]."""
    if image_embeddings.shape != text_embeddings.shape or image_embeddings.dim() != 2:
        raise ValueError(f"image_text_scores needs aligned [N, E] embeddings, got {list(image_embeddings.shape)} "
                         f"and {list(text_embeddings.shape)}")
    return (image_embeddings.float() * text_embeddings.float()).sum(-1)


def create_text_scorer(
    name: str = "clip-t",
    *,
    pretrained: str | os.PathLike | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    preprocess: PreprocessConfig | None = None,
) -> TextScorer:
    """Build a CLIP-T scorer (:data:`TEXT_SCORERS`) and the CLIP-I scorer of the same weights.

    ``pretrained``: a local folder, a registry name or a Hub repo id holding :data:`TEXT_FILES`
    (a transformers ``CLIPModel`` checkpoint, its ``preprocessor_config.json``, ``vocab.json`` and
    ``merges.txt``); default: the name's registry entry. ``precision``: ``fp32``, ``bf16`` or
    ``fp16`` for both towers; embeddings are float32 either way. The signature names the text
    tower, its context length and the hash of the BPE files. ``preprocess``: the image tower's
    preprocessing in place of the weights' own (a benchmark's, as :func:`~nearid_metric.create_scorer`);
    then also named in the signature.
    """
    if name not in TEXT_SCORERS:
        raise ValueError(f"unknown text scorer {name!r}; known: {', '.join(TEXT_SCORERS)}")
    check_precision(precision)
    source = pretrained if pretrained is not None else TEXT_SCORERS[name]
    checkpoint = resolve_checkpoint(source, revision, TEXT_FILES)
    missing = [file for file in TEXT_FILES if not (checkpoint.folder / file).is_file()]
    if missing:  # a registry entry that names fewer files
        raise FileNotFoundError(f"{checkpoint.folder} lacks {', '.join(missing)}, needed by {name}")
    device = pick_device(device)
    encoder = load_clip_text(checkpoint.folder, dtype=PRECISIONS[precision], device=device)
    tokenizer = ClipTokenizer.from_folder(checkpoint.folder, encoder.context_length)
    largest = max(tokenizer.vocab.values())
    if largest >= encoder.vocab_size:
        raise ValueError(f"{checkpoint.folder}: vocab.json has token id {largest}, but the text tower embeds "
                         f"{encoder.vocab_size} tokens")
    if encoder.pool_type == "eos" and encoder.eos_id != tokenizer.eos_id:
        raise ValueError(f"{checkpoint.folder}: config.json pools at eos_token_id {encoder.eos_id}, but vocab.json's "
                         f"end-of-text token is {tokenizer.eos_id}")
    image_scorer = create_scorer(_IMAGE_SCORERS[name], pretrained=checkpoint.folder, device=device,
                                 precision=precision, preprocess=preprocess)
    detail = _text_detail(checkpoint, tokenizer.context_length)
    if preprocess is not None:
        detail += f"|image:{preprocess.describe(normalization=True)}"
    logger.info("loaded %s text tower %s from %s on %s", name, checkpoint.source, checkpoint.folder, device)
    return TextScorer(encoder, tokenizer, image_scorer, name=name, device=device, precision=precision,
                      signature=signature(name, checkpoint, precision, detail=detail))


def _text_detail(checkpoint: Checkpoint, context_length: int) -> str:
    """``transformers:text<context>-bpe<12 hex of the BPE files' sha256>``: the text tower and its tokenizer."""
    digest = hashlib.sha256()
    for file in TOKENIZER_FILES:
        digest.update((checkpoint.folder / file).read_bytes())
    return f"transformers:text{context_length}-bpe{digest.hexdigest()[:12]}"
