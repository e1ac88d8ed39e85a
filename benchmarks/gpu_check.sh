#!/usr/bin/env bash
# The GPU check: one short script for a lent GPU machine, decisive in five minutes of wall time
# (data generation included), run from the repository root:
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # OUT_DIR: $1, else $OUT, else gpu_check/
# Steps, most wanted first; each prints its figures as soon as they are measured (a cut-off
# still returns numbers) and runs under its own time limit, and all of them under one budget
# (BUDGET_S, 290 s): a step that fails or runs out of time is recorded in OUT_DIR/steps.txt and
# the next one runs, so one bug costs one step, not the call.
#   audit        host round trips per training step of every method, fed in memory and by
#                decoding JPEGs on the device (dscl.engine.host_sync,
#                and CUDA's own sync warnings: torch.cuda.set_sync_debug_mode("warn"));
#   correctness  the cuda-marked tests of what only a GPU shows: bf16 rois under autocast on
#                CUDA, JPEGs decoded on the device while the GPU is busy against the CPU's
#                decode, byte for byte;
#   throughput   stage-1 images/s in bf16 at the demo and CIFAR settings, and at the ImageNet
#                setting (ResNet-50, 224 px) with cudnn.benchmark on and off, with the share of
#                the compute limit and the phase split;
#   run          a short `dscl run` on CUDA end to end (synthetic data: nothing to download);
#   file_loader  stage 1 of ResNet-50 at 224 px fed from a few hundred JPEGs (written in
#                parallel) by the fast file path, with and without data.decode_on_device:
#                compare with the ImageNet row of the throughput table (in memory);
#   tests        the other cuda-marked tests (nccl collectives, resume of a CUDA checkpoint).
# Every table goes to OUT_DIR: seven files, no folders (what a lent machine's output folder
# gives back); run folders go to a temporary folder. Call it with a time limit of about six
# minutes (timeout_s=360) so that a second call fits in the session's device time.
# Without a GPU every step runs in a toy size on the CPU (`make test` runs it so: a check that
# the script works). Imports dscl from src/ (no install: the lent machine has its own torch).
set -uo pipefail
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
: >"$out/steps.txt"
budget="${BUDGET_S:-290}"
deadline=$((SECONDS + budget))

# step NAME SECONDS FILE CMD...: run CMD under min(SECONDS, what is left of the budget), its
# output appended to OUT_DIR/FILE, and one line "NAME: ok|exit N|timed out after S s, T s" in
# OUT_DIR/steps.txt
step() {
  local name="$1" limit="$2" file="$3" start rc left
  shift 3
  left=$((deadline - SECONDS))
  if [ "$left" -lt 5 ]; then
    echo "$name: skipped, the ${budget} s budget is spent" | tee -a "$out/steps.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "== $name (limit $limit s)" | tee -a "$out/$file"
  start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$out/$file"
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
{
  if [ "$gpu" = 1 ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
  "$py" -c 'import sys, torch, torchvision; print("python", sys.version.split()[0], "torch",
torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda)'
  echo "cores: $cores"
} 2>&1 | tee "$out/gpu.txt"

tput=(benchmarks/throughput.py --amp bf16 --epochs 2)
pytest=("$py" -m pytest -q -p no:cacheprovider -m cuda)
if "$py" -c 'import pytest_timeout' 2>/dev/null; then pytest+=(--timeout 40); fi
if [ "$gpu" = 1 ]; then
  dev=cuda
  audit=(--device cuda --steps 4 --path memory --path device_decode)
  small=(--device cuda --steps 10 --batch-size 256 --setting demo --setting cifar)
  large=(--device cuda --steps 4 --batch-size 256 --setting imagenet --cudnn-benchmark on
    --cudnn-benchmark off)
  run_size=(data.n_max=200 data.image_size=32 "data.extra={num_classes: 10, image_size: 32}"
    pretrain.epochs=3 pretrain.batch_size=128 pretrain.queue_size=512 classifier.epochs=2
    classifier.batch_size=128)
  loader=(--files 512 --backbone resnet50 --batch-size 128 --device cuda --workers "$cores"
    --modes fast fast+device_decode)
else # toy sizes on the CPU: that the script and every command in it work
  dev=cpu
  audit=(--device cpu --steps 3 --image-size 16 --batch-size 16 --method ce --method dscl+pbsd
    --set pretrain.queue_size=32)
  small=(--device cpu --steps 2 --batch-size 16 --setting demo)
  large=()
  run_size=(data.n_max=40 data.image_size=16 "data.extra={num_classes: 4, image_size: 16}"
    pretrain.epochs=1 pretrain.batch_size=16 pretrain.queue_size=32 classifier.epochs=1
    classifier.batch_size=16)
  loader=(--files 24 --batch-size 8 --device cpu --workers 1 --modes fast)
fi

step audit 30 audit.md "$py" benchmarks/sync_audit.py "${audit[@]}"
step correctness 45 tests.txt "${pytest[@]}" tests/models tests/data
step throughput 45 throughput.md "$py" "${tput[@]}" "${small[@]}"
if [ "${#large[@]}" -gt 0 ]; then
  step throughput_imagenet 55 throughput.md "$py" "${tput[@]}" "${large[@]}"
fi
step run 35 run.txt "$py" -m dscl.cli run --name gpu_smoke output_dir="$scratch" device="$dev" \
  progress=false data.name=synthetic_lt data.imbalance_ratio=10 "${run_size[@]}" \
  pretrain.save_every_steps=5
step file_loader 60 file_loader.md "$py" benchmarks/file_loader.py --e2e-only --repeats 1 \
  "${loader[@]}"
step tests 35 tests.txt "${pytest[@]}" tests/test_dist.py tests/test_fault_tolerance.py \
  tests/test_device_pin.py tests/engine
echo "== steps"
cat "$out/steps.txt"
! grep -qv ": ok," "$out/steps.txt"
