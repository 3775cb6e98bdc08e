"""The fleet service's hooks for device sessions (hello, describe, targets, flashes)."""

from __future__ import annotations

import hashlib

import pytest
import trio

from otacore.errors import ValidationError
from otacore.precedence import TargetReason
from server.fleet.errors import UnknownDeviceError

D1 = "0123456789abcdef01234567"
D2 = "89abcdef0123456789abcdef"
D3 = "fedcba9876543210fedcba98"


async def _setup(api) -> tuple[str, int]:
    product = await api.create_product()
    slug = product["slug"]
    for device_id in (D1, D2, D3):
        await api.client.post(f"/v1/products/{slug}/devices", json={"id": device_id})
    for version in (1, 2):
        assert (await api.upload(slug, version)).status_code == 201
    return slug, product["id"]


async def test_hello_claims_a_version_and_the_describe_proves_the_image(api) -> None:
    slug, product_id = await _setup(api)
    fleet = api.handle.fleet
    with pytest.raises(UnknownDeviceError):
        await fleet.record_device_hello(
            "ffffffffffffffffffffffff", platform_id=13, product_version=1, system_version=1
        )
    await api.client.put(
        f"/v1/products/{slug}/devices/{D1}", json={"desired_firmware_version": 2, "flash": True}
    )
    view = await fleet.record_device_hello(
        D1, platform_id=13, product_version=2, system_version=4100, ip="10.0.0.7"
    )
    assert view.device.online and view.device.firmware_version == 2
    assert view.device.system_version == 4100 and view.device.last_ip_address == "10.0.0.7"
    assert view.device.flash_requested is False  # the locked version now runs
    assert view.target.reason == TargetReason.LOCKED and not view.update_needed
    firmware = (await api.client.get(f"/v1/products/{slug}/firmware/2")).json()
    # The claim is shown, but proves nothing: the release stays locked.
    assert firmware["running_seen_at"] is None and firmware["device_count"] == 1
    response = await api.client.put(
        f"/v1/products/{slug}/firmware/release", json={"version": 2, "product_default": True}
    )
    assert response.status_code == 400 and "not been reported running" in response.text
    # A Describe naming the image by its SHA-256, in the application's slot, proves it.
    module = {"function": 5, "index": 1, "version": 6, "store": 0, "size": 1,
              "sha256": firmware["sha256"], "dependencies": []}
    await fleet.record_describe(D1, [{**module, "function": 4}])  # another slot: no proof
    assert (await api.client.get(f"/v1/products/{slug}/firmware/2")).json()[
        "running_seen_at"] is None
    await fleet.record_describe(D1, [{**module, "sha256": firmware["sha256"].upper()}])
    firmware = (await api.client.get(f"/v1/products/{slug}/firmware/2")).json()
    assert firmware["running_seen_at"] is not None
    with api.store.read() as tx:
        seen = [a for a in tx.list_audit(product_id) if a.action == "firmware.seen_running"]
    assert [a.details for a in seen] == [{"device_id": D1, "sha256": firmware["sha256"]}]
    # Release of version 2 is now allowed without force.
    response = await api.client.put(
        f"/v1/products/{slug}/firmware/release", json={"version": 2, "product_default": True}
    )
    assert response.status_code == 200


async def test_targets_and_online_devices_needing_update(api) -> None:
    slug, _ = await _setup(api)
    fleet = api.handle.fleet
    await api.client.post(f"/v1/products/{slug}/groups", json={"name": "beta"})
    await api.client.put(f"/v1/products/{slug}/devices/{D2}", json={"groups": ["beta"]})
    for device_id in (D1, D2, D3):
        await fleet.record_device_hello(
            device_id, platform_id=13, product_version=1, system_version=4100
        )
    await fleet.device_offline(D3)
    assert await fleet.online_devices_needing_update(slug) == []

    await api.client.put(
        f"/v1/products/{slug}/firmware/release",
        json={"version": 2, "groups": ["beta"], "intelligent": True, "force": True},
    )
    response = await api.client.put(
        f"/v1/products/{slug}/firmware/release",
        json={
            "version": 2,
            "product_default": True,
            "groups": ["beta"],
            "intelligent": True,
            "force": True,
        },
    )
    body = response.json()
    assert body["affected_devices"] == 2 and body["affected_online_devices"] == 1  # D1, D3
    needing = await fleet.online_devices_needing_update(slug, immediate_only=True)
    assert sorted(v.device.id for v in needing) == [D1, D2]
    view = await fleet.target_for_device(D2)
    assert view.target.reason == TargetReason.GROUP_RELEASE and view.target.group == "beta"
    assert view.firmware is not None and view.firmware.version == 2
    assert view.update_needed and view.updates_allowed
    sha, image = await fleet.binary_for(view)  # type: ignore[misc]
    assert hashlib.sha256(image).hexdigest() == sha == view.firmware.sha256

    # A development device with a pending binary flash gets that binary first.
    await api.client.put(f"/v1/products/{slug}/devices/{D1}", json={"development": True})
    dev_image = api_image = await _flash_binary(api, slug, D1)
    view = await fleet.target_for_device(D1)
    assert view.target.reason == TargetReason.DEVELOPMENT and view.pending_flash is not None
    assert (await fleet.binary_for(view))[1] == dev_image == api_image  # type: ignore[index]


