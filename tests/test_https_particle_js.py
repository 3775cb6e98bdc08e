"""Issue 17, done-when: "a test drives the API over HTTPS with particle-api-js's base URL
pointing to https://, the installation's CA trusted".

The server serves HTTPS with a certificate ``ota admin api-cert`` issued from the
installation CA; Node.js trusts that CA through ``NODE_EXTRA_CA_CERTS`` (certificate checks
stay on: ``tests/js/https.js`` sets no ``rejectUnauthorized`` and the environment no
``NODE_TLS_REJECT_UNAUTHORIZED``). Particle's client signs in, uploads and releases a
firmware and lists the product's firmware and devices. Without the CA the same script
fails at its first call on the certificate.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import trio

from tests.test_https import HttpsApi, https_api  # noqa: F401  (the fixture)
from tests.test_ota_e2e_kit import app
from tests.test_particle_api_js import DEVICE, JS_DIR, NODE, PASSWORD

pytestmark = pytest.mark.skipif(
    NODE is None, reason="Node.js is not installed (scripts/bootstrap.sh then skips tests/js)"
)


def _node_env(ca_file: Path | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("NODE_EXTRA_CA_CERTS", "NODE_TLS_REJECT_UNAUTHORIZED")}
    if ca_file is not None:
        env["NODE_EXTRA_CA_CERTS"] = str(ca_file)
    return env


async def _run_js(server: HttpsApi, firmware: Path, ca_file: Path | None,
                  ) -> subprocess.CompletedProcess[bytes]:
    assert NODE is not None
    return await trio.run_process(
        [NODE, "https.js", server.handle.api_url, "js@example.com", PASSWORD, "js-https",
         str(firmware)],
        cwd=JS_DIR, env=_node_env(ca_file), capture_stdout=True, capture_stderr=True,
        check=False)


async def test_particle_api_js_drives_the_api_over_https(https_api: HttpsApi,  # noqa: F811
                                                          tmp_path: Path) -> None:
    if not (JS_DIR / "node_modules" / "particle-api-js").is_dir():
        pytest.fail("particle-api-js is not installed: run bash scripts/bootstrap.sh "
                    "(it runs npm ci in tests/js)")
    script = (JS_DIR / "https.js").read_text()
    assert "rejectUnauthorized" not in script.split("'use strict';", 1)[1]
    assert https_api.handle.api_url.startswith("https://")
    async with https_api.client() as client:
        created = await client.post("/v1/products", json={"name": "JS HTTPS",
                                                          "platform_id": 13})
        assert created.status_code == 201, created.text
        added = await client.post("/v1/products/js-https/devices", json={"id": DEVICE})
        assert added.status_code == 200, added.text
    await trio.to_thread.run_sync(lambda: https_api.handle.fleet.create_user_sync(
        "js@example.com", PASSWORD, "owner"))
    firmware = tmp_path / "app.bin"
    firmware.write_bytes(app(1))

    refused = await _run_js(https_api, firmware, ca_file=None)
    assert refused.returncode == 1
    assert b"UNABLE_TO_VERIFY_LEAF_SIGNATURE" in refused.stderr, refused.stderr.decode()

    result = await _run_js(https_api, firmware, ca_file=https_api.ca_file)
    assert result.returncode == 0, result.stderr.decode()
    out = json.loads(result.stdout)
    assert out["login"] == {"statusCode": 200, "tokenType": "bearer"}
    assert out["product"]["product"]["slug"] == "js-https"
    assert out["upload"]["statusCode"] == 201, out["upload"]
    assert out["upload"]["body"]["version"] == 1
    assert out["release"]["statusCode"] == 200, out["release"]
    assert [(f["version"], f["title"], f["product_default"]) for f in out["firmware"]] == [
        (1, "over https", True)]
    assert [d["id"] for d in out["devices"]["devices"]] == [DEVICE]
