#!/usr/bin/env bash
# Creates the Python environment of the interoperability test (tests/python_interop.rs): a virtual
# environment with pinned pyarrow, DuckDB, Polars and NumPy, from PyPI wheels. Prints the path of
# its python, and nothing else on stdout, so that
#
#   export LDL_PYTHON=$(bash scripts/python-env.sh)      # default folder: .venv-interop
#   bash scripts/python-env.sh /tmp/ldl-venv             # another folder
#
# The interoperability test runs this itself when LDL_PYTHON is unset.
# Idempotent: an environment that already holds exactly these pins (recorded in its
# `ldl-requirements.txt`) is reused in well under a second; one with other pins is updated.
# Environment: PYTHON (the interpreter to create it with, default python3, CPython >= 3.10).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$ROOT/.venv-interop}
PYTHON=${PYTHON:-python3}

# Pins: versions with CPython 3.11 x86-64 manylinux wheels. Polars pins its runtime wheel
# (polars-runtime-32) exactly; the others have no further dependencies.
REQUIREMENTS="numpy==2.4.6
pyarrow==26.0.1
duckdb==2.0.1
polars==2.1.0"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PY=$DIR/bin/python
STAMP=$DIR/ldl-requirements.txt

# One creator at a time (tests run in parallel may all ask for it): the others wait, then reuse.
exec 9>"$DIR/.lock"
flock 9

if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$REQUIREMENTS" ]; then
  echo "$PY"
  exit 0
fi

if [ ! -x "$PY" ]; then
  echo "python-env: creating $DIR with $("$PYTHON" --version 2>&1)" >&2
  "$PYTHON" -m venv "$DIR" >&2
fi
rm -f "$STAMP"
echo "python-env: installing $(echo "$REQUIREMENTS" | tr '\n' ' ')" >&2
printf '%s\n' "$REQUIREMENTS" > "$DIR/requirements.in"
# Wheels only: a source build would need compilers and minutes, and would not be what users get.
"$PY" -m pip install --quiet --disable-pip-version-check --no-input --only-binary :all: \
  -r "$DIR/requirements.in" >&2
"$PY" -c 'import numpy, pyarrow, pyarrow.dataset, duckdb, polars' >&2
printf '%s' "$REQUIREMENTS" > "$STAMP"
echo "$PY"
