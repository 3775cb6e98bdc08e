#!/usr/bin/env bash
# Create .venv (if needed) and install the project with its dev tools, building the
# Cython kernels in place. Idempotent: a second run with nothing changed installs nothing
# (a stamp in .venv records what the last install was made from); OTA_BOOTSTRAP_FORCE=1
# installs again regardless.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi

# Particle's JavaScript client for tests/test_particle_api_js.py, at the versions pinned in
# tests/js/package-lock.json (npm ci installs exactly those; again only when the lock changed).
# It runs in the background while pip installs: npm mostly waits on the disk and network,
# the kernels' build keeps the cores busy.
npm_pid=""
build_cfg=""
# Nothing outlives the script: on any exit, npm is waited for and the temporary file goes.
trap 'if [ -n "$npm_pid" ]; then wait "$npm_pid" 2>/dev/null || true; fi; rm -f "$build_cfg"' EXIT
if command -v npm >/dev/null; then
    if [ ! -f tests/js/node_modules/.package-lock.json ] \
        || [ tests/js/package-lock.json -nt tests/js/node_modules/.package-lock.json ]; then
        (cd tests/js && npm ci --no-audit --no-fund --loglevel=error >/dev/null) &
        npm_pid=$!
    fi
else
    echo "warning: npm not found: install Node.js (20+) to run the particle-api-js test" >&2
fi

# What the editable install is made from: the interpreter, the dependencies and build
# settings, the kernels' sources. The same digest as the last install, and every kernel
# built, means there is nothing to do (pip would still rebuild every kernel: ~30 s of CPU).
install_digest() {
    {
        .venv/bin/python -VV
        echo "OTA_NO_NATIVE_BUILD=${OTA_NO_NATIVE_BUILD:-}"
        cat pyproject.toml setup.py ext/*.pyx ext/*.h
    } | sha256sum | cut -d' ' -f1
}
kernels_built() {
    local pyx
    for pyx in ext/*.pyx; do
        pyx=${pyx#ext/}
        compgen -G "otacore/_${pyx%.pyx}.cpython-*.so" >/dev/null || return 1
    done
}
stamp=.venv/.otacloud-install
digest=$(install_digest)
if [ "${OTA_BOOTSTRAP_FORCE:-0}" != 1 ] && [ "$(cat "$stamp" 2>/dev/null)" = "$digest" ] \
    && { [ "${OTA_NO_NATIVE_BUILD:-}" = 1 ] || kernels_built; } \
    && .venv/bin/python -c "import importlib.metadata as m; m.version('otacloud')" 2>/dev/null
then
    echo "bootstrap: .venv is up to date with pyproject.toml, setup.py and ext/ (nothing installed)"
else
    rm -f "$stamp"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    # The kernels compile one per core (setuptools' build --parallel, set through
    # distutils' DIST_EXTRA_CONFIG since pip gives an editable build no command options;
    # the editable build re-creates build_ext, which then takes it from [build]).
    build_cfg=$(mktemp)
    printf '[build]\nparallel = %s\n' "$(nproc 2>/dev/null || echo 2)" >"$build_cfg"
    DIST_EXTRA_CONFIG=$build_cfg \
        .venv/bin/python -m pip install -q -e '.[dev,bench]'  # bench: the delta peers and plots some tests run
    echo "$digest" >"$stamp"
fi

if [ -n "$npm_pid" ]; then
    pid=$npm_pid
    npm_pid=""
    wait "$pid"  # its failure fails the script (set -e)
fi
