"""End to end over real sockets: what the fleet manager and the device's application control.

Locks, unlocks and "flash now"; development devices; Device OS system parts sent before the
application that needs them (never a downgrade); updates disabled, pending and forced; a
reset held by the application.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from otacore.device.emulated import DevicePhase, DeviceStatus
from otacore.protocol.link import Transport
from tests.test_ota_e2e_kit import (
    APP_V1,
    STEP,
    SYSTEM_5003,
    SYSTEM_5004,
    SYSTEM_5005,
    TRANSPORTS,
    app,
    flash_statuses,
    ota_rig,
    product_version,
    running,
    sha,
    updated_to,
)

PENDING = "particle/device/updates/pending"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_lock_flash_now_and_unlock(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await rig.upload_device_os(SYSTEM_5003)
        for version in (2, 3, 4):
            await rig.upload(version, app(version))
        await rig.release(2, product_default=True)
        fleet = rig.fleet([(device_id, transport)])
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for("spark/flash/status", device_id, "success")
            # A lock without "flash now" applies at the next handshake, above the release.
            body = await rig.put_device(device_id, desired_firmware_version=3)
            assert (body["desired_firmware_version"], body["target_reason"]) == (3, "locked")
            assert body["targeted_firmware_release_version"] == 3
            await rig.reconnect(fleet, device_id)
            await fleet.wait_until(updated_to(device_id, 3), timeout=STEP)
            await rig.wait_device(device_id, lambda d: d["firmware_version"] == 3)
            # Lock to 4 with flash=true: pushed to the online device at once.
            sessions = fleet.device(device_id).device.sessions
            body = await rig.put_device(device_id, desired_firmware_version=4, flash=True)
            assert body["flash_requested"] is True
            assert body["pending_flash"]["version"] == 4
            await fleet.wait_until(updated_to(device_id, 4), timeout=STEP)
            assert fleet.device(device_id).device.sessions == sessions + 1  # the reset only
            body = await rig.wait_device(
                device_id, lambda d: d["pending_flash"] is None and not d["flash_requested"]
            )
            assert body["firmware_version"] == 4
            # Unlock: back to the product default (an application may go down a version).
            body = await rig.put_device(device_id, desired_firmware_version=None)
            assert (body["targeted_firmware_release_version"], body["target_reason"]) == (
                2,
                "product_default",
            )
            await rig.reconnect(fleet, device_id)
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for("spark/flash/status", device_id, "success", count=4)
        assert flash_statuses(rig.events, device_id) == ["started", "success"] * 4


async def test_development_device_is_left_alone(nursery: trio.Nursery, tmp_path: Path) -> None:
    async with ota_rig(nursery, tmp_path, count=2) as rig:
        dev, normal = rig.ids
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, app(2))
        body = await rig.put_device(dev, development=True)
        assert body["development"] is True
        fleet = rig.fleet([(dev, "udp"), (normal, "tcp")])
        async with running(fleet):
            for device_id in (dev, normal):
                await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            # An immediate release reaches the normal device: by then the development
            # device, online all along, would have been offered it too.
            await rig.release(2, product_default=True, intelligent=True)
            await fleet.wait_until(updated_to(normal, 2), timeout=STEP)
            await rig.events.wait_for("spark/flash/status", normal, "success")
            # Nor does a new handshake change anything for the development device.
            await rig.reconnect(fleet, dev)
            await rig.wait_device(dev, lambda d: d["online"])
            body = await rig.device(dev)
            assert body["targeted_firmware_release_version"] is None
            assert body["target_reason"] == "development"
            assert (body["firmware_version"], body["update"]) == (1, None)
            assert product_version(fleet, dev) == 1
            assert fleet.device(dev).device.status().boots == 1
        assert flash_statuses(rig.events, dev) == []


async def test_system_part_first_and_never_a_downgrade(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A device on system part 5003 gets 5004 (the oldest stored version the application
    needs) and then the application; a device on 5005 gets only the application."""
    async with ota_rig(nursery, tmp_path, count=2) as rig:
        old, new = rig.ids
        await rig.upload_device_os(SYSTEM_5003, SYSTEM_5004, SYSTEM_5005)
        v3 = app(3, needs_system=5004)
        await rig.upload(3, v3)
        await rig.release(3, product_default=True)
        seen: dict[str, list[tuple[int, int]]] = {old: [], new: []}

        def note(status: DeviceStatus) -> None:
            versions = (status.system_version, status.product_version)
            if status.system_version and seen[status.device_id][-1:] != [versions]:
                seen[status.device_id].append(versions)

        fleet_old = rig.fleet([(old, "udp")])
        fleet_new = rig.fleet([(new, "tcp")], firmware=(SYSTEM_5005, APP_V1))
        fleet_old.on_status = fleet_new.on_status = note
        async with running(fleet_old), running(fleet_new):
            await fleet_old.wait_until(updated_to(old, 3, system=5004), timeout=STEP)
            await fleet_new.wait_until(updated_to(new, 3, system=5005), timeout=STEP)
            for device_id in (old, new):
                await rig.events.wait_for("spark/flash/status", device_id, "success")
            body = await rig.wait_device(old, lambda d: sha(v3) in str(d["modules"]))
            assert (body["system_version"], body["firmware_version"]) == (5004, 3)
            body = await rig.wait_device(new, lambda d: sha(v3) in str(d["modules"]))
            assert (body["system_version"], body["firmware_version"]) == (5005, 3)
        assert seen[old] == [(5003, 1), (5004, 1), (5004, 3)]
        assert seen[new] == [(5005, 1), (5005, 3)]
        # One update per device (the system part is a step of it, not an update of its own).
        assert flash_statuses(rig.events, old) == ["started", "success"]
        assert flash_statuses(rig.events, new) == ["started", "success"]
        stats = (await rig.firmware(3))["release_stats"]
        assert (stats["succeeded"], stats["failed"], stats["updating"]) == (2, 0, 0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_updates_disabled_pending_enabled_and_forced(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(2, app(2))
        await rig.upload(3, app(3))
        fleet = rig.fleet([(device_id, transport)])
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            runner = fleet.device(device_id)
            runner.disable_updates()
            await rig.wait_device(device_id, lambda d: not d["firmware_updates_enabled"])
            await rig.release(2, product_default=True, intelligent=True)
            # The cloud marks the update pending and tells the device, which refuses nothing
            # (it was never offered) and reports "pending" to its application.
            await rig.events.wait_for(PENDING, device_id, "true")
            body = await rig.device(device_id)
            assert body["updates_pending"] is True and body["firmware_version"] == 1
            await fleet.wait_until(
                lambda f: f.device(device_id).device.updates_pending, timeout=STEP
            )
            assert flash_statuses(rig.events, device_id) == []
            # The application enables updates: the pending update starts at once.
            runner.enable_updates()
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            body = await rig.wait_device(device_id, lambda d: d["firmware_version"] == 2)
            assert body["updates_pending"] is False and body["firmware_updates_enabled"]
            assert rig.events.named(PENDING, device_id)[-1] == "false"
            # Forced updates override a disable.
            runner.disable_updates()
            await rig.wait_device(device_id, lambda d: not d["firmware_updates_enabled"])
            body = await rig.put_device(device_id, firmware_updates_forced=True)
            assert body["firmware_updates_forced"] is True
            await fleet.wait_until(
                lambda f: f.device(device_id).device.updates_forced, timeout=STEP
            )
            await rig.release(3, product_default=True, intelligent=True)
            await fleet.wait_until(updated_to(device_id, 3), timeout=STEP)
            assert not fleet.device(device_id).device.updates_enabled  # still disabled
            body = await rig.wait_device(device_id, lambda d: d["firmware_version"] == 3)
            assert body["updates_pending"] is False


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_held_reset_is_reported_then_released(
    nursery: trio.Nursery, tmp_path: Path, transport: Transport
) -> None:
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await rig.upload_device_os(SYSTEM_5003)
        v2 = app(2)
        await rig.upload(2, v2)
        fleet = rig.fleet([(device_id, transport)])
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            runner = fleet.device(device_id)
            runner.disable_reset()
            await rig.release(2, product_default=True, intelligent=True)
            await fleet.wait_until(
                lambda f: f.device(device_id).device.status().reset_pending, timeout=STEP
            )
            status = runner.device.status()
            assert status.phase is DevicePhase.APPLYING and status.product_version == 1
            # The cloud knows: the reset is pending and the image is fully transferred.
            body = await rig.wait_device(device_id, lambda d: d["reset_pending"])
            assert body["firmware_version"] == 1
            update = body["update"]
            assert update is not None and update["sha256"] == sha(v2)
            assert update["bytes_done"] == update["bytes_total"] == len(v2)
            assert flash_statuses(rig.events, device_id) == ["started"]
            # The application lets the reset happen: the device boots the new image.
            runner.enable_reset()
            await fleet.wait_until(updated_to(device_id, 2), timeout=STEP)
            await rig.events.wait_for("spark/flash/status", device_id, "success")
            body = await rig.device(device_id)
            assert (body["firmware_version"], body["reset_pending"], body["update"]) == (
                2,
                False,
                None,
            )
            assert runner.device.status().boots == 2
