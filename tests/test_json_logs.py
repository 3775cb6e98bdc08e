"""``ota server --log-format json`` (issue 17 item 3): every line the server processes write
to stderr is one JSON object, and what an operator greps for is there with its fields.

A real ``ota server`` (a main process and a worker) serves emulated devices over TLS 1.3 and
DTLS 1.2; an operator releases v2 through the API, the devices take it, one device is
revoked. Every stderr line must parse, carry ts/level/logger/message/origin, and the
sessions, the release, the updates and the revocation must appear as events with their
device, product, transport and version fields.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from otacore.signing import TrustStore
from server.devices.keys import TRUST_FILE, read_trust_file
from server.emulator.fleet import EmulatedFleet, FleetMember, FleetSettings, find_credentials
from server.logs import JsonFormatter, configure_logging, set_log_origin
from tests.ota_server_process import start_ota_server
from tests.server_nodes import provisioned_product
from tests.test_ota_e2e_kit import APP_V1, FAST, STEP, SYSTEM_5003, app, running, sha

V2 = app(2, size=20_000)


async def _upload(api: httpx.AsyncClient, product_id: int, version: int, image: bytes) -> None:
    response = await api.post(f"/v1/products/{product_id}/firmware",
                              data={"version": str(version), "title": f"v{version}"},
                              files={"binary": ("firmware.bin", image,
                                                "application/octet-stream")})
    assert response.status_code == 201, response.text


def _on_v2(ids: list[str]) -> Any:
    def check(fleet: EmulatedFleet) -> bool:
        return all(fleet.device(d).device.status().product_version == 2 for d in ids)
    return check


async def test_every_line_is_json_with_the_events_an_operator_greps(tmp_path: Path) -> None:
    data, creds, state = tmp_path / "data", tmp_path / "creds", tmp_path / "state"
    product_id, ids, token = await trio.to_thread.run_sync(
        partial(provisioned_product, data, creds, 2, name="Loggers"))
    trust = TrustStore.initial(product_id, read_trust_file(creds / TRUST_FILE))
    log_path = tmp_path / "server.log"
    server = await trio.to_thread.run_sync(
        lambda: start_ota_server(data, log_path, "--log-format", "json", "--workers", "2"))
    try:
        async with httpx.AsyncClient(base_url=server.api_url, timeout=60,
                                     headers={"Authorization": f"Bearer {token}"}) as api:
            files = {"binary": ("system-part1.bin", SYSTEM_5003, "application/octet-stream")}
            assert (await api.post("/v1/device-os", files=files)).status_code == 201
            await _upload(api, product_id, 1, APP_V1)
            await _upload(api, product_id, 2, V2)
            found = dict(find_credentials(creds))
            members = [FleetMember(ids[0], found[ids[0]], state / ids[0], "tcp"),
                       FleetMember(ids[1], found[ids[1]], state / ids[1], "udp")]
            fleet = EmulatedFleet(members, FleetSettings(
                server=server.tls, udp_server=server.dtls, firmware=(SYSTEM_5003, APP_V1),
                trust_store=trust, **FAST))
            async with running(fleet):
                response = await api.put(f"/v1/products/{product_id}/firmware/release",
                                         json={"version": 2, "product_default": True,
                                               "force": True})
                assert response.status_code == 200, response.text
                await fleet.wait_until(_on_v2(ids), timeout=4 * STEP)
                with trio.fail_after(STEP):  # the devices' results arrive after their reboot
                    while log_path.read_text().count('"update_finished"') < len(ids):
                        await trio.sleep(0.05)
                revoked = await api.post(f"/v1/products/{product_id}/devices/{ids[0]}/revoke")
                assert revoked.status_code == 200, revoked.text
                with trio.fail_after(STEP):  # until its session was closed and logged
                    while '"session_closed_revoked"' not in log_path.read_text():
                        await trio.sleep(0.05)
    finally:
        assert server.stop() == 0, server.tail()

    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    entries = []
    for line in lines:
        entry = json.loads(line)  # every line, of every process
        assert isinstance(entry, dict)
        assert {"ts", "level", "logger", "message", "origin"} <= entry.keys(), entry
        assert entry["level"] in ("debug", "info", "warning", "error", "critical")
        dt.datetime.fromisoformat(entry["ts"])
        entries.append(entry)
    origins = {entry["origin"] for entry in entries}
    assert any(":main-" in origin for origin in origins), origins
    assert any(":worker1-" in origin for origin in origins), origins

    def events(name: str) -> list[dict[str, Any]]:
        return [entry for entry in entries if entry.get("event") == name]

    released = events("firmware_released")
    assert [(e["product_id"], e["version"], e["forced"]) for e in released] == [
        (product_id, 2, True)]
    opened = events("session_opened")
    assert {(e["device_id"], e["transport"]) for e in opened} >= {(ids[0], "tcp"),
                                                                 (ids[1], "udp")}
    assert all(e["address"] == "127.0.0.1" for e in opened)
    started = events("update_started")
    assert {e["device_id"] for e in started} == set(ids)
    assert all((e["product_id"], e["version"], e["sha256"]) == (product_id, 2, sha(V2))
               for e in started), started
    assert {e["transport"] for e in started} == {"tcp", "udp"}
    finished = events("update_finished")
    assert {(e["device_id"], e["product_id"], e["sha256"]) for e in finished} == {
        (device_id, product_id, sha(V2)) for device_id in ids}
    assert [(e["device_id"], e["product_id"]) for e in events("device_revoked")] == [
        (ids[0], product_id)]
    assert [e["device_id"] for e in events("session_closed_revoked")] == [ids[0]]
    closed = [(e["device_id"], e["product_id"], e["transport"], e["reason"])
              for e in events("session_closed")]
    assert (ids[0], product_id, "tcp", "device revoked") in closed
    assert (ids[1], product_id, "udp", "closed by device") in closed  # its reboot
    assert events("update_failed") == []


def test_the_formatter_keeps_its_own_keys_and_writes_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    set_log_origin("node-a:main-1")
    record = logging.LogRecord("ota.devices", logging.WARNING, __file__, 1,
                               "device %s said\n%s", ("abc", "bye\u2028"), None)
    record.__dict__.update({"event": "x", "device_id": "abc", "message": "spoofed",
                            "extra_list": (1, Path("/p"))})
    try:
        raise ValueError("boom")
    except ValueError as exc:
        record.exc_info = (type(exc), exc, exc.__traceback__)
    try:
        text = JsonFormatter().format(record)
    finally:
        set_log_origin(f"main-{os.getpid()}")  # as a process that never said
    assert "\n" not in text and text.isascii()
    entry = json.loads(text)
    assert entry["message"] == "device abc said\nbye\u2028"  # the record's, not extra's
    assert (entry["level"], entry["logger"], entry["origin"]) == ("warning", "ota.devices",
                                                                  "node-a:main-1")
    assert (entry["event"], entry["device_id"], entry["extra_list"]) == ("x", "abc",
                                                                        [1, "/p"])
    assert entry["exc"].startswith("Traceback") and "ValueError: boom" in entry["exc"]
    with pytest.raises(Exception, match="log format 'yaml' is not one of: text, json"):
        configure_logging("info", log_format="yaml")
