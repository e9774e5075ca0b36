"""Training groundwork: the two-tier loss (against an explicit re-derivation, gradcheck, 2 gloo
ranks), the epoch composition, the optimiser (schedule, clipping, fp16 loss scaling) and exporting
a trunk back to the released checkpoint format."""

from __future__ import annotations

import json
import math
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nearid_metric.data import MTGSample, NearIDSample
from nearid_metric.similarity import unique_images
from nearid_metric.train.data import EpochPlan, compose_epoch, mtg_as_nearid
from nearid_metric.train.loss import batch_loss, two_tier_infonce
from nearid_metric.train.optim import HeadUpdate, average_gradients, lr_factor

# The spawned ranks import this module: the export tests import transformers, timm and the
# conftest helpers themselves, which keeps each rank's start-up about 4 s shorter.

# --- the loss ---------------------------------------------------------------------------------------


def loop_reference(anchor, positives, negatives, pos_mask, neg_mask, temperature=0.07, alpha=0.5, identities=None,
                   tier1_mean="rows"):
    """Spec section 5 written out with Python loops (differentiable): (loss, {name: float}).

    ``identities``: positives of another sample with the anchor's label are dropped from both tiers.
    ``tier1_mean="slots"``: tier 1 is the mean over positive slots of the mean of the slot's rows.
    """
    a = F.normalize(anchor, dim=-1)
    pos = F.normalize(positives, dim=-1)
    neg = F.normalize(negatives, dim=-1)
    batch, slots = pos_mask.shape
    label = list(range(batch)) if identities is None else [int(i) for i in identities]
    everyone = [(c, q) for c in range(batch) for q in range(slots) if pos_mask[c, q]]
    tier1, hits1, tier2, hits2 = [], [], [], []
    per_slot = {p: [] for p in range(slots)}
    for b in range(batch):
        own_negs = [a[b] @ neg[b, k] / temperature for k in range(neg_mask.shape[1]) if neg_mask[b, k]]
        row = [a[b] @ pos[c, q] / temperature for c, q in everyone if c == b or label[c] != label[b]] + own_negs
        for p in range(slots):
            if pos_mask[b, p]:
                target = a[b] @ pos[b, p] / temperature
                tier1.append(torch.logsumexp(torch.stack(row), 0) - target)
                per_slot[p].append(tier1[-1])
                hits1.append(target.item() >= max(x.item() for x in row))
        others = [a[b] @ pos[c, q] / temperature for c, q in everyone if label[c] != label[b]]
        pooled = torch.logsumexp(torch.stack(others), 0) if others else torch.tensor(-math.inf, dtype=a.dtype)
        for s in own_negs:
            tier2.append(-s + torch.logaddexp(s, pooled))
            hits2.append(s.item() > pooled.item())
    t1 = sum(tier1) / len(tier1) if tier1 else torch.zeros((), dtype=a.dtype)
    if tier1_mean == "slots":
        means = [sum(terms) / len(terms) for terms in per_slot.values() if terms]
        t1 = sum(means) / len(means) if means else torch.zeros((), dtype=a.dtype)
    t2 = sum(tier2) / len(tier2) if tier2 else torch.zeros((), dtype=a.dtype)
    stats = {"tier1": t1.item(), "tier2": t2.item(),
             "tier1_acc": sum(hits1) / len(hits1) if hits1 else math.nan,
             "tier2_acc": sum(hits2) / len(hits2) if hits2 else math.nan,
             "tier1_rows": len(tier1), "tier2_rows": len(tier2)}
    return t1 + alpha * t2, stats


