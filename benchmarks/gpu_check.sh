#!/usr/bin/env bash
# The GPU checks, as one short script for a lent GPU machine (run from the repository root):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. stage-1 throughput, phase split, peak memory and compute limit at the demo, CIFAR and
#    ImageNet settings, bf16 autocast and full precision, and bf16 with torch.compile;
# 2. a short `dscl run` on CUDA (synthetic data: nothing to download) end to end, plus the tests
#    that need a GPU (nccl collectives);
# 3. image files: stage 1 of ResNet-50 at 224 px fed from a folder of JPEGs by the fast file path
#    (data.file_views=fast, workers = cores; with and without data.decode_on_device) against the
#    per-sample path; compare with the in-memory `imagenet` row of step 1's bf16 table.
# Prints everything; writes the tables and the run folder under OUT_DIR (default: gpu_check/).
# Without a GPU only step 3 runs, at a toy size on the CPU (a check that the script works).
set -euo pipefail
out="${1:-gpu_check}"
mkdir -p "$out"
py="${PYTHON:-python3}"
"$py" -m pip install -q --no-deps -e . 2>/dev/null || true
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
if [ "$gpu" = 1 ]; then
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
for amp in bf16 off; do
  "$py" benchmarks/throughput.py --device cuda --amp "$amp" --setting demo --setting cifar \
    --setting imagenet --steps 10 --epochs 3 --batch-size 256 | tee "$out/throughput_$amp.md"
done
# torch.compile (compile=true) in bf16 at the CIFAR and ImageNet settings: the one-off column is
# the compile, images/s against the bf16 table above gives what it buys on this GPU.
"$py" benchmarks/throughput.py --device cuda --amp bf16 --setting cifar --setting imagenet \
  --steps 10 --epochs 3 --batch-size 256 --compile --no-phases | tee "$out/throughput_compile.md"
"$py" -m dscl.cli run --name gpu_smoke output_dir="$out" device=cuda progress=false \
  data.name=synthetic_lt "data.extra={num_classes: 10, image_size: 32}" data.n_max=200 \
  data.imbalance_ratio=20 data.image_size=32 pretrain.epochs=3 pretrain.batch_size=128 \
  pretrain.queue_size=512 classifier.epochs=2 classifier.batch_size=128 \
  pretrain.save_every_steps=5 | tee "$out/run.txt"
"$py" -m pytest -q tests/test_dist.py tests/engine 2>&1 | tail -3 | tee "$out/tests.txt"
fi
# 3. image files (see the header); on a CPU a toy size: 40 files, one conv, batch 8
cores="$(nproc)"
if [ "$gpu" = 1 ]; then
  files=(--files 2048 --backbone resnet50 --batch-size 256 --device cuda --workers "$cores"
         --modes per_sample fast fast+device_decode)
else
  files=(--files 40 --batch-size 8 --device cpu --workers 1 --modes per_sample fast)
fi
"$py" benchmarks/file_loader.py --e2e-only --repeats 1 "${files[@]}" | tee "$out/file_loader.md"
