"""Particle's official JavaScript client (particle-api-js, pinned in tests/js/package-lock.json
and installed by scripts/bootstrap.sh) drives the team endpoints of a live server (issue 13,
finding 11): ``inviteTeamMember``, ``listTeamMembers``, ``removeTeamMember``, ``login`` of the
invited member, and an API user limited to one product and scope.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import trio

from tests.conftest import Api

JS_DIR = Path(__file__).parent / "js"
NODE = shutil.which("node")
PASSWORD = "correct horse battery"
DEVICE = "0123456789abcdef01234567"

pytestmark = pytest.mark.skipif(
    NODE is None, reason="Node.js is not installed (scripts/bootstrap.sh then skips tests/js)"
)


async def test_particle_api_js_manages_the_team(api: Api) -> None:
    if not (JS_DIR / "node_modules" / "particle-api-js").is_dir():
        pytest.fail("particle-api-js is not installed: run bash scripts/bootstrap.sh "
                    "(it runs npm ci in tests/js)")
    assert NODE is not None
    product = await api.create_product("JS Widget")
    slug = product["slug"]
    assert (await api.upload(slug, 1)).status_code == 201
    assert (await api.client.post(f"/v1/products/{slug}/devices", json={"id": DEVICE})
            ).status_code == 200
    await api.create_product("Someone Else's")
    await trio.to_thread.run_sync(lambda: api.handle.fleet.create_user_sync(
        "js@example.com", PASSWORD, "none"))

    result = await trio.run_process(
        [NODE, "team.js", api.handle.api_url, api.token, slug, "js@example.com", PASSWORD],
        cwd=JS_DIR, capture_stdout=True, capture_stderr=True, check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    out = json.loads(result.stdout)

    assert out["invite"]["statusCode"] == 200 and out["invite"]["body"]["ok"] is True
    assert out["team"]["ok"] is True
    assert [(m["username"], m["role"]["id"]) for m in out["team"]["team"]] == [
        ("js@example.com", "viewer")]
    assert [p["slug"] for p in out["memberProducts"]["products"]] == [slug]

    created = out["created"]
    assert created["ok"] is True and created["created"]["is_programmatic"] is True
    assert created["created"]["scopes"] == ["devices:list"]
    assert [d["id"] for d in out["botDevices"]["devices"]] == [DEVICE]
    assert out["botListProductsStatus"] == 403
    assert out["botFirmwareStatus"] == 403

    assert out["remove"]["statusCode"] == 204
    assert out["memberAfterRemoveStatus"] == 404
    assert [m["username"] for m in out["teamAfter"]["team"]] == [
        created["created"]["username"]]
