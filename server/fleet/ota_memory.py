"""The OTA engine's per-device memory in the store: the update in progress, the image staged
on the device whose boot result is still to come, and the images it refused or rolled back
from. The engine loads it when a session starts and writes it through on every change, so it
survives a restart and follows the device to whichever server process holds its next session.
"""

from __future__ import annotations

from collections.abc import Callable

from server.events import Event
from server.fleet.base import FleetBase, Outcome
from server.store import Tx
from server.store.tx_ota import OtaMemoryRecord


class OtaMemoryService(FleetBase):
    """Load and save :class:`OtaMemoryRecord` (used by ``server.devices.ota``)."""

    async def load_ota_memory(self, device_id: str) -> OtaMemoryRecord:
        """What the engine remembered of the device (empty for a device never updated)."""

        def work(tx: Tx) -> OtaMemoryRecord:
            return tx.get_ota_memory(device_id)

        return await self._read_grouped(work)

    async def save_ota_memory(self, memory: OtaMemoryRecord,
                              *with_: Callable[[Tx], Outcome]) -> None:
        """Replace the device's memory (durable when this returns), in one transaction
        with the writes ``with_`` (the ``*_work`` builders of the flash status, the
        transfer progress and the release's byte counters): the memory and what it
        records happen together or not at all, in one store round trip."""

        def work(tx: Tx) -> Outcome:
            tx.put_ota_memory(memory, now=self.clock())
            events: list[Event] = []
            for step in with_:
                events.extend(step(tx).events)
            return Outcome(None, events)

        await self._run_grouped(work)
