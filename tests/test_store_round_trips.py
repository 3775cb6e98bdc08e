"""The store stays off a device session's hot path (issue 14, item 7), over real TLS 1.3 and
DTLS 1.2 sessions to the real server and its SQLite file: a reconnecting device waits on the
store once to be authorized and once per message that changes what is stored, never for
state the server already holds; and what is held (the OTA memory a presence write read) is
never stale across sessions or processes."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from otacore.coap import Code
from otacore.messages import Dependency, ModuleDescription
from server.devices.plane import DevicePlane
from server.events import UPDATES_PENDING, EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.fleet.errors import WrongPlatformError
from server.fleet.hand_off import MemoryHandOff
from server.fleet.recent_blobs import RecentBlobs
from server.fleet.rollouts import RolloutService
from server.store import Store
from server.store.tx_ota import OtaMemoryRecord
from tests.device_client import LinkDevice
from tests.device_server import DeviceServerKit, start_device_server
from tests.test_revocation import assert_refused, assert_served

TRANSPORTS = ["tcp", "udp"]
SHA_A, SHA_B = "a" * 64, "b" * 64
#: The store work of each round trip, by name (FleetBase.round_trips.by_name).
AUTHORIZE = "SessionService.authorize_device.<locals>.read"
PRESENCE = "PresenceService._set_online.<locals>.work"
HELLO = "SessionService.record_device_hello.<locals>.work"
DESCRIBE = "SessionService.record_describe.<locals>.work"
TARGET_READ = "SessionService.target_for_device.<locals>.work"

#: The rollout ticker's read (server/rollout_ticks.py), on its own interval.
ROLLOUT_TICK_READ = RolloutService._active_rollouts.__qualname__


def _modules() -> list[ModuleDescription]:
    return [
        ModuleDescription(4, 1, 5003, 0, 600_000, bytes(range(32)), (Dependency(2, 0, 2001),)),
        ModuleDescription(5, 1, 7, 0, 90_000, bytes(32), (Dependency(4, 1, 5003),)),
    ]


def _plane(kit: DeviceServerKit) -> DevicePlane:
    assert kit.handle.devices is not None
    return kit.handle.devices


async def _until_idle(kit: DeviceServerKit, device_id: str) -> None:
    """Wait until the device's updater has handled every kick its session asked for (the
    engine's causal marker: nothing left to read or write for this session)."""
    plane = _plane(kit)
    with trio.fail_after(20):
        while (updater := plane.live.updater(device_id)) is None or (
                not updater.memory_loaded.is_set()):
            await trio.sleep(0.01)
        await updater.handled.reached(updater.kicks)


