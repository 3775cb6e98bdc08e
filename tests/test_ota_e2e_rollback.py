"""Application rollback protection end to end (issue 13, finding 13), over real TLS and DTLS:
a device refuses a replayed older manifest and another device's (or an expired) downgrade
authorisation, while an operator's lock or flash to an older version still takes the locked
device down, and the server's downgrade policy decides whether an older release does."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from otacore.coap import Message
from otacore.downgrade import authorize_downgrade
from otacore.protocol.link import Transport
from otacore.protocol.ota_wire import OFFER_REFUSED, offer_request
from otacore.signing import SignedManifest, manifest_for_module, sign_manifest
from server.devices.delivery import DowngradePolicy
from server.devices.keys import product_signing_key
from server.emulator.flash import Flash
from server.emulator.fleet import EmulatedFleet
from tests.test_ota_e2e_kit import (
    APP_V1,
    STEP,
    SYSTEM_5003,
    TRANSPORTS,
    OtaRig,
    app,
    flash_statuses,
    ota_rig,
    product_version,
    running,
    updated_to,
)

FLASH_STATUS = "spark/flash/status"
HOUR_MS = 3_600_000


async def _fleet_at_v3(rig: OtaRig, devices: list[str], transport: Transport) -> EmulatedFleet:
    """Upload v1 and v3, release v3: every device goes from the factory v1 to v3."""
    await rig.upload_device_os(SYSTEM_5003)
    await rig.upload(1, APP_V1)
    await rig.upload(3, app(3))
    await rig.release(3, product_default=True, intelligent=True)
    return rig.fleet([(device_id, transport) for device_id in devices])


async def _wait_at_v3(rig: OtaRig, fleet: EmulatedFleet, devices: list[str]) -> None:
    for device_id in devices:
        await fleet.wait_until(updated_to(device_id, 3), timeout=STEP)
        await rig.events.wait_for(FLASH_STATUS, device_id, "success")


def _signed_v1(rig: OtaRig) -> SignedManifest:
    """The genuine, validly signed manifest of v1: what a replay attacker captured."""
    key = product_signing_key(rig.kit.handle.store, rig.kit.data_dir, rig.product)
    return sign_manifest(key, manifest_for_module(APP_V1, product_id=rig.product))


async def _offer(rig: OtaRig, device_id: str, message: Message) -> tuple[int, str]:
    """Send an offer through the device's live session; its answer (code, text)."""
    plane = rig.kit.handle.devices
    assert plane is not None
    answer = await plane.sessions[device_id].request(message, STEP)
    return answer.code, bytes(answer.payload).decode(errors="replace")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_replayed_old_manifest_is_refused_by_a_device_running_a_newer_app(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        fleet = await _fleet_at_v3(rig, [device_id], transport)
        async with running(fleet):
            await _wait_at_v3(rig, fleet, [device_id])
            code, text = await _offer(rig, device_id, offer_request(_signed_v1(rig).to_bytes()))
            assert code == OFFER_REFUSED and text.startswith("DOWNGRADE:"), text
            assert "older than version 3" in text
            assert product_version(fleet, device_id) == 3
        guard = Flash.open(rig.state_root / device_id, fsync=False).boot_record().rollback
        assert guard is not None and guard.floor == 3  # kept in its flash


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_downgrade_authorised_for_one_device_is_refused_by_another_and_after_expiry(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=2) as rig:
        device_a, device_b = rig.ids
        fleet = await _fleet_at_v3(rig, [device_a, device_b], transport)
        async with running(fleet):
            await _wait_at_v3(rig, fleet, [device_a, device_b])
            signed = _signed_v1(rig)
            key = product_signing_key(rig.kit.handle.store, rig.kit.data_dir, rig.product)
            now_ms = rig.kit.handle.fleet.clock()
            for_a = authorize_downgrade(key, signed.manifest, device_id=device_a,
                                        from_version=3, issued_at_ms=now_ms,
                                        lifetime_ms=HOUR_MS).to_bytes()
            offer = offer_request(signed.to_bytes(), authorization=for_a)
            code, text = await _offer(rig, device_b, offer)
            assert code == OFFER_REFUSED and f"is for device {device_a}" in text, text
            expired = authorize_downgrade(key, signed.manifest, device_id=device_b,
                                          from_version=3, issued_at_ms=now_ms - 2 * HOUR_MS,
                                          lifetime_ms=HOUR_MS).to_bytes()
            offer = offer_request(signed.to_bytes(), authorization=expired)
            code, text = await _offer(rig, device_b, offer)
            assert code == OFFER_REFUSED and "expired" in text, text
            assert product_version(fleet, device_b) == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_operator_lock_to_an_older_version_downgrades_the_locked_device(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    """The server signs a downgrade authorisation for the locked device only; it installs
    v1 (its floor goes down with the commit), the other device stays on v3, and unlocking
    brings it back up to the release."""
    async with ota_rig(nursery, tmp_path, count=2) as rig:
        locked, other = rig.ids
        fleet = await _fleet_at_v3(rig, [locked, other], transport)
        async with running(fleet):
            await _wait_at_v3(rig, fleet, [locked, other])
            await rig.put_device(locked, desired_firmware_version=1, flash=True)
            await fleet.wait_until(updated_to(locked, 1), timeout=STEP)
            await rig.events.wait_for(FLASH_STATUS, locked, "success", count=2)
            guard = fleet.device(locked).device.flash.boot_record().rollback
            assert guard is not None and guard.floor == 1 and guard.authorised_at > 0
            assert product_version(fleet, other) == 3
            await rig.put_device(locked, desired_firmware_version=None)
            await rig.reconnect(fleet, locked)
            await fleet.wait_until(updated_to(locked, 3), timeout=STEP)
            await rig.events.wait_for(FLASH_STATUS, locked, "success", count=3)
        assert flash_statuses(rig.events, locked) == ["started", "success"] * 3
        assert flash_statuses(rig.events, other) == ["started", "success"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_development_binary_flash_of_an_older_build_is_authorised(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        fleet = await _fleet_at_v3(rig, [device_id], transport)
        async with running(fleet):
            await _wait_at_v3(rig, fleet, [device_id])
            await rig.put_device(device_id, development=True)
            binary = app(2, seed="a developer's build")
            url = f"/v1/products/{rig.product}/devices/{device_id}"
            response = await rig.api.put(url, files={"file": ("dev.bin", binary)})
            assert response.status_code == 200, response.text
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for(FLASH_STATUS, device_id, "success", count=2)


async def test_with_the_device_policy_an_older_release_does_not_downgrade(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """``ota server --downgrades device``: releasing an older version authorises nothing; the
    device refuses it, the failure names the reason, and a lock still works."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        rig.tune_engine(downgrades=DowngradePolicy.DEVICE)
        fleet = await _fleet_at_v3(rig, [device_id], "tcp")
        async with running(fleet):
            await _wait_at_v3(rig, fleet, [device_id])
            await rig.release(1, product_default=True, intelligent=True)
            await rig.events.wait_for(FLASH_STATUS, device_id, "failed")
            body = await rig.device(device_id)
            assert body["firmware_version"] == 3
            assert "DOWNGRADE" in fleet.device(device_id).device.last_error
            await rig.put_device(device_id, desired_firmware_version=1, flash=True)
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)


async def test_a_device_without_a_clock_takes_a_lock_and_refuses_older_authorisations(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A clockless device cannot see expiry: it takes the lock's fresh authorisation, and
    afterwards refuses any authorisation not newer than the last one it used."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(1, APP_V1)
        await rig.upload(3, app(3))
        await rig.release(3, product_default=True, intelligent=True)
        fleet = rig.fleet([(device_id, "udp")], wall_clock=False)
        async with running(fleet):
            await _wait_at_v3(rig, fleet, [device_id])
            assert fleet.device(device_id).device.wall_time(0.0) is None
            await rig.put_device(device_id, desired_firmware_version=1, flash=True)
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            used = fleet.device(device_id).device.flash.boot_record().rollback
            assert used is not None and used.authorised_at > 0
            await rig.put_device(device_id, desired_firmware_version=None)
            await rig.reconnect(fleet, device_id)
            await fleet.wait_until(updated_to(device_id, 3), timeout=STEP)
            signed = _signed_v1(rig)
            key = product_signing_key(rig.kit.handle.store, rig.kit.data_dir, rig.product)
            older = authorize_downgrade(key, signed.manifest, device_id=device_id,
                                        from_version=3, issued_at_ms=used.authorised_at - 1,
                                        lifetime_ms=HOUR_MS).to_bytes()
            code, text = await _offer(rig, device_id,
                                      offer_request(signed.to_bytes(), authorization=older))
            assert code == OFFER_REFUSED and "not newer than the last one" in text, text
