#!/usr/bin/env bash
# Set everything up, then run lint, type checks and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
bash scripts/bootstrap.sh
.venv/bin/ruff check otacore server tests bench
.venv/bin/mypy
.venv/bin/ota info
# On every core (pytest-xdist); --dist loadgroup runs the tests that start whole fleets in
# subprocesses one at a time (tests/conftest.py: FLEET_MODULES). OTA_TEST_WORKERS=N sets
# the number of worker processes (0: no workers, the suite runs in this process).
.venv/bin/python -m pytest -n "${OTA_TEST_WORKERS:-auto}" --dist loadgroup "$@"
