"""How much the reference evaluation's two quirks move SSR / PA, on synthetic data (docs/protocol.md).

1. fp16: the reference computes the embeddings in fp16 (weights and autocast); the package in fp32.
2. Re-indexing: the reference drops missing distractors and re-indexes the rest, so with distractor 1
   missing its ``cross_11`` compares view 1 with distractor 2; the package keeps slots aligned
   (a missing distractor's terms are not trials).

A random-weight SigLIP trunk (``--width``, ``--depth``) embeds ``--samples`` synthetic NearID
samples: three views of a random "object" pasted on three backgrounds, and three distractors (a
different object on the same backgrounds). The figures are illustrations of size on such data,
not predictions for the real benchmark. Run: ``python benchmarks/reference_quirks.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from embed_speed import random_image, write_random_checkpoint  # noqa: E402

from nearid_metric import create_scorer  # noqa: E402
from nearid_metric.data import NearIDSample  # noqa: E402
from nearid_metric.protocol import score_nearid_samples  # noqa: E402
from nearid_metric.scorer import embed_images  # noqa: E402
from nearid_metric.similarity import nearid_similarities, unique_images  # noqa: E402


def synthetic_samples(n: int, size: int, seed: int, folder: Path) -> list[NearIDSample]:
    """``n`` samples (PNG files in ``folder``): view j = the sample's object on background j, distractor j =
    another object on background j."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        backgrounds = [random_image(seed * 100_000 + i * 10 + j, (size, size)) for j in range(3)]
        thing, other = (random_image(seed * 100_000 + i * 10 + 5 + k, (size // 2, size // 2)) for k in range(2))
        views, distractors = [], []
        for j, background in enumerate(backgrounds):
            x, y = (int(v) for v in rng.integers(0, size // 2, 2))
            view, distractor = background.copy(), background.copy()
            view.paste(thing, (x, y))
            distractor.paste(other, (x, y))
            views.append(folder / f"{i}_view_{j}.png")
            distractors.append(folder / f"{i}_distractor_{j}.png")
            view.save(views[-1])
            distractor.save(distractors[-1])
        samples.append(NearIDSample(str(i), "synthetic", tuple(views), tuple(distractors)))
    return samples


def rates(sims: dict[str, np.ndarray]) -> tuple[float, float]:
    result = score_nearid_samples(sims)
    return result["SSR"], result["PA"]


def reindexed(sims: dict[str, np.ndarray], present: np.ndarray) -> dict[str, np.ndarray]:
    """The reference's cross columns when the distractors of ``present`` [N, 3] (bool) are compacted."""
    out = {k: v.copy() for k, v in sims.items()}
    for n in range(len(present)):
        kept = np.flatnonzero(present[n])
        for i in range(3):
            for j in range(3):
                out[f"cross_{i}{j}"][n] = sims[f"cross_{i}{kept[j]}"][n] if j < len(kept) else np.nan
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--size", type=int, default=112, help="image side, pixels")
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--missing", type=float, default=0.2, help="share of distractors missing (re-indexing)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    vision = dict(hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.depth,
                  num_attention_heads=max(1, args.width // 64), image_size=112, patch_size=14,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    with tempfile.TemporaryDirectory() as tmp:
        samples = synthetic_samples(args.samples, args.size, args.seed, Path(tmp))
        images = unique_images(samples)
        lookup = {image: n for n, image in enumerate(images)}
        folder = write_random_checkpoint(Path(tmp) / "ckpt", vision, args.seed)
        sims = {}
        for precision in ("fp32", "fp16"):
            scorer = create_scorer("nearid", pretrained=folder, device="cpu", precision=precision)
            [embeddings], _ = embed_images([scorer], images, progress=False)
            sims[precision] = nearid_similarities(samples, embeddings, lookup)
    fp32, fp16 = rates(sims["fp32"]), rates(sims["fp16"])
    cosine_diff = max(np.nanmax(np.abs(sims["fp32"][k] - sims["fp16"][k])) for k in sims["fp32"])
    rng = np.random.default_rng(args.seed + 1)
    present = rng.random((args.samples, 3)) >= args.missing
    aligned = {k: v.copy() for k, v in sims["fp32"].items()}
    for n, j in zip(*np.nonzero(~present)):
        for i in range(3):
            aligned[f"cross_{i}{j}"][n] = np.nan
    aligned_rates, reindexed_rates = rates(aligned), rates(reindexed(sims["fp32"], present))
    print(f"synthetic NearID: {args.samples} samples, {args.size}px, random SigLIP width {args.width} depth "
          f"{args.depth}, seed {args.seed}")
    print("| quirk | package (SSR / PA) | reference (SSR / PA) | difference (points) |")
    print("|---|---|---|---|")
    print(f"| fp16 embeddings (max cosine change {cosine_diff:.1e}) | {fp32[0]:.2f} / {fp32[1]:.2f} | "
          f"{fp16[0]:.2f} / {fp16[1]:.2f} | {fp16[0] - fp32[0]:+.2f} / {fp16[1] - fp32[1]:+.2f} |")
    print(f"| re-indexing, {args.missing:.0%} of distractors missing | {aligned_rates[0]:.2f} / {aligned_rates[1]:.2f} | "
          f"{reindexed_rates[0]:.2f} / {reindexed_rates[1]:.2f} | {reindexed_rates[0] - aligned_rates[0]:+.2f} / "
          f"{reindexed_rates[1] - aligned_rates[1]:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
