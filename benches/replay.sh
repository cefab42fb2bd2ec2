#!/usr/bin/env bash
# Replayed online labels (issue 22, part 3): speed and storage (benches/replay-speed.toml) and
# what f16 and top-10 storage change (benches/replay-quality.toml), printed as Markdown.
#
#   benches/replay.sh          # needs target/release/pipeline and, for the teacher, torch
#
# Environment: PIPELINE (default target/release/pipeline), PYTHON (python3 with torch, to
# write the ResNet-110 teacher), DATA (the CIFAR-100 binary folder), OUT (/tmp/ldl-replay).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PIPELINE="${PIPELINE:-$ROOT/target/release/pipeline}"
PYTHON="${PYTHON:-python3}"
DATA="$(cd "${DATA:-$ROOT/../shared/data/cifar-100-binary}" && pwd)"
OUT="${OUT:-/tmp/ldl-replay}"
mkdir -p "$OUT/teacher"

TEACHER="$OUT/teacher/resnet110.pth"
[ -f "$TEACHER" ] || "$PYTHON" "$ROOT/tests/fixtures/import/make_fixtures.py" --resnet110 "$TEACHER"

for part in speed quality; do
    sed -e "s|^output = .*|output = \"$OUT/$part\"|" \
        -e "s|^path = \"../../shared.*|path = \"$DATA\"|" \
        -e "s|^path = \"../outputs/bench-replay-teacher/resnet110.pth\"|path = \"$TEACHER\"|" \
        "$ROOT/benches/replay-$part.toml" >"$OUT/$part.toml"
    "$PIPELINE" run "$OUT/$part.toml" 2>&1 | tee "$OUT/$part.log" | grep -E "done in|stored" || true
done

# Seconds of each student's epochs (train_log.csv: epoch,lr,loss,accuracy,images_per_s,seconds).
epoch_s() { awk -F, 'NR > 1 { printf "%s%.2f", (NR > 2 ? " / " : ""), $6 }' "$OUT/speed/$1/train_log.csv"; }
stage_s() { grep -E "^.*INFO $1 \(.*\): done in" "$OUT/speed.log" | sed -E 's/.*done in ([0-9.]+m?s).*/\1/'; }
rows=$((2000 * 2))
bytes() {
    local sum=0
    for f in "$OUT/speed/$1"/epoch-*.parquet; do sum=$((sum + $(stat -c %s "$f"))); done
    echo "$sum"
}
echo
echo "| ResNet-20 student, 2,000 CIFAR-100 images, CutMix, batch 64 | seconds per epoch (1 / 2) |"
echo "|---|---|"
echo "| Vanilla | $(epoch_s vanilla) |"
echo "| On-LDL, ResNet-110 teacher online | $(epoch_s on-online) |"
echo "| On-LDL, replayed (f32) | $(epoch_s on-replayed) |"
echo "| replay stage (ResNet-110 over 2 epochs of batches) | $(stage_s replay.dtype=f32) |"
echo
echo "| store (K = 100, 2 epochs × 2,000 views) | bytes | bytes per view |"
echo "|---|---|---|"
for s in replay.dtype=f32 replay.dtype=f16 replay-top10; do
    b=$(bytes "$s")
    echo "| $s | $b | $(awk -v b="$b" -v r="$rows" 'BEGIN { printf "%.1f", b / r }') |"
done
echo
echo "| On-LDL student (ResNet-8, 8 epochs, 5,000 images) | accuracy | ECE | NLL |"
echo "|---|---|---|---|"
for e in eval-teacher eval-f32 eval-f16 eval-top10; do
    python3 - "$OUT/quality/$e/metrics.json" "$e" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))["metrics"]
print(f"| {sys.argv[2]} | {100 * m['accuracy']:.2f}% | {100 * m['ece']:.2f}% | {m['nll']:.4f} |")
PY
done