async def _session(kit: DeviceServerKit, device_id: str, transport: str, **hello: object
                   ) -> LinkDevice:
    """Connect, Hello, Describe, and wait until the session is idle."""
    device = await LinkDevice.connect(kit.creds_dir, device_id, transport,
                                      kit.address(transport))
    assert (await device.hello(product_version=7, **hello)).code == Code.CHANGED  # type: ignore[arg-type]
    assert (await device.describe(_modules())).code == Code.CHANGED
    await _until_idle(kit, device_id)
    return device


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_reconnecting_session_waits_on_the_store_once_per_stored_change(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    """Handshake to idle: one read (the handshake's authorization, fresh at every
    handshake so a revocation from any process takes effect) and three group-committed
    writes (presence, Hello, Describe); before: three reads and three to five writes (the
    Hello's platform read, the updater's memory read, separate writes for a Hello's
    updates-enabled and held-reset flags)."""
    kit = await start_device_server(nursery, tmp_path, count=1)
    device_id = kit.device_ids[0]
    fleet = kit.handle.fleet
    first = await _session(kit, device_id, transport)  # records the certificate as seen
    if transport == "udp":  # DTLS has no connection to close: the device says goodbye
        assert (await first.goodbye()).code == Code.CHANGED
    await first.aclose()
    with trio.fail_after(20):  # its session's end wrote the device offline
        while (await fleet.target_for_device(device_id)).device.online:
            await trio.sleep(0.01)
    before = Counter(fleet.round_trips.by_name)
    # Flags that differ from what is stored: before, each cost one more write.
    device = await _session(kit, device_id, transport, updates_enabled=False)
    trips = Counter(fleet.round_trips.by_name)
    trips.subtract(before)
    # The process's rollout ticker reads the active rollouts on its own clock, not the
    # session's: a tick that lands inside this window is not the session's round trip.
    trips.pop(ROLLOUT_TICK_READ, None)
    trips = +trips
    print(f"{transport}: store round trips from handshake to idle: {dict(trips)}")
    # The updater plans from the target the Describe's transaction handed it, and that
    # check answers the Describe's kick: no second check reads the target again.
    assert trips.pop(TARGET_READ, 0) == 0
    assert trips == {AUTHORIZE: 1, PRESENCE: 1, HELLO: 1, DESCRIBE: 1}
    view = await fleet.target_for_device(device_id)
    assert view.device.firmware_updates_enabled is False and view.device.online is True
    assert view.device.firmware_version == 7 and view.device.platform_id == 13
    await device.aclose()


async def test_the_updater_takes_the_memory_its_presence_write_read(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The OTA memory a session starts with is the store's at its presence write, written
    meanwhile by another process (a second Store on the same SQLite file): nothing of an
    earlier session of this process is reused."""
    kit = await start_device_server(nursery, tmp_path, count=1)
    device_id = kit.device_ids[0]
    engine = _plane(kit).ota
    device = await _session(kit, device_id, "tcp")
    assert engine.failed.get(device_id) is None and device_id not in engine.updating
    await device.aclose()
    with trio.fail_after(20):
        while device_id in _plane(kit).live:
            await trio.sleep(0.01)

    other = Store.open_dir(kit.data_dir)  # another process's view of the same database
    try:
        other_fleet = Fleet(other, EventBus())
        await other_fleet.save_ota_memory(OtaMemoryRecord(
            device_id, updating_sha256=SHA_B, refused=(SHA_A,)))
    finally:
        other.close()
    fleet = kit.handle.fleet
    memory_reads = fleet.round_trips.by_name["OtaMemoryService.load_ota_memory.<locals>.work"]
    device = await _session(kit, device_id, "tcp")
    assert engine.failed[device_id] == {SHA_A}
    assert engine.updating[device_id] == SHA_B
    # Handed over by the presence write: not read again.
    assert fleet.round_trips.by_name["OtaMemoryService.load_ota_memory.<locals>.work"] == (
        memory_reads)
    assert len(kit.handle.fleet.memory_hand_off) == 0  # taken, not left behind
    await device.aclose()


async def test_a_wrong_platform_is_refused_in_the_hellos_own_write_which_records_nothing(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The platform check moved into the Hello's transaction: a Hello naming another
    platform raises WrongPlatformError before anything is written; moving the device to a
    product of that platform (from another process) makes the next Hello pass, with no
    cached platform in the way."""
    kit = await start_device_server(nursery, tmp_path, count=1)
    device_id = kit.device_ids[0]
    fleet = kit.handle.fleet
    before = await fleet.target_for_device(device_id)
    with pytest.raises(WrongPlatformError, match=r"platform 13.*names platform 12") as caught:
        await fleet.record_device_hello(device_id, platform_id=12, product_version=9,
                                        system_version=1, updates_enabled=False,
                                        reset_pending=True, bound_platform=True)
    assert (caught.value.product_platform, caught.value.hello_platform) == (13, 12)
    after = await fleet.target_for_device(device_id)
    assert after.device == before.device  # not a column changed, not even updated_at

    # Another process (a second Store and Fleet on the same SQLite file) moves the device
    # to an Argon product: remove it from its product, add it to the other.
    other = Store.open_dir(kit.data_dir)
    try:
        other_fleet = Fleet(other, EventBus())
        argon = other_fleet.create_product_sync(SYSTEM_ACTOR, "Argons", 12)
        await other_fleet.remove_device(SYSTEM_ACTOR, kit.product_id, device_id)
        await other_fleet.add_device(SYSTEM_ACTOR, argon.id, device_id)
    finally:
        other.close()
    view = await fleet.record_device_hello(device_id, platform_id=12, product_version=9,
                                           system_version=1, bound_platform=True)
    assert view.product.id == argon.id and view.device.firmware_version == 9


def test_the_hand_off_is_bounded_take_once_and_per_device() -> None:
    hand_off = MemoryHandOff(capacity=2)
    d1, d2, d3 = "0" * 24, "1" * 24, "2" * 24
    hand_off.put("p/1", OtaMemoryRecord(d1, refused=(SHA_A,)))
    hand_off.put("p/2", OtaMemoryRecord(d2))
    hand_off.put("p/3", OtaMemoryRecord(d3))  # the oldest goes: its updater reads instead
    assert len(hand_off) == 2
    assert hand_off.take("p/1", d1) is None
    assert hand_off.take("p/2", d1) is None  # another device's: never handed over
    assert hand_off.take("p/2", d2) is None  # ... and gone
    memory = hand_off.take("p/3", d3)
    assert memory is not None and memory.device_id == d3
    assert hand_off.take("p/3", d3) is None
    hand_off.put("p/4", OtaMemoryRecord(d1))
    hand_off.drop("p/4")
    assert len(hand_off) == 0
    with pytest.raises(ValueError, match="at least 1"):
        MemoryHandOff(capacity=0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_another_processs_revocation_and_removal_take_effect_at_the_next_handshake(
    nursery: trio.Nursery, tmp_path: Path, transport: str
) -> None:
    """Nothing about authorization is held between handshakes: a revocation, and the
    removal of a device, committed by another process (a second Store and Fleet on the same
    SQLite file, whose events this server never sees) refuse the next handshake, which
    reads the store in a read shared with other handshakes."""
    kit = await start_device_server(nursery, tmp_path, count=2)
    revoked_id, removed_id = kit.device_ids
    for device_id in kit.device_ids:  # both served, their certificates recorded as seen
        await assert_served(kit, kit.creds_dir, device_id, transport)
    other = Store.open_dir(kit.data_dir)
    try:
        other_fleet = Fleet(other, EventBus())
        await other_fleet.set_certs_revoked(SYSTEM_ACTOR, kit.product_id, revoked_id, True)
        await other_fleet.remove_device(SYSTEM_ACTOR, kit.product_id, removed_id)
    finally:
        other.close()
    authorizations = kit.handle.fleet.round_trips.by_name[AUTHORIZE]
    await assert_refused(kit, kit.creds_dir, revoked_id, transport)
    await assert_refused(kit, kit.creds_dir, removed_id, transport)
    assert kit.handle.fleet.round_trips.by_name[AUTHORIZE] == authorizations + 2


async def test_a_base_image_is_read_once_and_still_checked_at_every_ask(
    store: Store, make_firmware: Callable[..., bytes]
) -> None:
    """``blob_for_product`` (a patch release asks it for every device's base): the bytes of
    a recently read image come from memory, but whether the device's product may have it is
    asked of the store every time: another product's device gets nothing, and once the
    firmware is deleted nobody does, though its bytes were held."""
    fleet = Fleet(store, EventBus())
    product = fleet.create_product_sync(SYSTEM_ACTOR, "Bases", 13)
    other = fleet.create_product_sync(SYSTEM_ACTOR, "Others", 13)
    image = make_firmware(3)
    await fleet.upload_firmware(SYSTEM_ACTOR, product.id, image, version=3, title="v3")
    sha256 = hashlib.sha256(image).hexdigest()
    get = f"{type(store.blobs).__name__}.get"  # the directory's or the database's
    blob_reads = fleet.round_trips.by_name[get]
    for _ in range(5):
        assert await fleet.blob_for_product(product.id, 13, sha256) == image
    assert fleet.round_trips.by_name[get] == blob_reads + 1  # read once
    assert await fleet.blob_for_product(other.id, 13, sha256) is None
    await fleet.delete_firmware(SYSTEM_ACTOR, product.id, 3)
    assert len(fleet.recent_blobs) == 1  # the bytes are still held ...
    assert await fleet.blob_for_product(product.id, 13, sha256) is None  # ... not handed out


def test_recent_blobs_are_bounded_in_count_and_size() -> None:
    blobs = RecentBlobs(max_entries=2, max_bytes=4)
    blobs.put(SHA_A, b"aaaa")
    blobs.put(SHA_B, b"bb")
    assert blobs.get(SHA_A) == b"aaaa"  # now the most recently used
    blobs.put("c" * 64, b"c")
    assert blobs.get(SHA_B) is None and blobs.get(SHA_A) == b"aaaa" and len(blobs) == 2
    blobs.put("d" * 64, b"too big")
    assert blobs.get("d" * 64) is None
    with pytest.raises(ValueError, match="at least one image"):
        RecentBlobs(max_entries=0)


async def test_a_hellos_flags_are_recorded_in_its_one_write(
    store: Store, make_firmware: Callable[..., bytes]
) -> None:
    """A Hello with updates disabled and a held reset: one write records both, and the
    target it returns (and the row, and the one "updates pending" event) already reflect
    them, as the separate writes did before."""
    bus = EventBus()
    fleet = Fleet(store, bus)
    product = fleet.create_product_sync(SYSTEM_ACTOR, "Flags", 13)
    device_id = "0123456789abcdef01234567"
    with store.write() as tx:
        tx.insert_device(device_id, product.id, 0)
    await fleet.upload_firmware(SYSTEM_ACTOR, product.id, make_firmware(2), version=2,
                                title="v2")
    await fleet.release_firmware(SYSTEM_ACTOR, product.id, 2, product_default=True, force=True)
    writes = fleet.round_trips.writes
    with bus.subscribe(device_id=device_id, name_prefix=UPDATES_PENDING) as events:
        view = await fleet.record_device_hello(
            device_id, platform_id=13, product_version=1, system_version=1,
            updates_enabled=False, reset_pending=True, bound_platform=True)
        assert events.receive.receive_nowait().data == "true"  # target 2, runs 1, disabled
        with pytest.raises(trio.WouldBlock):
            events.receive.receive_nowait()
    assert fleet.round_trips.writes == writes + 1
    with store.read() as tx:
        stored = tx.get_device(device_id)
    assert view.device == stored
    assert stored is not None and not stored.firmware_updates_enabled and stored.reset_pending
    assert stored.updates_pending and view.target.version == 2