async def _flash_binary(api, slug: str, device_id: str) -> bytes:
    from otacore.module import build_module

    image = build_module(b"\x42" * 5000, platform_id=13, function=5, version=6)
    response = await api.client.put(
        f"/v1/products/{slug}/devices/{device_id}", files={"file": ("d.bin", image)}
    )
    assert response.status_code == 200, response.text
    return image


async def test_updates_disabled_pending_and_forced(api) -> None:
    slug, _ = await _setup(api)
    fleet = api.handle.fleet
    await fleet.record_device_hello(D1, platform_id=13, product_version=1, system_version=1)
    view = await fleet.set_updates_enabled(D1, False)
    assert not view.device.updates_pending and not view.updates_allowed
    await api.client.put(
        f"/v1/products/{slug}/firmware/release",
        json={"version": 2, "product_default": True, "force": True},
    )
    view = await fleet.target_for_device(D1)
    assert view.device.updates_pending and view.update_needed and not view.updates_allowed
    await api.client.put(
        f"/v1/products/{slug}/devices/{D1}", json={"firmware_updates_forced": True}
    )
    view = await fleet.target_for_device(D1)
    assert view.updates_allowed and not view.device.updates_pending
    view = await fleet.set_updates_enabled(D1, True)
    assert view.device.firmware_updates_enabled


async def test_describe_progress_and_flash_outcomes(api) -> None:
    slug, product_id = await _setup(api)
    fleet = api.handle.fleet
    view = await fleet.record_describe(
        D1,
        [
            {"function": 4, "index": 1, "version": 4100, "size": 600_000},
            {"function": 5, "index": 1, "version": 6},
        ],
    )
    assert view.device.system_version == 4100 and view.device.modules is not None
    assert view.device.modules[0]["size"] == 600_000
    with pytest.raises(ValidationError):
        await fleet.record_describe(D1, [{"function": "x"}])

    await api.client.put(
        f"/v1/products/{slug}/firmware/release",
        json={"version": 2, "product_default": True, "force": True},
    )
    firmware = (await api.client.get(f"/v1/products/{slug}/firmware/2")).json()
    await fleet.record_update_progress(
        D1,
        sha256=firmware["sha256"],
        version=2,
        transfer="delta",
        bytes_done=100,
        bytes_total=1000,
    )
    state = await fleet.get_update_state(D1)
    assert state is not None and (state.bytes_done, state.transfer) == (100, "delta")
    with pytest.raises(ValidationError):
        await fleet.record_update_progress(
            D1, sha256="x", version=2, transfer="other", bytes_done=0, bytes_total=1
        )
    await fleet.record_flash_status(D1, "started")
    await fleet.record_flash_status(D1, "success")
    await fleet.record_flash_status(D2, "failed", error="CRC mismatch")
    assert await fleet.get_update_state(D1) is None
    with api.store.read() as tx:
        release = tx.list_releases(product_id)[0]
    assert (release.devices_started, release.devices_succeeded, release.devices_failed) == (1, 1, 1)

    # A pending per-device flash is completed by the outcome instead.
    await api.client.put(
        f"/v1/products/{slug}/devices/{D3}", json={"desired_firmware_version": 1, "flash": True}
    )
    await fleet.record_flash_status(D3, "success")
    view = await fleet.target_for_device(D3)
    assert view.pending_flash is None and not view.device.flash_requested
    with pytest.raises(ValidationError):
        await fleet.record_flash_status(D3, "exploded")  # type: ignore[arg-type]


async def test_startup_marks_everyone_offline(api) -> None:
    await _setup(api)
    fleet = api.handle.fleet
    await fleet.device_online(D1, ip="10.1.1.1")
    assert (await fleet.target_for_device(D1)).device.online
    assert await fleet.startup() == 1
    assert not (await fleet.target_for_device(D1)).device.online
    await trio.sleep(0)
