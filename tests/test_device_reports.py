"""What the server trusts a device's reports with, over real sockets and the real API
(issue 13, findings 6, 7, 9 and 12).

- A version claimed in a Hello is shown, but only a Describe naming the uploaded image by its
  SHA-256 marks firmware as seen running, which is what unlocks its release.
- Devices (and REST clients) may not publish events with the cloud's reserved names
  ("particle", "spark", "ota/"); every event carries its source, also across processes, and
  the server's listeners act only on the cloud's own.
- Ids, group names and colours are checked whole: a trailing newline is refused.
- A module whose suffix names another product is refused at upload, at a development flash,
  and by the device itself.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
import trio

from otacore.coap import Code
from otacore.device.slots import RejectReason, accept_download
from otacore.messages import Dependency, ModuleDescription
from otacore.module import ModuleDependency, build_module, validate_module
from otacore.platforms import ModuleFunction
from otacore.signing import SigningKey, TrustStore, manifest_for_module, sign_manifest
from server.events import (
    DEVICE_REVOKED,
    FIRMWARE_RELEASED,
    FLASH_REQUESTED,
    STATUS,
    UPDATES_PENDING,
    Event,
)
from server.fleet.deltas import RELEASE_BYTES_EVENT
from server.fleet.sessions import DESCRIBE_CHANGED
from tests.device_client import LinkDevice
from tests.device_server import DeviceServerKit, start_device_server
from tests.test_multiprocess_server import relay_pair
from tests.test_ota_e2e_kit import (
    BORON,
    STEP,
    SYSTEM_5003,
    app,
    flash_statuses,
    ota_rig,
    product_version,
    running,
    sha,
    updated_to,
)

TRANSPORTS = ["tcp", "udp"]
#: A product id no test server has (and not a platform id).
OTHER_PRODUCT = 4242


def _built_for(product_id: int, version: int, *, seed: str = "") -> bytes:
    """An application of ``version`` whose module suffix names ``product_id``."""
    body = hashlib.shake_256(f"foreign {version} {seed}".encode()).digest(9000)
    return build_module(
        body, platform_id=BORON, function=ModuleFunction.USER_PART, index=1, version=6,
        product_id=product_id, product_version=version,
        dependencies=[ModuleDependency(ModuleFunction.SYSTEM_PART, 1, 5003)],
    )


async def _upload(api: httpx.AsyncClient, product: int, version: int,
                  image: bytes) -> httpx.Response:
    files = {"binary": ("firmware.bin", image, "application/octet-stream")}
    data = {"version": str(version), "title": f"v{version}"}
    return await api.post(f"/v1/products/{product}/firmware", data=data, files=files)


async def _release(api: httpx.AsyncClient, kit: DeviceServerKit, version: int) -> httpx.Response:
    return await api.put(f"/v1/products/{kit.product_id}/firmware/release",
                         json={"version": version, "product_default": True})


def _application(image: bytes, sha256: bytes | None = None) -> ModuleDescription:
    """How a device describes ``image`` running as its application."""
    info = validate_module(image)
    return ModuleDescription(
        info.module_function, info.module_index, info.module_version, 0, len(image),
        sha256 if sha256 is not None else hashlib.sha256(image).digest(),
        tuple(Dependency(d.function, d.index, d.version) for d in info.dependencies),
    )


# -- finding 6: the release gate needs the image, not a version number -------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_version_claim_does_not_unlock_a_release_the_reported_image_does(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    kit = await start_device_server(nursery, tmp_path, count=1)
    (device_id,) = kit.device_ids
    v1, v2 = app(1), app(2)
    async with kit.api() as api:
        for version, image in ((1, v1), (2, v2)):
            assert (await _upload(api, kit.product_id, version, image)).status_code == 201
        device = await LinkDevice.connect(kit.creds_dir, device_id, transport,
                                          kit.address(transport))
        # The Hello claims v2 (the device never received it) and it runs v1.
        assert (await device.hello(product_version=2)).code == Code.CHANGED
        assert (await device.describe([_application(v1)])).code == Code.CHANGED
        record = (await api.get(f"/v1/products/{kit.product_id}/devices/{device_id}")).json()
        assert record["firmware_version"] == 2  # the claim is shown...
        refused = await _release(api, kit, 2)  # ...but unlocks nothing
        assert refused.status_code == 400, refused.text
        assert "has not been reported running" in refused.json()["error"]
        firmware = (await api.get(f"/v1/products/{kit.product_id}/firmware/2")).json()
        assert firmware["running_seen_at"] is None
        # A Describe naming some other image in v2's place proves nothing either.
        forged = _application(v2, sha256=hashlib.sha256(b"not v2").digest())
        assert (await device.describe([forged])).code == Code.CHANGED
        assert (await _release(api, kit, 2)).status_code == 400
        # v1 ran (its image was described): its release is allowed.
        assert (await _release(api, kit, 1)).status_code == 200
        # The device reports v2's exact image (the SHA-256 naming its blob): now it is.
        assert (await device.describe([_application(v2)])).code == Code.CHANGED
        firmware = (await api.get(f"/v1/products/{kit.product_id}/firmware/2")).json()
        assert firmware["running_seen_at"] is not None
        released = await _release(api, kit, 2)
        assert released.status_code == 200, released.text
        assert released.json()["forced"] is False
        if transport == "udp":
            assert (await device.goodbye()).code == Code.CHANGED
        await device.aclose()


# -- finding 7: reserved event names and event sources -----------------------------------------

RESERVED_FROM_DEVICES = [
    FIRMWARE_RELEASED,  # particle/product/firmware/released
    STATUS,  # spark/status
    FLASH_REQUESTED,  # ota/device/flash/requested
    DEVICE_REVOKED,  # ota/device/revoked: would close the device's own session
    UPDATES_PENDING,
    "Spark/Status",  # Particle's rule is case-insensitive
    "PARTICLE-anything",
    "OTA/release/bytes",
]


def test_every_internal_event_name_is_reserved() -> None:
    from server import events
    from server.devices.session import SHUTDOWN_EVENT
    from server.events import reserved_prefix

    internal = [value for name, value in vars(events).items()
                if name.isupper() and isinstance(value, str) and "/" in value]
    internal += [DESCRIBE_CHANGED, RELEASE_BYTES_EVENT, SHUTDOWN_EVENT]
    assert len(internal) >= 10
    assert [name for name in internal if reserved_prefix(name) is None] == []
    # The system events devices may still publish include the emulator's heartbeat.
    from otacore.device.emulated_api import DeviceConfig
    from server.events import DEVICE_SYSTEM_EVENTS

    assert DeviceConfig.heartbeat_event in DEVICE_SYSTEM_EVENTS


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_device_may_not_publish_reserved_names_and_its_session_goes_on(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    kit = await start_device_server(nursery, tmp_path, count=1)
    (device_id,) = kit.device_ids
    with kit.handle.bus.subscribe(product_id=kit.product_id) as stream:
        device = await LinkDevice.connect(kit.creds_dir, device_id, transport,
                                          kit.address(transport))
        assert (await device.hello()).code == Code.CHANGED
        for name in RESERVED_FROM_DEVICES:  # more than a session's violation budget (5)
            answer = await device.publish(name, '{"version": 1, "immediate": true}')
            assert answer.code == Code.FORBIDDEN, name
            assert b"reserved" in bytes(answer.payload), bytes(answer.payload)
        # The session goes on: the device's own events and the protocol's system events
        # are taken (updates disabled is recorded), marked as the device's.
        assert (await device.publish("sensor/temp", "21.5")).code == Code.CHANGED
        enabled = await device.publish("particle/device/updates/enabled", "false")
        assert enabled.code == Code.CHANGED
        async with kit.api() as api:
            with trio.fail_after(STEP):  # recorded after the answer: wait for it
                while True:
                    record = (await api.get(
                        f"/v1/products/{kit.product_id}/devices/{device_id}")).json()
                    if record["firmware_updates_enabled"] is False:
                        break
                    await trio.sleep(0.02)
        assert record["online"] is True
        assert (await device.hello()).code == Code.CHANGED
        seen: list[Event] = []
        with trio.fail_after(STEP):
            while not any(e.name == "particle/device/updates/enabled" for e in seen):
                seen.append(await stream.receive.receive())
        if transport == "udp":
            assert (await device.goodbye()).code == Code.CHANGED
        await device.aclose()
    from server.events import EventSource  # imported here: the file's others run without it

    from_device = [e for e in seen if e.source is EventSource.DEVICE]
    assert [e.name for e in from_device] == ["sensor/temp", "particle/device/updates/enabled"]
    assert not [e for e in seen if e.name in RESERVED_FROM_DEVICES and not e.from_cloud]
    assert all(e.from_cloud for e in seen if e not in from_device)


async def test_listeners_act_on_the_clouds_events_only(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Even if a reserved name slipped through, a device's event would not revoke a
    session: the plane's listener takes the cloud's events only."""
    from server.events import EventSource
    kit = await start_device_server(nursery, tmp_path, count=2)
    kept_id, closed_id = kit.device_ids
    kept = await LinkDevice.connect(kit.creds_dir, kept_id, "tcp", kit.tcp)
    closed = await LinkDevice.connect(kit.creds_dir, closed_id, "tcp", kit.tcp)
    for device in (kept, closed):
        assert (await device.hello()).code == Code.CHANGED
    bus = kit.handle.bus
    bus.publish(Event(DEVICE_REVOKED, "true", product_id=kit.product_id, device_id=kept_id,
                      coreid=kept_id, source=EventSource.DEVICE))
    bus.publish(Event(DEVICE_REVOKED, "true", product_id=kit.product_id, device_id=kept_id,
                      coreid="api", source=EventSource.API))
    bus.publish(Event(DEVICE_REVOKED, "true", product_id=kit.product_id, device_id=closed_id,
                      coreid=closed_id))  # the cloud's, after the others on the same bus
    await closed.wait_closed()
    assert (await kept.hello()).code == Code.CHANGED  # the earlier two were ignored
    await kept.aclose()
    await closed.aclose()


