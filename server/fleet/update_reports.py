"""What a device reports about an update: transfer progress, flash status, and results.

The device-protocol layer (next issues) calls these as an update goes on: the progress of
a transfer in flight, the update's start, success or failure (which finishes the pending
flash, counts the outcome on the release that decided the target and appends it to the
device's update results). Separate from the session hooks (:mod:`server.fleet.sessions`,
what a session tells the control plane when it connects): these record an update's course,
and own the update state and the update results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

from otacore.errors import ValidationError
from otacore.precedence import Target, TargetReason
from server.events import FLASH_STATUS, Event
from server.fleet.base import FleetBase, Outcome, normalize_device_id, unknown_device
from server.fleet.targets import DeviceTarget, target_view
from server.store import ReleaseRecord, Tx, UpdateStateRecord
from server.store.tx_firmware import PRODUCT_SCOPE, group_scope

#: Named as before this module was split from :mod:`server.fleet.sessions`: the logger's
#: name is a field of every log line (``logger`` in the JSON format).
log = logging.getLogger("server.fleet.sessions")

FlashStatus = Literal["started", "success", "failed"]


class UpdateReportService(FleetBase):
    """Hooks for what devices report about their updates."""

    async def record_update_progress(
        self,
        device_id: str,
        *,
        sha256: str,
        version: int | None,
        transfer: str,
        bytes_done: int,
        bytes_total: int,
        status: str = "in_progress",
    ) -> None:
        """Persist transfer progress (call it every few tens of KiB, not per chunk)."""
        await self._run_grouped(self.update_progress_work(
            device_id, sha256=sha256, version=version, transfer=transfer,
            bytes_done=bytes_done, bytes_total=bytes_total, status=status))

    def update_progress_work(
        self,
        device_id: str,
        *,
        sha256: str,
        version: int | None,
        transfer: str,
        bytes_done: int,
        bytes_total: int,
        status: str = "in_progress",
    ) -> Callable[[Tx], Outcome]:
        """The store work of :meth:`record_update_progress`, to run in one transaction with
        the device's OTA memory (:meth:`OtaMemoryService.save_ota_memory`)."""
        if transfer not in ("full", "zstd", "delta"):
            raise ValidationError("transfer must be 'full', 'zstd' or 'delta'")

        def work(tx: Tx) -> Outcome:
            now = self.clock()
            normalized = normalize_device_id(device_id)
            # Usually one statement: a stored state means the device exists (its row's
            # deletion removes the state), and the update keeps its start time.
            advanced = tx.advance_update_state(
                normalized,
                sha256=sha256,
                version=version,
                transfer=transfer,
                bytes_done=bytes_done,
                bytes_total=bytes_total,
                status=status,
                now=now,
            )
            if not advanced:
                if tx.get_device_online(normalized) is None:
                    raise unknown_device(device_id)
                state = UpdateStateRecord(
                    normalized, sha256, version, transfer, bytes_done, bytes_total, status, now, now
                )
                tx.put_update_state(state)
            return Outcome(None)

        return work

    async def get_update_state(self, device_id: str) -> UpdateStateRecord | None:
        """The transfer in flight to a device, if any."""

        def work() -> UpdateStateRecord | None:
            with self.store.read() as tx:
                return tx.get_update_state(self._device(tx, device_id).id)

        return await self._read(work)

    async def record_flash_status(
        self, device_id: str, status: FlashStatus, *, error: str = "",
        application_sha256: str | None = None,
    ) -> None:
        """An update to the device started, succeeded or failed: update the pending flash
        and the deciding release's counters, and emit ``spark/flash/status``
        (``application_sha256``: see :meth:`flash_status_work`)."""
        await self._run_grouped(self.flash_status_work(
            device_id, status, error=error, application_sha256=application_sha256))

    def flash_status_work(
        self, device_id: str, status: FlashStatus, *, error: str = "",
        application_sha256: str | None = None,
    ) -> Callable[[Tx], Outcome]:
        """The store work of :meth:`record_flash_status`, to run in one transaction with
        the device's OTA memory (:meth:`OtaMemoryService.save_ota_memory`).

        ``application_sha256``: the application image the status is about, when known (None
        for a Device OS part delivered ahead of it, which serves whatever the device's target
        is). A status about another image than the pending flash's (the operator asked for a
        new flash while an older image was still on its way) leaves that flash pending: the
        device has not received it yet."""
        if status not in ("started", "success", "failed"):
            raise ValidationError("flash status must be started, success or failed")

        def work(tx: Tx) -> Outcome:
            now = self.clock()
            device, product = self._device_and_product(tx, device_id)
            releases = tx.list_releases(product.id)
            view = target_view(tx, device, product, releases=releases, with_firmware=False)
            flash = view.pending_flash
            if flash is not None and application_sha256 not in (None, flash.sha256):
                log.info("device %s reports %s for image %s, not the pending flash %d",
                         device_id, status, application_sha256[:12], flash.id)
            elif flash is not None:
                final = {"started": "started", "success": "succeeded", "failed": "failed"}
                tx.finish_flash(
                    flash.id, final[status], error, None if status == "started" else now
                )
                if status == "success":
                    tx.update_device(view.device.id, {"flash_requested": False}, now)
                if status != "started":
                    _record_result(tx, view, status, error, now, "flash", flash.version,
                                   application_sha256 or flash.sha256)
            else:
                self._count_release(tx, view, releases, status)
                if status != "started":
                    _record_result(tx, view, status, error, now, _result_kind(view.target),
                                   view.target.version, application_sha256)
            if status != "started":
                tx.clear_update_state(view.device.id)
            # The device's last outcome, for the console's "update status" and its reason.
            outcome = {"started": "started", "success": "succeeded", "failed": "failed"}[status]
            tx.update_device(view.device.id, {"last_update_status": outcome,
                                              "last_update_error": error or None,
                                              "last_update_at": now}, now)
            event = Event(
                FLASH_STATUS,
                f"{status} ",
                product_id=view.product.id,
                device_id=view.device.id,
                coreid=view.device.id,
                published_at=now,
            )
            return Outcome(None, [event])

        return work

    @staticmethod
    def _count_release(
        tx: Tx, view: DeviceTarget, releases: Sequence[ReleaseRecord], status: FlashStatus
    ) -> None:
        """Count the outcome on the release that decided the target (``releases``: the
        product's, as read in this transaction; a group release carries its group's name)."""
        if view.target.reason == TargetReason.PRODUCT_DEFAULT:
            scopes = {PRODUCT_SCOPE}
        elif view.target.reason == TargetReason.GROUP_RELEASE and view.target.group:
            scopes = {
                group_scope(release.group_id)
                for release in releases
                if release.group_id is not None and release.group_name == view.target.group
            }
        else:
            return
        counter = {
            "started": "devices_started",
            "success": "devices_succeeded",
            "failed": "devices_failed",
        }[status]
        for release in releases:
            if release.scope in scopes:
                tx.bump_release_counter(release.id, counter)


def _result_kind(target: Target) -> str:
    """What decided the update a result is about: a release, a lock, or neither (e.g. a
    Device OS part for a development device)."""
    if target.reason in (TargetReason.PRODUCT_DEFAULT, TargetReason.GROUP_RELEASE):
        return "release"
    if target.reason == TargetReason.LOCKED:
        return "lock"
    return "other"


def _record_result(tx: Tx, view: DeviceTarget, status: FlashStatus, error: str, now: int,
                   kind: str, version: int | None, sha256: str | None) -> None:
    """Append the outcome to the device's update results (issue 17: a release's failures
    with their reasons and its latency curve), before the update in flight is cleared."""
    tx.record_update_result(
        product_id=view.product.id, device_id=view.device.id, version=version,
        sha256=sha256, kind=kind, result="success" if status == "success" else "failed",
        error=error, now=now)
