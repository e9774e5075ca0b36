#!/usr/bin/env python
"""Embedding throughput: nearid-metric vs the transformers reference pipeline.

Both pipelines embed the same images with the same random full-size SigLIP2
so400m/14-384 weights (written once, in the released NearID folder format, to a
temporary folder):

* reference: ``SiglipImageProcessorPil`` (the PIL path, ``use_fast=False``) +
  transformers ``SiglipVisionModel`` loaded from the same float16 weights upcast to
  float32 (bf16/fp16 rows: the model cast to that dtype and the pixel values too),
  ``pooler_output`` L2-normalised;
* package: ``NearIDScore.from_pretrained(folder, device=..., precision=...).embed(...)``.

Inputs are measured two ways: PIL images already in memory, and end to end from JPEG
files on disk (decoding included). After one warm-up pass per pipeline, reference and
package runs are interleaved (alternating which goes first) so that load drift on a
shared machine hits both alike; the median images/s of the repeats is reported, with
the ratio package / reference and the max abs difference of the two pipelines'
embeddings (a sanity check: ~1e-6 in fp32).

Run ``python benchmarks/embed_speed.py --help``. Needs ``transformers`` (the ``bench``
extra). Nothing is downloaded: the Hugging Face Hub is put in offline mode.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never contact the Hub from a benchmark
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

# SigLIP2 so400m/14 at 384 px: the NearID backbone.
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# A toy configuration to smoke-test this script in seconds (--model tiny).
TINY = dict(hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
            image_size=56, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
MODELS = {"so400m": SO400M, "tiny": TINY}

IMAGE_SIZES = ((512, 384), (640, 480), (1024, 768))  # (width, height), cycled over the inputs
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The targets.
CPU_FP32_TARGET = 1.0
CPU_BF16_TARGET = 1.7
GPU_BF16_JPEG_IMG_S = 900.0
GPU_BF16_JPEG_RATIO = 5.0


# --------------------------------------------------------------------------- checkpoint


def preprocessor_dict(size: int, resample: int = 2) -> dict:
    """The SigLIP2 base model's SiglipImageProcessor config, at ``size`` px."""
    return {
        "image_processor_type": "SiglipImageProcessor",
        "processor_class": "SiglipProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": resample,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def write_random_checkpoint(folder: Path, vision: dict, seed: int) -> Path:
    """Random SiglipVisionModel weights saved as a NearID release folder.

    The model is built on the meta device (no slow full-size random init) only to get
    the parameter names and shapes; weights are a cheap seeded normal * 0.02 (LayerNorm
    scales 1 + that), stored in float16 under ``backbone.vision_model.`` as released.
    """
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(**vision)
    with torch.device("meta"):
        shapes = SiglipVisionModel(config).state_dict()
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, meta in shapes.items():
        value = torch.randn(meta.shape, generator=gen) * 0.02
        if name.endswith(".weight") and meta.ndim == 1:  # LayerNorm scale
            value += 1.0
        key = "backbone.vision_model." + name.removeprefix("vision_model.")
        weights[key] = value.half().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    checkpoint_config = {
        "model_type": "nearid",
        "architectures": ["NearIDModel"],
        "auto_map": {"AutoConfig": "configuration_nearid.NearIDConfig", "AutoModel": "modeling_nearid.NearIDModel"},
        "vision_config": config.to_dict(),
        "embed_dim": config.hidden_size,
        "normalize_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(checkpoint_config, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_dict(config.image_size), indent=2))
    return folder


# --------------------------------------------------------------------------- reference


class Reference:
    """The transformers pipeline: SiglipImageProcessorPil + SiglipVisionModel pooler output."""

    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device):
        from transformers import SiglipVisionConfig, SiglipVisionModel

        self.processor = self.make_processor(folder)
        vision = json.loads((folder / "config.json").read_text())["vision_config"]
        with torch.device("meta"):
            model = SiglipVisionModel(SiglipVisionConfig.from_dict(vision))
        names = model.state_dict().keys()
        inner = "vision_model." if any(k.startswith("vision_model.") for k in names) else ""
        state = {}
        for key, value in load_file(folder / "model.safetensors").items():
            for prefix in ("backbone.vision_model.", "backbone."):
                if key.startswith(prefix):
                    key = inner + key[len(prefix):]
                    break
            state[key] = value.float().to(dtype)  # fp16 checkpoint upcast to fp32 (then to dtype)
        model.load_state_dict(state, strict=True, assign=True)
        for module in model.modules():  # non-persistent buffers are not in the file
            for bname, buf in list(module.named_buffers(recurse=False)):
                if buf.is_meta:
                    if bname != "position_ids":
                        raise RuntimeError(f"reference model buffer {bname} left uninitialised")
                    setattr(module, bname, torch.arange(buf.shape[-1]).expand(buf.shape).contiguous())
        self.model = model.to(device).eval().requires_grad_(False)
        self.dtype = dtype
        self.device = device

    @staticmethod
    def make_processor(folder: Path):
        """The PIL-backend SiglipImageProcessor (the path the paper's numbers used)."""
        try:
            from transformers import SiglipImageProcessorPil

            return SiglipImageProcessorPil.from_pretrained(folder)
        except ImportError:  # transformers 4
            from transformers import SiglipImageProcessor

            return SiglipImageProcessor.from_pretrained(folder, use_fast=False)

    def embed(self, images: list, batch_size: int) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            pil = [Image.open(p).convert("RGB") if isinstance(p, (str, Path)) else p for p in chunk]
            pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, non_blocking=True).to(self.dtype)
            with torch.inference_mode():
                pooled = self.model(pixel_values=pixels).pooler_output
            out.append(F.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out)