async def test_relayed_events_keep_their_source(tmp_path: Path) -> None:
    from server.events import EventSource
    async with relay_pair(tmp_path) as (a, b):
        with b.bus.subscribe() as everything, b.bus.subscribe(cloud_only=True) as cloud:
            for source in (EventSource.DEVICE, EventSource.API, EventSource.CLOUD):
                a.bus.publish(Event(FLASH_REQUESTED, source.value, product_id=1,
                                    device_id="d1", source=source))
            with trio.fail_after(5):
                relayed = [await everything.receive.receive() for _ in range(3)]
                trusted = await cloud.receive.receive()
        assert [(e.data, e.source) for e in relayed] == [
            ("device", EventSource.DEVICE), ("api", EventSource.API),
            ("cloud", EventSource.CLOUD)]
        assert (trusted.data, trusted.source) == ("cloud", EventSource.CLOUD)


@pytest.mark.parametrize("name", [STATUS, FIRMWARE_RELEASED, FLASH_REQUESTED, "sPaRk/x"])
async def test_the_rest_api_may_not_publish_reserved_names(api, name: str) -> None:
    slug = (await api.create_product())["slug"]
    with api.handle.bus.subscribe() as stream:
        refused = await api.client.post(f"/v1/products/{slug}/events",
                                        json={"name": name, "data": "x"})
        assert refused.status_code == 400, refused.text
        assert "reserved" in refused.json()["error"]
        ok = await api.client.post(f"/v1/products/{slug}/events",
                                   json={"name": "ops/notice", "data": "x"})
        assert ok.status_code == 200
        event = stream.receive.receive_nowait()  # published synchronously
    assert (event.name, event.coreid) == ("ops/notice", "api")
    assert event.source.value == "api"
    assert stream.receive.statistics().current_buffer_used == 0


