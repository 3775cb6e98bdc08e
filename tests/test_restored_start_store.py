"""The store side of starting restored sessions in batches (``server.devices.restored_start``),
on a real SQLite store and on PostgreSQL: the grouped presence write leaves every device
exactly as one ``device_online`` per device does (same columns, same events, same OTA memory
handed off), and the grouped target read gives every device the target ``target_view`` gives
it alone (releases, groups, locks, pending flashes, several products)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import trio

from server.events import STATUS, Event, EventBus
from server.fleet import Fleet
from server.fleet.targets import target_view, targets_of_devices
from server.store import Store
from server.store import schema as t
from server.store.tx_many_devices import ManyDeviceQueries
from server.store.tx_ota import OtaMemoryRecord
from tests.provisioning import provision_product
from tests.test_store_session_path import _firmware, _flash

NOW = 1_800_000_000_000
#: The presence columns a session's start writes.
_PRESENCE = ("online", "last_heard_at", "session_owner", "session_node",
             "session_lease_until", "last_ip_address", "updated_at")


def _rows(store: Store, ids: list[str]) -> dict[str, dict[str, Any]]:
    columns = [t.devices.c[name] for name in _PRESENCE]
    with store.read() as tx:
        rows = tx.conn.execute(sa.select(t.devices.c.id, *columns)
                               .where(t.devices.c.id.in_(ids))).mappings()
        return {row["id"]: {name: row[name] for name in _PRESENCE} for row in rows}


def _put_back(store: Store, rows: dict[str, dict[str, Any]]) -> None:
    with store.write() as tx:
        for device_id, values in rows.items():
            tx.conn.execute(sa.update(t.devices).where(t.devices.c.id == device_id)
                            .values(**values))


def _status_events(bus: EventBus, run: Any) -> list[tuple[str | None, str | None, int | None]]:
    with bus.subscribe(name_prefix=STATUS) as subscription:
        run()
        events: list[Event] = []
        while True:
            try:
                events.append(subscription.receive.receive_nowait())
            except trio.WouldBlock:
                break
    return sorted((e.device_id, e.data, e.product_id) for e in events)


@pytest.mark.parametrize("chunk", [2, 500])
def test_grouped_presence_write_equals_one_write_per_device(
    store: Store, data_dir: Path, tmp_path: Path, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seven devices (two already online with another session, one with an OTA memory,
    one without an address) and one removed while the server was down: the grouped write
    (in chunks of ``chunk`` devices) gives the same rows and spark/status events as one
    ``device_online`` each, hands off the same memories, and reports the removed one."""
    monkeypatch.setattr(ManyDeviceQueries, "MANY_CHUNK", chunk)
    _, devices = provision_product(store, data_dir, tmp_path / "creds", 8)
    ids = sorted(d.device_id for d in devices)
    removed = ids.pop()
    with store.write() as tx:
        tx.delete_device(removed)
        for device_id in ids[:2]:  # online with an older session (e.g. another process's)
            tx.update_device(device_id, {"online": True, "session_owner": "old/1",
                                         "session_node": "other", "session_lease_until": 5},
                             now=3)  # fmt: skip
        tx.put_ota_memory(OtaMemoryRecord(ids[3], updating_sha256="ab" * 32,
                                          delivered_sha256="cd" * 32, delivered_final=True,
                                          refused=("ef" * 32,)), now=4)  # fmt: skip
    sessions = [(device_id.upper() if i == 4 else device_id,  # any case, as device_online
                 None if i == 5 else f"10.0.0.{i}", f"server-7/{i}")
                for i, device_id in enumerate(ids)]  # fmt: skip
    initial = _rows(store, ids)

    bus = EventBus()
    one_by_one = Fleet(store, bus, clock=lambda: NOW)

    async def each() -> None:
        for device_id, ip, token in sessions:
            await one_by_one.device_online(device_id, ip=ip, session=token)

    events_each = _status_events(bus, lambda: trio.run(each))
    rows_each = _rows(store, ids)
    memories_each = {token: one_by_one.memory_hand_off.take(token, device_id.lower())
                     for device_id, _, token in sessions}  # fmt: skip

    _put_back(store, initial)
    batched = Fleet(store, bus, clock=lambda: NOW)
    marked: list[bool] = []

    async def grouped() -> None:
        marked.extend(await batched.restored_sessions_online(
            [*sessions, (removed, "10.0.0.9", "server-7/9")]))

    events_grouped = _status_events(bus, lambda: trio.run(grouped))
    assert marked == [True] * len(ids) + [False]
    assert _rows(store, ids) == rows_each
    assert events_grouped == events_each
    assert len(events_each) == len(ids) - 2  # the two already online get no event
    memories_grouped = {token: batched.memory_hand_off.take(token, device_id.lower())
                        for device_id, _, token in sessions}  # fmt: skip
    assert memories_grouped == memories_each
    assert memories_grouped[sessions[3][2]] == OtaMemoryRecord(
        ids[3], "ab" * 32, "cd" * 32, True, False, ("ef" * 32,))
    with store.read() as tx:
        assert tx.get_device(removed) is None  # nothing written for it


def test_grouped_presence_write_of_nothing(store: Store) -> None:
    """No session: no statement fails, nothing is returned."""
    fleet = Fleet(store, EventBus(), clock=lambda: NOW)
    assert trio.run(fleet.restored_sessions_online, []) == []


def test_grouped_target_read_equals_one_read_per_device(
    store: Store, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two products; releases to the product and to a group; a device locked to a version,
    one with a pending flash, one with updates forced, one in the group; and an unknown id:
    each device's target from the grouped read (in chunks of 2) equals ``target_view``'s."""
    monkeypatch.setattr(ManyDeviceQueries, "MANY_CHUNK", 2)
    products: dict[int, list[str]] = {}
    for name in ("A", "B"):
        product_id, devices = provision_product(store, data_dir, tmp_path / name, 4, name=name)
        products[product_id] = sorted(d.device_id for d in devices)
    (a, a_ids), (b, b_ids) = products.items()
    with store.write() as tx:
        for product_id in (a, b):
            for version in (1, 2, 3):
                _firmware(tx, product_id, version)
        tx.set_release(a, None, version=2, intelligent=False, actor="test", now=2)
        group = tx.ensure_groups(a, ["beta"], now=2)[0]
        tx.set_device_groups(a_ids[0], [group.id])
        tx.set_release(a, group.id, version=3, intelligent=True, actor="test", now=3)
        tx.set_release(b, None, version=3, intelligent=False, actor="test", now=3)
        tx.update_device(a_ids[1], {"desired_firmware_version": 1}, now=3)  # locked
        tx.update_device(b_ids[0], {"firmware_updates_forced": True, "firmware_version": 1},
                         now=3)  # fmt: skip
        _flash(tx, b_ids[1], 2, "pending")
    ids = [*a_ids, *b_ids, "f" * 24]
    with store.read() as tx:
        grouped = targets_of_devices(tx, ids)
        alone = {}
        for device_id in ids[:-1]:
            found = tx.get_device_and_product(device_id)
            assert found is not None
            alone[device_id] = target_view(tx, *found)
    assert grouped == alone
    assert grouped[a_ids[0]].target.version == 3 and grouped[a_ids[2]].target.version == 2
    assert grouped[a_ids[1]].target.version == 1
    assert grouped[b_ids[1]].pending_flash is not None and grouped[b_ids[0]].updates_forced
