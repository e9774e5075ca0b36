"""Scoring on several processes (``torchrun``): each rank embeds its share of the images, every rank gets all.

The distinct images still to embed are cut into loader batches exactly as one process would
cut them, and rank ``r`` of ``W`` embeds batches ``r, r + W, r + 2W, ...``. The same batches
go through the same forward passes as in a single process, so the merged embeddings, hence
the scores, are the ones a single process computes. Merging is an all-reduce sum of rows that
exactly one rank filled (``x + 0 = x`` exactly), so it is exact too.

Everything here is a collective: every rank must make the same calls with the same images.
torch is imported by the functions that use it, so the commands check their launch (:func:`launched_by_torchrun`,
:func:`missing_torchrun_variables`) before importing it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True under ``torchrun`` with more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def missing_torchrun_variables() -> list[str]:
    """The variables torchrun sets that this process lacks."""
    return [name for name in TORCHRUN_VARIABLES if name not in os.environ]


def rank_device(device: str | None) -> torch.device:
    """This process's device: ``cuda:<LOCAL_RANK>`` for None or ``"cuda"`` when CUDA is available;
    an explicit device (``cpu``, ``cuda:1``) as given; else CPU."""
    import torch

    if device in (None, "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device or "cpu")


@contextmanager
def process_group(device: str | None, *, timeout: timedelta | None = None) -> Iterator[torch.device]:
    """Join the ``torchrun`` process group for one command; yields this rank's device (:func:`rank_device`).

    NCCL on CUDA, else gloo. ``timeout``: of the collectives (torch's default when None).
    """
    import torch
    import torch.distributed as dist

    missing = missing_torchrun_variables()
    if missing:
        raise RuntimeError(f"this needs the environment torchrun sets ({', '.join(missing)} missing); "
                           f"launch it with: torchrun --nproc-per-node N -m MODULE ...")
    chosen = rank_device(device)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    options = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", init_method="env://", **options)
    try:
        yield chosen
    finally:
        dist.destroy_process_group()


def rank_and_world(distributed: bool) -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` when not distributed."""
    if not distributed:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
    return dist.get_rank(), dist.get_world_size()


def _device() -> torch.device:
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def check_same_inputs(keys: Sequence[str | None]) -> None:
    """Raise ``ValueError`` on every rank unless all ranks were given the same images."""
    import torch
    import torch.distributed as dist

    digest = hashlib.sha256("\n".join(map(str, keys)).encode()).digest()
    mine = torch.tensor(list(digest), dtype=torch.int64, device=_device())
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise ValueError("distributed scoring needs the same images on every rank, in the same order")


def any_rank(mask: torch.Tensor) -> torch.Tensor:
    """Element-wise OR of a bool tensor over the ranks (so that all ranks agree on what to embed)."""
    import torch
    import torch.distributed as dist

    merged = mask.to(device=_device(), dtype=torch.uint8)
    dist.all_reduce(merged, op=dist.ReduceOp.MAX)
    return merged.cpu().bool()


def merge_rows(rows: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks of a tensor whose rows each rank filled alone (zeros elsewhere): exact."""
    import torch.distributed as dist

    merged = rows.to(_device())
    dist.all_reduce(merged)
    return merged.cpu()


def merge_dicts(mine: dict) -> dict:
    """Union of every rank's dict."""
    import torch.distributed as dist

    parts: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}
