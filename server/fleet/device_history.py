"""A device's history: what operators did to it (its audit entries) and the updates asked
for it (its flashes), newest first; what the console's device page shows.

Device events themselves are not stored for long (the store's event log is a relay between
server processes, pruned after minutes): the console streams them live instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from otacore.errors import ValidationError
from server.fleet.base import FleetBase
from server.store import FlashRecord
from server.store.records import AuditRecord

#: The most audit entries one history page holds.
MAX_HISTORY_PAGE = 200


@dataclass(frozen=True)
class DeviceHistory:
    """One page of a device's audit entries (newest first), its latest flashes, and the id
    to page on from (``before``), None on the last page."""

    audit: list[AuditRecord]
    flashes: list[FlashRecord]
    next_before: int | None


class DeviceHistoryService(FleetBase):
    """Read a device's history."""

    async def device_history(
        self, product_ref: int | str, device_id: str, *, before_id: int | None = None,
        limit: int = 25, flashes: int = 20,
    ) -> DeviceHistory:
        """A page of the device's audit entries older than ``before_id`` (all when None) and
        its ``flashes`` latest flashes; UnknownDeviceError unless it is the product's."""
        if not 1 <= limit <= MAX_HISTORY_PAGE:
            raise ValidationError(f"a history page holds 1 to {MAX_HISTORY_PAGE} entries")
        if before_id is not None and before_id < 1:
            raise ValidationError("before must be a positive audit entry id")

        def work() -> DeviceHistory:
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                device = self._device_in(tx, product, device_id)
                audit = tx.device_audit(device.id, before_id=before_id, limit=limit + 1)
                latest = tx.device_flashes(device.id, limit=flashes)
            more = len(audit) > limit
            audit = audit[:limit]
            return DeviceHistory(audit, latest, audit[-1].id if more else None)

        return await self._read(work)
