"""Store queries on the OTA engine's per-device memory (see ``schema.device_ota_memory``)."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from server.store import schema as t

#: Refused images remembered per device (the oldest are forgotten first).
MAX_REFUSED = 32


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
        table = t.device_ota_memory
        row = self.conn.execute(
            sa.select(table).where(table.c.device_id == device_id)
        ).mappings().first()
        if row is None:
            return OtaMemoryRecord(device_id)
        return OtaMemoryRecord(
            device_id,
            row["updating_sha256"],
            row["delivered_sha256"],
            bool(row["delivered_final"]),
            bool(row["delivered_awaited"]),
            tuple(str(sha) for sha in row["refused"] or ()),
        )

    def put_ota_memory(self, memory: OtaMemoryRecord, *, now: int) -> None:
        """Replace the device's memory (a device that no longer exists is skipped)."""
        table = t.device_ota_memory
        values = {
            "updating_sha256": memory.updating_sha256,
            "delivered_sha256": memory.delivered_sha256,
            "delivered_final": memory.delivered_final,
            "delivered_awaited": memory.delivered_awaited,
            "refused": list(memory.refused[-MAX_REFUSED:]),
            "updated_at": now,
        }
        changed = self.conn.execute(
            sa.update(table).where(table.c.device_id == memory.device_id).values(values)
        ).rowcount
        if changed:
            return
        exists = self.conn.execute(
            sa.select(t.devices.c.id).where(t.devices.c.id == memory.device_id)
        ).first()
        if exists is not None:
            self.conn.execute(sa.insert(table).values(device_id=memory.device_id, **values))

    def forget_refused_images(self, device_id: str, *, now: int) -> None:
        """An operator flashed or locked the device: every image may be offered again."""
        table = t.device_ota_memory
        self.conn.execute(
            sa.update(table)
            .where(table.c.device_id == device_id)
            .values(refused=[], updated_at=now)
        )
