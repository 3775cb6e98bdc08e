#!/usr/bin/env bash
# Set everything up, then run lint, type checks and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
bash scripts/bootstrap.sh
.venv/bin/ruff check otacore server tests bench
.venv/bin/mypy
.venv/bin/ota info
# A throwaway PostgreSQL cluster for the store tests that run on PostgreSQL too
# (server/store/pg_cluster.py: initdb in a temporary directory, a free loopback port, an
# unprivileged user); the tests read its URL from OTA_TEST_PG_URL, and it goes on exit.
pg_env=$(.venv/bin/python -m server.store.pg_cluster start)  # fails the script if it fails
eval "$pg_env"
trap '.venv/bin/python -m server.store.pg_cluster stop "$OTA_TEST_PG_DIR"' EXIT
# On every core (pytest-xdist); with --dist loadgroup the modules that start whole fleets in
# subprocesses form two work units that start first (tests/conftest.py: FLEET_GROUPS).
# OTA_TEST_WORKERS=N sets the number of worker processes (0: the suite runs in this one).
.venv/bin/python -m pytest -n "${OTA_TEST_WORKERS:-auto}" --dist loadgroup "$@"
