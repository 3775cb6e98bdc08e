#!/usr/bin/env bash
# Set everything up, then run lint, type checks and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
bash scripts/bootstrap.sh
.venv/bin/ruff check otacore server tests bench
.venv/bin/mypy
.venv/bin/ota info
.venv/bin/python -m pytest "$@"
