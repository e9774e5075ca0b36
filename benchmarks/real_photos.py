#!/usr/bin/env python
"""Real photos end to end: 1-2k px camera-like JPEGs (quality 90-95, some with an EXIF orientation
tag) as references and 512-1024 px generations, embedded by the package and by the reference
pipeline (transformers' ``SiglipImageProcessorPil`` + ``SiglipVisionModel``, EXIF applied as
transformers' ``load_image`` does), with the cost per image of every stage and the scaling of the
package's decode workers.

Stages, per image (milliseconds, median over the inputs, one process):
read (the file's bytes), decode (PIL), exif (orientation), rgb, resize, normalise, forward (one
batch, divided by its size). Then the package end to end (``NearIDScore.embed`` from the files)
with 0, 1, 2, ... workers (``--workers``), against the reference end to end, in the same run.

The photos are generated procedurally (smooth random scenes with noise); nothing is downloaded.
Run: ``python benchmarks/real_photos.py --help`` (the ``bench`` extra: transformers).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from embed_speed import MODELS, Reference, machine_description, random_image, timed  # noqa: E402
from embed_speed import write_random_checkpoint  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from nearid_metric import NearIDScore  # noqa: E402
from nearid_metric.preprocess import PreprocessConfig, normalization_table, normalize_uint8, to_rgb  # noqa: E402

REFERENCE_SIZES = ((2048, 1536), (1536, 2048), (1600, 1200), (1024, 1365))  # camera photos, some portrait
GENERATION_SIZES = ((512, 512), (768, 768), (1024, 1024), (1024, 768))
ORIENTATIONS = (1, 6, 3, 8)  # EXIF: as stored, 90 cw, 180, 90 ccw


def make_photos(folder: Path, n: int, seed: int) -> list[Path]:
    """``n`` JPEGs: half references (1-2k px, quality 95, every other one with an orientation tag), half
    generations (512-1024 px, quality 90)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        reference = i % 2 == 0
        size = (REFERENCE_SIZES if reference else GENERATION_SIZES)[(i // 2) % 4]
        image = random_image(seed + i, size)
        exif = Image.Exif()
        if reference:
            exif[0x0112] = ORIENTATIONS[(i // 2) % 4]
        path = folder / f"{'ref' if reference else 'gen'}_{i:04d}.jpg"
        image.save(path, quality=95 if reference else 90, exif=exif.tobytes())
        paths.append(path)
    return paths


def stage_breakdown(paths: list[Path], config: PreprocessConfig, scorer: NearIDScore, batch: int) -> dict:
    """Median milliseconds per image of each stage of the package's path, one process."""
    table = normalization_table(config)
    stages: dict[str, list[float]] = {k: [] for k in ("read", "decode", "exif", "rgb", "resize", "normalise")}
    pixels = []
    for path in paths:
        t0 = time.perf_counter()
        data = path.read_bytes()
        t1 = time.perf_counter()
        image = Image.open(io.BytesIO(data))
        image.load()
        t2 = time.perf_counter()
        image = ImageOps.exif_transpose(image)
        t3 = time.perf_counter()
        rgb = to_rgb(image)
        t4 = time.perf_counter()
        resized = rgb.resize((config.width, config.height), resample=config.resample, reducing_gap=None)
        t5 = time.perf_counter()
        tensor = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)
        normalize_uint8(tensor[None], table)
        t6 = time.perf_counter()
        pixels.append(tensor)
        for key, (a, b) in zip(stages, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6))):
            stages[key].append((b - a) * 1e3)
    out = {k: statistics.median(v) for k, v in stages.items()}
    stack = normalize_uint8(torch.stack(pixels[:batch]).to(scorer.device), table.to(scorer.device))
    scorer.embed_pixels(stack)  # warm-up
    seconds, _, _ = timed(lambda: scorer.embed_pixels(stack), scorer.device)
    out["forward"] = seconds / len(stack) * 1e3
    return out


def reference_breakdown(paths: list[Path], reference: Reference, batch: int) -> dict:
    """The reference pipeline's per-image cost: open + EXIF + convert (as transformers' load_image), the
    processor (resize, rescale, normalise), the model's forward."""
    load, process = [], []
    images = []
    for path in paths:
        t0 = time.perf_counter()
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        t1 = time.perf_counter()
        reference.processor(images=[image], return_tensors="pt")
        t2 = time.perf_counter()
        load.append((t1 - t0) * 1e3)
        process.append((t2 - t1) * 1e3)
        images.append(image)
    pixels = reference.processor(images=images[:batch], return_tensors="pt")["pixel_values"].to(reference.device)
    with torch.inference_mode():
        reference.model(pixel_values=pixels.to(reference.dtype))  # warm-up
        seconds, _, _ = timed(lambda: reference.model(pixel_values=pixels.to(reference.dtype)), reference.device)
    return {"load (read, decode, exif, rgb)": statistics.median(load),
            "processor (resize, rescale, normalise)": statistics.median(process),
            "forward": seconds / len(images[:batch]) * 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny",
                        help="so400m: the real NearID size; tiny: a seconds-long smoke test")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    print(f"machine: {machine_description(device)}")
    print(f"command: {' '.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_checkpoint(Path(tmp) / "ckpt", MODELS[args.model], args.seed)
        paths = make_photos(Path(tmp) / "photos", args.images, args.seed)
        megapixels = statistics.mean(Image.open(p).size[0] * Image.open(p).size[1] for p in paths) / 1e6
        config = PreprocessConfig.from_file(folder / "preprocessor_config.json")
        scorer = NearIDScore.from_pretrained(folder, device=device, precision=args.precision)
        reference = Reference(folder, dtype, device)
        ours = stage_breakdown(paths, config, scorer, args.batch_size)
        theirs = reference_breakdown(paths, reference, args.batch_size)
        print(f"\n{len(paths)} JPEGs, mean {megapixels:.2f} MP; per image (ms, median):")
        print("| stage | package | | reference | |")
        print("|---|---|---|---|---|")
        rows = max(len(ours), len(theirs))
        for k in range(rows):
            a = list(ours.items())[k] if k < len(ours) else ("", None)
            b = list(theirs.items())[k] if k < len(theirs) else ("", None)
            print(f"| {a[0]} | {'' if a[1] is None else f'{a[1]:.2f}'} | | {b[0]} | "
                  f"{'' if b[1] is None else f'{b[1]:.2f}'} |")
        reference.embed([str(p) for p in paths[:4]], args.batch_size)  # warm-up
        ref_s, _, _ = timed(lambda: reference_end_to_end(reference, paths, args.batch_size), device)
        print(f"\nend to end, {args.precision} on {device}: reference {len(paths) / ref_s:.2f} img/s")
        for workers in args.workers:
            scorer.embed(paths[:4], num_workers=workers, progress=False)  # warm-up (worker start included below)
            seconds, _, share = timed(lambda: scorer.embed(paths, batch_size=args.batch_size, num_workers=workers,
                                                           progress=False), device)
            print(f"package, {workers} worker(s): {len(paths) / seconds:.2f} img/s = "
                  f"{ref_s / seconds:.2f}x the reference (CPU share {share:.2f})")
    return 0


def reference_end_to_end(reference: Reference, paths: list[Path], batch: int) -> torch.Tensor:
    """The reference from the files, EXIF applied as transformers' ``load_image`` does."""
    images = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths]
    return reference.embed(images, batch)


if __name__ == "__main__":
    sys.exit(main())
