"""``NearIDMetric``: a drop-in metric for evaluation loops (``update`` / ``compute`` / ``reset``).

Per-pair scores are kept (``metric.scores``), not only their mean. Under
``torch.distributed`` ``compute()`` gathers every rank's scores, so the result equals a
single process scoring the union of the pairs: sums are exactly rounded (``math.fsum``),
and the bootstrap interval depends only on the set of scores, so neither depends on how the
pairs were split across ranks.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from nearid_metric.scorer import Images, Scorer, describe_image
from nearid_metric.scorers import create_scorer
from nearid_metric.stats import BOOTSTRAP_RESAMPLES, CI_LEVEL, bootstrap_ci

CI_METHODS = ("bootstrap", None)
ON_ERROR = ("raise", "skip")


def summarize_scores(scores: torch.Tensor, *, ci: str | None = None, ci_resamples: int = BOOTSTRAP_RESAMPLES,
                     ci_seed: int = 0) -> dict[str, float | int]:
    """``{"mean", "std", "n"}`` of per-pair scores [N]: exactly rounded mean, sample std (ddof=1).

    ``mean`` is NaN for no scores, ``std`` NaN for fewer than 2. With ``ci="bootstrap"`` also
    ``ci_low`` and ``ci_high``: the 95% percentile bootstrap interval of the mean over pairs
    (:func:`nearid_metric.stats.bootstrap_ci`; ``ci_resamples`` resamples, ``ci_seed``), NaN for
    fewer than 2 scores.
    """
    check_ci(ci)
    values = scores.double().tolist()
    n = len(values)
    mean = math.fsum(values) / n if n else math.nan
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    summary: dict[str, float | int] = {"mean": mean, "std": std, "n": n}
    if ci is not None:
        summary["ci_low"], summary["ci_high"] = bootstrap_ci(values, resamples=ci_resamples, seed=ci_seed,
                                                             level=CI_LEVEL)
    return summary


def check_ci(ci: str | None) -> None:
    if ci not in CI_METHODS:
        raise ValueError(f"ci must be 'bootstrap' or None, got {ci!r}")


def gather_scores(scores: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All ranks' scores [N_r] concatenated in rank order (the input itself outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return scores
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    local = scores.double().to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([len(local)], device=device), group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.float64, device=device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes)]).cpu()


class NearIDMetric:
    """Identity preservation of generated images, accumulated over an evaluation loop.

    ``scorer``: a name from :func:`nearid_metric.list_scorers` (built with ``pretrained``,
    ``device``, ``precision``) or a ready :class:`~nearid_metric.scorer.Scorer`.
    ``update(refs, gens)`` scores aligned pairs (paths, PIL images or uint8 [N, 3, H, W]
    tensors) and returns their scores [N]; ``compute()`` summarises every pair seen so far,
    across ranks: ``mean``, ``std``, ``n`` and, unless ``ci=None``, the 95% bootstrap interval
    of the mean ``ci_low``, ``ci_high`` (``ci_resamples`` resamples of the pairs, ``ci_seed``).
    The scorer's model is never moved by the metric.
    """

    higher_is_better = True

    def __init__(
        self,
        scorer: str | Scorer = "nearid",
        *,
        pretrained: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        batch_size: int | None = None,
        process_group: dist.ProcessGroup | None = None,
        ci: str | None = "bootstrap",
        ci_resamples: int = BOOTSTRAP_RESAMPLES,
        ci_seed: int = 0,
    ):
        check_ci(ci)
        if isinstance(scorer, Scorer):
            if pretrained is not None or device is not None:
                raise ValueError("pretrained/device apply when the scorer is given by name, not to a built scorer")
            self.scorer = scorer
        else:
            self.scorer = create_scorer(scorer, pretrained=pretrained, device=device, precision=precision)
        self.batch_size = batch_size
        self.process_group = process_group
        self.ci, self.ci_resamples, self.ci_seed = ci, ci_resamples, ci_seed
        self._scores: list[torch.Tensor] = []
        self._pairs = 0  # pairs passed to update, scored or not
        self.failures: list[dict[str, object]] = []
        """Inputs skipped by ``update(..., on_error="skip")``: pair number (over all updates), side, input, reason."""

    def update(self, refs: Images, gens: Images, *, on_error: str = "raise") -> torch.Tensor:
        """Score aligned pairs (refs[i], gens[i]); returns their scores [N] float32 (kept for ``compute``).

        ``on_error="raise"`` (default): an image that cannot be read raises
        :class:`~nearid_metric.images.ImageLoadError` and nothing of the batch is kept.
        ``on_error="skip"``: the pairs with an unreadable side get NaN in the returned scores and
        are left out of ``compute``; each bad input is recorded in :attr:`failures`.
        """
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if len(refs) != len(gens):
            raise ValueError(f"update() needs aligned pairs: {len(refs)} refs vs {len(gens)} gens")
        kwargs = dict(batch_size=self.batch_size, progress=False)
        if on_error == "raise":
            scores = self.scorer.score(refs, gens, **kwargs)
        else:
            (ref_emb, ref_failed), (gen_emb, gen_failed) = (self.scorer.embed_with_failures(refs, **kwargs),
                                                            self.scorer.embed_with_failures(gens, **kwargs))
            scores = (ref_emb * gen_emb).sum(-1)  # NaN where a side failed
            for side, images, failed in (("ref", refs, ref_failed), ("gen", gens, gen_failed)):
                self.failures += [{"pair": self._pairs + i, "side": side, "input": describe_image(images, i),
                                   "reason": reason} for i, reason in sorted(failed.items())]
        self._pairs += len(scores)
        self._scores.append(scores[~torch.isnan(scores)].double())
        return scores

    @property
    def scores(self) -> torch.Tensor:
        """This process's per-pair scores so far, in update order: [N] float64."""
        return torch.cat(self._scores) if self._scores else torch.zeros(0, dtype=torch.float64)

    def compute(self) -> dict[str, float | int]:
        """``{"mean", "std", "n", "ci_low", "ci_high"}`` over all pairs of all ranks (collective when distributed)."""
        return summarize_scores(gather_scores(self.scores, self.process_group), ci=self.ci,
                                ci_resamples=self.ci_resamples, ci_seed=self.ci_seed)

    def reset(self) -> None:
        self._scores = []
        self._pairs = 0
        self.failures = []

    def __repr__(self) -> str:
        return f"NearIDMetric({self.scorer.signature!r}, pairs={len(self.scores)})"
