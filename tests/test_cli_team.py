"""``ota product team ...`` against a real server, and ``ota admin user|user-update`` on the
store (issue 13, findings 11 and 12)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner

from server.cli.main import app

runner = CliRunner()
PASSWORD = "correct horse battery"


def _ota(server: Any, *args: str, token: str | None = None) -> Any:
    env = {"OTA_API_URL": server.url, "OTA_TOKEN": token or server.token,
           "OTA_PRODUCT": "cli-team"}
    return runner.invoke(app, list(args), env=env)


def _json(server: Any, *args: str, token: str | None = None) -> Any:
    result = _ota(server, *args, "--json", token=token)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_team_workflow_through_the_cli(threaded_server: Any) -> None:
    server = threaded_server
    _json(server, "product", "create", "CLI Team", "--platform-id", "13",
          "--api-url", server.url, "--token", server.token)
    server.handle.fleet.create_user_sync("carol@example.com", PASSWORD, "none")

    added = _json(server, "product", "team", "add", "carol@example.com", "--role", "developer")
    assert added["invited"]["role"]["id"] == "developer"
    table = _ota(server, "product", "team", "list")
    assert table.exit_code == 0 and "carol@example.com" in table.output
    assert "developer" in table.output
    changed = _json(server, "product", "team", "role", "carol@example.com", "viewer")
    assert changed["updated"]["role"]["id"] == "viewer"

    created = _json(server, "product", "team", "api-user", "Dashboard",
                    "--scope", "devices:list", "--scope", "firmware:list")
    assert created["scopes"] == ["devices:list", "firmware:list"]
    token = created["tokens"][0]["token"]
    assert _json(server, "firmware", "list", token=token) == []
    refused = _ota(server, "group", "list", token=token)
    assert refused.exit_code == 1 and "groups:list" in refused.output
    text = _ota(server, "product", "team", "scopes", created["username"], "--scope",
                "groups:list")
    assert text.exit_code == 0 and "token (shown once):" in text.output
    new_token = text.output.strip().rsplit(" ", 1)[-1]
    assert _json(server, "group", "list", token=new_token) == []
    assert _ota(server, "group", "list", token=token).exit_code == 1  # the old token died

    bad = _ota(server, "product", "team", "api-user", "x", "--scope", "devices:fly")
    assert bad.exit_code == 1 and "unknown scope" in bad.output
    for user in ("carol@example.com", created["username"]):
        removed = _ota(server, "product", "team", "remove", user)
        assert removed.exit_code == 0, removed.output
    assert _json(server, "product", "team", "list")["team"] == []


def test_admin_user_update_disables_and_changes_roles(threaded_server: Any,
                                                     tmp_path: Path) -> None:
    server = threaded_server
    data = str(server.handle.store.blobs.root.parent)
    result = runner.invoke(app, ["admin", "user", "dora@example.com", "--password", PASSWORD,
                                 "--data", data])
    assert result.exit_code == 0 and "(none)" in result.output, result.output
    signed = httpx.post(f"{server.url}/oauth/token", data={
        "grant_type": "password", "username": "dora@example.com", "password": PASSWORD})
    token = signed.json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{server.url}/v1/products", headers=headers).status_code == 403

    result = runner.invoke(app, ["admin", "user-update", "dora@example.com", "--role", "viewer",
                                 "--data", data])
    assert result.exit_code == 0 and "role viewer, enabled" in result.output, result.output
    assert httpx.get(f"{server.url}/v1/products", headers=headers).status_code == 200

    result = runner.invoke(app, ["admin", "user-update", "dora@example.com", "--disable",
                                 "--data", data])
    assert result.exit_code == 0 and "disabled" in result.output
    assert httpx.get(f"{server.url}/v1/products", headers=headers).status_code == 401
    for args, message in ((["--disable", "--enable"], "not both"), ([], "nothing to change")):
        result = runner.invoke(app, ["admin", "user-update", "dora@example.com", *args,
                                     "--data", data])
        assert result.exit_code == 1 and message in result.output
    result = runner.invoke(app, ["admin", "user-update", "nobody", "--enable", "--data", data])
    assert result.exit_code == 1 and "no user 'nobody'" in result.output
