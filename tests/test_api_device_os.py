"""``/v1/device-os``: an upload answers with the name the module is stored and listed under."""

from __future__ import annotations

import hashlib

from otacore.module import build_module, parse_module
from otacore.platforms import ModuleFunction
from tests.conftest import Api


async def test_an_upload_answers_with_the_stored_files_sha256(api: Api) -> None:
    module = build_module(b"\x22" * 3000, platform_id=13, function=ModuleFunction.SYSTEM_PART,
                          index=1, version=5003)
    uploaded = await api.client.post("/v1/device-os", files={"binary": ("system.bin", module)})
    assert uploaded.status_code == 201, uploaded.text
    body = uploaded.json()
    # The file's SHA-256 names the module (what devices fetch as fw/<sha256> and the list
    # shows); the digest in the module's suffix (over all but its last 38 bytes) differs.
    assert body["sha256"] == hashlib.sha256(module).hexdigest()
    assert body["module_sha256"] == parse_module(module).stored_sha256.hex() != body["sha256"]
    assert body["size"] == len(module)
    listed = await api.client.get("/v1/device-os")
    assert [m["sha256"] for m in listed.json()] == [body["sha256"]]
