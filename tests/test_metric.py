"""NearIDMetric (and the torchmetrics adapter): accumulation, reset, and torch.distributed across 2 gloo ranks."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import random_image

from nearid_metric import NearIDMetric
from nearid_metric.metric import gather_scores, summarize_scores


def pair_images(n: int, seed: int = 0) -> tuple[list, list]:
    refs = [random_image(seed + i, (40 + 3 * i, 50)) for i in range(n)]
    gens = [random_image(seed + 100 + i, (60, 30 + 5 * i)) for i in range(n)]
    return refs, gens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accumulates_per_pair_scores(scorer):
    refs, gens = pair_images(7)
    metric = NearIDMetric(scorer)
    first = metric.update(refs[:4], gens[:4])
    second = metric.update(refs[4:], gens[4:])
    assert torch.equal(first, scorer.score(refs[:4], gens[:4]))
    assert torch.equal(metric.scores, torch.cat([first, second]).double())
    values = metric.scores.numpy()
    result = metric.compute()
    assert result["n"] == 7
    assert result["mean"] == pytest.approx(values.mean(), abs=1e-15)
    assert result["std"] == pytest.approx(values.std(ddof=1), abs=1e-15)
    metric.reset()
    assert metric.compute()["n"] == 0 and math.isnan(metric.compute()["mean"])


def test_built_from_a_name(checkpoint_dir, scorer):
    refs, gens = pair_images(2)
    metric = NearIDMetric("nearid", pretrained=checkpoint_dir, device="cpu")
    assert metric.scorer.signature == scorer.signature
    assert torch.equal(metric.update(refs, gens), scorer.score(refs, gens))
    with pytest.raises(ValueError, match="built scorer"):
        NearIDMetric(scorer, device="cpu")


def test_summary_is_order_independent():
    rng = np.random.default_rng(0)
    values = torch.from_numpy(rng.normal(0.3, 1e3, 1001) * 10.0 ** rng.integers(-8, 8, 1001))
    shuffled = values[torch.from_numpy(rng.permutation(1001))]
    assert summarize_scores(values) == summarize_scores(shuffled)  # exactly, thanks to math.fsum
    one = summarize_scores(torch.tensor([0.25]))
    assert one["mean"] == 0.25 and math.isnan(one["std"]) and one["n"] == 1


def _gather_worker(rank: int, world: int, port: int, chunks: list[list[float]], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        gathered = gather_scores(torch.tensor(chunks[rank], dtype=torch.float64))
        Path(out, f"{rank}.json").write_text(json.dumps(gathered.tolist()))
    finally:
        dist.destroy_process_group()


def test_gather_across_ranks_equals_union(tmp_path):
    """Uneven shards, one of them empty: every rank ends with the union, in rank order."""
    chunks = [[0.5, -0.25, 0.125], [], [0.75, 1.0]]
    mp.spawn(_gather_worker, args=(3, free_port(), chunks, str(tmp_path)), nprocs=3, join=True)
    union = [v for chunk in chunks for v in chunk]
    for rank in range(3):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == union
    assert summarize_scores(torch.tensor(union)) == summarize_scores(torch.tensor(union[::-1]))


def _metric_worker(rank: int, world: int, port: int, checkpoint: str, splits: list[int], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        refs, gens = pair_images(sum(splits))
        start = sum(splits[:rank])
        mine = slice(start, start + splits[rank])
        metric = NearIDMetric("nearid", pretrained=checkpoint, device="cpu")
        metric.update(refs[mine], gens[mine])
        result = {"metric": metric.compute()}
        try:
            from nearid_metric.torchmetrics_adapter import NearIDTorchMetric
        except ImportError:
            pass
        else:
            adapter = NearIDTorchMetric(metric.scorer)
            adapter.update(refs[mine], gens[mine])
            result["torchmetrics"] = {k: v.item() for k, v in adapter.compute().items()}
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path, checkpoint_dir):
    splits = [3, 2]
    mp.spawn(_metric_worker, args=(2, free_port(), str(checkpoint_dir), splits, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    refs, gens = pair_images(sum(splits))
    single = NearIDMetric("nearid", pretrained=checkpoint_dir, device="cpu")
    for start, size in ((0, 3), (3, 2)):  # the same batches as the ranks
        single.update(refs[start:start + size], gens[start:start + size])
    expected = single.compute()
    for result in results:
        for kind in result:
            assert result[kind]["n"] == expected["n"] == 5
            assert result[kind]["mean"] == pytest.approx(expected["mean"], abs=1e-6)
            assert result[kind]["std"] == pytest.approx(expected["std"], abs=1e-6)
        assert results[0] == results[1]  # every rank reports the same numbers


def test_torchmetrics_adapter(scorer):
    pytest.importorskip("torchmetrics")
    from torchmetrics import Metric

    from nearid_metric.torchmetrics_adapter import NearIDTorchMetric

    refs, gens = pair_images(5)
    adapter, plain = NearIDTorchMetric(scorer), NearIDMetric(scorer)
    assert isinstance(adapter, Metric)
    assert not list(adapter.parameters()) and "scorer" not in dict(adapter.named_children())
    for part in (slice(0, 2), slice(2, 5)):
        adapter.update(refs[part], gens[part])
        plain.update(refs[part], gens[part])
    got, expected = adapter.compute(), plain.compute()
    assert got["n"].item() == 5
    assert got["mean"].item() == expected["mean"] and got["std"].item() == expected["std"]
    adapter.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert adapter.compute()["n"].item() == 0