def random_batch(seed: int, batch: int = 6, slots: int = 2, hard: int = 3, dim: int = 8,
                 dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """anchor, positives, negatives (leaf tensors, one shared direction so logits spread), masks.

    Sample 0 has no valid positive, sample 1 no valid hard negative; masked slots hold NaN.
    """
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=gen, dtype=dtype)
    anchor = torch.randn(batch, dim, generator=gen, dtype=dtype) + common
    positives = anchor[:, None] + 0.8 * torch.randn(batch, slots, dim, generator=gen, dtype=dtype)
    negatives = anchor[:, None] + 0.5 * torch.randn(batch, hard, dim, generator=gen, dtype=dtype)
    pos_mask = torch.rand(batch, slots, generator=gen) < 0.7
    neg_mask = torch.rand(batch, hard, generator=gen) < 0.7
    pos_mask[0], neg_mask[1] = False, False
    pos_mask[2:, 0] = neg_mask[2:, 0] = True  # the other samples have at least one of each
    positives[~pos_mask] = math.nan
    negatives[~neg_mask] = math.nan
    return [t.requires_grad_() for t in (anchor, positives, negatives)] + [pos_mask, neg_mask]


def assert_stats(stats: dict, expected: dict, tol: float = 1e-12) -> None:
    for name, value in expected.items():
        assert stats[name].item() == pytest.approx(value, abs=tol, nan_ok=True), name


