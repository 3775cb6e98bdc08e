"""The device-session store path with prebuilt statements: its records equal what plain
per-call queries read, and its shortcuts (no re-reads, one-statement updates) keep the
results the fleet gave before."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
import trio

from otacore.errors import ValidationError
from otacore.precedence import TargetReason
from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.fleet.errors import UnknownDeviceError
from server.store import DeviceRecord, ProductRecord, Store, Tx
from server.store import schema as t
from server.store.records import record_columns, record_from
from server.store.tx_firmware import group_scope

D1 = "0123456789abcdef01234567"
D2 = "89abcdef0123456789abcdef"
UNKNOWN = "ffffffffffffffffffffffff"


class Clock:
    """A settable clock (epoch ms) for the fleet."""

    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        self.now += 1
        return self.now


@pytest.fixture
def fleet(store: Store) -> Fleet:
    return Fleet(store, EventBus(), clock=Clock())


def _product(store: Store, fleet: Fleet) -> ProductRecord:
    product = fleet.create_product_sync(SYSTEM_ACTOR, "Hot path", 13)
    with store.write() as tx:
        for device_id in (D1, D2):
            tx.insert_device(device_id, product.id, 0)
    return product


def _firmware(tx: Tx, product_id: int, version: int) -> None:
    tx.insert_firmware(
        product_id=product_id,
        version=version,
        title=f"v{version}",
        description="",
        filename="fw.bin",
        size=100,
        sha256=f"{version:064x}",
        platform_id=13,
        module_function=5,
        module_index=1,
        module_version=6,
        module_info={"version": version},
        uploaded_by="test",
        uploaded_at=0,
    )


def _flash(tx: Tx, device_id: str, version: int, status: str) -> int:
    flash = tx.insert_flash(
        device_id=device_id,
        kind="product",
        version=version,
        sha256=f"{version:064x}",
        size=100,
        filename="fw.bin",
        module_info=None,
        status=status,
        error="",
        requested_by="test",
        requested_at=0,
        finished_at=None,
    )
    return flash.id


def _device_read_plainly(tx: Tx, device_id: str) -> DeviceRecord | None:
    """The device as per-call queries read it (a mapping row plus a groups query)."""
    row = tx.conn.execute(sa.select(t.devices).where(t.devices.c.id == device_id)).mappings()
    found = row.first()
    if found is None:
        return None
    names = tx.conn.execute(
        sa.select(t.groups.c.name)
        .join(t.device_groups, t.device_groups.c.group_id == t.groups.c.id)
        .where(t.device_groups.c.device_id == device_id)
        .order_by(t.groups.c.name)
    )
    return record_from(DeviceRecord, found, groups=tuple(name for (name,) in names))


def test_device_records_equal_plain_reads(store: Store, fleet: Fleet) -> None:
    product = _product(store, fleet)
    with store.write() as tx:
        groups = tx.ensure_groups(product.id, ["zeta", "alpha", "mid"], now=5)
        tx.set_device_groups(D1, [group.id for group in groups])
        modules = [{"function": 4, "index": 1, "version": 5003, "deps": [[2, 0, 1]]}]
        assert tx.update_device(D1, {"modules": modules, "name": "n1", "online": True}, 9)
        assert not tx.update_device(UNKNOWN, {"online": True}, 9)  # no such row
    with store.read() as tx:
        for device_id in (D1, D2):
            plain = _device_read_plainly(tx, device_id)
            assert tx.get_device(device_id) == plain
            assert tx.get_device_and_product(device_id) == (plain, product)
        device = tx.get_device(D1)
        assert device is not None and device.groups == ("alpha", "mid", "zeta")
        assert device.modules == modules and device.online is True and device.updated_at == 9
        assert tx.get_device_online(D1) == (product.id, True)
        assert tx.get_device_online(D2) == (product.id, False)
        assert tx.get_device(UNKNOWN) is None
        assert tx.get_device_and_product(UNKNOWN) is None
        assert tx.get_device_online(UNKNOWN) is None
        assert tx.get_product(product.id) == tx.get_product(product.slug) == product


def test_advance_update_state_keeps_start_for_the_same_image(store: Store, fleet: Fleet) -> None:
    _product(store, fleet)
    common: dict[str, Any] = {"version": 3, "transfer": "full", "bytes_total": 100}
    with store.write() as tx:
        assert not tx.advance_update_state(
            D1, sha256="aa" * 32, bytes_done=1, status="in_progress", now=10, **common
        )
        assert tx.get_update_state(D1) is None  # nothing stored: the caller inserts
    fleet_progress(fleet, D1, "aa" * 32, 10)
    fleet_progress(fleet, D1, "aa" * 32, 20)
    with store.read() as tx:
        first = tx.get_update_state(D1)
    assert first is not None and first.bytes_done == 20 and first.started_at < first.updated_at
    fleet_progress(fleet, D1, "bb" * 32, 5)  # another image: the transfer starts anew
    with store.read() as tx:
        second = tx.get_update_state(D1)
    assert second is not None and second.sha256 == "bb" * 32
    assert second.started_at == second.updated_at > first.updated_at


def fleet_progress(fleet: Fleet, device_id: str, sha256: str, done: int) -> None:
    async def main() -> None:
        await fleet.record_update_progress(
            device_id, sha256=sha256, version=3, transfer="full", bytes_done=done, bytes_total=100
        )

    trio.run(main)


async def test_one_statement_writes_still_refuse_unknown_devices(
    store: Store, fleet: Fleet
) -> None:
    _product(store, fleet)
    for call in (
        fleet.set_reset_pending(UNKNOWN, True),
        fleet.device_online(UNKNOWN),
        fleet.device_offline(UNKNOWN),
        fleet.record_update_progress(
            UNKNOWN, sha256="aa" * 32, version=None, transfer="zstd", bytes_done=1, bytes_total=2
        ),
    ):
        with pytest.raises(UnknownDeviceError, match=f"device {UNKNOWN} is not in any product"):
            await call
    with pytest.raises(ValidationError):
        await fleet.set_reset_pending("not-a-device-id", True)
    await fleet.set_reset_pending(D1.upper(), True)  # ids are normalised as before
    with store.read() as tx:
        device = tx.get_device(D1)
        assert tx.get_update_state(UNKNOWN) is None
    assert device is not None and device.reset_pending is True


async def test_session_views_equal_a_fresh_read(store: Store, fleet: Fleet) -> None:
    product = _product(store, fleet)
    with store.write() as tx:
        for version in (1, 2, 3):
            _firmware(tx, product.id, version)
        tx.set_release(product.id, None, version=3, intelligent=False, actor="t", now=1)
    hello = await fleet.record_device_hello(
        D1, platform_id=13, product_version=1, system_version=4100, ip="10.0.0.9"
    )
    assert hello == await fleet.target_for_device(D1)
    assert hello.firmware is not None and hello.firmware.version == 3
    # Tuples in a module come back as JSON lists, in the returned view as in the store.
    modules = [{"function": 4, "index": 1, "version": 5003, "deps": ((2, 0, 1),)}]
    described = await fleet.record_describe(D1, modules)
    assert described == await fleet.target_for_device(D1)
    assert described.device.modules == [
        {"function": 4, "index": 1, "version": 5003, "deps": [[2, 0, 1]]}
    ]
    assert described.device.system_version == 5003
    disabled = await fleet.set_updates_enabled(D1, False)
    assert disabled == await fleet.target_for_device(D1)
    assert disabled.device.updates_pending is True  # target 3, runs 1, updates disabled


async def test_hello_finishing_a_flash_reads_the_next_one(store: Store, fleet: Fleet) -> None:
    product = _product(store, fleet)
    with store.write() as tx:
        for version in (1, 2):
            _firmware(tx, product.id, version)
        older = _flash(tx, D1, 1, "started")  # a flash still under way ...
        # ... and a newer one, as an older server left them (insert_flash now supersedes
        # every open flash, so it is written directly).
        tx.conn.execute(sa.insert(t.device_flashes).values(
            device_id=D1, kind="product", version=2, sha256=f"{2:064x}", size=100,
            filename="fw.bin", module_info=None, status="pending", error="",
            requested_by="test", requested_at=0, finished_at=None))
    view = await fleet.record_device_hello(
        D1, platform_id=13, product_version=2, system_version=4100
    )
    assert view.pending_flash is not None and view.pending_flash.id == older
    assert view == await fleet.target_for_device(D1)


@dataclass
class Counters:
    started: int
    succeeded: int
    failed: int


def _counters(store: Store, product_id: int) -> dict[str, Counters]:
    with store.read() as tx:
        return {
            release.scope: Counters(
                release.devices_started, release.devices_succeeded, release.devices_failed
            )
            for release in tx.list_releases(product_id)
        }


async def test_flash_status_counts_on_the_deciding_release(store: Store, fleet: Fleet) -> None:
    product = _product(store, fleet)
    with store.write() as tx:
        for version in (1, 2):
            _firmware(tx, product.id, version)
        (beta,) = tx.ensure_groups(product.id, ["beta"], now=1)
        tx.set_device_groups(D1, [beta.id])
        tx.set_release(product.id, None, version=1, intelligent=False, actor="t", now=1)
        tx.set_release(product.id, beta.id, version=2, intelligent=False, actor="t", now=1)
    assert (await fleet.target_for_device(D1)).target.reason == TargetReason.GROUP_RELEASE
    await fleet.record_flash_status(D1, "started")  # D1 follows the beta release
    await fleet.record_flash_status(D1, "success")
    await fleet.record_flash_status(D2, "started")  # D2 follows the product default
    await fleet.record_flash_status(D2, "failed", error="boom")
    assert _counters(store, product.id) == {
        "product": Counters(1, 0, 1),
        group_scope(beta.id): Counters(1, 1, 0),
    }


def test_record_columns_follow_the_record_fields() -> None:
    columns = record_columns(DeviceRecord, t.devices, skip=("groups",))
    assert [column.key for column in columns][:3] == ["id", "product_id", "name"]
    with pytest.raises(LookupError, match=r"DeviceRecord\.groups has no column"):
        record_columns(DeviceRecord, t.devices)
    with pytest.raises(LookupError, match="skipped fields must come after"):
        record_columns(ProductRecord, t.products, skip=("id",))


async def test_releases_come_with_their_firmware(store: Store, fleet: Fleet) -> None:
    product = _product(store, fleet)
    with store.write() as tx:
        for version in (1, 2, 4):
            _firmware(tx, product.id, version)
        (beta, gamma) = tx.ensure_groups(product.id, ["beta", "gamma"], now=1)
        tx.set_release(product.id, None, version=1, intelligent=False, actor="t", now=1)
        tx.set_release(product.id, beta.id, version=2, intelligent=True, actor="t", now=1)
        tx.set_release(product.id, gamma.id, version=9, intelligent=False, actor="t", now=1)
        tx.update_device(D2, {"desired_firmware_version": 4}, now=2)  # locked, not released
    with store.read() as tx:
        releases, firmware = tx.list_releases_with_firmware(product.id)
        assert releases == tx.list_releases(product.id)
        assert [release.group_name for release in releases] == [None, "beta", "gamma"]
        assert firmware == {v: tx.get_firmware(product.id, v) for v in (1, 2)}  # no 9
    locked = await fleet.target_for_device(D2)
    assert locked.target.reason == TargetReason.LOCKED
    assert locked.firmware is not None and locked.firmware.version == 4
    default = await fleet.target_for_device(D1)
    assert default.firmware is not None and default.firmware.version == 1
    # The one-device path gives what the many-devices path (after a release) gives.
    for device_id in (D1, D2):
        await fleet.device_online(device_id)
    many = await fleet.online_devices_needing_update(product.id)
    assert many == [await fleet.target_for_device(device_id) for device_id in (D1, D2)]


async def test_presence_belongs_to_the_session_that_set_it(store: Store, fleet: Fleet) -> None:
    """A device that reconnected (maybe to another server process) before its old session
    ended stays online when the old one ends; a dead process's sessions are cleared."""
    _product(store, fleet)
    await fleet.device_online(D1, session="worker0-1/7")
    await fleet.device_online(D1, session="worker1-2/3")  # it reconnected elsewhere
    await fleet.device_offline(D1, session="worker0-1/7")  # the old session noticed late
    assert (await fleet.target_for_device(D1)).device.online
    await fleet.device_offline(D1, session="worker1-2/3")
    assert not (await fleet.target_for_device(D1)).device.online

    await fleet.device_online(D1, session="worker1-2/4")
    await fleet.device_online(D2, session="worker1-2/40")
    with pytest.raises(ValueError, match="origin"):  # an origin, never a session token:
        await fleet.sessions_lost("worker1-2/4")  # (it would name no process; nothing changes)
    assert (await fleet.target_for_device(D1)).device.online
    assert await fleet.sessions_lost("worker1-2") == 2
    for device_id in (D1, D2):
        assert not (await fleet.target_for_device(device_id)).device.online
    await fleet.device_online(D2, session="worker1-9/1")
    assert await fleet.sessions_lost("worker1-2") == 0  # a later process's sessions stay
    assert (await fleet.target_for_device(D2)).device.online