# -- finding 9: whole-string validation --------------------------------------------------------

D1 = "0123456789abcdef01234567"


async def test_a_trailing_newline_never_makes_a_second_spelling(api) -> None:
    product = await api.create_product()
    slug = product["slug"]
    before = await api.snapshot()
    for bad in (D1 + "\n", D1.upper() + "\n", "\n" + D1, D1 + "\n\n"):
        response = await api.client.post(f"/v1/products/{slug}/devices", json={"id": bad})
        assert response.status_code == 400, (bad, response.text)
        assert "24 hexadecimal digits" in response.json()["error"]
    for body in ({"name": "beta\n"}, {"name": "beta", "color": "#a0b0c0\n"}):
        response = await api.client.post(f"/v1/products/{slug}/groups", json=body)
        assert response.status_code == 400, (body, response.text)
    assert await api.snapshot() == before  # no row, no audit entry
    assert (await api.client.post(f"/v1/products/{slug}/devices",
                                  json={"id": D1})).status_code == 200
    response = await api.client.get(f"/v1/products/{slug}/devices/{D1}%0A")
    assert response.status_code == 400, response.text
    devices = (await api.client.get(f"/v1/products/{slug}/devices")).json()["devices"]
    assert [d["id"] for d in devices] == [D1]


# -- finding 12: a module naming another product -----------------------------------------------


