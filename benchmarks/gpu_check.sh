#!/usr/bin/env bash
# The GPU checks, as one short script for a lent GPU machine (run from the repository root):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Steps, most wanted first (each under its own time limit; a step that fails or runs out of time
# is recorded in OUT_DIR/steps.txt and the next one runs, so one bug costs one step, not the call):
#   throughput_bf16  stage-1 throughput, phase split, peak memory and compute limit at the demo,
#                    CIFAR and ImageNet settings in bf16 autocast;
#   run              a short `dscl run` on CUDA end to end (synthetic data: nothing to download);
#   file_loader      image files: stage 1 of ResNet-50 at 224 px fed from a folder of JPEGs by the
#                    fast file path (workers = cores; with and without data.decode_on_device)
#                    against the per-sample path; compare with the `imagenet` row of the bf16 table;
#   tests            the tests that need a GPU (nccl collectives) and the engine's;
#   throughput_off   the same settings in full precision;
#   compile          bf16 with torch.compile at the CIFAR and ImageNet settings (the one-off column
#                    is the compile; images/s against the bf16 table is what it buys).
# Every table goes to OUT_DIR (default gpu_check/), at most seven files and no folders (what a lent
# machine's output folder gives back); the run folder goes to a temporary folder.
# The limits add up to 8 minutes (a lent machine's call may run 10): call it with a time limit
# of 9 minutes or more, e.g. timeout_s=540.
# Without a GPU only file_loader runs, at a toy size on the CPU (a check that the script works).
# Imports dscl from src/ (no install: the lent machine has its own torch and no network).
set -uo pipefail
out="${1:-gpu_check}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
scratch="$(mktemp -d)"
: >"$out/steps.txt"

# step NAME SECONDS FILE CMD...: run CMD under a time limit, its output appended to OUT_DIR/FILE,
# and one line "NAME: ok|exit N|timed out after S s, T s" in OUT_DIR/steps.txt
step() {
  local name="$1" limit="$2" file="$3" start rc
  shift 3
  echo "== $name (limit $limit s)" | tee -a "$out/$file"
  start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$out/$file"
  rc=${PIPESTATUS[0]}
  case "$rc" in
    0) rc=ok ;;
    124 | 137) rc="timed out after $limit s" ;;
    *) rc="exit $rc" ;;
  esac
  echo "$name: $rc, $((SECONDS - start)) s" | tee -a "$out/steps.txt"
}

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
cores="$(nproc)"
if [ "$gpu" = 1 ]; then
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c 'import sys, torch, torchvision; print("python", sys.version.split()[0], "torch",
torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda)'
    echo "cores: $cores"
  } 2>&1 | tee "$out/gpu.txt"
  bench=(benchmarks/throughput.py --device cuda --steps 10 --epochs 3 --batch-size 256)
  step throughput_bf16 90 throughput.md \
    "$py" "${bench[@]}" --amp bf16 --setting demo --setting cifar --setting imagenet
  step run 60 run.txt "$py" -m dscl.cli run --name gpu_smoke output_dir="$scratch" device=cuda \
    progress=false data.name=synthetic_lt "data.extra={num_classes: 10, image_size: 32}" \
    data.n_max=200 data.imbalance_ratio=20 data.image_size=32 pretrain.epochs=3 \
    pretrain.batch_size=128 pretrain.queue_size=512 classifier.epochs=2 \
    classifier.batch_size=128 pretrain.save_every_steps=5
  step file_loader 120 file_loader.md "$py" benchmarks/file_loader.py --e2e-only --repeats 1 \
    --files 2048 --backbone resnet50 --batch-size 256 --device cuda --workers "$cores" \
    --modes per_sample fast fast+device_decode
  step tests 60 tests.txt "$py" -m pytest -q -p no:cacheprovider -m cuda
  step throughput_off 60 throughput.md \
    "$py" "${bench[@]}" --amp off --setting demo --setting cifar --setting imagenet
  step compile 90 throughput.md \
    "$py" "${bench[@]}" --amp bf16 --setting cifar --setting imagenet --compile --no-phases
else
  step file_loader 300 file_loader.md "$py" benchmarks/file_loader.py --e2e-only --repeats 1 \
    --files 40 --batch-size 8 --device cpu --workers 1 --modes per_sample fast
fi
rm -rf "$scratch"
echo "== steps"
cat "$out/steps.txt"
! grep -qv ": ok," "$out/steps.txt"