async def test_a_late_hello_of_an_old_session_leaves_presence_alone(
    store: Store, fleet: Fleet
) -> None:
    """The device moved to a newer session, which ended: a Hello the old session records
    only now must not mark the device online again with no session owning that."""
    _product(store, fleet)
    await fleet.device_online(D1, session="worker0-1/1")
    await fleet.device_online(D1, session="worker1-2/1")  # it reconnected elsewhere
    await fleet.device_offline(D1, session="worker1-2/1")  # and that session ended
    await fleet.record_device_hello(D1, platform_id=13, product_version=None,
                                    system_version=None, session="worker0-1/1")
    assert not (await fleet.target_for_device(D1)).device.online
    # Without a session (a caller that does not track presence) a Hello still means online.
    await fleet.record_device_hello(D1, platform_id=13, product_version=None,
                                    system_version=None)
    assert (await fleet.target_for_device(D1)).device.online


def _flash_statuses(store: Store, device_id: str) -> list[tuple[int | None, str]]:
    with store.read() as tx:
        rows = tx.conn.execute(
            sa.select(t.device_flashes.c.version, t.device_flashes.c.status)
            .where(t.device_flashes.c.device_id == device_id)
            .order_by(t.device_flashes.c.id)
        )
        return [(version, status) for version, status in rows]


