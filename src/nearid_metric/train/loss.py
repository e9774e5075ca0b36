"""The NearID two-tier contrastive loss (spec section 5), in one process and under ``torch.distributed``.

:func:`two_tier_infonce` takes anchors, positives and hard negatives with their masks;
:func:`batch_loss` applies it to one training batch laid out in :data:`~nearid_metric.train.config.SLOTS` order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 (same shape on every rank); the backward sums every rank's
    gradient of the gathered tensor and returns this rank's slice (what DDP expects).

    torch's own ``torch.distributed.nn.functional.all_gather`` does the same but is
    deprecated (FutureWarning on every call) in recent torch, and its replacement is private.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _global_positives(positives: torch.Tensor, pos_mask: torch.Tensor, identities: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """All ranks' positives [M, D] (differentiable), mask [M] and owners' identities [M / P],
    and this rank's first sample index.

    Ranks may hold different batch sizes: every rank pads to the largest with masked slots,
    so global sample ``i`` owns columns ``i * P .. i * P + P - 1``.
    """
    batch, slots, dim = positives.shape
    if not _distributed():
        return positives.reshape(-1, dim), pos_mask.reshape(-1), identities, 0
    size = torch.tensor([batch], device=positives.device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    padded = int(size)
    positives = F.pad(positives, (0, 0, 0, 0, 0, padded - batch))
    pos_mask = F.pad(pos_mask, (0, 0, 0, padded - batch))  # padding is invalid (False)
    identities = F.pad(identities, (0, padded - batch), value=-1)
    masks = [torch.empty_like(pos_mask) for _ in range(dist.get_world_size())]
    dist.all_gather(masks, pos_mask)
    labels = [torch.empty_like(identities) for _ in range(dist.get_world_size())]
    dist.all_gather(labels, identities)
    gathered = _GatherWithGrad.apply(positives)
    return gathered.reshape(-1, dim), torch.cat(masks).reshape(-1), torch.cat(labels), dist.get_rank() * padded


def two_tier_infonce(
    anchor: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    pos_mask: torch.Tensor,
    neg_mask: torch.Tensor,
    *,
    temperature: float = 0.07,
    alpha: float = 0.5,
    identities: torch.Tensor | None = None,
    tier1_mean: str = "rows",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The NearID two-tier InfoNCE loss (spec section 5): ``(loss, stats)``.

    Inputs (any float dtype; computed in float32, float64 stays float64, autocast off):
    ``anchor`` [B, D] (positive view 0), ``positives`` [B, P, D] (views 1..P),
    ``negatives`` [B, K, D] (the hard negatives: matched-context distractors),
    ``pos_mask`` [B, P] and ``neg_mask`` [B, K] bool (True = the slot holds an image).
    Every embedding is L2-normalised here, so raw head outputs can be passed (normalising
    already-normalised vectors changes neither values nor gradients). Masked slots are ignored
    whatever they hold (zeros, NaN) and get zero gradient.

    With logits = cosine / ``temperature`` and M = all valid positives of the global batch:

    - Tier 1, one row per valid positive (b, p): cross-entropy over anchor_b's logits to all
      M positives (b's own other views included) and to b's own valid hard negatives, target
      b's positive p. A sample with no valid positive has no row.
    - Tier 2, one term per valid hard negative (b, k): with ``s = anchor_b . n_k / T`` and
      ``L`` = logsumexp of anchor_b's logits to the positives of the *other* samples,
      ``-s + logaddexp(s, L)`` (= -log sigmoid(s - L): the distractor must beat the pooled
      random negatives). With no other valid positive, L = -inf and the term is exactly 0
      (masked logits are the dtype's most negative finite value, so no NaN arises).
    - ``identities`` (optional [B] int64, non-negative): samples sharing a label show the same
      identity (e.g. one object with two distractor sets), so their positives are not
      negatives of each other: an anchor's logits to the positives of *other* samples with its
      label are left out of both tiers. Default: every sample its own identity.
    - Tier 2 is the mean over its terms in the global batch. Tier 1 is, with
      ``tier1_mean="rows"``, the mean over its rows in the global batch; with ``"slots"`` (the
      reference trainer's reduction), the mean over positive slots p of the mean over slot p's
      rows, slots without a valid row anywhere left out. Either is 0 when it has no rows/terms
      (no valid positive anywhere; no valid hard negative anywhere). Masked slots take no part in
      either (the reference keeps padded slots' embeddings in its logits; docs/training.md).
    - total = tier1 + ``alpha`` * tier2.

    Under ``torch.distributed`` (initialised, world size W > 1) every rank must call this
    (and later ``backward``) with the same P, K and D; batch sizes may differ. Each rank's
    anchors see all ranks' positives, and the returned loss on rank r is
    ``W * (tier-1 sum of r's rows / global tier-1 rows + alpha * tier-2 sum of r's terms /
    global tier-2 terms)`` (with ``"slots"``, r's tier-1 sum per slot divided by the slot's global
    rows and by the number of slots with rows). So the mean over ranks of the returned losses equals the
    one-process loss on the concatenated batch, and with gradients averaged over ranks
    (DDP's default) every parameter gets exactly the one-process gradient. In one process
    the loss is the plain total.

    ``stats`` (detached 0-d tensors, global over all ranks): ``loss`` (the total),
    ``tier1``, ``tier2`` (the tier losses), ``tier1_acc`` (fraction of tier-1 rows whose
    target logit is the largest of its row; ties count as hits), ``tier2_acc`` (fraction of
    valid hard negatives with s > L, i.e. whose tier-2 term is below log 2; always a hit
    when L = -inf), ``tier1_rows``, ``tier2_rows`` (their counts). An accuracy with no rows
    is NaN.
    """
    batch, slots, dim = positives.shape
    if anchor.shape != (batch, dim) or negatives.shape[::2] != (batch, dim):
        raise ValueError(f"shapes: anchor {tuple(anchor.shape)} must be [B, D], positives "
                         f"{tuple(positives.shape)} [B, P, D], negatives {tuple(negatives.shape)} [B, K, D]")
    if pos_mask.shape != positives.shape[:2] or neg_mask.shape != negatives.shape[:2]:
        raise ValueError(f"masks {tuple(pos_mask.shape)}, {tuple(neg_mask.shape)} must be "
                         f"[B, P] = {tuple(positives.shape[:2])}, [B, K] = {tuple(negatives.shape[:2])}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tier1_mean not in ("rows", "slots"):
        raise ValueError(f"tier1_mean must be rows or slots, got {tier1_mean!r}")
    pos_mask, neg_mask = pos_mask.bool(), neg_mask.bool()
    device = anchor.device
    if identities is None:
        identities = torch.arange(batch, device=device)  # distinct labels; made global below
        distinct = True
    else:
        if identities.shape != (batch,) or identities.is_floating_point() or bool((identities < 0).any()):
            raise ValueError(f"identities must be [B] = [{batch}] non-negative integers, got "
                             f"{identities.dtype} {tuple(identities.shape)}")
        distinct = False
    dtype = torch.promote_types(anchor.dtype, torch.float32)
    with torch.autocast(device.type, enabled=False):
        anchor = F.normalize(anchor.to(dtype), dim=-1)
        positives = F.normalize(positives.to(dtype).where(pos_mask[..., None], 0), dim=-1)
        negatives = F.normalize(negatives.to(dtype).where(neg_mask[..., None], 0), dim=-1)
        all_pos, all_mask, labels, first = _global_positives(positives, pos_mask, identities.long())
        lowest = torch.finfo(dtype).min  # a finite -inf
        pos_logits = (anchor @ all_pos.T / temperature).masked_fill(~all_mask, lowest)  # [B, M]
        neg_logits = torch.einsum("bd,bkd->bk", anchor, negatives) / temperature  # [B, K]
        samples = first + torch.arange(batch, device=device)  # global index of each sample, [B]
        owner = torch.arange(all_mask.numel(), device=device) // slots  # global sample of each column, [M]
        own = owner[None, :] == samples[:, None]  # [B, M]
        # Columns of the anchor's identity: its own positives, and other samples' with its label.
        kin = own if distinct else labels[owner][None, :] == identities[:, None]
        pos_logits = pos_logits.masked_fill(kin & ~own, lowest)

        # Tier 1: one softmax row per sample, shared by its P targets.
        logits = torch.cat([pos_logits, neg_logits.masked_fill(~neg_mask, lowest)], dim=1)  # [B, M + K]
        target = logits.gather(1, samples[:, None] * slots + torch.arange(slots, device=device))  # [B, P]
        tier1 = (logits.logsumexp(1, keepdim=True) - target).where(pos_mask, 0)
        hits1 = (target >= logits.amax(1, keepdim=True)) & pos_mask

        # Tier 2: the positives of other samples, pooled into one logit L per anchor.
        pooled = pos_logits.masked_fill(kin, lowest).logsumexp(1, keepdim=True)  # [B, 1]
        tier2 = (torch.logaddexp(neg_logits, pooled) - neg_logits).where(neg_mask, 0)
        hits2 = (neg_logits > pooled) & neg_mask

        sums = torch.cat([tier1.sum(0), tier2.sum()[None]])  # per positive slot [P], then tier 2
        counts = torch.cat([pos_mask.sum(0), torch.stack([neg_mask.sum(), hits1.sum(), hits2.sum()])]).to(dtype)
        totals = torch.cat([sums.detach(), counts])  # summed over ranks below
        world = 1
        if _distributed():
            dist.all_reduce(totals)
            world = dist.get_world_size()
        slot_rows, (rows2, right1, right2) = totals[slots + 1:2 * slots + 1], totals[2 * slots + 1:]
        rows1 = slot_rows.sum()
        if tier1_mean == "rows":  # every row weighs 1 / rows
            weights = (1 / rows1.clamp(min=1)).expand(slots)
        else:  # every slot with rows weighs 1 / slots with rows, shared by its rows
            filled = slot_rows > 0
            weights = filled / (slot_rows.clamp(min=1) * filled.sum().clamp(min=1))
        tier1_loss, tier2_loss = totals[:slots] @ weights, totals[slots] / rows2.clamp(min=1)
        loss = world * (sums[:slots] @ weights + alpha * sums[slots] / rows2.clamp(min=1))
    stats = {
        "loss": tier1_loss + alpha * tier2_loss,
        "tier1": tier1_loss,
        "tier2": tier2_loss,
        "tier1_acc": right1 / rows1,
        "tier2_acc": right2 / rows2,
        "tier1_rows": rows1,
        "tier2_rows": rows2,
    }
    return loss, stats


def batch_loss(embeddings: torch.Tensor, index: torch.Tensor, identities: torch.Tensor, *, temperature: float,
               alpha: float, tier1_mean: str = "rows") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`two_tier_infonce` of one batch: ``embeddings`` [U, D] of its images, ``index`` [b, 6]
    (rows of ``embeddings`` in :data:`SLOTS` order, -1 = missing), ``identities`` [b].

    A sample whose anchor is missing takes no part (all its slots are masked). The loss always
    requires grad, even for a batch without images (e.g. a rank's empty share of the last
    batch), so every rank runs the backward's collective.
    """
    valid = (index >= 0) & (index[:, :1] >= 0)
    if embeddings.shape[0] == 0:
        embeddings = embeddings.new_zeros((1, embeddings.shape[1])).requires_grad_()
    rows = embeddings[index.clamp(min=0)]  # [b, 6, D]
    return two_tier_infonce(rows[:, 0], rows[:, 1:3], rows[:, 3:], valid[:, 1:3], valid[:, 3:],
                            temperature=temperature, alpha=alpha, identities=identities, tier1_mean=tier1_mean)
