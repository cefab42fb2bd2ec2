#!/usr/bin/env bash
# CPU training speed beside PyTorch, in alternating runs on one machine: for each model and
# batch, ROUNDS times in turn, `pipeline bench train` with the planned step, the same with
# candle's autograd (`--no-plan`, the step before the plan existed) and benches/torch_train.py
# (PyTorch eager f32, its default threads). Prints one row per run: images/s and peak RSS.
#
#   cargo build --release -p pipeline
#   PY=/path/to/venv/bin/python benches/cpu-pairs.sh
#   CASES="resnet20:64" ROUNDS=5 benches/cpu-pairs.sh
#   CASES="resnet18:16:28 densenet121:64 dla:64" benches/cpu-pairs.sh   # model:batch[:image size]
#
# DenseNet and DLA have no planned step: their "planned" and "autograd" runs are the same step.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/pipeline}
PY=${PY:-python3}
ROUNDS=${ROUNDS:-3}
CASES=${CASES:-"resnet20:64 resnet56:64 resnet18:256"}
WARMUP=${WARMUP:-3}
STEPS=${STEPS:-10}

# Runs "$@" under GNU time; prints "<images/s column of the model's table row> <peak RSS in MiB>".
measure() {
  local col=$1 model=$2
  shift 2
  local out rss
  out=$(/usr/bin/time -f "RSS %M" "$@" 2>&1)
  rss=$(echo "$out" | awk '/^RSS/ {printf "%.0f", $2 / 1024}')
  echo "$out" | awk -F'|' -v c="$col" -v r="$rss" -v m="$model" \
    '{name = $2; gsub(/ /, "", name)} name == m {gsub(/ /, "", $c); print $c, r; exit}'
}

echo "| round | model | batch | ours, planned (img/s) | ours, autograd (img/s) | PyTorch f32 (img/s) | planned / PyTorch | RSS planned / autograd / PyTorch (MiB) |"
echo "|---:|---|---:|---:|---:|---:|---:|---|"
for round in $(seq 1 "$ROUNDS"); do
  for case in $CASES; do
    IFS=: read -r model batch size <<< "$case"
    size=${size:-32}
    args=(bench train --device cpu --model "$model" --batch "$batch" --image-size "$size"
      --warmup "$WARMUP" --steps "$STEPS")
    read -r planned rss_p < <(measure 6 "$model" "$BIN" "${args[@]}")
    read -r autograd rss_a < <(measure 6 "$model" "$BIN" "${args[@]}" --no-plan)
    read -r torch rss_t < <(measure 5 "$model" "$PY" benches/torch_train.py --model "$model" \
      --batch "$batch" --image-size "$size" --device cpu --modes f32 --warmup "$WARMUP" --steps "$STEPS")
    ratio=$(awk -v a="$planned" -v b="$torch" 'BEGIN {printf "%.2f", a / b}')
    echo "| $round | $model | $batch (${size}×$size) | $planned | $autograd | $torch | $ratio | $rss_p / $rss_a / $rss_t |"
  done
done
