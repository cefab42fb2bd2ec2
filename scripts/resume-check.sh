#!/usr/bin/env bash
# Resume on a device, end to end: a student (ResNet-20 on synthetic CIFAR-shaped data, 3 epochs,
# a checkpoint every 8 steps) trained once uninterrupted, and once killed with SIGKILL as soon
# as its second checkpoint is complete and rerun to the end. The final weights of the two are
# compared byte for byte; where they differ, the largest difference per tensor is printed.
#
#   scripts/resume-check.sh [PIPELINE_BINARY] [OUTPUT_FOLDER]
#
# RESUME_DEVICE (cpu or cuda, default cpu) and RESUME_DTYPE (default bf16 on cuda, f32 on the
# CPU) choose the device; LDL_GPU_PLAN=1 in the environment takes the planned CUDA step.
# Exit status 0 when the weights are equal, 1 otherwise. scripts/gpu-bench.sh runs it on CUDA.
set -u
BIN=${1:-target/release/pipeline}
OUT=${2:-resume-check-out}
DEV=${RESUME_DEVICE:-cpu}
DT=${RESUME_DTYPE:-$([ "$DEV" = cuda ] && echo bf16 || echo f32)}
rm -rf "$OUT" && mkdir -p "$OUT"

cfg() { # output folder
  cat <<TOML
[run]
output = "$1"
seed = 3
device = "$DEV"
threads = 4
[[stage]]
name = "data"
kind = "prepare"
source = "synthetic"
train_size = 2048
test_size = 128
[[stage]]
name = "student"
kind = "train"
needs = ["data"]
model = "resnet20"
method = "vanilla"
epochs = 3
batch_size = 128
checkpoint_every = 8
dtype = "$DT"
schedule = { type = "cosine" }
TOML
}
cfg whole > "$OUT/whole.toml"
cfg killed > "$OUT/killed.toml"

t0=$SECONDS
"$BIN" -q run "$OUT/whole.toml" || { echo "resume-check: the uninterrupted run failed"; exit 1; }
echo "resume-check ($DEV, $DT, LDL_GPU_PLAN=${LDL_GPU_PLAN:-0}): uninterrupted run $((SECONDS - t0)) s"

"$BIN" -q run "$OUT/killed.toml" &
pid=$!
# Killed once two checkpoints are complete (a `step-*` folder is only ever complete).
while kill -0 "$pid" 2>/dev/null; do
  n=$(find "$OUT/killed" -path '*checkpoints/step-*' -name state.json 2>/dev/null | wc -l)
  [ "$n" -ge 2 ] && break
  sleep 0.05
done
if kill -9 "$pid" 2>/dev/null; then
  wait "$pid" 2>/dev/null
  echo "resume-check: killed after $(find "$OUT/killed" -path '*checkpoints/step-*' -name state.json | sed 's|.*/step-0*\([0-9]*\)/.*|\1|' | sort -n | tr '\n' ' ')(steps checkpointed)"
else
  echo "resume-check: the run ended before it could be killed (make it longer)"
  exit 1
fi
"$BIN" -q run "$OUT/killed.toml" || { echo "resume-check: the resumed run failed"; exit 1; }

a="$OUT/whole/student/model.safetensors"
b="$OUT/killed/student/model.safetensors"
if cmp -s "$a" "$b"; then
  echo "resume-check: final weights bitwise equal ($(stat -c %s "$a") bytes)"
  exit 0
fi
echo "resume-check: final weights differ"
python3 - "$a" "$b" <<'PY'
import json, struct, sys
import numpy as np
def load(p):
    raw = open(p, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    kinds = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "U32": np.uint32}
    return {k: np.frombuffer(body[v["data_offsets"][0]:v["data_offsets"][1]], kinds[v["dtype"]])
            for k, v in head.items() if k != "__metadata__"}
a, b = load(sys.argv[1]), load(sys.argv[2])
for k in sorted(a):
    d = np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max() if a[k].size else 0.0
    s = np.abs(a[k].astype(np.float64)).max() if a[k].size else 0.0
    if d > 0:
        print(f"  {k}: max |diff| {d:.3e} (max |value| {s:.3e})")
PY
exit 1
