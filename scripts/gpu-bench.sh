#!/usr/bin/env bash
# The GPU checks, on one card in one run (about 4 minutes on an H100 before issue 23's variants
# were added; budget 8–10):
#  1. the GPU op tests (stages/engine/tests/gpu_ops.rs: cuDNN convolutions, BatchNorm, add-ReLU, SGD and
#     a few ResNet steps against the CPU, f32 and bf16);
#  2. the side-by-side training benchmark: `pipeline bench train` (f32 and bf16) against
#     benches/torch_train.py (eager f32; bf16 autocast + channels_last) for ResNet-18 at batch 256
#     and ResNet-56 at batch 64, and the On-LDL step (ResNet-20 student, ResNet-110 teacher,
#     batch 64), images/s and peak memory;
#  3. end to end: two epochs of a CIFAR-10-shaped student (50,000 images, crop + flip) through
#     `pipeline run`, loader included, whose second-epoch images/s compare with the pure step
#     rate of 2.;
#  4. resume on CUDA: a planned bf16 training with CUDA graphs and NHWC killed (SIGKILL) after a
#     checkpoint and rerun, against an uninterrupted run: the final weights compared byte for
#     byte (scripts/resume-check.sh; SKIP_RESUME=1 leaves it out);
#  5. with CURVES=1, a short pipeline run on the GPU and on the CPU, same seed, to compare their
#     loss curves.
# Steps 2 and 3 run the CUDA steps side by side: candle's autograd (the default), the planned
# step over fixed buffers (LDL_GPU_PLAN=1, models/plan.rs + gpu/plan.rs), the planned step
# with its passes replayed as CUDA graphs (LDL_GPU_GRAPH=1), and that with channels-last
# activations (LDL_GPU_NHWC=1), with per-phase profiles.
#
#   scripts/gpu-bench.sh [PIPELINE_BINARY] [GPU_OPS_TEST_BINARY] [OUTPUT_FOLDER]
#
# Binaries: scripts/build-cuda.sh (TESTS=1 for the test binary). Needs on the GPU machine: the
# NVIDIA driver, python3 with PyTorch (CUDA), and the CUDA 13 + cuDNN 9 libraries the binary links
# (found in PyTorch's cu13x wheels or a system CUDA).
set -u
BIN=${1:-target/cuda/release/pipeline}
TESTBIN=${2:-}
OUT=${3:-gpu-bench-out}
mkdir -p "$OUT"
SP=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
for d in "$SP"/nvidia/cu13/lib "$SP"/nvidia/cudnn/lib /usr/local/cuda/lib64; do
  [ -d "$d" ] && export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-/tmp/cuda-cache}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/bench.md"
python3 -c 'import torch; print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())' | tee -a "$OUT/bench.md"

run() { # label, timeout, command...
  local label=$1 limit=$2; shift 2
  echo "== $label" | tee -a "$OUT/bench.md"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/last.log" 2>&1
  local rc=$?
  tail -n 30 "$OUT/last.log" | tee -a "$OUT/bench.md"
  echo "(exit $rc, $((SECONDS - t0)) s)" | tee -a "$OUT/bench.md"
}

if [ -n "$TESTBIN" ]; then
  run "GPU op tests" 240 "$TESTBIN" --test-threads 1 --nocapture
fi

for spec in "resnet18 256" "resnet56 64"; do
  set -- $spec
  for dt in bf16 f32; do
    run "ours $1 batch $2 $dt (autograd)" 120 "$BIN" bench train --model "$1" --batch "$2" --device cuda --dtype "$dt" --warmup 10 --steps 50
    [ "$dt" = bf16 ] && run "ours $1 batch $2 $dt (planned)" 120 env LDL_GPU_PLAN=1 "$BIN" bench train --model "$1" --batch "$2" --device cuda --dtype "$dt" --warmup 10 --steps 50
    run "ours $1 batch $2 $dt (planned + CUDA graphs)" 120 env LDL_GPU_PLAN=1 LDL_GPU_GRAPH=1 "$BIN" bench train --model "$1" --batch "$2" --device cuda --dtype "$dt" --warmup 10 --steps 50
    [ "$dt" = bf16 ] && run "ours $1 batch $2 $dt (planned + CUDA graphs + NHWC)" 120 env LDL_GPU_PLAN=1 LDL_GPU_GRAPH=1 LDL_GPU_NHWC=1 "$BIN" bench train --model "$1" --batch "$2" --device cuda --dtype "$dt" --warmup 10 --steps 50
  done
  run "torch $1 batch $2" 180 python3 benches/torch_train.py --model "$1" --batch "$2" --device cuda --warmup 10 --steps 50
  for plan in 0 1; do
    run "profile: ours $1 batch $2 bf16, LDL_GPU_PLAN=$plan LDL_GPU_NHWC=$plan" 120 env LDL_GPU_PLAN=$plan LDL_GPU_NHWC=$plan "$BIN" bench train --model "$1" --batch "$2" --device cuda --dtype bf16 --warmup 5 --steps 20 --profile
  done
