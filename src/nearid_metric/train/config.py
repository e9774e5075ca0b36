"""``nearid-train``'s settings: :class:`TrainConfig`, its checks and the TOML / YAML config files.

Imports no torch, so a command can build its parser and refuse bad settings before any heavy import.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nearid_metric.options import available_cores

CHECKPOINT_FORMAT = 2  # 2: schedule, loss scaler, best held-out SSR, epoch composition
SLOTS = ("anchor", "positive_1", "positive_2", "negative_0", "negative_1", "negative_2")
AUTOCAST = ("auto", "fp32", "bf16", "fp16")
STORE_DTYPES = {"fp16": "float16", "fp32": "float32"}
EXPORT_DTYPES = ("fp16", "fp32")
LR_SCHEDULES = ("cosine", "constant")
TIER1_MEANS = ("slots", "rows")


@dataclass
class TrainConfig:
    """What ``nearid-train`` does. Config-file keys and ``--flags`` use these names (``_`` -> ``-``).

    Defaults are the reference trainer's recipe (docs/training.md, "Recipe"): AdamW lr 1e-4 with
    weight decay 1e-4, 100 warm-up steps then a cosine decay, gradient norm clipped at 1, 11 epochs,
    global batch 128, T 0.07, alpha 0.5, fp16 mixed precision on CUDA, anchors shuffled, MTG rows
    4x per epoch, evaluation every 100 steps. Data fields are those of ``nearid-bench``.
    """

    out: str | None = None
    base: str = "siglip2-so400m"
    revision: str | None = None
    nearid_folder: list[str] = field(default_factory=list)
    positives: list[str] = field(default_factory=list)
    distractors: list[str] = field(default_factory=list)
    distractor_prefix: str = "auto"
    group: list[str] = field(default_factory=list)
    mtg: list[str] = field(default_factory=list)
    mtg_repeat: int = 4
    hf: bool = False
    split: str = "train"
    data_revision: str | None = None
    eval_fraction: float = 0.05
    eval_groups: list[str] = field(default_factory=list)
    epochs: int = 11
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    grad_clip: float = 1.0
    temperature: float = 0.07
    alpha: float = 0.5
    tier1_mean: str = "slots"
    shuffle_anchor: bool = True
    seed: int = 0
    precision: str = "auto"
    device: str | None = None
    cache_dir: str | None = None
    cache_dtype: str = "fp16"
    num_workers: int = min(8, available_cores())
    checkpoint_every: int = 500
    eval_every: int = 100
    log_every: int = 10
    max_steps: int | None = None
    resume: bool = False
    export_dtype: str = "fp16"
    progress: bool = True


# Fields that define a run: a resumed run must have the same values.
# (``epochs`` too under the cosine schedule, whose length it sets: see ``run_fields``.)
RUN_FIELDS = ("base", "revision", "nearid_folder", "positives", "distractors", "distractor_prefix", "group", "mtg",
              "mtg_repeat", "hf", "split", "data_revision", "eval_fraction", "eval_groups", "batch_size", "lr",
              "weight_decay", "lr_schedule", "warmup_steps", "grad_clip", "temperature", "alpha", "tier1_mean",
              "shuffle_anchor", "seed", "precision", "cache_dtype")

FIELD_HELP = {
    "out": "output folder: checkpoint.pt, log.jsonl, summary.json and final/ (the exported checkpoint)",
    "base": "SigLIP(2) checkpoint whose trunk is frozen and whose head initialises training: registry name, "
            "folder or Hub repo id (default: siglip2-so400m)",
    "revision": "Hub revision of --base",
    "nearid_folder": "NearID image folders ROOT/<sample>/view_K.*, distractor_K.* or ROOT/<group>/<sample>/...",
    "positives": "NearID positives table(s) (.parquet/.arrow file(s) or a folder; id, img1..img3)",
    "distractors": "NearID distractor tables, one group each",
    "distractor_prefix": "distractor image columns: auto, img or nimg",
    "group": "group names, one per --distractors or --nearid-folder source",
    "mtg": "MTG tables mixed into training (views 1 and 2, negatives = their part edits)",
    "mtg_repeat": "copies of every MTG row per epoch (reference: 4, scripts/train_example.sh)",
    "hf": "--positives/--distractors/--mtg are Hugging Face dataset ids or saved dataset folders",
    "split": "dataset split with --hf",
    "data_revision": "dataset revision with --hf",
    "eval_fraction": "fraction of NearID identities held out for the per-epoch SSR / PA (by a hash of the id)",
    "eval_groups": "NearID groups (inpainting settings) held out for evaluation",
    "epochs": "passes over the training samples",
    "batch_size": "global batch (samples; split over ranks)",
    "lr": "AdamW peak learning rate",
    "weight_decay": "AdamW weight decay (reference: 1e-4, training/config.py)",
    "lr_schedule": "cosine (linear warm-up, then a half cosine to 0 at the last step; the reference's) or constant "
                   "(after the warm-up)",
    "warmup_steps": "optimiser updates of linear learning-rate warm-up from 0 (reference: 100)",
    "grad_clip": "clip the head's global gradient norm to this (reference: 1.0); 0 = no clipping",
    "temperature": "InfoNCE temperature",
    "alpha": "weight of tier 2",
    "tier1_mean": "tier-1 average: slots (mean over positive slots of each slot's mean; the reference's) or rows "
                  "(mean over all valid positive rows)",
    "shuffle_anchor": "each epoch, shuffle every sample's valid views (its distractors follow them); the first is "
                      "the anchor (--no-shuffle-anchor: always the first present view)",
    "seed": "seed of the sample order, the anchor shuffle and the distractor generators drawn",
    "precision": "autocast of trunk and head: auto (CUDA: fp16 with loss scaling, as the reference; CPU: fp32), "
                 "fp32, bf16 or fp16; the head's weights stay fp32",
    "device": "torch device (default: cuda if available; cuda:LOCAL_RANK under torchrun)",
    "cache_dir": "feature cache folder: the trunk's tokens of each image are computed once and stored there",
    "cache_dtype": "feature cache storage: fp16 (default) or fp32",
    "num_workers": "data loader processes",
    "checkpoint_every": "steps between checkpoints (and at every epoch end)",
    "eval_every": "steps between held-out evaluations (and at step 0 and every epoch end)",
    "log_every": "steps between log.jsonl records",
    "max_steps": "stop after this many steps in total (checkpointed; --resume continues)",
    "resume": "continue from OUT/checkpoint.pt if there is one",
    "export_dtype": "dtype of the exported weights: fp16 (as released) or fp32",
    "progress": "progress bars (--no-progress: none)",
}


def check_config(config: TrainConfig) -> None:
    """``ValueError`` naming the first setting that cannot work."""
    if not config.out:
        raise ValueError("out: an output folder is required")
    if not (config.nearid_folder or config.positives or config.mtg):
        raise ValueError("no data: give nearid_folder, positives + distractors, or mtg")
    if bool(config.positives) != bool(config.distractors):
        raise ValueError("positives and distractors go together (views and their distractors, joined on id)")
    if config.nearid_folder and config.positives:
        raise ValueError("give NearID data as nearid_folder or as positives + distractors, not both")
    if config.group and len(config.group) != len(config.nearid_folder or config.distractors):
        raise ValueError(f"group needs one name per NearID source, got {len(config.group)}")
    if not 0 <= config.eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}")
    for name in ("epochs", "batch_size", "checkpoint_every", "log_every", "eval_every", "mtg_repeat"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {config.max_steps}")
    for name in ("num_workers", "warmup_steps"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    if config.lr <= 0 or config.temperature <= 0 or min(config.weight_decay, config.alpha, config.grad_clip) < 0:
        raise ValueError("lr and temperature must be > 0, weight_decay, alpha and grad_clip >= 0")
    for name, choices in (("precision", AUTOCAST), ("cache_dtype", STORE_DTYPES), ("export_dtype", EXPORT_DTYPES),
                          ("distractor_prefix", ("auto", "img", "nimg")), ("lr_schedule", LR_SCHEDULES),
                          ("tier1_mean", TIER1_MEANS)):
        if getattr(config, name) not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(config, name)!r}")


def run_fields(config: TrainConfig) -> tuple[str, ...]:
    """The settings a resumed run must share with its checkpoint: :data:`RUN_FIELDS`, and
    ``epochs`` under the cosine schedule (its length is ``epochs`` x the steps of an epoch)."""
    return RUN_FIELDS + (("epochs",) if config.lr_schedule == "cosine" else ())


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML (``.toml``) or YAML (``.yaml``/``.yml``) file of :class:`TrainConfig` keys, type-checked.

    Keys are the field names (``batch_size``) or the flag spelling (``batch-size``).
    """
    path = Path(path)
    try:
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:
                import tomli as tomllib
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError("YAML config files need PyYAML: pip install 'nearid-metric[train]'") from None

            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        else:
            raise ValueError("config files end in .toml, .yaml or .yml")
    except (OSError, ValueError) as e:  # tomllib / yaml errors are ValueErrors
        raise ValueError(f"{path}: {e}") from None
    except Exception as e:  # yaml.YAMLError
        raise ValueError(f"{path}: {type(e).__name__}: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
    names = [name.replace("-", "_") for name in values]  # flag spelling (batch-size) allowed too
    if len(set(names)) < len(names):
        raise ValueError(f"{path}: a setting is given twice (with - and with _)")
    return {name: _typed(name, value, str(path)) for name, value in zip(names, values.values())}


def _typed(name: str, value: Any, source: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if name not in fields:
        raise ValueError(f"{source}: unknown setting {name!r}; known: {', '.join(fields)}")
    default = TrainConfig().__getattribute__(name)
    kind = fields[name].type
    if isinstance(default, list):
        value = [value] if isinstance(value, str) else value
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif "int" in kind:
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (value is None and "None" in kind)
    else:
        ok = isinstance(value, str) or (value is None and "None" in kind)
    if not ok:
        raise ValueError(f"{source}: setting {name!r} must be {kind}, got {value!r}")
    return value
