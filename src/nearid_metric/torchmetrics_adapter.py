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

from nearid_metric.metric import check_ci, summarize_scores
from nearid_metric.scorer import Images, Scorer
from nearid_metric.scorers import create_scorer
from nearid_metric.stats import BOOTSTRAP_RESAMPLES


class NearIDTorchMetric(Metric):
    """torchmetrics wrapper: ``update(refs, gens)``, ``compute()``, ``reset()``.

    ``compute()`` returns float64 tensors ``mean``, ``std``, ``n`` and (unless ``ci=None``)
    ``ci_low``, ``ci_high``, as :meth:`nearid_metric.NearIDMetric.compute`.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, scorer: str | Scorer = "nearid", *, pretrained: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, precision: str = "fp32", batch_size: int | None = None,
                 ci: str | None = "bootstrap", ci_resamples: int = BOOTSTRAP_RESAMPLES, ci_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        check_ci(ci)
        self.ci, self.ci_resamples, self.ci_seed = ci, ci_resamples, ci_seed
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
        summary = summarize_scores(scores.cpu(), ci=self.ci, ci_resamples=self.ci_resamples, ci_seed=self.ci_seed)
        return {key: torch.tensor(value) if key == "n" else torch.tensor(value, dtype=torch.float64)
                for key, value in summary.items()}
