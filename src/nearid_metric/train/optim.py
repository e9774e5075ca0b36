"""How the head's parameters change: AdamW, the learning-rate schedule, gradient-norm clipping,
mixed precision (autocast dtype, fp16 loss scaling) and gradient averaging over ranks
(spec section 5; docs/training.md, "Recipe").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def lr_factor(step: int, *, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of ``lr`` for the optimiser update that follows ``step`` updates (0-based).

    Linear warm-up ``step / warmup_steps`` while ``step < warmup_steps`` (0 at step 0), then
    ``1`` (``schedule="constant"``) or the half cosine ``0.5 * (1 + cos(pi * p))`` with
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` (``"cosine"``: transformers'
    ``get_cosine_schedule_with_warmup``, as the reference trainer uses), never below 0.
    """
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of trunk and head for ``precision`` on ``device``; None = float32.

    ``auto``: float16 on CUDA (the reference's fp16 mixed precision), float32 elsewhere.
    """
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(autocast: torch.dtype | None) -> str:
    """``fp32``, ``bf16`` or ``fp16``: the name of an :func:`autocast_dtype` result."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast]


def average_gradients(parameters: Sequence[torch.nn.Parameter], world: int) -> None:
    """DDP's gradient averaging for the head, in one all-reduce (a missing gradient counts as zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for p, chunk in zip(parameters, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).clone()


class HeadUpdate:
    """AdamW on ``parameters`` (kept in float32: the master weights) with a :func:`lr_factor`
    schedule over ``total_steps`` updates, gradient-norm clipping at ``grad_clip`` (0 = off) and,
    with ``scaler``, fp16 loss scaling.

    Per training step: ``zero_grad()``, ``backward(loss)``, (average the gradients over ranks),
    ``step()``. :meth:`state_dict` holds everything a resumed run needs.
    """

    def __init__(self, parameters: Sequence[torch.nn.Parameter], *, lr: float, weight_decay: float, schedule: str,
                 warmup_steps: int, total_steps: int, grad_clip: float,
                 scaler: torch.amp.GradScaler | None = None):
        self.parameters = list(parameters)
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=weight_decay)
        factor = functools.partial(lr_factor, total_steps=total_steps, schedule=schedule, warmup_steps=warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.grad_clip, self.scaler = grad_clip, scaler

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` (multiplied by the loss scale with a scaler)."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self) -> dict[str, float]:
        """One update from the current gradients (already averaged over ranks).

        With a scaler the gradients are unscaled first; if any is inf or NaN the scaler skips
        the AdamW step and halves its scale (seen as a smaller scale after ``update``). The
        global gradient norm is clipped to ``grad_clip``. The schedule advances only when the
        update was taken (as accelerate does for the reference). Returns ``lr`` (of this
        update), ``grad_norm`` (before clipping, unscaled) and ``skipped`` (1.0 or 0.0).
        """
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip or math.inf)
        if self.scaler is None:
            self.optimizer.step()
            skipped = False
        else:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
        if not skipped:
            self.scheduler.step()
        return {"lr": lr, "grad_norm": float(norm), "skipped": float(skipped)}

    def state_dict(self) -> dict[str, Any]:
        """``optimizer`` (AdamW), ``scheduler`` (steps taken) and ``scaler`` (None without one)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
