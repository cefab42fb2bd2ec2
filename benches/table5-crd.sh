#!/usr/bin/env bash
# Issue 20's short runs (benches/table5-crd.toml: KD, CRD, CRD+KD, SSKD and the Table 5 networks)
# with the release binary, then each run's epochs and test metrics, and the full-size Table 5
# networks' step time and parameter counts (`pipeline bench train`, CPU, batch 64, 100 classes).
#
#   DATA=../shared/data/cifar-100-binary benches/table5-crd.sh
#   ONLY="--only sskd --only eval-sskd" benches/table5-crd.sh    # some stages (inputs up to date)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release/pipeline}
OUT=${OUT:-$ROOT/outputs/bench-table5-crd}
CFG=$(mktemp --suffix .toml)
trap 'rm -f "$CFG"' EXIT
sed "s|^path = .*|path = \"${DATA:-$ROOT/../shared/data/cifar-100-binary}\"|" "$ROOT/benches/table5-crd.toml" > "$CFG"
"$BIN" run "$CFG" --output "$OUT" ${ONLY:-}
for d in "$OUT"/student.method=* "$OUT"/teacher-sskd "$OUT"/sskd "$OUT"/resnext "$OUT"/densenet "$OUT"/dla; do
  [ -f "$d/train_log.csv" ] || continue   # a stage left out by ONLY
  echo "== $(basename "$d")"; cat "$d/train_log.csv" | cut -d, -f1-6
done
for e in "$OUT"/eval-*; do
  [ -f "$e/metrics.json" ] || continue
  echo "== $(basename "$e")"; python3 -c "import json,sys; m=json.load(open(sys.argv[1]))['metrics']; print({k: round(m[k],4) for k in ('accuracy','ece','nll')})" "$e/metrics.json"
done
for m in resnext29_4x64d densenet121 dla; do
  "$BIN" bench train --model "$m" --classes 100 --batch 64 --warmup 1 --steps ${STEPS:-3} --device cpu
done
