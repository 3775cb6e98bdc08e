"""Delta patches the OTA engine computed, and the bytes each firmware release sent.

Patches are stored once per (base SHA-256, target SHA-256) pair: the bytes as a blob, the
sizes in the ``deltas`` table. Every completed transfer adds its bytes, and the bytes the full
image would have taken, to its firmware version's counters, and publishes them as
``RELEASE_BYTES_EVENT`` so the data a release saved is visible.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from server.events import Event
from server.fleet.base import FleetBase, Outcome
from server.store import Tx

#: Published after every completed transfer of a product firmware version (JSON data).
RELEASE_BYTES_EVENT = "ota/release/bytes"


@dataclass(frozen=True)
class StoredDelta:
    """A stored patch from one image to another."""

    base_sha256: str
    target_sha256: str
    patch_sha256: str
    patch_size: int
    target_size: int


class DeltaService(FleetBase):
    """Store and look up delta patches; count the bytes releases send."""

    async def find_delta(
        self, base_sha256: str, target_sha256: str, format_version: int
    ) -> tuple[StoredDelta, bytes] | None:
        """The stored patch from ``base_sha256`` to ``target_sha256`` made for
        ``format_version`` (the newest the maker was held to) and its bytes, if any."""

        def work() -> tuple[StoredDelta, bytes] | None:
            with self.store.read() as tx:
                row = tx.get_delta(base_sha256, target_sha256, format_version)
            if row is None:
                return None
            delta = StoredDelta(
                row["base_sha256"],
                row["target_sha256"],
                row["patch_sha256"],
                row["patch_size"],
                row["target_size"],
            )
            return delta, self.store.blobs.get(delta.patch_sha256)

        return await self._read(work)

    async def save_delta(
        self,
        base_sha256: str,
        target_sha256: str,
        format_version: int,
        patch: bytes,
        target_size: int,
        *,
        replace: bool = False,
    ) -> StoredDelta:
        """Store a patch made for ``format_version`` (blob first, then the row that names
        it); with ``replace`` in place of the one stored for the pair and version, else one
        stored before is kept."""

        def work() -> Outcome:
            patch_sha256 = self.store.blobs.put(patch)  # durable before the row naming it
            with self.store.write() as tx:
                tx.insert_delta(
                    base_sha256, target_sha256, format_version, patch_sha256, len(patch),
                    target_size, self.clock(), replace=replace,
                )
            return Outcome(
                StoredDelta(base_sha256, target_sha256, patch_sha256, len(patch), target_size)
            )

        stored: StoredDelta = await self._run(work)
        return stored

    async def count_deltas(self) -> int:
        """How many patches are stored."""

        def work() -> int:
            with self.store.read() as tx:
                return tx.count_deltas()

        return await self._read(work)

    def transfer_bytes_work(
        self,
        product_id: int,
        version: int,
        device_id: str,
        *,
        bytes_sent: int,
        bytes_full: int,
        transfer: str,
    ) -> Callable[[Tx], Outcome]:
        """Count one completed transfer ("full", "zstd" or "delta") towards firmware
        ``version`` and publish the totals: the store work, run in one transaction with the
        device's OTA memory (:meth:`OtaMemoryService.save_ota_memory`)."""

        def work(tx: Tx) -> Outcome:
            totals = tx.add_transfer_bytes(
                product_id,
                version,
                bytes_sent=bytes_sent,
                bytes_full=bytes_full,
                transfer=transfer,
            )
            data = json.dumps(
                {
                    "version": version,
                    "transfer": transfer,
                    "bytes_sent": bytes_sent,
                    "bytes_full_image": bytes_full,
                    "release_bytes_sent": totals["bytes_sent"],
                    "release_bytes_full_images": totals["bytes_full"],
                },
                separators=(",", ":"),
            )
            event = Event(RELEASE_BYTES_EVENT, data, product_id=product_id, device_id=device_id)
            return Outcome(totals, [event])

        return work

    async def transfer_bytes(self, product_id: int, version: int) -> dict[str, int]:
        """Firmware ``version``'s counters: bytes_sent, bytes_full (what full images would
        have taken), delta_transfers, full_transfers."""

        def work() -> dict[str, int]:
            with self.store.read() as tx:
                return tx.get_transfer_bytes(product_id, version)

        return await self._read(work)
