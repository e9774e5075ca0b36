"""Reading transformers-format checkpoints into open_clip and timm modules: what every family shares.

The paper's baselines and the benchmarks' encoders are Hub repos in transformers' format
(``openai/clip-vit-*``, ``facebook/dinov2-*``, ``facebook/dino-vits*``): a ``config.json`` and a
``model.safetensors`` under transformers' names. The per-family modules
(:mod:`nearid_metric.convert_clip`, :mod:`nearid_metric.convert_vit`) map such a config to the
open_clip / timm constructor and describe the renaming with a :class:`KeyTable`; this module
reads the files, applies a table (:func:`convert_keys`) and loads the result strictly
(:func:`load_strict`), so transformers is not needed at run time. Key tables: docs/scorers.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


@dataclass(frozen=True)
class KeyTable:
    """How one model family's transformers tensor names become the target module's names.

    ``renames``: whole source names -> target names. Per-layer tensors are
    ``{layers}{i}.{module}.{param}``; they become ``{layer_target}.{module'}.{param'}`` (``layer_target``
    formatted with ``layer=i``) with ``module'`` from ``layer_renames`` and ``param'`` from
    ``param_renames`` (unchanged when absent). The ``qkv`` modules (q, k, v in that order) of a
    layer are stacked into one tensor named ``{layer_target}.{qkv_target}`` (formatted with
    ``param``). ``skipped``: source names that are dropped. ``family`` names the format in errors.
    """

    family: str
    renames: Mapping[str, str]
    layers: str
    layer_target: str
    layer_renames: Mapping[str, str]
    qkv: tuple[str, str, str]
    qkv_target: str
    param_renames: Mapping[str, str] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()

    @property
    def layer_pattern(self) -> re.Pattern[str]:
        """Matches a per-layer source name: groups (layer index, module, parameter)."""
        return re.compile(rf"^{re.escape(self.layers)}(\d+)\.(.+)\.([^.]+)$")


def convert_keys(state_dict: Mapping[str, torch.Tensor], table: KeyTable,
                 transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                 ) -> dict[str, torch.Tensor]:
    """Rename ``state_dict`` by ``table``; ``transforms``: applied to the tensors of those target names.

    q/k/v projections [D, ...] each become one [3D, ...] tensor (q, k, v order). Raises
    ``KeyError`` naming the keys that are neither mapped nor skipped, or a layer's missing q/k/v.
    """
    transforms = transforms or {}
    pattern = table.layer_pattern
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for name, tensor in state_dict.items():
        if name in table.renames:
            out[table.renames[name]] = tensor
        elif match := pattern.match(name):
            layer, module, param = match[1], match[2], match[3]
            prefix = table.layer_target.format(layer=layer)
            target_param = table.param_renames.get(param, param)
            if module in table.qkv:
                qkv.setdefault(f"{prefix}.{table.qkv_target.format(param=target_param)}", {})[module] = tensor
            elif module in table.layer_renames:
                out[f"{prefix}.{table.layer_renames[module]}.{target_param}"] = tensor
            else:
                unknown.append(name)
        elif name not in table.skipped:
            unknown.append(name)
    if unknown:
        raise KeyError(f"unexpected {table.family} checkpoint keys: {sorted(unknown)[:5]}")
    for target, parts in qkv.items():
        missing = [module for module in table.qkv if module not in parts]
        if missing:
            raise KeyError(f"{table.family} {target}: incomplete q/k/v projections (missing {missing})")
        out[target] = torch.cat([parts[module] for module in table.qkv])
    return {name: transforms[name](tensor) if name in transforms else tensor for name, tensor in out.items()}


def read_config(folder: Path, model_type: str) -> dict[str, Any]:
    """``folder/config.json``, checked to be a transformers config of ``model_type`` (``clip``, ``dinov2``, ``vit``)."""
    path = folder / "config.json"
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("model_type") != model_type:
        raise ValueError(f"{path} has model_type {config.get('model_type')!r}, not {model_type!r}: not a "
                         f"transformers {model_type} checkpoint")
    return config


def read_tensors(path: Path, *, dtype: torch.dtype, device: torch.device | str,
                 skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, read onto ``device``, floating-point ones cast to ``dtype``.

    Each tensor is read where it will run and cast before the next is read, so the file is never
    held twice (the cast is a no-op when the file holds ``dtype``). Tensors whose names start
    with one of ``skip`` are not read.
    """
    with safe_open(path, framework="pt", device=str(device)) as f:
        return {name: cast(f.get_tensor(name), dtype) for name in f.keys() if not (skip and name.startswith(skip))}


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A floating-point ``tensor`` in ``dtype`` (itself when it already is); integer tensors unchanged."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def load_strict(model: ModuleT, state: Mapping[str, torch.Tensor]) -> ModuleT:
    """``model`` (built on the meta device) holding ``state``'s tensors as they are: strict, eval mode, no gradients.

    Raises ``RuntimeError`` naming any parameter or buffer left on the meta device.
    """
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__}: not loaded from the checkpoint: {left[:5]}")
    return model.eval().requires_grad_(False)


def mlp_ratio(intermediate_size: int, hidden_size: int) -> float:
    """A ratio whose ``int(hidden_size * ratio)`` (how open_clip and timm size the MLP) is ``intermediate_size``."""
    return (intermediate_size + 0.5) / hidden_size
