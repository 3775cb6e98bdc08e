"""Every ``ota`` command that takes ``--data`` also reads ``OTA_DB_URL`` (issue 16, item 4):
with only that variable set, to a SQLite file outside the data directory, the direct store
commands (product create, admin user/token/client, device provision, product rotate-key,
device cert-info), a real ``ota server`` and the API commands through it (firmware upload
and release, device lock, team add) all use one store, and the data directory holds no
database of its own."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from server.cli.main import app
from server.store import Store
from tests.ota_server_process import start_ota_server

runner = CliRunner()
PASSWORD = "correct horse battery"


def _ota(env: dict[str, str], *args: str) -> str:
    result = runner.invoke(app, list(args), env=env)
    assert result.exit_code == 0, (args, result.output)
    return result.output


def _json(env: dict[str, str], *args: str) -> Any:
    return json.loads(_ota(env, *args, "--json"))


def test_every_data_command_and_the_server_share_the_store_ota_db_url_names(
    tmp_path: Path, make_firmware,
) -> None:
    data, creds = tmp_path / "data", tmp_path / "creds"
    database = tmp_path / "elsewhere" / "fleet.db"
    url = f"sqlite:///{database}"
    env = {"OTA_DB_URL": url}
    d = str(data)

    _ota(env, "device", "pki-init", "--data", d)
    product = _json(env, "product", "create", "Sensors", "--platform-id", "13", "--data", d)
    slug = product["slug"]
    _ota(env, "admin", "user", "alice@example.com", "--password", PASSWORD, "--data", d)
    token = _json(env, "admin", "token", "--data", d)["access_token"]
    client = json.loads(_ota(env, "admin", "client", "ci", "--data", d))
    devices = _json(env, "device", "provision", "--data", d, "--product", slug,
                    "--count", "2", "--out", str(creds))
    rotated = _json(env, "product", "rotate-key", "--data", d, "-p", slug)
    info = _json(env, "device", "cert-info", devices[0]["cert"], "--data", d)
    assert info["device_registered"] and info["issued_by_this_server"], info
    assert database.is_file() and not (data / "ota.db").exists()

    # The server reads OTA_DB_URL too: the token made above works against it.
    server = start_ota_server(data, tmp_path / "server.log",
                              env={**os.environ, "OTA_DB_URL": url})
    try:
        api_env = {**env, "OTA_API_URL": server.api_url, "OTA_TOKEN": token,
                   "OTA_PRODUCT": slug}
        image = tmp_path / "v1.bin"
        image.write_bytes(make_firmware(1))
        _json(api_env, "firmware", "upload", str(image), "--version", "1", "--title", "v1")
        _json(api_env, "firmware", "release", "--version", "1", "--product-default",
              "--force")
        _json(api_env, "device", "lock", devices[1]["id"], "--version", "1")
        _json(api_env, "product", "team", "add", "alice@example.com", "--role", "developer")
        listing = _json(api_env, "device", "list")
        listed = {d["id"] for d in listing.get("devices", listing)}
        assert listed >= {devices[0]["id"], devices[1]["id"]}
    finally:
        assert server.stop() == 0, server.tail()

    assert not (data / "ota.db").exists(), "a command opened the embedded store instead"
    store = Store.open(url, data / "blobs", pool_size=1)
    try:
        with store.read() as tx:
            record = tx.get_product(slug)
            assert record is not None
            alice = tx.get_user("alice@example.com")
            assert alice is not None
            assert tx.get_member(record.id, alice.id) is not None
            assert tx.get_client(client["client_id"]) is not None
            firmware = tx.list_firmware(record.id)
            assert [fw.version for fw in firmware] == [1]
            assert store.blobs.exists(firmware[0].sha256)
            locked = tx.get_device(devices[1]["id"])
            assert locked is not None and locked.desired_firmware_version == 1
            actions = {entry.action for entry in tx.list_audit(record.id, limit=1000)}
            assert "key.rotate" in actions, actions
    finally:
        store.close()
    assert rotated["new_key_id"] != rotated["old_key_id"]


def test_a_blank_ota_db_url_means_the_embedded_store(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {"OTA_DB_URL": ""}
    _ota(env, "product", "create", "Sensors", "--platform-id", "13", "--data", str(data))
    assert (data / "ota.db").is_file()


def test_a_bad_db_url_is_a_one_line_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["admin", "token", "--data", str(tmp_path / "d"),
                                 "--db-url", "not a url"])
    assert result.exit_code == 1
    assert "not a valid SQLAlchemy URL" in result.output and "Traceback" not in result.output
