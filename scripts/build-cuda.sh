#!/usr/bin/env bash
# Builds the CUDA binary of `pipeline` (candle with CUDA 13) on any x86-64 Linux machine, also one
# with no GPU, no NVIDIA driver and no system CUDA: the compiler and libraries come from PyPI wheels.
#
#   scripts/build-cuda.sh               # -> target/cuda/release/pipeline
#   TESTS=1 scripts/build-cuda.sh       # also the GPU test binary (stages/engine/tests/gpu_ops.rs)
#   CLIPPY=1 scripts/build-cuda.sh      # also clippy over the `cuda` code (-D warnings)
#   HOST_TESTS=1 scripts/build-cuda.sh  # also the cuda build's engine unit tests, run here: those
#                                       # needing a GPU skip (the driver is the stub); the others,
#                                       # e.g. launches checked against the PTX, run
#
# Environment: TK (toolkit folder, default ~/.cache/cuda13-pip), CUDA_COMPUTE_CAP (default 90,
# the H100/H200; 80 for A100, 89 for L4/L40/RTX 40xx), JOBS (cargo -j, default: all cores).
#
# Steps:
#  1. pip-installs nvcc 13.0 and the CUDA 13.0 libraries (`cuda-toolkit==13.0.2`, the CUDA that
#     PyTorch 2.11's cu130 wheels use) into $TK/site, in one pip call (a second `pip install
#     --target` into a folder that already holds `nvidia/` silently skips packages);
#  2. generates a link-time stub `libcuda.so` (SONAME libcuda.so.1) from cudarc's driver bindings
#     (the driver library is not on PyPI; the stub is only linked against, never loaded);
#  3. links unversioned names (libcublas.so -> libcublas.so.13, ...) for the linker;
#  4. builds with the variables candle's build needs, into target/cuda so the CPU build's
#     artifacts are left alone.
# Running the binary needs the NVIDIA driver and the CUDA 13 libraries: point LD_LIBRARY_PATH at
# a CUDA 13 `lib64`, or at a PyTorch cu130 environment's site-packages/nvidia/cu13/lib (and
# nvidia/cudnn/lib with cuDNN). Set CUDA_CACHE_PATH to a writable folder so the PTX that candle
# embeds is JIT-compiled once, not by every process.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TK=${TK:-${XDG_CACHE_HOME:-$HOME/.cache}/cuda13-pip}
# The GPU path needs cuDNN (convolutions), so the `cuda` feature always links it.
FEATURE=cuda
mkdir -p "$TK"

PKGS=("cuda-toolkit[nvcc,crt,nvvm,cccl,cudart,cublas,curand,nvrtc]==13.0.2" "nvidia-cudnn-cu13==9.19.0.56")
if [ ! -x "$TK/site/nvidia/cu13/bin/nvcc" ] || [ ! -d "$TK/site/nvidia/cudnn" ]; then
  rm -rf "$TK/site"
  python3 -m pip install --quiet --disable-pip-version-check --target "$TK/site" "${PKGS[@]}"
fi
CU=$TK/site/nvidia/cu13
"$CU/bin/nvcc" --version | tail -1

