#!/usr/bin/env bash
# Packs what the GPU machine needs from this one for scripts/gpu-bench.sh: the CUDA `pipeline`
# binary and the GPU test binary (scripts/build-cuda.sh with TESTS=1), stripped and
# xz-compressed into gpu-pack/ (ignored by git). The device tool carries at most 64 MiB with the
# working tree; the two binaries without debug info are ~135 MB, packed ~18 MB.
#
#   TESTS=1 scripts/build-cuda.sh && scripts/gpu-pack.sh
#   device run, carry ["gpu-pack"]:  PARTS="tests pairs" scripts/gpu-bench.sh gpu-pack "" $OUT
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PACK=gpu-pack
TESTBIN=$(cat target/cuda/gpu_ops.path 2>/dev/null || true)
[ -x target/cuda/release/pipeline ] || { echo "gpu-pack.sh: no target/cuda/release/pipeline (scripts/build-cuda.sh)" >&2; exit 1; }
[ -n "$TESTBIN" ] && [ -x "$TESTBIN" ] || { echo "gpu-pack.sh: no GPU test binary (TESTS=1 scripts/build-cuda.sh)" >&2; exit 1; }
rm -rf "$PACK" && mkdir -p "$PACK"
for pair in "pipeline target/cuda/release/pipeline" "gpu_ops $TESTBIN"; do
  set -- $pair
  # Debug info dropped, symbols kept: a panic there still names its functions.
  strip --strip-debug -o "$PACK/$1" "$2"
  xz -T0 -6 "$PACK/$1"
done
git describe --always --dirty > "$PACK/commit"
du -ch "$PACK"/* | tail -n 1
# What the device tool carries besides: tracked and untracked-but-not-ignored files.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1 || true)
pack=$(du -cb "$PACK"/* | tail -n 1 | cut -f1)
echo "gpu-pack.sh: $((pack / 1048576)) MiB packed + $((tree / 1048576)) MiB tracked tree (limit 64 MiB)"
[ $((pack + tree)) -lt $((64 * 1048576)) ] || { echo "gpu-pack.sh: over the device tool's 64 MiB" >&2; exit 1; }
