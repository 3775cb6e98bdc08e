"""``ota firmware|device|group|events`` against a real server over HTTP."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from otacore.module import build_module
from server.cli.main import app
from server.client import ApiClient

runner = CliRunner()
DEVICE = "00aa11bb22cc33dd44ee55ff"


def _ota(server: Any, *args: str) -> Any:
    env = {"OTA_API_URL": server.url, "OTA_TOKEN": server.token, "OTA_PRODUCT": "cli-fleet"}
    return runner.invoke(app, list(args), env=env)


def _json(server: Any, *args: str) -> Any:
    result = _ota(server, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_operator_workflow_through_the_cli(threaded_server: Any, tmp_path: Path) -> None:
    server = threaded_server
    created = _json(server, "product", "create", "CLI Fleet", "--platform-id", "13",
                    "--api-url", server.url, "--token", server.token)
    assert created["slug"] == "cli-fleet"

    image = build_module(bytes(range(256)) * 200, platform_id=13, function=5, version=3,
                         product_id=13, product_version=3)
    path = tmp_path / "v3.bin"
    path.write_bytes(image)
    uploaded = _json(server, "firmware", "upload", str(path), "--version", "3", "--title", "v3")
    assert uploaded["version"] == 3 and uploaded["size"] == len(image)
    listed = _json(server, "firmware", "list")
    assert [fw["version"] for fw in listed] == [3]

    # A version mismatch is refused with the server's message and a non-zero exit.
    bad = _ota(server, "firmware", "upload", str(path), "--version", "4", "--title", "x")
    assert bad.exit_code == 1 and "version" in bad.output

    assert _json(server, "device", "add", DEVICE)["updated"] == 1
    _json(server, "device", "groups", DEVICE, "beta", "field")
    _json(server, "device", "lock", DEVICE, "--version", "3")
    device = _json(server, "device", "get", DEVICE)
    assert device["desired_firmware_version"] == 3
    assert sorted(device["groups"]) == ["beta", "field"]
    assert device["targeted_firmware_release_version"] == 3
    _json(server, "device", "unlock", DEVICE)
    _json(server, "device", "develop", DEVICE)
    assert _json(server, "device", "get", DEVICE)["development"] is True
    # The list's filters (issue 17): development, online, locked, version, update status.
    page = _json(server, "device", "list", "--development", "--offline", "--unlocked",
                 "--update-status", "no_target")
    assert [d["id"] for d in page["devices"]] == [DEVICE]
    assert _json(server, "device", "list", "--locked")["devices"] == []
    assert _json(server, "device", "list", "--version", "3")["devices"] == []
    refused = _ota(server, "device", "list", "--update-status", "sideways")
    assert refused.exit_code == 1 and "update status" in refused.output

    refused = _ota(server, "firmware", "release", "--version", "3", "--group", "beta")
    assert refused.exit_code == 1 and "force" in refused.output
    released = _json(server, "firmware", "release", "--version", "3", "--group", "beta",
                     "--force")
    assert released["forced"] is True
    groups = _json(server, "group", "list")
    assert {g["name"] for g in groups} >= {"beta", "field"}
    page = _json(server, "device", "list", "--group", "beta")
    assert [d["id"] for d in page["devices"]] == [DEVICE]

    out = tmp_path / "down.bin"
    result = _ota(server, "firmware", "download", "--version", "3", "--out", str(out))
    assert result.exit_code == 0 and out.read_bytes() == image

    table = _ota(server, "device", "list")
    assert table.exit_code == 0 and DEVICE[:6] in table.output

    # The release's progress and the audit log (issue 17), as JSON and as tables.
    progress = _json(server, "firmware", "progress", "3")
    # The group's one device is a development device: no release targets it.
    assert progress["version"] == 3 and progress["target"] == 0
    assert [r["group"] for r in progress["releases"]] == ["beta"]
    shown = _ota(server, "firmware", "progress", "3")
    assert shown.exit_code == 0 and "0 targeted" in shown.output, shown.output
    missing = _ota(server, "firmware", "progress", "9")
    assert missing.exit_code == 1 and "9" in missing.output
    audit = _json(server, "audit", "--action", "firmware.", "--limit", "1")
    assert [e["action"] for e in audit["entries"]] == ["firmware.release.forced"]
    older = _json(server, "audit", "--action", "firmware.", "--before",
                  str(audit["next_before"]))
    assert [e["action"] for e in older["entries"]] == ["firmware.upload"]
    listed = _ota(server, "audit")
    assert listed.exit_code == 0 and "device" in listed.output, listed.output


def test_events_stream_shows_published_events(threaded_server: Any) -> None:
    server = threaded_server
    _ota(server, "product", "create", "CLI Fleet", "--platform-id", "13",
         "--api-url", server.url, "--token", server.token)
    results: list[Any] = []

    def listen() -> None:
        results.append(_ota(server, "events", "ota-test", "--product", "cli-fleet",
                            "--count", "1", "--json"))

    listener = threading.Thread(target=listen)
    listener.start()
    with ApiClient(server.url, server.token) as client:
        for _ in range(100):
            client._request("POST", "/v1/products/cli-fleet/events",
                            json={"name": "ota-test/hello", "data": "42"})
            listener.join(0.1)
            if not listener.is_alive():
                break
    listener.join(10)
    assert results and results[0].exit_code == 0, results
    event = json.loads(results[0].output.strip().splitlines()[0])
    assert event["event"] == "ota-test/hello" and event["data"] == "42"


def test_unreachable_server_is_one_clear_line() -> None:
    result = runner.invoke(app, ["firmware", "list", "--product", "x", "--api-url",
                                 "http://127.0.0.1:9", "--token", "t"])
    assert result.exit_code == 1 and "cannot reach" in result.output
