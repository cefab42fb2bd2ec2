#!/usr/bin/env bash
# Accuracy/calibration parity with PyTorch on real data (issue 19, item 6).
#
# Trains the same recipe on both sides, one run at a time (never both at once), seeds 0, 1, 2:
# ours through `pipeline run benches/parity-cifar10.toml` (prepare CIFAR-10 batch 1, train
# ResNet-20 Vanilla, evaluate), PyTorch through benches/torch_recipe.py, then prints a Markdown
# table of test accuracy, ECE and NLL (mean ± sample std over seeds) and seconds per run.
#
#   benches/parity.sh                       # 15 epochs, data in /work/shared/data/cifar-10-batches-bin
#   EPOCHS=1 OUT=/tmp/ldl-parity/e1 benches/parity.sh
#
# Environment: PIPELINE (default target/release/pipeline), PYTHON (default python3, needs torch
# and numpy), DATA (CIFAR-10 binary folder), EPOCHS (15), SEEDS ("0 1 2"), THREADS (2),
# OUT (/tmp/ldl-parity/run: the generated stages.toml, our output root, PyTorch's JSON lines,
# logs and table.md). Use a fresh OUT for each comparison: stages already complete under
# OUT/ours are skipped by `pipeline run`, which would make our seconds per run meaningless.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PIPELINE="${PIPELINE:-$ROOT/target/release/pipeline}"
PYTHON="${PYTHON:-python3}"
DATA="${DATA:-$ROOT/../shared/data/cifar-10-batches-bin}"
EPOCHS="${EPOCHS:-15}"
SEEDS="${SEEDS:-0 1 2}"
THREADS="${THREADS:-2}"
OUT="${OUT:-/tmp/ldl-parity/run}"

mkdir -p "$OUT/torch" "$OUT/logs"
DATA="$(cd "$DATA" && pwd)"
TOML="$OUT/parity-cifar10.toml"

# Our side's stages.toml: benches/parity-cifar10.toml with this run's epochs, seeds, data
# folder, threads and output root.
seed_list="$(echo "$SEEDS" | tr -s ' ' | sed 's/^ //; s/ $//; s/ /, /g')"
sed -e "s|^output = .*|output = \"$OUT/ours\"|" \
    -e "s|^threads = .*|threads = $THREADS|" \
    -e "s|^path = .*|path = \"$DATA\"|" \
    -e "s|^epochs = .*|epochs = $EPOCHS|" \
    -e "s|^matrix = { seed = .*|matrix = { seed = [$seed_list] }|" \
    "$ROOT/benches/parity-cifar10.toml" >"$TOML"

now() { date +%s.%N; }

echo "parity: $EPOCHS epochs, seeds $SEEDS, $THREADS threads; ours: $PIPELINE; PyTorch: $PYTHON; output $OUT" >&2
"$PIPELINE" run "$TOML" --only data -q

for seed in $SEEDS; do
    echo "parity: ours, seed $seed" >&2
    t0=$(now)
    "$PIPELINE" run "$TOML" --only "train.seed=$seed" -q 2>"$OUT/logs/ours-train-$seed.log"
    "$PIPELINE" run "$TOML" --only "eval.seed=$seed" -q 2>"$OUT/logs/ours-eval-$seed.log"
    t1=$(now)
    echo "$t0 $t1" >"$OUT/logs/ours-wall-$seed.txt"

    echo "parity: PyTorch, seed $seed" >&2
    "$PYTHON" "$ROOT/benches/torch_recipe.py" --data "$DATA" --batches 1 --model resnet20 \
        --epochs "$EPOCHS" --batch 128 --lr 0.1 --seed "$seed" --threads "$THREADS" \
        --out "$OUT/torch/seed=$seed.json" >/dev/null 2>"$OUT/logs/torch-$seed.log"
done
"$PIPELINE" run "$TOML" --only report -q

"$PYTHON" - "$OUT" "$EPOCHS" $SEEDS <<'PY' | tee "$OUT/table.md"
import json, math, os, sys

out, epochs, seeds = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def mean_std(xs):  # the report stage's convention: sample standard deviation (n - 1)
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s

rows = {"ours (candle, CPU)": [], "PyTorch (CPU)": []}
for seed in seeds:
    ev = os.path.join(out, "ours", f"eval.seed={seed}")
    m = json.load(open(os.path.join(ev, "metrics.json")))["metrics"]
    t0, t1 = map(float, open(os.path.join(out, "logs", f"ours-wall-{seed}.txt")).read().split())
    rows["ours (candle, CPU)"].append((m["accuracy"], m["ece"], m["nll"], t1 - t0))
    t = json.load(open(os.path.join(out, "torch", f"seed={seed}.json")))
    rows["PyTorch (CPU)"].append((t["accuracy"], t["ece"], t["nll"], t["seconds"]))

print(f"ResNet-20, Vanilla, CIFAR-10 data_batch_1 (10,000 train images), test_batch (10,000), "
      f"{epochs} epochs, batch 128, lr 0.1 cosine, SGD 0.9 / 5e-4, crop + flip; seeds {', '.join(seeds)}\n")
print("| framework | accuracy (%) | ECE | NLL | seconds per run |")
print("|---|---:|---:|---:|---:|")
for name, r in rows.items():
    acc, ece, nll, sec = (mean_std([x[i] for x in r]) for i in range(4))
    print(f"| {name} | {100 * acc[0]:.2f} ± {100 * acc[1]:.2f} | {ece[0]:.4f} ± {ece[1]:.4f} | "
          f"{nll[0]:.4f} ± {nll[1]:.4f} | {sec[0]:.0f} ± {sec[1]:.0f} |")
print()
print("| framework | seed | accuracy (%) | ECE | NLL | seconds |")
print("|---|---:|---:|---:|---:|---:|")
for name, r in rows.items():
    for seed, (a, e, n, s) in zip(seeds, r):
        print(f"| {name} | {seed} | {100 * a:.2f} | {e:.4f} | {n:.4f} | {s:.0f} |")
PY
