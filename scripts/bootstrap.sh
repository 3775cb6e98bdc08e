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
.venv/bin/python -m pip install -q -e '.[dev,bench]'  # bench: the delta peers and plots some tests run
# Particle's JavaScript client for tests/test_particle_api_js.py, at the versions pinned in
# tests/js/package-lock.json (npm ci installs exactly those; again only when the lock changed).
if command -v npm >/dev/null; then
    if [ ! -f tests/js/node_modules/.package-lock.json ] \
        || [ tests/js/package-lock.json -nt tests/js/node_modules/.package-lock.json ]; then
        (cd tests/js && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    fi
else
    echo "warning: npm not found: install Node.js (20+) to run the particle-api-js test" >&2
fi
