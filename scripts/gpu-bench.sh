#!/usr/bin/env bash
# The GPU side-by-side training benchmark: `pipeline bench train` (a CUDA build, see
# scripts/build-cuda.sh) against benches/torch_train.py, on one card in one run, plus a short
# pipeline run on the GPU and the same on the CPU to compare their loss curves.
#
#   scripts/gpu-bench.sh [PIPELINE_BINARY] [OUTPUT_FOLDER]
#
# Needs on the GPU machine: the NVIDIA driver, python3 with PyTorch (CUDA), and the CUDA 13
# libraries the binary links (found in PyTorch's cu13x wheels or a system CUDA).
set -u
BIN=${1:-target/cuda/release/pipeline}
OUT=${2:-gpu-bench-out}
mkdir -p "$OUT"
SP=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
for d in "$SP"/nvidia/cu13/lib "$SP"/nvidia/cudnn/lib /usr/local/cuda/lib64; do
  [ -d "$d" ] && export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-/tmp/cuda-cache}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__)'

run() { # label, timeout, command...
  local label=$1 limit=$2; shift 2
  echo "== $label"
  timeout "$limit" "$@" 2>&1 | tail -n 25 | tee -a "$OUT/bench.md"
  echo "(exit ${PIPESTATUS[0]})"
}
for spec in "resnet20 64" "resnet56 64" "resnet18 256"; do
  set -- $spec
  run "ours $1 batch $2" 150 "$BIN" bench train --model "$1" --batch "$2" --device cuda --warmup 5 --steps 30
  run "torch $1 batch $2" 150 python3 benches/torch_train.py --model "$1" --batch "$2" --device cuda --warmup 10 --steps 50
done

# A short pipeline on synthetic data, on the GPU and on the CPU: same stages, same seed.
cfg() {
  cat <<EOF
[run]
output = "run-$1"   # relative to this file's folder
seed = 0
device = "$1"
threads = 8
[[stage]]
name = "data"
kind = "prepare"
source = "synthetic"
train_size = 2000
test_size = 500
[[stage]]
name = "teacher"
kind = "train"
needs = ["data"]
model = "resnet20"
method = "vanilla"
epochs = 3
batch_size = 64
schedule = { type = "cosine" }
[[stage]]
name = "eval"
kind = "evaluate"
needs = ["data", "teacher"]
EOF
}
for dev in cuda cpu; do
  cfg "$dev" > "$OUT/stages-$dev.toml"
  run "pipeline run on $dev" 240 "$BIN" -q run "$OUT/stages-$dev.toml"
  cat "$OUT/run-$dev/teacher/train_log.csv" "$OUT/run-$dev/eval/metrics.md" 2>/dev/null | tee -a "$OUT/bench.md"
done
