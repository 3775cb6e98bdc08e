"""Product devices over real HTTP: import, listing, settings, locks, flashes, removal."""

from __future__ import annotations

import pytest

from otacore.platforms import ModuleFunction

D1 = "0123456789abcdef01234567"
D2 = "89abcdef0123456789abcdef"
D3 = "fedcba9876543210fedcba98"


async def _product_with_devices(api, *ids: str) -> str:
    product = await api.create_product()
    slug: str = product["slug"]
    for device_id in ids:
        response = await api.client.post(f"/v1/products/{slug}/devices", json={"id": device_id})
        assert response.status_code == 200, response.text
    return slug


async def test_import_and_remove(api) -> None:
    product = await api.create_product()
    slug = product["slug"]
    response = await api.client.post(f"/v1/products/{slug}/devices", json={"id": D1.upper()})
    body = response.json()
    assert response.status_code == 200 and body["updatedDeviceIds"] == [D1] and body["updated"] == 1
    again = (await api.client.post(f"/v1/products/{slug}/devices", json={"id": D1})).json()
    assert again["updated"] == 0 and again["existingDeviceIds"] == [D1]
    # Form encoding works as well.
    response = await api.client.post(f"/v1/products/{slug}/devices", data={"id": D2})
    assert response.json()["updatedDeviceIds"] == [D2]

    other = await api.create_product("Other")
    before = await api.snapshot()
    response = await api.client.post(f"/v1/products/{other['slug']}/devices", json={"id": D1})
    error = response.json()["error"]
    assert response.status_code == 409 and "belongs to another product" in error
    assert slug not in error  # nor which: other products look absent to this caller
    for bad in ({"id": "xyz"}, {"id": 5}, {}, {"id": D3, "extra": 1}):
        response = await api.client.post(f"/v1/products/{slug}/devices", json=bad)
        assert response.status_code == 400, bad
    assert await api.snapshot() == before

    assert (await api.client.delete(f"/v1/products/{slug}/devices/{D1}")).status_code == 204
    assert (await api.client.get(f"/v1/products/{slug}/devices/{D1}")).status_code == 404
    assert (await api.client.delete(f"/v1/products/{slug}/devices/{D1}")).status_code == 404
    # The device of another product is not reachable through this one.
    assert (await api.client.get(f"/v1/products/{other['slug']}/devices/{D2}")).status_code == 404


async def test_list_filters_and_pages(api) -> None:
    ids = [f"{i:024x}" for i in range(1, 8)]
    slug = await _product_with_devices(api, *ids)
    await api.client.put(f"/v1/products/{slug}/devices/{ids[0]}", json={"name": "Kitchen Sensor"})
    await api.client.put(f"/v1/products/{slug}/devices/{ids[1]}", json={"groups": ["beta"]})
    await api.client.put(f"/v1/products/{slug}/devices/{ids[2]}", json={"groups": ["beta", "eu"]})

    page = (await api.client.get(f"/v1/products/{slug}/devices", params={"per_page": 3})).json()
    assert [d["id"] for d in page["devices"]] == ids[:3]
    assert page["meta"] == {"total_pages": 3, "total": 7, "page": 1, "per_page": 3}
    last = (
        await api.client.get(f"/v1/products/{slug}/devices", params={"per_page": 3, "page": 3})
    ).json()
    assert [d["id"] for d in last["devices"]] == ids[6:]

    by_name = await api.client.get(f"/v1/products/{slug}/devices", params={"deviceName": "kitchen"})
    assert [d["id"] for d in by_name.json()["devices"]] == [ids[0]]
    by_id = await api.client.get(f"/v1/products/{slug}/devices", params={"deviceId": "0000006"})
    assert [d["id"] for d in by_id.json()["devices"]] == [ids[5]]
    by_group = await api.client.get(f"/v1/products/{slug}/devices", params={"groups": "eu,beta"})
    assert [d["id"] for d in by_group.json()["devices"]] == ids[1:3]
    assert by_group.json()["devices"][1]["groups"] == ["beta", "eu"]

    for params in ({"per_page": 0}, {"per_page": "x"}, {"page": 0}, {"per_page": 5000}):
        response = await api.client.get(f"/v1/products/{slug}/devices", params=params)
        assert response.status_code == 400, params
    assert (await api.client.get("/v1/products/nope/devices")).status_code == 404


