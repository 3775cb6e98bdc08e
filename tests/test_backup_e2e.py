"""Issue 16, done-when: "a backup taken during an immediate release restores into a server
that serves the fleet with every acknowledged write present".

A real ``ota server`` process serves emulated devices (TLS 1.3 and DTLS 1.2) that take an
immediate release of a larger v2, while a client makes writes through the API one after
another (group creations and firmware uploads, each with its own blob) and records every
2xx answer. ``ota admin backup`` (the real command, in its own process) runs in the middle
of both; the release is under way then whatever the machine's speed, since one device of
the product is held back (offline) until after the restore. The backup is restored with
``ota admin restore`` into a new directory, served by a new ``ota server``, and there:

- every write acknowledged before the backup started is present, blobs byte for byte;
- what is present is a prefix of the client's writes (a consistent snapshot of a
  sequential writer: a later write never without an earlier one), and nothing else;
- the immediate release of v2 is there, and devices take it: one held back during the
  release connects on v1 and is updated to v2, one updated before is served on v2.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from otacore.signing import TrustStore
from server.devices.keys import TRUST_FILE, read_trust_file
from server.emulator.fleet import EmulatedFleet, FleetMember, FleetSettings, find_credentials
from tests.ota_server_process import REPO, ServerProcess, start_ota_server
from tests.server_nodes import provisioned_product
from tests.test_ota_e2e_kit import APP_V1, FAST, STEP, SYSTEM_5003, TRANSPORTS, app, running

DEVICES = 6  # the last one is held back during the release
V2 = app(2, size=160_000)  # large enough that the release is still under way for a while


@dataclass
class Ledger:
    """The client's writes in order, and how many were acknowledged when the backup began."""

    writes: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, key, sha256)
    acked_before_backup: int = -1


def _fleet(server: ServerProcess, creds: Path, state: Path, trust: TrustStore,
           devices: list[tuple[str, Any]]) -> EmulatedFleet:
    found = dict(find_credentials(creds))
    members = [FleetMember(device_id, found[device_id], state / device_id, kind)
               for device_id, kind in devices]
    settings = FleetSettings(server=server.tls, udp_server=server.dtls,
                             firmware=(SYSTEM_5003, APP_V1), trust_store=trust, **FAST)
    return EmulatedFleet(members, settings)


def _on(version: int, devices: list[str]) -> Any:
    def check(fleet: EmulatedFleet) -> bool:
        return all(fleet.device(d).device.status().product_version == version
                   and fleet.device(d).device.status().phase.value == "online"
                   for d in devices)
    return check


async def _upload(api: httpx.AsyncClient, product_id: int, version: int, image: bytes) -> None:
    files = {"binary": ("firmware.bin", image, "application/octet-stream")}
    response = await api.post(f"/v1/products/{product_id}/firmware",
                              data={"version": str(version), "title": f"v{version}"},
                              files=files)
    assert response.status_code == 201, response.text


async def _writer(api: httpx.AsyncClient, product_id: int, ledger: Ledger, stop: trio.Event,
                  acked: trio.Event) -> None:
    """Sequential writes through the API; each is recorded once its 2xx answer arrived."""
    index = 0
    while not stop.is_set():
        if index % 2 == 0:
            name = f"backup-group-{index}"
            response = await api.post(f"/v1/products/{product_id}/groups", json={"name": name})
            assert response.status_code == 201, response.text
            ledger.writes.append(("group", name, ""))
        else:
            version = 100 + index
            image = app(version, size=3_000 + index, seed="backup")
            await _upload(api, product_id, version, image)
            ledger.writes.append(("firmware", str(version), hashlib.sha256(image).hexdigest()))
        index += 1
        if index >= 4:
            acked.set()


