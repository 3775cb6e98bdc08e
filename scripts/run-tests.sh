#!/usr/bin/env bash
# Set everything up, then run lint, type checks and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
bash scripts/bootstrap.sh
.venv/bin/ruff check otacore server tests bench
.venv/bin/mypy
.venv/bin/ota info
# On every core (pytest-xdist); with --dist loadgroup the modules that start whole fleets in
# subprocesses form two work units that start first (tests/conftest.py: FLEET_GROUPS).
# OTA_TEST_WORKERS=N sets the number of worker processes (0: the suite runs in this one).
.venv/bin/python -m pytest -n "${OTA_TEST_WORKERS:-auto}" --dist loadgroup "$@"
