"""The CUDA paths: scoring and training on a GPU agree with the CPU. Skipped without CUDA.

Run on a GPU machine with ``python -m pytest tests/test_cuda.py``; record the outcome in
benchmarks/RESULTS.md. Tolerances: fp32 on CUDA may use TF32 convolutions (torch's default for
cuDNN), so CUDA fp32 embeddings are compared with the CPU's by cosine (>= 0.9999) rather than
bit for bit; bf16 by cosine >= 0.99, as on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_image
from test_train_run import settings, step_losses, write_identities

from nearid_metric import NearIDScore
from nearid_metric.scorer import score_pairs
from nearid_metric.train.loop import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def pictures():
    return [random_image(40 + i, (60 + 7 * i, 50 + 5 * i)) for i in range(10)]


def test_cuda_fp32_embeddings_match_the_cpu(checkpoint_dir, pictures):
    cpu = NearIDScore.from_pretrained(checkpoint_dir, device="cpu").embed(pictures)
    gpu = NearIDScore.from_pretrained(checkpoint_dir, device="cuda").embed(pictures, num_workers=2)
    assert gpu.device.type == "cpu" and gpu.dtype == torch.float32
    assert F.cosine_similarity(cpu, gpu).min() >= 0.9999


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_half_precision_stays_close(checkpoint_dir, pictures, precision):
    reference = NearIDScore.from_pretrained(checkpoint_dir, device="cuda").embed(pictures)
    half = NearIDScore.from_pretrained(checkpoint_dir, device="cuda", precision=precision).embed(pictures)
    assert torch.isfinite(half).all() and F.cosine_similarity(reference, half).min() >= 0.99


def test_cuda_cache_and_automatic_batches(checkpoint_dir, pictures, tmp_path):
    scorer = NearIDScore.from_pretrained(checkpoint_dir, device="cuda")
    assert scorer.forward_batch_size() >= 64  # sized to the device, not the CPU's 2
    pairs = [(pictures[i], pictures[(i + 1) % len(pictures)]) for i in range(len(pictures))]
    (first,), ok, _ = score_pairs([scorer], pairs, cache_dir=tmp_path)
    (second,), _, _ = score_pairs([scorer], pairs, cache_dir=tmp_path)
    assert ok.all() and torch.equal(first, second)


def test_cuda_training_learns_and_cache_matches(siglip_base, tmp_path):
    """bf16 autocast (precision auto) on the GPU: the head learns, and the fp32 feature cache
    gives the uncached loss curve (the cache stores what the same trunk computed)."""
    data = write_identities(tmp_path / "shapes")
    uncached = train(settings(siglip_base[0], data, tmp_path / "uncached", device="cuda", epochs=3))
    cached = train(settings(siglip_base[0], data, tmp_path / "cached", device="cuda", epochs=3,
                            cache_dir=str(tmp_path / "cache"), cache_dtype="fp32"))
    assert uncached["finished"] and uncached["history"][-1]["PA"] > uncached["history"][0]["PA"]
    a, b = step_losses(tmp_path / "uncached"), step_losses(tmp_path / "cached")
    np.testing.assert_allclose(list(b.values()), list(a.values()), rtol=1e-2)
    NearIDScore.from_pretrained(cached["export"], device="cuda").embed([data / "id00" / "view_0.png"])
