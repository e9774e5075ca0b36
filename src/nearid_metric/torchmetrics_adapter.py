"""``NearIDTorchMetric``: :class:`~nearid_metric.metric.NearIDMetric` as a real ``torchmetrics.Metric``.

Needs the optional extra: ``pip install "nearid-metric[torchmetrics]"``. Per-pair scores
are a ``cat``-reduced state, so torchmetrics syncs them across ranks at ``compute()``.
The scorer is a plain attribute, not a submodule: ``metric.to(device)`` does not move
the model, and its weights are not part of the metric's ``state_dict``.
"""

from __future__ import annotations

import os

import torch

try:
    from torchmetrics import Metric
    from torchmetrics.utilities import dim_zero_cat
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError('NearIDTorchMetric needs torchmetrics: pip install "nearid-metric[torchmetrics]"') from e

from nearid_metric.metric import summarize_scores
from nearid_metric.scorer import Images, Scorer
from nearid_metric.scorers import create_scorer


class NearIDTorchMetric(Metric):
    """torchmetrics wrapper: ``update(refs, gens)``, ``compute() -> {"mean", "std", "n"}`` (tensors), ``reset()``."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, scorer: str | Scorer = "nearid", *, pretrained: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, precision: str = "fp32", batch_size: int | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        built = scorer if isinstance(scorer, Scorer) else create_scorer(scorer, pretrained=pretrained, device=device,
                                                                          precision=precision)
        object.__setattr__(self, "scorer", built)  # not registered as a submodule
        self.batch_size = batch_size
        self.add_state("scores", default=[], dist_reduce_fx="cat")

    def update(self, refs: Images, gens: Images) -> None:
        self.scores.append(self.scorer.score(refs, gens, batch_size=self.batch_size, progress=False).double())

    def compute(self) -> dict[str, torch.Tensor]:
        scores = self.scores  # a list locally, one tensor once synced across ranks
        if isinstance(scores, list):
            scores = dim_zero_cat(scores) if scores else torch.zeros(0, dtype=torch.float64)
        summary = summarize_scores(scores.cpu())
        return {"mean": torch.tensor(summary["mean"], dtype=torch.float64),
                "std": torch.tensor(summary["std"], dtype=torch.float64),
                "n": torch.tensor(summary["n"])}