@pytest.mark.parametrize("tier1_mean", ["rows", "slots"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temperature, alpha", [(0.07, 0.5), (0.3, 1.7)])
def test_loss_matches_loop_reference(seed, temperature, alpha, tier1_mean):
    inputs = random_batch(seed)
    loss, stats = two_tier_infonce(*inputs, temperature=temperature, alpha=alpha, tier1_mean=tier1_mean)
    grads = torch.autograd.grad(loss, inputs[:3])
    clean = [t.detach().nan_to_num().requires_grad_() for t in inputs[:3]]  # the reference can't take NaN
    expected, expected_stats = loop_reference(*clean, *inputs[3:], temperature, alpha, tier1_mean=tier1_mean)
    expected_grads = torch.autograd.grad(expected, clean)

    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert_stats(stats, expected_stats)
    assert stats["loss"].item() == pytest.approx(loss.item(), abs=1e-12)
    for grad, ref, mask in zip(grads, expected_grads, (None, *inputs[3:])):
        torch.testing.assert_close(grad, ref, rtol=0, atol=1e-12)
        if mask is not None:  # masked slots: zero gradient, although they hold NaN
            assert torch.all(grad[~mask] == 0)


def test_slot_mean_differs_from_row_mean():
    inputs = random_batch(0)
    assert inputs[3].sum(0).tolist()[0] != inputs[3].sum(0).tolist()[1]  # the slots hold different row counts
    rows, slots = (two_tier_infonce(*inputs, tier1_mean=mean)[1]["tier1"].item() for mean in ("rows", "slots"))
    assert abs(rows - slots) > 1e-3
    with pytest.raises(ValueError, match="tier1_mean"):
        two_tier_infonce(*inputs, tier1_mean="samples")


@pytest.mark.parametrize("tier1_mean", ["rows", "slots"])
@pytest.mark.parametrize("seed", range(3))
def test_shared_identities_are_not_negatives(seed, tier1_mean):
    inputs = random_batch(seed)
    identities = torch.tensor([0, 1, 0, 2, 1, 1])
    loss, stats = two_tier_infonce(*inputs, identities=identities, tier1_mean=tier1_mean)
    grads = torch.autograd.grad(loss, inputs[:3])
    clean = [t.detach().nan_to_num().requires_grad_() for t in inputs[:3]]
    expected, expected_stats = loop_reference(*clean, *inputs[3:], identities=identities, tier1_mean=tier1_mean)
    expected_grads = torch.autograd.grad(expected, clean)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert_stats(stats, expected_stats)
    for grad, ref in zip(grads, expected_grads):
        torch.testing.assert_close(grad, ref, rtol=0, atol=1e-12)
    # distinct labels are the default
    assert two_tier_infonce(*inputs, identities=torch.arange(6) * 7, tier1_mean=tier1_mean)[0].item() == pytest.approx(
        two_tier_infonce(*inputs, tier1_mean=tier1_mean)[0].item(), abs=1e-12)
    assert loss.item() != pytest.approx(two_tier_infonce(*inputs, tier1_mean=tier1_mean)[0].item(), abs=1e-6)
    with pytest.raises(ValueError, match="identities"):
        two_tier_infonce(*inputs, identities=torch.zeros(6))


def test_gradcheck():
    anchor, positives, negatives, pos_mask, neg_mask = random_batch(7, batch=3, slots=2, hard=2, dim=4)
    positives, negatives = (t.detach().nan_to_num().requires_grad_() for t in (positives, negatives))
    assert not pos_mask.all() and not neg_mask.all()
    assert torch.autograd.gradcheck(lambda a, p, n: two_tier_infonce(a, p, n, pos_mask, neg_mask, temperature=0.5)[0],
                                    (anchor, positives, negatives))


def test_edge_cases():
    anchor, positives, negatives, pos_mask, neg_mask = random_batch(3, batch=2)
    pos_mask[:], neg_mask[:] = True, True
    positives, negatives = (t.detach().nan_to_num().requires_grad_() for t in (positives, negatives))

    # one sample: no other sample's positives, L = -inf, every tier-2 term is exactly 0
    loss, stats = two_tier_infonce(anchor[:1], positives[:1], negatives[:1], pos_mask[:1], neg_mask[:1])
    assert stats["tier2"].item() == 0 and stats["tier2_acc"].item() == 1 and stats["tier2_rows"].item() == 3
    assert loss.item() == pytest.approx(stats["tier1"].item(), abs=1e-12) and stats["tier1"] > 0
    # no valid hard negative anywhere: tier 2 is 0, its accuracy NaN
    no_neg = torch.zeros_like(neg_mask)
    loss, stats = two_tier_infonce(anchor, positives, negatives, pos_mask, no_neg)
    assert stats["tier2"].item() == 0 and math.isnan(stats["tier2_acc"]) and stats["tier2_rows"].item() == 0
    assert loss.item() == pytest.approx(loop_reference(anchor, positives, negatives, pos_mask, no_neg)[0].item())
    # no valid positive anywhere: tier 1 is 0, tier 2 has L = -inf
    loss, stats = two_tier_infonce(anchor, positives, negatives, torch.zeros_like(pos_mask), neg_mask)
    assert loss.item() == 0 and stats["tier1_rows"].item() == 0 and math.isnan(stats["tier1_acc"])
    assert two_tier_infonce(anchor, positives, negatives, torch.zeros_like(pos_mask), neg_mask,
                            tier1_mean="slots")[0].item() == 0
    for case in [(anchor[:1], positives[:1], negatives[:1], pos_mask[:1], neg_mask[:1]),
                 (anchor, positives, negatives, torch.zeros_like(pos_mask), neg_mask)]:
        grads = torch.autograd.grad(two_tier_infonce(*case)[0], case[:3], allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_low_precision_inputs_computed_in_float32():
    anchor, positives, negatives, pos_mask, neg_mask = (t.detach() for t in random_batch(5))
    half = [t.nan_to_num().to(torch.bfloat16) for t in (anchor, positives, negatives)]
    expected, _ = two_tier_infonce(*(t.float() for t in half), pos_mask, neg_mask)
    loss, _ = two_tier_infonce(*half, pos_mask, neg_mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_loss, _ = two_tier_infonce(*half, pos_mask, neg_mask)
    assert loss.dtype == autocast_loss.dtype == torch.float32
    assert loss.item() == expected.item() == autocast_loss.item()


def test_rejects_mismatched_shapes():
    anchor, positives, negatives, pos_mask, neg_mask = random_batch(0)
    with pytest.raises(ValueError, match="anchor"):
        two_tier_infonce(anchor[:, :4], positives, negatives, pos_mask, neg_mask)
    with pytest.raises(ValueError, match="masks"):
        two_tier_infonce(anchor, positives, negatives, pos_mask[:, :1], neg_mask)


# --- the loss across 2 gloo ranks -------------------------------------------------------------------

SPLITS = [4, 2]  # uneven on purpose: the smaller rank pads its gathered positives
IDENTITIES = torch.tensor([0, 1, 2, 3, 1, 0])  # samples 4 and 5 share identities with rank 0's samples


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_head() -> torch.nn.Module:
    torch.manual_seed(5)
    return torch.nn.Linear(8, 8, dtype=torch.float64)


MEANS = ("rows", "slots")


def _loss_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        start = sum(SPLITS[:rank])
        mine = slice(start, start + SPLITS[rank])
        results = {}
        for mean in MEANS:
            inputs = [t.detach()[mine] for t in random_batch(11, batch=sum(SPLITS))]
            leaves = [t.requires_grad_() for t in inputs[:3]]
            loss, stats = two_tier_infonce(*leaves, *inputs[3:], identities=IDENTITIES[mine], tier1_mean=mean)
            loss.backward()
            head = shared_head()  # a trained layer: nearid-train averages its gradients over the ranks
            head_loss, _ = two_tier_infonce(*(head(torch.nan_to_num(t.detach())) for t in inputs[:3]), *inputs[3:],
                                            identities=IDENTITIES[mine], tier1_mean=mean)
            head_loss.backward()
            average_gradients(list(head.parameters()), world)
            results[mean] = {"loss": loss.detach(), "stats": stats, "grads": [t.grad for t in leaves],
                             "head_grads": [p.grad for p in head.parameters()]}
        # every rank composes the epochs itself (shuffled anchors, drawn generators)
        results["epochs"] = [compose_epoch(synthetic_plan(), 5, epoch) for epoch in (0, 3)]
        torch.save(results, Path(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_loss_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.mark.parametrize("mean", MEANS)
def test_two_ranks_equal_one_process(two_ranks, mean):
    ranks = [result[mean] for result in two_ranks]
    inputs = random_batch(11, batch=sum(SPLITS))
    single, single_stats = two_tier_infonce(*inputs, identities=IDENTITIES, tier1_mean=mean)
    single_grads = torch.autograd.grad(single, inputs[:3])

    assert 0 < single_stats["tier1_acc"] < 1 and 0 < single_stats["tier2_acc"] < 1  # not trivially all/none
    assert ranks[0]["loss"] != ranks[1]["loss"]
    assert (ranks[0]["loss"] + ranks[1]["loss"]).item() / 2 == pytest.approx(single.item(), abs=1e-12)
    for result in ranks:
        for name, value in single_stats.items():
            assert result["stats"][name].item() == pytest.approx(value.item(), abs=1e-12, nan_ok=True), name
    # local input gradients are W x the one-process ones, so DDP's averaging yields the same update
    for rank, result in enumerate(ranks):
        start = sum(SPLITS[:rank])
        for grad, expected in zip(result["grads"], single_grads):
            torch.testing.assert_close(grad / 2, expected[start:start + SPLITS[rank]], rtol=0, atol=1e-12)
    # after nearid-train's gradient averaging, a shared layer gets exactly the one-process gradient
    head = shared_head()
    head_loss, _ = two_tier_infonce(*(head(torch.nan_to_num(t.detach())) for t in inputs[:3]), *inputs[3:],
                                    identities=IDENTITIES, tier1_mean=mean)
    head_loss.backward()
    for result in ranks:
        for grad, param in zip(result["head_grads"], head.parameters()):
            torch.testing.assert_close(grad, param.grad, rtol=0, atol=1e-12)


def test_batch_loss_drops_samples_without_an_anchor():
    """A sample whose anchor image is missing (unreadable) takes no part: same loss as without it."""
    gen = torch.Generator().manual_seed(3)
    embeddings = torch.randn(20, 8, generator=gen, dtype=torch.float64)
    index = torch.randperm(20, generator=gen)[:18].reshape(3, 6)
    index[0, 4] = index[2, 2] = -1
    identities = torch.tensor([0, 1, 2])
    dropped = index.clone()
    dropped[1, 0] = -1
    loss, stats = batch_loss(embeddings, dropped, identities, temperature=0.07, alpha=0.5)
    keep = torch.tensor([0, 2])
    expected, expected_stats = batch_loss(embeddings, index[keep], identities[keep], temperature=0.07, alpha=0.5)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert stats["tier1_rows"] == expected_stats["tier1_rows"] == 3


# --- the epoch composition ----------------------------------------------------------------------------

GENERATORS = ("flux", "sdxl", "qwen")


def synthetic_samples() -> list[NearIDSample]:
    """30 identities in 3 generators (qwen lacks every third identity; id3 lacks view 1), then 5 MTG rows.

    Views are named ``idI/vJ`` (shared by the generators), distractors ``G/idI/dJ``.
    """
    samples = []
    for i in range(30):
        views = tuple(None if (i, j) == (3, 1) else f"id{i}/v{j}" for j in range(3))
        samples += [NearIDSample(f"id{i}", g, views, tuple(f"{g}/id{i}/d{j}" for j in range(3)))
                    for g in GENERATORS if not (g == "qwen" and i % 3 == 0)]
    samples += [mtg_as_nearid(MTGSample(str(k), "mtg", f"m{k}/v1", f"m{k}/v2", f"m{k}/d1", f"m{k}/d2",
                                        None, None, None, None)) for k in range(5)]
    return samples


def synthetic_plan(**kwargs) -> EpochPlan:
    images = unique_images(synthetic_samples())
    return EpochPlan.from_samples(synthetic_samples(), {name: n for n, name in enumerate(images)}, **kwargs)


def named_epoch(seed: int, epoch: int, **kwargs) -> tuple[list[list[str | None]], list[int]]:
    """compose_epoch of the synthetic plan (MTG rows 4x) with image names instead of rows."""
    images = unique_images(synthetic_samples())
    slots, labels = compose_epoch(synthetic_plan(mtg_repeat=4), seed, epoch, **kwargs)
    return [[None if r < 0 else images[r] for r in row] for row in slots.tolist()], labels.tolist()


def owner(name: str) -> str:
    """The identity an image name belongs to (idI or mK)."""
    return next(part for part in name.split("/") if part.startswith(("id", "m")))


def test_an_epoch_holds_each_identity_once_and_each_mtg_row_four_times():
    plan = synthetic_plan(mtg_repeat=4)
    assert plan.groups == GENERATORS + ("mtg",) and len(plan) == 30 + 5 * 4
    rows, labels = named_epoch(0, 0)
    assert len(rows) == len(labels) == 50
    per_identity = Counter(owner(row[0]) for row in rows)
    assert per_identity == {**{f"id{i}": 1 for i in range(30)}, **{f"m{k}": 4 for k in range(5)}}
    for k in range(5):  # the copies of an MTG row are identical, and share one identity label
        copies = [(row, label) for row, label in zip(rows, labels) if owner(row[0]) == f"m{k}"]
        assert all(copy == copies[0] for copy in copies)
    assert len(set(labels)) == 35


def test_distractors_follow_their_views_and_draw_their_generator():
    counts = {True: Counter(), False: Counter()}  # identity in qwen or not -> distractors per generator
    anchors = Counter()
    for epoch in range(20):
        rows, _ = named_epoch(0, epoch)
        mixed = 0
        for row in rows:
            views, distractors = row[:3], row[3:]
            name = owner(row[0])
            if name == "id3":
                assert views[2] is None and distractors[2] == f"{distractors[2].split('/')[0]}/id3/d1"
            assert sorted(filter(None, views)) == sorted(v for v in (f"{name}/v{j}" for j in range(3))
                                                         if v != "id3/v1") or name.startswith("m")
            for view, distractor in zip(views, distractors):
                if view is not None:  # distractor j sits in view j's background
                    assert distractor.endswith(view.replace("/v", "/d")), (view, distractor)
            if name.startswith("id"):
                generators = [d.split("/")[0] for d in distractors]
                counts[int(name[2:]) % 3 != 0].update(generators)
                mixed += len(set(generators)) > 1
            anchors[name, row[0]] += 1
        assert mixed > 10  # a sample's slots draw their generators independently
    # uniform over the identity's generators: 20 x 3 x 20 draws for those in qwen, 10 x 3 x 20 for the rest
    assert counts[False].keys() == {"flux", "sdxl"} and all(abs(n - 300) < 50 for n in counts[False].values())
    assert counts[True].keys() == set(GENERATORS) and all(abs(n - 400) < 60 for n in counts[True].values())
    # every present view becomes the anchor in some epoch
    assert {view for (name, view) in anchors if name == "id0"} == {"id0/v0", "id0/v1", "id0/v2"}
    assert {view for (name, view) in anchors if name == "m0"} == {"m0/v1", "m0/v2"}


def test_composition_is_a_function_of_seed_and_epoch():
    first, again, other_epoch, other_seed = named_epoch(0, 2), named_epoch(0, 2), named_epoch(0, 3), named_epoch(1, 2)
    assert first == again and first != other_epoch and first != other_seed
    fixed, _ = named_epoch(0, 2, shuffle_anchor=False)  # anchor: the first present view, in view order
    assert all(row[:3] == [f"{owner(row[0])}/v{j}" for j in range(3)] for row in fixed if owner(row[0]) == "id5")
    assert [row[:3] for row in fixed if owner(row[0]) == "id3"] == [["id3/v0", "id3/v2", None]]
    plan = synthetic_plan()
    lost = plan.without_images([int(plan.views[0, 0])])
    assert lost.views[0, 0] == -1 and (lost.views[1:] == plan.views[1:]).all()


def test_two_ranks_compose_the_epochs_of_one_process(two_ranks):
    """Each rank (and a resumed run, a fresh process) composes an epoch from (seed, epoch) alone."""
    for epoch, composed in zip((0, 3), zip(*(result["epochs"] for result in two_ranks))):
        expected = compose_epoch(synthetic_plan(), 5, epoch)
        for slots, labels in composed:
            assert np.array_equal(slots, expected[0]) and np.array_equal(labels, expected[1])


# --- the optimiser -----------------------------------------------------------------------------------


def test_cosine_schedule_with_warmup():
    total, warmup, peak = 1000, 100, 3e-4
    param = torch.nn.Parameter(torch.zeros(3))
    update = HeadUpdate([param], lr=peak, weight_decay=1e-4, schedule="cosine", warmup_steps=warmup,
                        total_steps=total, grad_clip=1.0)
    lrs = []
    for _ in range(total):
        update.zero_grad()
        param.grad = torch.ones(3)
        lrs.append(update.step()["lr"])
    expected = {0: 0.0, 50: peak / 2, 100: peak, 101: peak * (1 + math.cos(math.pi / 900)) / 2,
                999: peak * (1 + math.cos(math.pi * 899 / 900)) / 2}
    for step, lr in expected.items():
        assert lrs[step] == pytest.approx(lr, rel=1e-12, abs=1e-18), step
    assert lrs[999] < 1e-8 and max(lrs) == pytest.approx(peak)
    assert lr_factor(150, total_steps=total, schedule="constant", warmup_steps=warmup) == 1.0


def test_clipping_caps_the_gradient_norm():
    params = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2, 2))]
    update = HeadUpdate(params, lr=1e-3, weight_decay=0.0, schedule="constant", warmup_steps=0, total_steps=10,
                        grad_clip=1.0)
    params[0].grad, params[1].grad = torch.full((4,), 3.0), torch.full((2, 2), 4.0)
    figures = update.step()
    assert figures["grad_norm"] == pytest.approx(10.0)  # sqrt(4 x 9 + 4 x 16), before clipping
    assert torch.cat([p.grad.reshape(-1) for p in params]).norm().item() == pytest.approx(1.0, rel=1e-5)
    params[0].grad, params[1].grad = torch.full((4,), 0.1), torch.zeros(2, 2)
    update.step()
    assert params[0].grad.norm().item() == pytest.approx(0.2)  # below the cap: unchanged


def test_loss_scaler_skips_the_step_on_inf():
    param = torch.nn.Parameter(torch.ones(3))
    update = HeadUpdate([param], lr=0.1, weight_decay=0.0, schedule="cosine", warmup_steps=0, total_steps=10,
                        grad_clip=1.0, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    update.zero_grad()
    update.backward((param * torch.tensor([1.0, math.inf, 1.0])).sum())
    figures = update.step()
    assert figures["skipped"] == 1 and torch.equal(param.detach(), torch.ones(3))
    assert update.scaler.get_scale() == 2.0 ** 9 and update.scheduler.last_epoch == 0  # the schedule waits
    update.zero_grad()
    update.backward((param * 2).sum())
    figures = update.step()
    assert figures["skipped"] == 0 and figures["grad_norm"] == pytest.approx(2 * math.sqrt(3))  # unscaled
    assert (param.detach() < 1).all() and update.scheduler.last_epoch == 1
    state = update.state_dict()
    assert state["scaler"]["scale"] == 2.0 ** 9 and state["scheduler"]["last_epoch"] == 1


# --- exporting a trunk to the released checkpoint format -----------------------------------------------


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def export_from(trunk, source: Path, folder: Path, **kwargs) -> Path:
    from nearid_metric.model import VisionConfig
    from nearid_metric.train.export import export_checkpoint

    vision_config = VisionConfig.from_dict(read_json(source / "config.json")["vision_config"])
    return export_checkpoint(trunk, folder, vision_config=vision_config,
                             preprocessor_config=read_json(source / "preprocessor_config.json"), **kwargs)


def transformers_model(folder: Path) -> SiglipVisionModel:
    """The exported folder loaded into transformers' SiglipVisionModel (the reference network)."""
    from conftest import vision_tower
    from transformers import SiglipVisionConfig, SiglipVisionModel

    vision_config = read_json(folder / "config.json")["vision_config"]
    model = SiglipVisionModel(SiglipVisionConfig.from_dict(vision_config)).eval()
    weights = read_weights(folder)
    state = {k.removeprefix("backbone.").removeprefix("vision_model."): v.float() for k, v in weights.items()}
    vision_tower(model).load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("key_layout", ["transformers4", "transformers5"])
def test_export_round_trips_the_release(tmp_path, checkpoint_dir, key_layout):
    from conftest import TINY_VISION

    from nearid_metric.model import VisionConfig, load_checkpoint_trunk

    trunk = load_checkpoint_trunk(checkpoint_dir, dtype=torch.float32, device="cpu")
    folder = export_from(trunk, checkpoint_dir, tmp_path / "exported", key_layout=key_layout)
    original, exported = read_weights(checkpoint_dir), read_weights(folder)
    if key_layout == "transformers5":
        original = {k.replace("backbone.vision_model.", "backbone."): v for k, v in original.items()}
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == torch.float16 and torch.equal(exported[name], tensor), name

    config = read_json(folder / "config.json")
    assert config["model_type"] == "nearid" and config["normalize_embeddings"] is True
    assert config["embed_dim"] == TINY_VISION["hidden_size"]
    # the release's fields, so the official quick-start resolves the release repo's code for an exported head
    assert config["architectures"] == ["NearIDModel"] and config["torch_dtype"] == "float16"
    assert config["auto_map"] == {"AutoConfig": "Aleksandar/nearid-siglip2--configuration_nearid.NearIDConfig",
                                  "AutoModel": "Aleksandar/nearid-siglip2--modeling_nearid.NearIDModel"}
    assert VisionConfig.from_dict(config["vision_config"]) == VisionConfig.from_dict(TINY_VISION)
    assert read_json(folder / "preprocessor_config.json") == read_json(checkpoint_dir / "preprocessor_config.json")


def test_exported_auto_map_resolves_in_the_official_loader(tmp_path, checkpoint_dir, monkeypatch):
    """``AutoModel.from_pretrained(folder, trust_remote_code=True)`` asks for the release repo's NearIDConfig:
    transformers' own resolution of the exported ``auto_map`` (the code fetch is intercepted; nothing runs)."""
    import transformers
    import transformers.models.auto.configuration_auto as configuration_auto

    from nearid_metric.model import load_checkpoint_trunk

    folder = export_from(load_checkpoint_trunk(checkpoint_dir, dtype=torch.float32, device="cpu"), checkpoint_dir,
                         tmp_path / "exported")
    asked = []

    class Intercepted(Exception):
        pass

    def fetch(class_reference, path, *args, **kwargs):
        asked.append((class_reference, str(path)))
        raise Intercepted

    monkeypatch.setattr(configuration_auto, "get_class_from_dynamic_module", fetch)
    with pytest.raises(Intercepted):
        transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert asked == [("Aleksandar/nearid-siglip2--configuration_nearid.NearIDConfig", str(folder))]


def test_export_loads_in_transformers(tmp_path, checkpoint_dir):
    from conftest import reference_embed, reference_pixels, sample_pictures

    from nearid_metric import NearIDScore
    from nearid_metric.model import load_checkpoint_trunk

    trunk = load_checkpoint_trunk(checkpoint_dir, dtype=torch.float32, device="cpu")
    folder = export_from(trunk, checkpoint_dir, tmp_path / "exported")
    pictures = sample_pictures()
    pixels = reference_pixels(pictures, read_json(folder / "preprocessor_config.json"))
    reference = reference_embed(transformers_model(folder), pixels)
    ours = NearIDScore.from_pretrained(folder, device="cpu").embed(pictures)
    assert (ours - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_trained_head_survives_export(tmp_path, checkpoint_dir, dtype):
    from conftest import TINY_VISION

    from nearid_metric.model import load_checkpoint_trunk

    trunk = load_checkpoint_trunk(checkpoint_dir, dtype=torch.float32, device="cpu")
    size = TINY_VISION["image_size"]
    pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    before = F.normalize(trunk(pixels), dim=-1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a "trained" head; fp16-exact when exporting to fp16
        for name, p in trunk.named_parameters():
            if name.startswith("attn_pool."):
                p.add_(0.05 * torch.randn(p.shape, generator=gen)).copy_(p.to(dtype).float())
    trained = F.normalize(trunk(pixels), dim=-1)
    assert (trained - before).abs().max() > 1e-2

    folder = export_from(trunk, checkpoint_dir, tmp_path / "trained", dtype=dtype)
    reloaded = F.normalize(load_checkpoint_trunk(folder, dtype=torch.float32, device="cpu")(pixels), dim=-1)
    assert torch.equal(reloaded, trained)
    with torch.no_grad():
        reference = F.normalize(transformers_model(folder)(pixel_values=pixels).pooler_output, dim=-1)
    assert (reference - trained).abs().max().item() <= 1e-5


def test_export_rejects_a_mismatched_config(tmp_path, checkpoint_dir):
    from conftest import TINY_VISION

    from nearid_metric.model import VisionConfig, load_checkpoint_trunk
    from nearid_metric.train.export import export_checkpoint

    trunk = load_checkpoint_trunk(checkpoint_dir, dtype=torch.float32, device="cpu")
    wrong = VisionConfig.from_dict({**TINY_VISION, "intermediate_size": 96})
    with pytest.raises(ValueError, match="does not match vision_config"):
        export_checkpoint(trunk, tmp_path / "x", vision_config=wrong, preprocessor_config={})
    with pytest.raises(ValueError, match="key_layout"):
        export_checkpoint(trunk, tmp_path / "x", vision_config=VisionConfig.from_dict(TINY_VISION),
                          preprocessor_config={}, key_layout="timm")