async def _ota(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run an ``ota`` command in its own process (as an operator would)."""
    return await trio.run_process([sys.executable, "-m", "server.cli.main", *args], cwd=REPO,
                                  capture_stdout=True, capture_stderr=True, check=False)


async def test_a_backup_taken_during_an_immediate_release_restores_into_a_serving_fleet(
    tmp_path: Path,
) -> None:
    data, creds, state = tmp_path / "data", tmp_path / "creds", tmp_path / "state"
    product_id, ids, token = await trio.to_thread.run_sync(
        provisioned_product, data, creds, DEVICES)
    trust = TrustStore.initial(product_id, read_trust_file(creds / TRUST_FILE))
    held_back, riders = ids[-1], ids[:-1]
    backup = tmp_path / "backup"
    ledger = Ledger()
    server = await trio.to_thread.run_sync(start_ota_server, data, tmp_path / "server.log")
    try:
        async with httpx.AsyncClient(base_url=server.api_url, timeout=60,
                                     headers={"Authorization": f"Bearer {token}"}) as api:
            files = {"binary": ("system-part1.bin", SYSTEM_5003, "application/octet-stream")}
            assert (await api.post("/v1/device-os", files=files)).status_code == 201
            await _upload(api, product_id, 1, APP_V1)
            response = await api.put(f"/v1/products/{product_id}/firmware/release",
                                     json={"version": 1, "product_default": True,
                                           "force": True})
            assert response.status_code == 200, response.text
            await _upload(api, product_id, 2, V2)
            fleet = _fleet(server, creds, state, trust,
                           [(d, TRANSPORTS[i % 2]) for i, d in enumerate(riders)])
            async with running(fleet):
                await fleet.wait_until(_on(1, riders), timeout=4 * STEP)
                response = await api.put(f"/v1/products/{product_id}/firmware/release",
                                         json={"version": 2, "product_default": True,
                                               "intelligent": True, "force": True})
                assert response.status_code == 200, response.text
                stop, acked = trio.Event(), trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_writer, api, product_id, ledger, stop, acked)
                    with trio.fail_after(STEP):
                        await acked.wait()
                    ledger.acked_before_backup = len(ledger.writes)
                    done = await _ota("admin", "backup", str(backup), "--data", str(data),
                                      "--step-pages", "4", "--json")
                    stop.set()
                assert done.returncode == 0, done.stderr.decode()
                summary = json.loads(done.stdout)
                print("backup:", summary, "writes:", len(ledger.writes),
                      "acknowledged before it began:", ledger.acked_before_backup)
                # The original server finishes the release (not needed for the backup).
                await fleet.wait_until(_on(2, riders), timeout=4 * STEP)
            # A restore refuses the running server's directory.
            refused = await _ota("admin", "restore", str(backup), "--data", str(data),
                                 "--force")
            assert refused.returncode == 1 and b"in use" in refused.stderr, refused.stderr
    finally:
        assert server.stop() == 0, server.tail()

    restored = tmp_path / "restored"
    result = await _ota("admin", "restore", str(backup), "--data", str(restored), "--json")
    assert result.returncode == 0, result.stderr.decode()
    server = await trio.to_thread.run_sync(start_ota_server, restored,
                                           tmp_path / "restored.log")
    try:
        async with httpx.AsyncClient(base_url=server.api_url, timeout=60,
                                     headers={"Authorization": f"Bearer {token}"}) as api:
            await _check_writes(api, product_id, ledger)
            # The held-back device never ran: it boots its factory v1 and must take v2 from
            # the restored server (the release and its blob came back); the other was
            # updated before the backup's release finished and is served on v2.
            assert not (state / held_back).exists()
            fleet = _fleet(server, creds, state, trust,
                           [(held_back, "udp"), (riders[0], "tcp")])
            async with running(fleet):
                await fleet.wait_until(_on(2, [held_back, riders[0]]), timeout=4 * STEP)
    finally:
        assert server.stop() == 0, server.tail()


async def _check_writes(api: httpx.AsyncClient, product_id: int, ledger: Ledger) -> None:
    response = await api.get(f"/v1/products/{product_id}/firmware")
    assert response.status_code == 200, response.text
    firmware = {fw["version"]: fw for fw in response.json()}
    response = await api.get(f"/v1/products/{product_id}/groups")
    assert response.status_code == 200, response.text
    groups = {group["name"] for group in response.json()["groups"]}
    assert firmware[2]["product_default"], firmware[2]  # the immediate release was made
    assert firmware[2]["sha256"] == hashlib.sha256(V2).hexdigest()
    present = [(kind == "group" and key in groups) or (kind == "firmware" and int(key) in firmware)
               for kind, key, _ in ledger.writes]
    count = sum(present)
    assert present == [True] * count + [False] * (len(present) - count), present
    assert count >= ledger.acked_before_backup, (count, ledger.acked_before_backup)
    # Nothing appears that the client did not write.
    assert groups == {key for kind, key, _ in ledger.writes[:count] if kind == "group"}
    assert set(firmware) == {1, 2} | {int(key) for kind, key, _ in ledger.writes[:count]
                                      if kind == "firmware"}
    for kind, key, sha in ledger.writes[:count]:
        if kind == "firmware":
            assert firmware[int(key)]["sha256"] == sha
            binary = await api.get(f"/v1/products/{product_id}/firmware/{key}/binary")
            assert binary.status_code == 200
            assert hashlib.sha256(binary.content).hexdigest() == sha
