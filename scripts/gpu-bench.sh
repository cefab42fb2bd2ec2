#!/usr/bin/env bash
# The GPU checks, on one card, in parts that each fit one call of the device tool (10 minutes a
# command, 15 minutes of device time a session):
#   tests   the GPU op tests (stages/engine/tests/gpu_ops.rs: cuDNN convolutions, BatchNorm,
#           add-ReLU, SGD, the planned step NCHW and NHWC, recorded graphs, planned inference,
#           all against the CPU);
#   pairs   the side-by-side training benchmark: `pipeline bench train` against
#           benches/torch_train.py (eager f32; bf16 autocast + channels_last) for ResNet-18 at
#           batch 256 and ResNet-56 at batch 64, images/s and peak memory, and per-phase
#           profiles: candle's autograd (the default), the planned step (LDL_GPU_PLAN=1), with its
#           passes replayed as CUDA graphs (LDL_GPU_GRAPH=1), and channels-last (LDL_GPU_NHWC=1);
#   compile PyTorch's bf16 + channels_last step under torch.compile (the issue's stretch mark),
#           ResNet-18 at batch 256 and ResNet-56 at batch 64;
#   online  the On-LDL step (ResNet-20 student, ResNet-110 teacher on every batch, batch 64);
#   e2e     two epochs of a CIFAR-10-shaped student (50,000 images, crop + flip) through
#           `pipeline run`, loader included, against the step rate of `pairs`;
#   resume  a planned bf16 training with graphs and NHWC killed (SIGKILL) after a checkpoint and
#           rerun, its final weights compared byte for byte with an uninterrupted run's
#           (scripts/resume-check.sh);
#   curves  a short pipeline run on the GPU (f32, bf16) and on the CPU, same seed, loss curves;
#   sanitize  the planned-step GPU tests under compute-sanitizer's memcheck (out-of-bounds and
#           misaligned accesses of our kernels; slow, only when a test shows garbage).
#
#   PARTS="tests pairs" scripts/gpu-bench.sh [PIPELINE_BINARY | PACK_FOLDER] [GPU_OPS_TEST_BINARY] [OUTPUT_FOLDER]
#
# PARTS defaults to "tests pairs compile online e2e resume". With no GPU session's time to spare:
# first call PARTS="tests pairs" (about 6–8 minutes), then PARTS="compile online e2e resume".
# Binaries: scripts/build-cuda.sh (TESTS=1 for the test binary), carried to the GPU machine by
# scripts/gpu-pack.sh: pass its folder as the first argument (the test binary comes with it).
# Needs on the GPU machine: the NVIDIA driver, python3 with PyTorch (CUDA), and the CUDA 13 +
# cuDNN 9 libraries the binary links (found in PyTorch's cu13x wheels or a system CUDA). Only
# bench.md, last.log and the test logs (gpu_ops.log, sanitize.log) go to the output folder; runs
# and configs go to $WORK (/tmp/gpu-work), emptied of a part's earlier runs before it reruns them.
set -u
BIN=${1:-target/cuda/release/pipeline}
TESTBIN=${2:-}
OUT=${3:-gpu-bench-out}
PARTS=${PARTS:-tests pairs compile online e2e resume}
WORK=${WORK:-/tmp/gpu-work}
mkdir -p "$OUT" "$WORK"
if [ -d "$BIN" ]; then
  # A pack from scripts/gpu-pack.sh, unpacked again whenever it differs from the one unpacked
  # last (a warm machine keeps /tmp between calls).
  PACK=$BIN
  mkdir -p "$WORK/bin"
  SUM=$(cat "$PACK"/*.xz | sha256sum | cut -c1-16)
  if [ "$(cat "$WORK/bin/sum" 2>/dev/null)" != "$SUM" ]; then
    rm -f "$WORK/bin/"*
    for f in pipeline gpu_ops; do
      # Python's lzma (xz itself may be missing there), into a temporary name first.
      python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$PACK/$f.xz" "$WORK/bin/$f.tmp" &&
        chmod +x "$WORK/bin/$f.tmp" && mv "$WORK/bin/$f.tmp" "$WORK/bin/$f" || { echo "gpu-bench.sh: unpacking $f failed" >&2; exit 1; }
    done
    echo "$SUM" > "$WORK/bin/sum"
  fi
  BIN=$WORK/bin/pipeline
  TESTBIN=${TESTBIN:-$WORK/bin/gpu_ops}
fi
want() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
SP=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
for d in "$SP"/nvidia/cu13/lib "$SP"/nvidia/cudnn/lib /usr/local/cuda/lib64; do
  [ -d "$d" ] && export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-/tmp/cuda-cache}
COMMIT=$(cat "${PACK:-/nonexistent}/commit" 2>/dev/null || git describe --always --dirty 2>/dev/null)
echo "# gpu-bench.sh: $PARTS (binaries of ${COMMIT:-an unknown commit})" | tee -a "$OUT/bench.md"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/bench.md"
python3 -c 'import torch; print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())' | tee -a "$OUT/bench.md"

run() { # label, timeout, command...
  local label=$1 limit=$2; shift 2
  echo "== $label" | tee -a "$OUT/bench.md"
  local t0=$SECONDS
  timeout -k 15 "$limit" "$@" > "$OUT/last.log" 2>&1
  local rc=$?
  tail -n 30 "$OUT/last.log" | tee -a "$OUT/bench.md"
  echo "(exit $rc, $((SECONDS - t0)) s)" | tee -a "$OUT/bench.md"
}

if want tests && [ -n "$TESTBIN" ]; then
  run "GPU op tests" 300 "$TESTBIN" --test-threads 1 --nocapture
  # Every test's own lines (errors, largest deviations, replay counts), not only the tail.
  grep -E "^test |error|off by|largest|replayed|could not plan|panicked" "$OUT/last.log" | head -n 120 >> "$OUT/bench.md"
  cp "$OUT/last.log" "$OUT/gpu_ops.log"
fi

SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -n 1)
if want sanitize && [ -n "$TESTBIN" ] && [ -z "$SAN" ]; then
  echo "== compute-sanitizer not found on this machine: sanitize skipped" | tee -a "$OUT/bench.md"
elif want sanitize && [ -n "$TESTBIN" ]; then
  run "GPU planned-step tests under compute-sanitizer memcheck" 540 "$SAN" --tool memcheck --error-exitcode 9 "$TESTBIN" --test-threads 1 --nocapture planned recorded
  grep -E "=========|^test |panicked" "$OUT/last.log" | head -n 80 >> "$OUT/bench.md"
  cp "$OUT/last.log" "$OUT/sanitize.log"
fi

# Ours in the variants below, one run each, most telling first (a call cut short still returns
# them): (environment, dtype, label).
VARIANTS=(
  "LDL_GPU_PLAN=1 LDL_GPU_GRAPH=1 LDL_GPU_NHWC=1|bf16|planned + CUDA graphs + NHWC"
  "LDL_GPU_PLAN=1 LDL_GPU_GRAPH=1|bf16|planned + CUDA graphs"
  "LDL_GPU_PLAN=0|bf16|autograd"
  "LDL_GPU_PLAN=1|bf16|planned"
  "LDL_GPU_PLAN=1 LDL_GPU_GRAPH=1|f32|planned + CUDA graphs"
  "LDL_GPU_PLAN=0|f32|autograd"
)
pair_runs() { # model batch: ours in every variant, then PyTorch, then two profiles
  local v env dt label
  for v in "${VARIANTS[@]}"; do
    IFS='|' read -r env dt label <<< "$v"
    # shellcheck disable=SC2086
    run "ours $1 batch $2 $dt ($label)" 120 env $env "$BIN" bench train --model "$1" --batch "$2" --device cuda --dtype "$dt" --warmup 10 --steps 50
    [ "$v" = "${VARIANTS[1]}" ] && run "torch $1 batch $2" 180 python3 benches/torch_train.py --model "$1" --batch "$2" --device cuda --warmup 10 --steps 50
  done
  for plan in 0 1; do
    run "profile: ours $1 batch $2 bf16, LDL_GPU_PLAN=$plan LDL_GPU_NHWC=$plan" 120 env LDL_GPU_PLAN=$plan LDL_GPU_NHWC=$plan "$BIN" bench train --model "$1" --batch "$2" --device cuda --dtype bf16 --warmup 5 --steps 20 --profile
  done
}
if want pairs; then
  pair_runs resnet18 256
  pair_runs resnet56 64
fi

if want compile; then
  for spec in "resnet18 256" "resnet56 64"; do
    set -- $spec
    run "torch.compile $1 batch $2 (bf16 + channels_last)" 300 python3 benches/torch_train.py --model "$1" --batch "$2" --device cuda --modes compile --warmup 10 --steps 50
  done
fi

# The On-LDL step of issue 23: a ResNet-20 student, a ResNet-110 teacher applied to every batch.
if want online; then
run "ours On-LDL resnet20 + teacher resnet110, batch 64 bf16 (autograd)" 120 "$BIN" bench train --model resnet20 --teacher resnet110 --batch 64 --device cuda --dtype bf16 --warmup 10 --steps 50
run "ours On-LDL resnet20 + teacher resnet110, batch 64 bf16 (planned + CUDA graphs)" 120 env LDL_GPU_PLAN=1 LDL_GPU_GRAPH=1 "$BIN" bench train --model resnet20 --teacher resnet110 --batch 64 --device cuda --dtype bf16 --warmup 10 --steps 50
run "ours On-LDL resnet20 + teacher resnet110, batch 64 bf16 (planned + CUDA graphs + NHWC)" 120 env LDL_GPU_PLAN=1 LDL_GPU_GRAPH=1 LDL_GPU_NHWC=1 "$BIN" bench train --model resnet20 --teacher resnet110 --batch 64 --device cuda --dtype bf16 --warmup 10 --steps 50
run "torch On-LDL resnet20 + teacher resnet110, batch 64" 180 python3 benches/torch_train.py --model resnet20 --teacher resnet110 --batch 64 --device cuda --warmup 10 --steps 50
fi

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
want e2e && for spec in "resnet18 256 bf16" "resnet56 64 bf16"; do
  set -- $spec
  for plan in 0 1; do
    e2e "$@" | sed "s/^output = \"e2e-/output = \"e2e-plan$plan-/" > "$WORK/e2e-$1-plan$plan.toml"
    # The runner skips stages whose inputs and parameters are unchanged: a rerun must train.
    rm -rf "$WORK/e2e-plan$plan-$1-$3"
    run "pipeline run: 2 epochs of $1 batch $2 $3, LDL_GPU_PLAN=$plan LDL_GPU_GRAPH=$plan LDL_GPU_NHWC=$plan (loader included)" 150 env LDL_GPU_PLAN=$plan LDL_GPU_GRAPH=$plan LDL_GPU_NHWC=$plan "$BIN" run "$WORK/e2e-$1-plan$plan.toml"
    cat "$WORK/e2e-plan$plan-$1-$3/student/train_log.csv" 2>/dev/null | cut -c1-200 | tee -a "$OUT/bench.md"
  done
done

want resume && RESUME_DEVICE=cuda LDL_GPU_PLAN=1 LDL_GPU_GRAPH=1 LDL_GPU_NHWC=1 scripts/resume-check.sh "$BIN" "$WORK/resume" 2>&1 | tee -a "$OUT/bench.md"

want curves || exit 0
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
  cfg "$1" "$2" > "$WORK/stages-$1-$2.toml"
  rm -rf "$WORK/run-$1-$2"
  run "pipeline run on $1 ($2)" 150 "$BIN" -q run "$WORK/stages-$1-$2.toml"
  cat "$WORK/run-$1-$2/teacher/train_log.csv" "$WORK/run-$1-$2/eval/metrics.md" 2>/dev/null | cut -c1-160 | tee -a "$OUT/bench.md"
done
