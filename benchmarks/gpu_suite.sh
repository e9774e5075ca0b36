#!/usr/bin/env bash
# The GPU figures in one run (issue 20), for a session that is lent a CUDA machine: about 6-8 minutes on
# one H100/H200. Writes every report to ${OUT:-gpu-results}/ (markdown + JSON), to be copied into
# benchmarks/RESULTS.md with the device name and these command lines.
#   bash benchmarks/gpu_suite.sh            # from the repository root, with the project installed
set -uo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
py="${PYTHON:-python}"
run() {  # name, command...: run one step, log it, keep going on failure
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/commands.txt"
  local start=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  echo "   exit $? in $((SECONDS - start)) s" | tee -a "$out/commands.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/device.txt" 2>&1
$py -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" >>"$out/device.txt" 2>&1
run tests_cuda       $py -m pytest -q tests/test_cuda.py
run embed_fp32_bf16  $py benchmarks/embed_speed.py --device cuda --precisions fp32,bf16,fp16 --num-images 256 \
                     --out "$out/embed_speed.md" --json "$out/embed_speed.json"
run real_photos      $py benchmarks/real_photos.py --model so400m --device cuda --precision bf16 --images 256 \
                     --batch-size 64 --workers 0 2 4 8 16
run first_score      $py benchmarks/first_score.py --device cuda --precision bf16 --repeats 3
run cache            $py benchmarks/cache_speed.py --device cuda --precision bf16 --num-images 512 \
                     --out "$out/cache_speed.md" --json "$out/cache_speed.json"
run compile_off      $py benchmarks/embed_speed.py --device cuda --precisions bf16 --num-images 256 --inputs jpeg \
                     --no-breakdown --out "$out/compile_off.md"
run compile_on       $py benchmarks/embed_speed.py --device cuda --precisions bf16 --num-images 256 --inputs jpeg \
                     --no-breakdown --compile --out "$out/compile_on.md"
run tf32_parity      $py - <<'PY'
# TF32 for fp32 on CUDA: cosine difference against CPU fp32, with TF32 matmuls/convolutions off and on
import sys, tempfile, torch
from pathlib import Path
sys.path.insert(0, "benchmarks")
from embed_speed import MODELS, make_inputs, write_random_checkpoint
from nearid_metric import NearIDScore
tmp = Path(tempfile.mkdtemp())
folder = write_random_checkpoint(tmp / "ckpt", MODELS["so400m"], 0)
images, _ = make_inputs(32, tmp / "img", 0)
cpu = NearIDScore.from_pretrained(folder, device="cpu").embed(images, progress=False)
for tf32 in (False, True):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    gpu = NearIDScore.from_pretrained(folder, device="cuda").embed(images, progress=False)
    print(f"tf32={tf32}: max |cosine(cpu, cuda) - 1| = {(1 - (cpu * gpu).sum(1)).abs().max().item():.2e}, "
          f"max abs diff {(cpu - gpu).abs().max().item():.2e}")
PY
echo "reports in $out/"
