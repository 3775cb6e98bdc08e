#!/usr/bin/env bash
# Set everything up, then run lint, type checks and the test suite. Each step says how long
# it took (on stderr), so a slow CI run shows where the time went.
set -euo pipefail
cd "$(dirname "$0")/.."
step_started=$SECONDS
step_done() {
    printf 'run-tests: %-22s %4d s\n' "$1" $((SECONDS - step_started)) >&2
    step_started=$SECONDS
}
bash scripts/system-deps.sh
step_done "Debian packages"
bash scripts/bootstrap.sh
step_done "bootstrap"
# Compiled bytecode is cached (out of the source tree, in .venv): the suite starts hundreds
# of Python processes (servers, their workers, the CLI) and pytest rewrites the asserts of
# every test module in each worker; with PYTHONDONTWRITEBYTECODE set (as some sandboxes
# do) each of them compiled everything again, ~6 s of CPU per pytest process alone.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=$PWD/.venv/pycache
.venv/bin/ruff check otacore server tests bench
step_done "ruff"
.venv/bin/mypy
step_done "mypy"
.venv/bin/ota info
# A throwaway PostgreSQL cluster for the store tests that run on PostgreSQL too
# (server/store/pg_cluster.py: initdb in a temporary directory, a free loopback port, an
# unprivileged user); the tests read its URL from OTA_TEST_PG_URL, and it goes on exit.
pg_env=$(.venv/bin/python -m server.store.pg_cluster start)  # fails the script if it fails
eval "$pg_env"
trap '.venv/bin/python -m server.store.pg_cluster stop "$OTA_TEST_PG_DIR"' EXIT
step_done "ota info, PostgreSQL"
# On every core (pytest-xdist); with --dist loadgroup the modules that start whole fleets in
# subprocesses form two work units that start first (tests/conftest.py: FLEET_GROUPS).
# OTA_TEST_WORKERS=N sets the number of worker processes (0: the suite runs in this one).
tests_status=0
.venv/bin/python -m pytest -n "${OTA_TEST_WORKERS:-auto}" --dist loadgroup "$@" || tests_status=$?
step_done "tests"
exit "$tests_status"
