#!/usr/bin/env bash
# Resume on a device, end to end: a student (ResNet-20 on synthetic CIFAR-shaped data, 3 epochs
# of 16 steps, a checkpoint every 8 steps) trained once uninterrupted, and once killed with
# SIGKILL as soon as a checkpoint at step 16 or later is complete and rerun to the end. The final weights of the two are
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
# The newest complete checkpoint's step (a `step-*` folder is only ever complete), or 0.
newest() {
  find "$OUT/killed" -path '*checkpoints/step-*' -name state.json 2>/dev/null |
    sed 's|.*/step-0*\([0-9]*\)/.*|\1|' | sort -n | tail -1
}
# Killed once the checkpoint of step 16 (the end of the first epoch) or a later one is complete.
while kill -0 "$pid" 2>/dev/null; do
  [ "$(newest)" -ge 16 ] 2>/dev/null && break
  sleep 0.05
done
if kill -9 "$pid" 2>/dev/null; then
  wait "$pid" 2>/dev/null
  echo "resume-check: killed with the checkpoint of step $(newest) of 48 complete"
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
import array, json, struct, sys
def load(p):
    raw = open(p, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    out = {}
    for k, v in head.items():
        if k == "__metadata__" or v["dtype"] != "F32":
            continue
        a, b = v["data_offsets"]
        out[k] = array.array("f", body[a:b])
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
for k in sorted(a):
    d = max((abs(x - y) for x, y in zip(a[k], b[k])), default=0.0)
    if d > 0:
        s = max((abs(x) for x in a[k]), default=0.0)
        print(f"  {k}: max |diff| {d:.3e} (max |value| {s:.3e})")
PY
exit 1
