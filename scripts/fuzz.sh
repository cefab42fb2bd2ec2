#!/usr/bin/env bash
# Runs the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer; needs a nightly toolchain) for SECONDS
# each (default 600), JOBS at a time (default 2), each starting from its seed corpus in
# fuzz/corpus/<target>/ (read only) and collecting new inputs in fuzz/work/<target>/. A crash
# leaves its input in fuzz/artifacts/<target>/ and fails the script; add it to the target's
# regression test (tests/malformed.rs or the module's tests) once fixed.
#
#   bash scripts/fuzz.sh                 # every target, 10 minutes each
#   bash scripts/fuzz.sh 60 config packed
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-600}
shift || true
TARGETS=${*:-config datasets packed label_store checkpoint import}
JOBS=${JOBS:-2}
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
cargo +nightly fuzz build --fuzz-dir fuzz -O >&2
status=0
running=0
for t in $TARGETS; do
  mkdir -p "fuzz/work/$t" "fuzz/artifacts/$t"
  (
    cargo +nightly fuzz run --fuzz-dir fuzz -O "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$SECS" -rss_limit_mb=4096 -timeout=30 \
      -artifact_prefix="fuzz/artifacts/$t/" > "fuzz/work/$t.log" 2>&1
    echo "$t: exit $? — $(grep -E '^(#[0-9]+|Done)' "fuzz/work/$t.log" | tail -1)"
  ) &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || status=1
    running=$((running - 1))
  fi
done
while [ "$running" -gt 0 ]; do
  wait -n || status=1
  running=$((running - 1))
done
if ls fuzz/artifacts/*/* >/dev/null 2>&1; then
  echo "crashes:" && ls fuzz/artifacts/*/*
  status=1
fi
exit $status
