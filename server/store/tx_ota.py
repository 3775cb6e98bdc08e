"""Store queries on the OTA engine's per-device memory (see ``schema.device_ota_memory``)."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from server.store import schema as t

#: Refused images remembered per device (the oldest are forgotten first).
MAX_REFUSED = 32

# Statements built once (see tx_fleet.py); update keys are named ``key_*`` since a bindparam
# may not share a column's name.
_MEMORY = t.device_ota_memory
SELECT_OTA_MEMORY = sa.select(
    _MEMORY.c.updating_sha256,
    _MEMORY.c.delivered_sha256,
    _MEMORY.c.delivered_final,
    _MEMORY.c.delivered_awaited,
    _MEMORY.c.refused,
).where(_MEMORY.c.device_id == sa.bindparam("device_id"))
#: The SET clause comes from the parameter names given at execution.
UPDATE_OTA_MEMORY = sa.update(_MEMORY).where(_MEMORY.c.device_id == sa.bindparam("key_device_id"))
INSERT_OTA_MEMORY = sa.insert(_MEMORY)
SELECT_DEVICE_EXISTS = sa.select(t.devices.c.id).where(t.devices.c.id == sa.bindparam("device_id"))


@dataclass(frozen=True)
class OtaMemoryRecord:
    """What the OTA engine remembers of one device between sessions."""

    device_id: str
    updating_sha256: str | None = None
    delivered_sha256: str | None = None
    delivered_final: bool = False
    delivered_awaited: bool = False
    refused: tuple[str, ...] = ()


class OtaMemoryQueries:
    """Per-device OTA memory; mixed into the store's Tx."""

    conn: Connection

    def get_ota_memory(self, device_id: str) -> OtaMemoryRecord:
        """The device's memory (empty when nothing was ever remembered)."""
        row = self.conn.execute(SELECT_OTA_MEMORY, {"device_id": device_id}).first()
        if row is None:
            return OtaMemoryRecord(device_id)
        updating, delivered, final, awaited, refused = row
        return OtaMemoryRecord(
            device_id,
            updating,
            delivered,
            bool(final),
            bool(awaited),
            tuple(str(sha) for sha in refused or ()),
        )

    def put_ota_memory(self, memory: OtaMemoryRecord, *, now: int) -> None:
        """Replace the device's memory (a device that no longer exists is skipped)."""
        values = {
            "updating_sha256": memory.updating_sha256,
            "delivered_sha256": memory.delivered_sha256,
            "delivered_final": memory.delivered_final,
            "delivered_awaited": memory.delivered_awaited,
            "refused": list(memory.refused[-MAX_REFUSED:]),
            "updated_at": now,
        }
        changed = self.conn.execute(
            UPDATE_OTA_MEMORY, {**values, "key_device_id": memory.device_id}
        ).rowcount
        if changed:
            return
        exists = self.conn.execute(SELECT_DEVICE_EXISTS, {"device_id": memory.device_id}).first()
        if exists is not None:
            self.conn.execute(INSERT_OTA_MEMORY, {**values, "device_id": memory.device_id})

    def forget_refused_images(self, device_id: str, *, now: int) -> None:
        """An operator flashed or locked the device: every image may be offered again."""
        table = t.device_ota_memory
        self.conn.execute(
            sa.update(table)
            .where(table.c.device_id == device_id)
            .values(refused=[], updated_at=now)
        )