class Package:
    def __init__(self, folder: Path, precision: str, device: torch.device, num_workers: int, compile: bool = False):
        from nearid_metric import NearIDScore

        self.scorer = NearIDScore.from_pretrained(folder, device=device, precision=precision, compile=compile)
        self.num_workers = num_workers

    def embed(self, images: list, batch_size: int) -> torch.Tensor:
        return self.scorer.embed(images, batch_size=batch_size, num_workers=self.num_workers, progress=False)


# --------------------------------------------------------------------------- inputs


def random_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth random RGB picture with a little noise; size is (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 256, (max(2, h // 7), max(2, w // 7), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.integers(-20, 21, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8))


def make_inputs(n: int, folder: Path, seed: int) -> tuple[list[Image.Image], list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    images, paths = [], []
    for i in range(n):
        image = random_image(seed + i, IMAGE_SIZES[i % len(IMAGE_SIZES)])
        path = folder / f"img_{i:04d}.jpg"
        image.save(path, quality=90)
        images.append(image)
        paths.append(path)
    return images, paths


# --------------------------------------------------------------------------- timing


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor, float]:
    """``(wall seconds, fn(), CPU share)``; CPU share = CPU seconds / (wall * torch threads).

    On CPU a share well below 1 means the run lost cores to something else on the machine.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    cpu = _cpu_seconds()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    return wall, result, (_cpu_seconds() - cpu) / (wall * torch.get_num_threads())


def preprocess_breakdown(folder: Path, images: list, paths: list, repeats: int) -> dict:
    """Milliseconds per image of each pipeline's CPU preprocessing alone (decode, RGB, resize, normalise)."""
    from nearid_metric.images import load_image
    from nearid_metric.preprocess import PreprocessConfig, normalization_table, normalize_uint8, resize_to_uint8

    config = PreprocessConfig.from_file(folder / "preprocessor_config.json")
    table = normalization_table(config)
    processor = Reference.make_processor(folder)

    def package(items):
        for item in items:
            image = load_image(item) if isinstance(item, str) else item
            normalize_uint8(resize_to_uint8(image, config)[None], table)

    def reference(items):
        pil = [Image.open(p).convert("RGB") if isinstance(p, str) else p for p in items]
        processor(images=pil, return_tensors="pt")

    out = {}
    for name, fn in (("reference (SiglipImageProcessorPil)", reference), ("package", package)):
        row = {}
        for mode, items in (("memory", images), ("jpeg", paths)):
            fn(items)  # warm-up
            runs = []
            for _ in range(max(3, repeats)):
                start = time.perf_counter()
                fn(items)
                runs.append((time.perf_counter() - start) / len(items) * 1e3)
            row[f"{mode}_ms"] = statistics.median(runs)
        out[name] = row
    return out


def machine_description(device: torch.device) -> dict:
    import timm
    import transformers

    import nearid_metric

    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in (platform.processor(), platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": "avx512_bf16" in flags.split(),
        "amx": "amx_bf16" in flags.split(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "pillow": Image.__version__,
        "nearid_metric": nearid_metric.__version__,
        "gpu": None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def run(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    vision = MODELS[args.model]
    command = shlex.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    results = {"machine": machine_description(device), "command": command,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": []}
    t_total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nearid-bench-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        folder = write_random_checkpoint(tmp / "checkpoint", vision, args.seed)
        log(f"wrote random {args.model} checkpoint in {time.perf_counter() - t0:.1f}s: {folder}")
        images, paths = make_inputs(args.num_images, tmp / "images", args.seed)
        inputs = {"memory": images, "jpeg": [str(p) for p in paths]}
        modes = [m for m in ("memory", "jpeg") if m in args.inputs]
        reference_fp32_emb: dict[str, torch.Tensor] = {}
        package_emb: dict[tuple[str, str], torch.Tensor] = {}
        for precision in args.precisions:
            dtype = DTYPES[precision]
            t0 = time.perf_counter()
            ref = Reference(folder, dtype, device)
            pkg = Package(folder, precision, device, args.num_workers, args.compile)
            log(f"[{precision}] loaded both pipelines in {time.perf_counter() - t0:.1f}s")
            pipelines = {"ref": ref, "pkg": pkg}
            for name, pipe in pipelines.items():  # warm-up: same shapes as the timed runs
                for _ in range(args.warmup):
                    seconds, _, share = timed(lambda: pipe.embed(images, args.batch_size), device)
                    log(f"[{precision}] warm-up {name}: {seconds:.2f}s (CPU share {share:.2f})")
            for path in paths:  # OS page cache, so the first JPEG repeat is not special
                path.read_bytes()
            for mode in modes:
                data = inputs[mode]
                times: dict[str, list[float]] = {"ref": [], "pkg": []}
                shares: dict[str, list[float]] = {"ref": [], "pkg": []}
                emb: dict[str, torch.Tensor] = {}
                for r in range(args.repeats):
                    order = ("ref", "pkg") if r % 2 == 0 else ("pkg", "ref")  # ABBA... interleaving
                    for name in order:
                        seconds, emb[name], share = timed(lambda: pipelines[name].embed(data, args.batch_size),
                                                          device)
                        times[name].append(seconds)
                        shares[name].append(share)
                        log(f"[{precision} {mode}] repeat {r + 1}/{args.repeats} {name}: {seconds:.2f}s "
                            f"({len(data) / seconds:.2f} img/s, CPU share {share:.2f})")
                if precision == "fp32":
                    reference_fp32_emb[mode] = emb["ref"]
                package_emb[(precision, mode)] = emb["pkg"]
                rate = {k: len(data) / statistics.median(v) for k, v in times.items()}
                row = {
                    "device": device.type, "precision": precision, "input": mode,
                    "images": len(data), "batch_size": args.batch_size,
                    "ref_img_s": rate["ref"], "pkg_img_s": rate["pkg"], "ratio": rate["pkg"] / rate["ref"],
                    "max_abs_diff": (emb["pkg"] - emb["ref"]).abs().max().item(),
                    "ref_best_img_s": len(data) / min(times["ref"]), "pkg_best_img_s": len(data) / min(times["pkg"]),
                    "ref_seconds": times["ref"], "pkg_seconds": times["pkg"],
                    "ref_cpu_share": shares["ref"], "pkg_cpu_share": shares["pkg"],
                }
                results["rows"].append(row)
            del ref, pkg, pipelines
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if args.breakdown:
            results["breakdown"] = preprocess_breakdown(folder, images, inputs["jpeg"], args.repeats)
        # Low-precision rows against the fp32 reference (speed measured in the fp32 phase).
        for row in results["rows"]:
            if row["precision"] == "fp32":
                continue
            fp32 = next((r for r in results["rows"] if r["precision"] == "fp32" and r["input"] == row["input"]), None)
            if fp32 is not None:
                row["ref_fp32_img_s"] = fp32["ref_img_s"]
                row["ratio_vs_ref_fp32"] = row["pkg_img_s"] / fp32["ref_img_s"]
                # the package's low-precision embeddings vs the fp32 reference: the accuracy cost
                diff = package_emb[(row["precision"], row["input"])] - reference_fp32_emb[row["input"]]
                row["max_abs_diff_vs_ref_fp32"] = diff.abs().max().item()
    results["total_seconds"] = time.perf_counter() - t_total
    return results


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- report


def _fmt_rate(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3f}"


def targets(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        dev, prec, mode, ratio = row["device"], row["precision"], row["input"], row["ratio"]
        if dev == "cpu" and prec == "fp32":
            ok = ratio >= CPU_FP32_TARGET
            lines.append(f"- CPU fp32, {mode}: package/reference = {ratio:.2f}x (target >= {CPU_FP32_TARGET:.1f}x): "
                         f"{'met' if ok else 'NOT met'}")
        elif dev == "cpu" and prec == "bf16":
            vs32 = row.get("ratio_vs_ref_fp32")
            s = (f"- CPU bf16, {mode}: package bf16 / reference bf16 = {ratio:.2f}x "
                 f"({'met' if ratio >= CPU_BF16_TARGET else 'NOT met'})")
            if vs32 is not None:
                s += (f"; package bf16 / reference fp32 = {vs32:.2f}x "
                      f"({'met' if vs32 >= CPU_BF16_TARGET else 'NOT met'})")
            lines.append(s + f" (target >= {CPU_BF16_TARGET:.1f}x)")
        elif dev == "cuda" and prec == "bf16" and mode == "jpeg":
            rate = row["pkg_img_s"]
            s = (f"- GPU bf16 end to end from JPEGs: {rate:.0f} img/s (target >= {GPU_BF16_JPEG_IMG_S:.0f}: "
                 f"{'met' if rate >= GPU_BF16_JPEG_IMG_S else 'NOT met'}); package/reference bf16 = {ratio:.2f}x")
            vs32 = row.get("ratio_vs_ref_fp32")
            if vs32 is not None:
                s += f", vs reference fp32 = {vs32:.2f}x"
            lines.append(s + f" (target >= {GPU_BF16_JPEG_RATIO:.0f}x: "
                         f"{'met' if ratio >= GPU_BF16_JPEG_RATIO else 'NOT met'} vs bf16)")
    return lines


def markdown(results: dict) -> str:
    m = results["machine"]
    s = results["settings"]
    out = ["## Machine", ""]
    out.append(f"- CPU: {m['cpu']}, {m['cpu_cores']} cores visible, torch threads {m['torch_threads']}, "
               f"ISA {m['cpu_isa']}, avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}, "
               f"AMX {'yes' if m['amx'] else 'no'}")
    if m["gpu"]:
        out.append(f"- GPU: {m['gpu']} (CUDA {m.get('cuda')})")
    else:
        out.append("- GPU: none used")
    out.append(f"- Python {m['python']}, torch {m['torch']}, timm {m['timm']}, transformers {m['transformers']}, "
               f"Pillow {m['pillow']}, nearid-metric {m['nearid_metric']}")
    out += ["", "## Settings", ""]
    out.append(f"- model: {s['model']} (random weights, seed {s['seed']}); {s['num_images']} images "
               f"({', '.join(f'{w}x{h}' for w, h in IMAGE_SIZES)} cycled), batch size {s['batch_size']}, "
               f"{s['warmup']} warm-up pass(es) per pipeline, {s['repeats']} interleaved repeats (median), "
               f"package num_workers={s['num_workers']}")
    out.append(f"- command: `python {results['command']}`")
    out.append(f"- total run time: {results['total_seconds'] / 60:.1f} min")
    out += ["", "## Results", ""]
    out.append("| device | precision | input | ref img/s | package img/s | ratio pkg/ref | ratio pkg/ref-fp32 "
               "| max \\|Δemb\\| vs ref | max \\|Δemb\\| vs ref-fp32 |")
    out.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results["rows"]:
        vs32 = r.get("ratio_vs_ref_fp32")
        vs32_text = "—" if vs32 is None else f"{vs32:.2f}x"
        diff32 = r.get("max_abs_diff_vs_ref_fp32")
        diff32_text = "—" if diff32 is None else f"{diff32:.1e}"
        out.append(f"| {r['device']} | {r['precision']} | {r['input']} | {_fmt_rate(r['ref_img_s'])} | "
                   f"{_fmt_rate(r['pkg_img_s'])} | {r['ratio']:.2f}x | {vs32_text} | "
                   f"{r['max_abs_diff']:.1e} | {diff32_text} |")
    out += ["", "Per-repeat wall seconds (CPU share: process CPU time / (wall x torch threads); well below 1 "
            "means another process took cores; single-threaded decode/resize lowers it a little), "
            "and best-repeat ratio:", ""]
    for r in results["rows"]:
        ref = ", ".join(f"{t:.2f} ({c:.2f})" for t, c in zip(r["ref_seconds"], r["ref_cpu_share"]))
        pkg = ", ".join(f"{t:.2f} ({c:.2f})" for t, c in zip(r["pkg_seconds"], r["pkg_cpu_share"]))
        best = r["pkg_best_img_s"] / r["ref_best_img_s"]
        out.append(f"- {r['device']} {r['precision']} {r['input']}: ref [{ref}] / package [{pkg}]; "
                   f"best/best {best:.2f}x")
    if results.get("breakdown"):
        out += ["", "## Preprocessing alone (one thread, ms per image, median)", "",
                "| pipeline | from memory | from JPEG (decode included) |", "|---|---:|---:|"]
        for name, b in results["breakdown"].items():
            out.append(f"| {name} | {b['memory_ms']:.1f} | {b['jpeg_ms']:.1f} |")
    lines = targets(results["rows"])
    if lines:
        out += ["", "## Against the targets", ""] + lines
    return "\n".join(out) + "\n"


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="cpu or cuda[:N]")
    p.add_argument("--precisions", default=None,
                   help="comma-separated from fp32,bf16,fp16 (fp16 on CUDA only); default fp32,bf16")
    p.add_argument("--inputs", default="memory,jpeg", help="comma-separated: memory (PIL in memory), jpeg (files)")
    p.add_argument("--num-images", type=int, default=None, help="default 4 on CPU, 256 on CUDA")
    p.add_argument("--batch-size", type=int, default=None, help="default: all images at once on CPU, 64 on CUDA")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per pipeline; default 3 on CPU, 5 on CUDA")
    p.add_argument("--warmup", type=int, default=1, help="warm-up passes per pipeline and precision")
    p.add_argument("--num-workers", type=int, default=None,
                   help="package DataLoader workers; default 0 on CPU, min(8, cores) on CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip timing each pipeline's CPU preprocessing alone")
    p.add_argument("--model", choices=sorted(MODELS), default="so400m", help="tiny: a smoke test of this script")
    p.add_argument("--compile", action="store_true", help="the package's encoder through torch.compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="parent of the temporary checkpoint/image folder")
    p.add_argument("--out", default=None, help="also write the markdown report here")
    p.add_argument("--json", default=None, help="also write the raw results here as JSON")
    args = p.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    if on_cuda and not cuda:
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.precisions = [x.strip() for x in (args.precisions or "fp32,bf16").split(",") if x.strip()]
    for x in args.precisions:
        if x not in DTYPES:
            p.error(f"unknown precision {x!r}; choose from {sorted(DTYPES)}")
        if x == "fp16" and not on_cuda:
            p.error("fp16 is measured on CUDA only")
    args.inputs = [x.strip() for x in args.inputs.split(",") if x.strip()]
    if not set(args.inputs) <= {"memory", "jpeg"} or not args.inputs:
        p.error("--inputs takes memory and/or jpeg")
    args.num_images = args.num_images or (256 if on_cuda else 4)
    args.batch_size = args.batch_size or (64 if on_cuda else args.num_images)
    args.repeats = args.repeats or (5 if on_cuda else 3)
    if args.num_workers is None:
        args.num_workers = min(8, os.cpu_count() or 1) if on_cuda else 0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    report = markdown(results)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
