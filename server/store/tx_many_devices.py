"""Store queries on many devices at once: the sessions restored after a graceful restart.

A restarted process restores every saved DTLS session together (``server.devices.
restored_start``): one statement per :attr:`ManyDeviceQueries.MANY_CHUNK` devices for their
presence and targets, instead of the per-device queries of
:class:`server.store.tx_fleet.FleetQueries` it extends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from server.store import schema as t
from server.store.records import DeviceRecord
from server.store.tx_fleet import DEVICE_COLUMNS, DEVICE_MUTABLE, UPDATE_DEVICE, FleetQueries
from server.store.tx_ota import OtaMemoryRecord


class ManyDeviceQueries(FleetQueries):
    """:class:`FleetQueries` of many devices at once (see the module docstring)."""

    #: Device ids per statement of the methods below (bound-parameter limits stay far away).
    MANY_CHUNK = 500

    def get_devices_online(self, device_ids: Sequence[str]) -> dict[str, tuple[int, bool]]:
        """:meth:`get_device_online` of many devices: id -> (product id, online flag) of
        each that exists."""
        found: dict[str, tuple[int, bool]] = {}
        ids = sorted(set(device_ids))
        for start in range(0, len(ids), self.MANY_CHUNK):
            rows = self.conn.execute(
                sa.select(t.devices.c.id, t.devices.c.product_id, t.devices.c.online)
                .where(t.devices.c.id.in_(ids[start : start + self.MANY_CHUNK]))
            )  # fmt: skip
            for device_id, product_id, online in rows:
                found[device_id] = (int(product_id), bool(online))
        return found

    def update_devices(self, changes: Sequence[tuple[str, dict[str, Any]]], now: int) -> None:
        """:meth:`update_device` of many devices (each its own fields), one executemany per
        set of column names; stamps ``updated_at``."""
        by_columns: dict[frozenset[str], list[dict[str, Any]]] = {}
        for device_id, fields in changes:
            unknown = fields.keys() - DEVICE_MUTABLE
            if unknown:
                raise ValueError(f"device columns {sorted(unknown)} cannot be changed")
            params = {**fields, "updated_at": now, "key_device_id": device_id}
            by_columns.setdefault(frozenset(params), []).append(params)
        for rows in by_columns.values():
            self.conn.execute(UPDATE_DEVICE, rows)

    def get_devices(self, device_ids: Sequence[str]) -> list[DeviceRecord]:
        """:meth:`get_device` of many devices (with their group names), in id order; the
        ids that do not exist are left out."""
        devices: list[DeviceRecord] = []
        ids = sorted(set(device_ids))
        for start in range(0, len(ids), self.MANY_CHUNK):
            rows = self.conn.execute(
                sa.select(*DEVICE_COLUMNS)
                .where(t.devices.c.id.in_(ids[start : start + self.MANY_CHUNK]))
                .order_by(t.devices.c.id)
            ).mappings()  # fmt: skip
            devices.extend(self._devices_from_rows(rows))
        return devices

    def get_ota_memories(self, device_ids: Sequence[str]) -> dict[str, OtaMemoryRecord]:
        """``get_ota_memory`` (``server.store.tx_ota``) of many devices: id -> memory,
        an empty one for a device with nothing remembered."""
        memory = t.device_ota_memory
        found = {device_id: OtaMemoryRecord(device_id) for device_id in device_ids}
        ids = sorted(found)
        for start in range(0, len(ids), self.MANY_CHUNK):
            rows = self.conn.execute(
                sa.select(memory.c.device_id, memory.c.updating_sha256,
                          memory.c.delivered_sha256, memory.c.delivered_final,
                          memory.c.delivered_awaited, memory.c.refused)
                .where(memory.c.device_id.in_(ids[start : start + self.MANY_CHUNK]))
            )  # fmt: skip
            for device_id, updating, delivered, final, awaited, refused in rows:
                found[device_id] = OtaMemoryRecord(
                    device_id, updating, delivered, bool(final), bool(awaited),
                    tuple(str(sha) for sha in refused or ()),
                )  # fmt: skip
        return found