async def test_an_upload_naming_another_product_is_refused(api) -> None:
    product = await api.create_product()
    slug, product_id = product["slug"], product["id"]
    assert product_id not in (OTHER_PRODUCT, BORON)
    before = await api.snapshot()
    refused = await api.upload(slug, 3, _built_for(OTHER_PRODUCT, 3))
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert f"built for product {OTHER_PRODUCT}" in error and f"id {product_id}" in error
    # The development flash checks the same.
    await api.client.post(f"/v1/products/{slug}/devices", json={"id": D1})
    await api.client.put(f"/v1/products/{slug}/devices/{D1}", json={"development": True})
    before = await api.snapshot()
    refused = await api.client.put(f"/v1/products/{slug}/devices/{D1}",
                                   files={"file": ("dev.bin", _built_for(OTHER_PRODUCT, 4))})
    assert refused.status_code == 400, refused.text
    assert f"built for product {OTHER_PRODUCT}" in refused.json()["error"]
    assert await api.snapshot() == before
    # No product id (the platform's, Device OS >= 4.0) or this product's own: accepted.
    assert (await api.upload(slug, 3, _built_for(BORON, 3))).status_code == 201
    assert (await api.upload(slug, 4, _built_for(product_id, 4))).status_code == 201
    flashed = await api.client.put(f"/v1/products/{slug}/devices/{D1}",
                                   files={"file": ("dev.bin", _built_for(product_id, 5))})
    assert flashed.status_code == 200, flashed.text


def test_the_device_refuses_an_image_of_another_product_under_its_own_manifest() -> None:
    key = SigningKey.from_private_bytes(bytes(range(32)))
    trust = TrustStore.initial(7, [key.public_key])
    installed = [(ModuleFunction.SYSTEM_PART, 1, 5003)]
    for named, accepted in ((OTHER_PRODUCT, False), (BORON, True), (7, True)):
        image = _built_for(named, 2)
        signed = sign_manifest(key, manifest_for_module(image, product_id=7)).to_bytes()
        verdict = accept_download(image, signed, trust, platform_id=BORON, installed=installed)
        assert verdict.accepted is accepted, (named, verdict.detail)
        if not accepted:
            assert verdict.reason is RejectReason.WRONG_PRODUCT
            assert f"built for product {OTHER_PRODUCT}" in verdict.detail


async def test_an_emulated_device_refuses_another_products_image_over_real_sockets(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A foreign image stored before the upload check existed (written to the store
    directly here) is signed into the product's manifest by the server; the device still
    refuses it after the transfer, and keeps running its image."""
    async with ota_rig(nursery, tmp_path, count=1) as rig:
        (device_id,) = rig.ids
        await rig.upload_device_os(SYSTEM_5003)
        foreign = _built_for(OTHER_PRODUCT, 2)
        store, info = rig.kit.handle.store, validate_module(foreign)

        def store_directly() -> None:
            blob = store.blobs.put(foreign)
            with store.write() as tx:
                tx.insert_firmware(
                    product_id=rig.product, version=2, title="v2", description="",
                    filename="f.bin", size=len(foreign), sha256=blob,
                    platform_id=info.platform_id, module_function=info.module_function,
                    module_index=info.module_index, module_version=info.module_version,
                    module_info=info.to_json(), uploaded_by="old-server", uploaded_at=1)

        await trio.to_thread.run_sync(store_directly)
        fleet = rig.fleet([(device_id, "tcp")])
        async with running(fleet):
            await fleet.wait_until(updated_to(device_id, 1), timeout=STEP)
            await rig.put_device(device_id, desired_firmware_version=2, flash=True)
            await rig.events.wait_for("spark/flash/status", device_id, "failed")
            assert product_version(fleet, device_id) == 1
            assert "WRONG_PRODUCT" in fleet.device(device_id).device.last_error
        assert flash_statuses(rig.events, device_id) == ["started", "failed"]
        assert sha(foreign) not in {m.sha256.hex() for m in
                                    fleet.device(device_id).device.describe().modules}
