#!/usr/bin/env bash
# Create .venv (if needed) and install the project with its dev tools, building the
# Cython kernels in place. Idempotent: a second run only refreshes what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
