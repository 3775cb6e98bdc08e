#!/usr/bin/env bash
# Install the Debian packages the tests drive as real peers (libcoap's coap-client, openssl,
# nginx as the fleet benchmark's baseline, PostgreSQL for the store tests' throwaway cluster,
# zstd and xdelta3 as the delta benchmark's peers, Chromium for the console's browser tests,
# which Playwright drives: no browser download).
# Needs root (as on CI and the dev machines); otherwise says what is missing and goes on.
set -euo pipefail
PACKAGES=(openssl libcoap3-bin nginx postgresql zstd xdelta3 chromium)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
    echo "warning: missing Debian packages (install as root): ${missing[*]}" >&2
fi