done

# The On-LDL step of issue 23: a ResNet-20 student, a ResNet-110 teacher applied to every batch.
run "ours On-LDL resnet20 + teacher resnet110, batch 64 bf16 (autograd)" 120 "$BIN" bench train --model resnet20 --teacher resnet110 --batch 64 --device cuda --dtype bf16 --warmup 10 --steps 50
run "ours On-LDL resnet20 + teacher resnet110, batch 64 bf16 (planned + CUDA graphs)" 120 env LDL_GPU_PLAN=1 LDL_GPU_GRAPH=1 "$BIN" bench train --model resnet20 --teacher resnet110 --batch 64 --device cuda --dtype bf16 --warmup 10 --steps 50
run "ours On-LDL resnet20 + teacher resnet110, batch 64 bf16 (planned + CUDA graphs + NHWC)" 120 env LDL_GPU_PLAN=1 LDL_GPU_GRAPH=1 LDL_GPU_NHWC=1 "$BIN" bench train --model resnet20 --teacher resnet110 --batch 64 --device cuda --dtype bf16 --warmup 10 --steps 50
run "torch On-LDL resnet20 + teacher resnet110, batch 64" 180 python3 benches/torch_train.py --model resnet20 --teacher resnet110 --batch 64 --device cuda --warmup 10 --steps 50

# End to end: prepare a CIFAR-10-shaped synthetic set, train two epochs, read the log.
e2e() { # model batch dtype
  cat <<EOF
[run]
output = "e2e-$1-$3"
seed = 0
device = "cuda"
threads = 12
[[stage]]
name = "data"
kind = "prepare"
source = "synthetic"
train_size = 50000
test_size = 1000
[[stage]]
name = "student"
kind = "train"
needs = ["data"]
model = "$1"
method = "vanilla"
epochs = 2
batch_size = $2
dtype = "$3"
schedule = { type = "cosine" }
EOF
}
for spec in "resnet18 256 bf16" "resnet56 64 bf16"; do
  set -- $spec
  for plan in 0 1; do
    e2e "$@" | sed "s/^output = \"e2e-/output = \"e2e-plan$plan-/" > "$OUT/e2e-$1-plan$plan.toml"
    run "pipeline run: 2 epochs of $1 batch $2 $3, LDL_GPU_PLAN=$plan LDL_GPU_GRAPH=$plan LDL_GPU_NHWC=$plan (loader included)" 150 env LDL_GPU_PLAN=$plan LDL_GPU_GRAPH=$plan LDL_GPU_NHWC=$plan "$BIN" run "$OUT/e2e-$1-plan$plan.toml"
    cat "$OUT/e2e-plan$plan-$1-$3/student/train_log.csv" 2>/dev/null | cut -c1-200 | tee -a "$OUT/bench.md"
  done
done

[ "${SKIP_RESUME:-0}" = 1 ] || RESUME_DEVICE=cuda LDL_GPU_PLAN=1 LDL_GPU_GRAPH=1 LDL_GPU_NHWC=1 scripts/resume-check.sh "$BIN" "$OUT/resume" 2>&1 | tee -a "$OUT/bench.md"

[ "${CURVES:-0}" = 1 ] || exit 0
# A short pipeline on synthetic data, on the GPU (f32 and bf16) and on the CPU: same stages, seed.
cfg() { # device dtype
  cat <<EOF
[run]
output = "run-$1-$2"
seed = 0
device = "$1"
threads = 12
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
dtype = "$2"
schedule = { type = "cosine" }
[[stage]]
name = "eval"
kind = "evaluate"
needs = ["data", "teacher"]
EOF
}
for dd in "cuda f32" "cuda bf16" "cpu f32"; do
  set -- $dd
  cfg "$1" "$2" > "$OUT/stages-$1-$2.toml"
  run "pipeline run on $1 ($2)" 150 "$BIN" -q run "$OUT/stages-$1-$2.toml"
  cat "$OUT/run-$1-$2/teacher/train_log.csv" "$OUT/run-$1-$2/eval/metrics.md" 2>/dev/null | cut -c1-160 | tee -a "$OUT/bench.md"
done
