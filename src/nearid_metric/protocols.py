"""The benchmarks' published procedures as data: which scorers, preprocessing, scaling, pairing, layout and
aggregation DreamBooth, DreamBench++ and CustomConcept101 use (facts: shared/spec/PROTOCOLS.md).

One table, :data:`PROTOCOLS`, read by one routine, :func:`protocol_inputs` (a benchmark's folder
layout -> the pairs, their subjects and prompts), and by ``nearid-score --protocol``. NearID is
added to every preset and always reported as its plain cosine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nearid_metric.dreambench import parse_key
from nearid_metric.images import list_images
from nearid_metric.pairing import Pairing, image_key, pair_by_name, pair_by_subject, pair_subject_lists
from nearid_metric.preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, torchvision_eval
from nearid_metric.prompts import lookup_prompts, read_prompts, text_folder_prompts

SCALES = ("cosine", "100x", "clipscore")
"""``cosine`` as is; ``100x``: 100 x cosine (DreamBench++); ``clipscore``: 2.5 x max(cosine, 0) (CLIPScore,
CustomConcept101's text alignment)."""

AGGREGATIONS = ("macro", "micro", "per-subject")
"""The headline figure: mean over subjects of the per-subject means, mean over pairs, or one figure per subject."""

LAYOUTS = ("subjects", "dreambench-run", "concepts")

CC101_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tiff", ".JPG")
"""The file endings CustomConcept101's evaluate.py reads (case-sensitive, top level of each folder only)."""


def scale_scores(cosines: np.ndarray, scale: str) -> np.ndarray:
    """Cosines [N] in a benchmark's unit (:data:`SCALES`); NaN stays NaN."""
    cosines = np.asarray(cosines, dtype=np.float64)
    if scale == "cosine":
        return cosines
    if scale == "100x":
        return 100.0 * cosines
    if scale == "clipscore":
        return 2.5 * np.where(np.isnan(cosines), np.nan, np.maximum(cosines, 0.0))
    raise ValueError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")


@dataclass(frozen=True)
class ProtocolColumn:
    """One score column of a preset: the scorer (image or text), its unit, and the benchmark's own
    preprocessing where it differs from what the weights' files say (None: the weights' own)."""

    scorer: str
    scale: str = "cosine"
    preprocess: PreprocessConfig | None = None


@dataclass(frozen=True)
class Protocol:
    """A benchmark's procedure: ``columns``, the folder ``layout`` REF and GEN are read in, the headline
    ``aggregation``, whether DreamBench++ ``categories`` are reported, and what it regenerates."""

    name: str
    title: str
    columns: tuple[ProtocolColumn, ...]
    layout: str
    aggregation: str
    categories: bool = False
    source: str = ""
    published: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def model_spec(self) -> str:
        """The ``--model`` value of the preset's scorers."""
        return ",".join(column.scorer for column in self.columns)

    def column(self, scorer: str) -> ProtocolColumn:
        return next(column for column in self.columns if column.scorer == scorer)

    def settings(self) -> dict[str, Any]:
        """Every setting, as written to ``summary.json``."""
        return {"name": self.name, "title": self.title, "layout": self.layout, "aggregation": self.aggregation,
                "categories": self.categories, "source": self.source, "published": self.published,
                "notes": list(self.notes),
                "columns": {c.scorer: {"scale": c.scale,
                                       "preprocessing": None if c.preprocess is None else c.preprocess.describe()}
                            for c in self.columns}}

    def signature_suffix(self, scorer: str) -> str:
        """What a column's signature gains under this preset: ``protocol:<name>|scale:<scale>|<aggregation>``."""
        return f"protocol:{self.name}|scale:{self.column(scorer).scale}|{self.aggregation}"


_CC101_CLIP = torchvision_eval(224, 224, CLIP_MEAN, CLIP_STD, rgb_mode="after_crop")
_CC101_DINO = torchvision_eval(256, 224, IMAGENET_MEAN, IMAGENET_STD, rgb_mode="after_crop")

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "dreambooth", "DreamBooth (Ruiz et al. 2023)",
            (ProtocolColumn("nearid"), ProtocolColumn("dino-vits16"), ProtocolColumn("clip-i"),
             ProtocolColumn("clip-t")),
            layout="subjects", aggregation="macro",
            source="arXiv 2208.12242 section 4.1; data google/dreambooth",
            published="Table 1: Real images DINO 0.774 CLIP-I 0.885; DreamBooth (SD) 0.668 / 0.803 / CLIP-T 0.305",
            notes=("the paper does not pin the CLIP variant or the preprocessing: CLIP ViT-B/32 with CLIPProcessor "
                   "and DINO's torchvision eval transform are used",)),
        Protocol(
            "dreambench", "DreamBench++ (Peng et al. 2025)",
            (ProtocolColumn("nearid"), ProtocolColumn("dino-vits8", "100x"), ProtocolColumn("dinov2-small", "100x"),
             ProtocolColumn("clip-i", "100x"), ProtocolColumn("clip-t", "100x")),
            layout="dreambench-run", aggregation="micro", categories=True,
            source="yuangpeng/dreambench_plus dreambench_plus/metrics/{dino_score,clip_score}.py",
            notes=("its clip_score.py does not truncate prompts; here prompts are truncated at 77 tokens",
                   "its CLIPProcessor loads transformers' fast tokenizer, which skips ftfy's text repair; here the "
                   "tokens are the Python CLIPTokenizer's (with ftfy): they differ only on prompts ftfy changes "
                   "(curly quotes, mojibake, HTML entities)")),
        Protocol(
            "customconcept101", "CustomConcept101 (Kumari et al. 2023)",
            (ProtocolColumn("nearid"), ProtocolColumn("clip-i", preprocess=_CC101_CLIP),
             ProtocolColumn("dino-vits16", preprocess=_CC101_DINO),
             ProtocolColumn("clip-t", "clipscore", preprocess=_CC101_CLIP)),
            layout="concepts", aggregation="per-subject",
            source="adobe-research/custom-diffusion customconcept101/evaluate.py",
            notes=("evaluate.py runs CLIP in fp16 on CUDA; here the precision is --precision (fp32 by default)",
                   "its OpenAI tokenizer unescapes HTML entities a second time after ftfy (&amp;amp; -> &); the "
                   "tokenizer here repairs text with ftfy once")),
    )
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