# The stub exports every driver function cudarc binds, each returning an error code.
(cd "$ROOT" && cargo fetch --quiet)
CUDARC=$(cd "$ROOT" && cargo metadata --format-version 1 --all-features | python3 -c '
import json, os, sys
m = json.load(sys.stdin)
p = [x for x in m["packages"] if x["name"] == "cudarc"]
print(os.path.dirname(p[0]["manifest_path"]) if p else "")')
[ -n "$CUDARC" ] || { echo "build-cuda.sh: cudarc is not in the dependency graph" >&2; exit 1; }
python3 - "$CUDARC/src/driver/sys/mod.rs" "$TK/cuda_stub.c" <<'EOF'
import re, sys
src = open(sys.argv[1]).read()
names = sorted(set(re.findall(r'extern "C" \{\s*(?:#\[[^\]]*\]\s*)*fn\s+(\w+)\s*\(', src)))
with open(sys.argv[2], "w") as f:
    f.write("/* link-time stub for libcuda.so.1, generated from cudarc's driver bindings */\n")
    f.writelines(f"int {n}(void) {{ return 999; }}\n" for n in names)
print(f"libcuda stub: {len(names)} symbols")
EOF
mkdir -p "$TK/link/lib"
gcc -shared -fPIC -o "$TK/link/lib/libcuda.so" -Wl,-soname,libcuda.so.1 "$TK/cuda_stub.c"
for so in "$CU"/lib/libcublas.so.13 "$CU"/lib/libcublasLt.so.13 "$CU"/lib/libnvrtc.so.13 \
          "$CU"/lib/libcurand.so.10 "$CU"/lib/libcudart.so.13 "$TK"/site/nvidia/cudnn/lib/libcudnn.so.9; do
  [ -e "$so" ] || continue
  b=$(basename "$so")
  ln -sf "$so" "$TK/link/lib/$b"
  ln -sf "$so" "$TK/link/lib/${b%%.so*}.so"
done

export PATH=$CU/bin:$PATH
export CUDA_HOME=$TK/link              # cudarc's build script links from $CUDA_HOME/lib
export CUDARC_CUDA_VERSION=13000       # cudarc's bindings for CUDA 13.0
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}   # no nvidia-smi to ask on a build machine
export CUDAFORGE_THREADS=${JOBS:-$(nproc)}
export LD_LIBRARY_PATH=$TK/link/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
cd "$ROOT"
cargo build --release -p pipeline --features "$FEATURE" --target-dir target/cuda ${JOBS:+-j "$JOBS"}
echo "built $ROOT/target/cuda/release/pipeline (features: $FEATURE, compute capability $CUDA_COMPUTE_CAP)"
# The driver JIT-compiles our kernels' PTX on the GPU: assemble it here for the target card
# first, so a kernel ptxas refuses (or one spilling registers) shows before device time is spent.
PTX=$(ls -t target/cuda/release/build/engine-*/out/kernels.ptx | head -n 1)
"$CU/bin/ptxas" -arch="sm_$CUDA_COMPUTE_CAP" -v "$PTX" -o /dev/null 2> target/cuda/ptxas.log ||
  { cat target/cuda/ptxas.log >&2; echo "build-cuda.sh: ptxas refused $PTX" >&2; exit 1; }
echo "ptxas: $(grep -c 'Compiling entry' target/cuda/ptxas.log) kernels assemble for sm_$CUDA_COMPUTE_CAP, $(grep -c '[1-9][0-9]* bytes spill' target/cuda/ptxas.log) spill"
if [ "${TESTS:-0}" = 1 ]; then
  cargo test --release -p engine --features cuda --target-dir target/cuda --test gpu_ops --no-run \
    ${JOBS:+-j "$JOBS"} 2>&1 | tee /dev/stderr | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' > target/cuda/gpu_ops.path
  echo "built $(cat target/cuda/gpu_ops.path)"
fi
if [ "${HOST_TESTS:-0}" = 1 ]; then
  # The stub under its runtime name, in a folder of its own: never on a GPU machine's path.
  mkdir -p "$TK/stub-runtime"
  ln -sf "$TK/link/lib/libcuda.so" "$TK/stub-runtime/libcuda.so.1"
  LD_LIBRARY_PATH=$TK/stub-runtime:$LD_LIBRARY_PATH cargo test --release -p engine --features cuda \
    --target-dir target/cuda --lib ${JOBS:+-j "$JOBS"}
fi
if [ "${CLIPPY:-0}" = 1 ]; then
  cargo clippy --release -p engine --features cuda --target-dir target/cuda --all-targets \
    ${JOBS:+-j "$JOBS"} -- -D warnings
  echo "clippy: the cuda feature's code is clean"
fi