async def test_settings_lock_and_targets(api) -> None:
    slug = await _product_with_devices(api, D1, D2)
    for version in (1, 2, 3):
        assert (await api.upload(slug, version)).status_code == 201
    await api.report_running(D2, 1)
    url = f"/v1/products/{slug}/devices/{D1}"

    changed = await api.client.put(
        url,
        json={
            "name": "Lab unit",
            "notes": "on the bench",
            "groups": ["beta"],
            "firmware_updates_forced": True,
        },
    )
    body = changed.json()
    assert changed.status_code == 200, changed.text
    assert body["name"] == "Lab unit" and body["notes"] == "on the bench"
    assert body["groups"] == ["beta"] and body["firmware_updates_forced"] is True
    assert body["targeted_firmware_release_version"] is None  # nothing released yet

    await api.client.put(
        f"/v1/products/{slug}/firmware/release", json={"version": 1, "product_default": True}
    )
    await api.client.put(
        f"/v1/products/{slug}/firmware/release",
        json={"version": 2, "groups": ["beta"], "force": True},
    )
    device = (await api.client.get(url)).json()
    assert device["targeted_firmware_release_version"] == 2
    assert device["target_reason"] == "group_release"
    other = (await api.client.get(f"/v1/products/{slug}/devices/{D2}")).json()
    assert other["targeted_firmware_release_version"] == 1

    locked = (await api.client.put(url, json={"desired_firmware_version": 3})).json()
    assert locked["desired_firmware_version"] == 3
    assert locked["targeted_firmware_release_version"] == 3 and locked["target_reason"] == "locked"
    assert locked["pending_flash"] is None and locked["flash_requested"] is False

    flashed = (
        await api.client.put(url, json={"desired_firmware_version": 3, "flash": True})
    ).json()
    assert flashed["flash_requested"] is True
    assert (
        flashed["pending_flash"]["kind"] == "product" and flashed["pending_flash"]["version"] == 3
    )

    dev = (await api.client.put(url, json={"development": True})).json()
    assert (
        dev["targeted_firmware_release_version"] is None and dev["target_reason"] == "development"
    )

    unlocked = (
        await api.client.put(url, json={"desired_firmware_version": None, "development": False})
    ).json()
    assert unlocked["desired_firmware_version"] is None and unlocked["flash_requested"] is False
    assert unlocked["pending_flash"] is None  # unlocking cancels the undelivered flash
    assert unlocked["targeted_firmware_release_version"] == 2

    with api.store.read() as tx:
        details = [a.details for a in tx.list_audit(None) if a.action == "device.update"]
    assert {"desired_firmware_version": 3, "flash_requested": True} in details


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({}, 400, "nothing to change"),
        ({"colour": "red"}, 400, "unknown device field"),
        ({"development": "sometimes"}, 400, "true or false"),
        ({"desired_firmware_version": "x"}, 400, "must be an integer"),
        ({"desired_firmware_version": 42}, 404, "no firmware version 42"),
        ({"flash": True}, 400, "needs a locked version"),
        ({"groups": "not a list!"}, 400, "group name"),
        ({"groups": [""]}, 400, "group name"),
        ({"name": 5}, 400, "must be a string"),
        ({"notes": "x" * 10_001}, 400, "longer than"),
    ],
)
async def test_bad_device_updates_change_nothing(
    api, body: dict[str, object], status: int, message: str
) -> None:
    slug = await _product_with_devices(api, D1)
    await api.upload(slug, 1)
    before = await api.snapshot()
    response = await api.client.put(f"/v1/products/{slug}/devices/{D1}", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert await api.snapshot() == before


async def test_roles_on_device_changes(api) -> None:
    slug = await _product_with_devices(api, D1)
    before = await api.snapshot()
    for role in ("viewer", "support"):
        async with await api.client_for(role) as client:
            assert (await client.get(f"/v1/products/{slug}/devices/{D1}")).status_code == 200
            response = await client.put(f"/v1/products/{slug}/devices/{D1}", json={"name": "x"})
            assert response.status_code == 403
            response = await client.post(f"/v1/products/{slug}/devices", json={"id": D2})
            assert response.status_code == 403
            assert (await client.delete(f"/v1/products/{slug}/devices/{D1}")).status_code == 403
    assert await api.snapshot() == before
    async with await api.client_for("developer") as client:
        response = await client.put(f"/v1/products/{slug}/devices/{D1}", json={"name": "ok"})
        assert response.status_code == 200


async def test_flash_binary_to_development_device(api, make_firmware) -> None:
    slug = await _product_with_devices(api, D1)
    url = f"/v1/products/{slug}/devices/{D1}"
    image = make_firmware(77, size=9000)
    before = await api.snapshot()
    response = await api.client.put(url, files={"file": ("dev.bin", image)})
    assert response.status_code == 400 and "not a development device" in response.json()["error"]
    assert await api.snapshot() == before

    await api.client.put(url, json={"development": True})
    before = await api.snapshot()
    for bad, message in (
        (image[:-1] + bytes([image[-1] ^ 1]), "not a valid firmware module"),
        (make_firmware(1, platform_id=12), "built for argon"),
        (make_firmware(1, function=ModuleFunction.SYSTEM_PART), "only application"),
    ):
        response = await api.client.put(url, files={"file": ("x.bin", bad)})
        assert response.status_code == 400 and message in response.json()["error"], message
    response = await api.client.put(url, files={"other": ("x.bin", image)})
    assert response.status_code == 400
    assert await api.snapshot() == before

    response = await api.client.put(url, files={"file": ("dev.bin", image)})
    assert response.status_code == 200, response.text
    flash = response.json()["flash"]
    assert flash["kind"] == "binary" and flash["status"] == "pending" and flash["name"] == "dev.bin"
    assert api.store.blobs.get(flash["sha256"]) == image
    device = (await api.client.get(url)).json()
    assert device["pending_flash"]["sha256"] == flash["sha256"]