@dataclass
class ProtocolInputs:
    """What a preset reads from REF and GEN: the pairing (with subjects), the prompt of each pair (None
    where missing), each pair's DreamBench++ category (None when not reported), the roots the paths are
    relative to, and where the prompts came from."""

    pairing: Pairing
    prompts: list[str | None] | None
    categories: list[str] | None
    ref_root: Path
    gen_root: Path
    prompt_source: str | None = None


def protocol_inputs(protocol: Protocol, ref: str | os.PathLike, gen: str | os.PathLike | None, *,
                    prompts_file: str | os.PathLike | None = None) -> ProtocolInputs:
    """Read REF and GEN in ``protocol``'s layout. ``ValueError`` naming the folder for a wrong layout.

    - ``subjects`` (DreamBooth): ``REF/<subject>/*`` x ``GEN/<subject>/*``; prompts from ``prompts_file``.
    - ``dreambench-run``: REF is a run folder holding ``src_image/``, ``tgt_image/`` and ``text/`` (GEN
      unused, or the same folder); pairs by relative path; prompts from ``text/<path>.txt``.
    - ``concepts`` (CustomConcept101): REF is one or more target folders joined by ``+`` (one concept
      each), GEN the sample root holding ``samples/`` and ``prompts.json`` (prompts by file stem); every
      sample with every target image of each concept; only the top level of each folder and
      :data:`CC101_EXTENSIONS` are read, as evaluate.py does (other files are reported).
    """
    if protocol.layout == "subjects":
        if gen is None:
            raise ValueError(f"--protocol {protocol.name} needs REF (dataset/<subject>/...) and GEN (<subject>/...)")
        pairing = pair_by_subject(ref, gen)
        prompts = _file_prompts(pairing, Path(gen), prompts_file)
        return ProtocolInputs(pairing, prompts, None, Path(ref), Path(gen),
                              None if prompts_file is None else str(prompts_file))
    if protocol.layout == "dreambench-run":
        run = Path(ref)
        if gen is not None and Path(gen).resolve() != run.resolve():
            raise ValueError(f"--protocol {protocol.name} reads one run folder (src_image/, tgt_image/, text/): "
                             f"give it as REF only")
        missing = [name for name in ("src_image", "tgt_image", "text") if not (run / name).is_dir()]
        if missing:
            raise ValueError(f"{run}: a DreamBench++ run folder holds src_image/, tgt_image/ and text/ "
                             f"(missing {', '.join(missing)})")
        if prompts_file is not None:
            raise ValueError(f"--protocol {protocol.name} reads its prompts from {run / 'text'}; drop --prompts")
        src, tgt = run / "src_image", run / "tgt_image"
        pairing = pair_by_name(src, tgt)
        prompts = text_folder_prompts([g for _, g in pairing.pairs], tgt, run / "text")
        return ProtocolInputs(pairing, prompts, _categories(pairing, src), src, tgt, str(run / "text"))
    if protocol.layout == "concepts":
        if gen is None:
            raise ValueError(f"--protocol {protocol.name} needs REF (target folders joined by +) and GEN "
                             f"(the folder holding samples/ and prompts.json)")
        root = Path(gen)
        samples, json_path = root / "samples", root / "prompts.json"
        if not samples.is_dir():
            raise ValueError(f"{root}: a CustomConcept101 sample root holds samples/ (and prompts.json)")
        targets = [Path(part) for part in str(ref).split("+") if part]
        pairing = Pairing(subjects=[])
        refs = {_concept_name(t, targets): _top_level_images(t, pairing) for t in targets}
        gens = _top_level_images(samples, pairing)
        pair_subject_lists(refs, {concept: gens for concept in refs}, pairing, "the target folder", str(samples))
        if prompts_file is None and not json_path.is_file():
            raise ValueError(f"{json_path}: missing; CustomConcept101's text alignment reads the prompts from it")
        prompts = _file_prompts(pairing, samples, prompts_file or json_path)
        return ProtocolInputs(pairing, prompts, None, Path(targets[0]).parent if len(targets) > 1 else targets[0],
                              samples, str(prompts_file or json_path))
    raise ValueError(f"unknown layout {protocol.layout!r}")