async def test_a_new_flash_supersedes_one_under_way(store: Store, fleet: Fleet) -> None:
    product = _product(store, fleet)
    with store.write() as tx:
        for version in (1, 2):
            _firmware(tx, product.id, version)
        _flash(tx, D1, 1, "started")
        newer = _flash(tx, D1, 2, "pending")
        assert tx.pending_flash(D1) is not None and tx.pending_flash(D1).id == newer  # type: ignore[union-attr]
    assert _flash_statuses(store, D1) == [(1, "superseded"), (2, "pending")]
    # Once the newer one succeeded nothing is left to flash: the older image is not
    # offered again (it was, before: the older open flash became the target).
    await fleet.record_flash_status(D1, "success", application_sha256=f"{2:064x}")
    assert _flash_statuses(store, D1) == [(1, "superseded"), (2, "succeeded")]
    assert (await fleet.target_for_device(D1)).pending_flash is None


async def test_a_status_about_an_older_image_leaves_the_new_flash_pending(
    store: Store, fleet: Fleet
) -> None:
    """The operator asked for a new flash while the previous image was on its way: that
    image's start, success or failure is not the new flash's, which the device has not
    received yet."""
    product = _product(store, fleet)
    with store.write() as tx:
        for version in (1, 2):
            _firmware(tx, product.id, version)
        _flash(tx, D1, 1, "started")
        _flash(tx, D1, 2, "pending")
    for status in ("started", "success", "failed"):
        await fleet.record_flash_status(D1, status, application_sha256=f"{1:064x}")  # type: ignore[arg-type]
        assert _flash_statuses(store, D1) == [(1, "superseded"), (2, "pending")], status
    await fleet.record_flash_status(D1, "started", application_sha256=f"{2:064x}")
    assert _flash_statuses(store, D1) == [(1, "superseded"), (2, "started")]
    # A Device OS part ahead of the application names no application: it is the flash's.
    await fleet.record_flash_status(D1, "failed", error="system part refused")
    assert _flash_statuses(store, D1) == [(1, "superseded"), (2, "failed")]