def _file_prompts(pairing: Pairing, gen_root: Path, prompts_file: str | os.PathLike | None) -> list[str | None] | None:
    if prompts_file is None:
        return None
    return lookup_prompts([g for _, g in pairing.pairs], gen_root, read_prompts(prompts_file))


def _categories(pairing: Pairing, src: Path) -> list[str] | None:
    """Each pair's DreamBench++ category from its key (None, logged by the caller, when a key has none)."""
    out = []
    for ref, _ in pairing.pairs:
        try:
            out.append(parse_key(image_key(ref, src).replace("/", "-")).category)
        except ValueError:
            return None
    return out if out else None


def _concept_name(target: Path, targets: Sequence[Path]) -> str:
    """A concept's name: its folder's name, or its path where two targets share a name."""
    names = [t.name for t in targets]
    return target.name if names.count(target.name) == 1 else str(target)


def _top_level_images(folder: Path, pairing: Pairing) -> list[Path]:
    """The files evaluate.py reads in ``folder``: top level, :data:`CC101_EXTENSIONS`; the others are ignored
    (reported in ``pairing.ignored``)."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder (CustomConcept101 target folders and samples/ hold images)")
    images = []
    for path in pairing.add_listing(list_images(folder)):
        (images if path.parent == folder and path.name.endswith(CC101_EXTENSIONS) else pairing.ignored).append(path)
    return images

