"""JSON shapes of the REST API, following Particle's field names where Particle has them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.events import iso_ms
from server.fleet import DeviceView, FirmwareView, GroupView
from server.store import FlashRecord, ProductRecord


def iso(epoch_ms: int | None) -> str | None:
    """ISO-8601 time or None."""
    return None if epoch_ms is None else iso_ms(epoch_ms)


def product_json(product: ProductRecord) -> dict[str, Any]:
    """A product."""
    return {
        "id": product.id,
        "slug": product.slug,
        "name": product.name,
        "platform_id": product.platform_id,
        "description": product.description,
        "firmware_updates_forced": product.firmware_updates_forced,
        "created_at": iso(product.created_at),
    }


def firmware_json(
    view: FirmwareView, transfer_bytes: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """A product firmware version (Particle's product firmware object plus module data).

    ``transfer_bytes`` (``Fleet.transfer_bytes``) adds what releasing it sent:
    ``release_stats.bytes_sent`` against ``bytes_full_images``, the bytes full images would
    have taken (deltas make the difference).
    """
    rec = view.record
    body: dict[str, Any] = {
        "_id": str(rec.id),
        "version": rec.version,
        "title": rec.title,
        "description": rec.description,
        "name": rec.filename,
        "size": rec.size,
        "sha256": rec.sha256,
        "product_id": rec.product_id,
        "platform_id": rec.platform_id,
        "product_default": view.product_default,
        "groups": list(view.groups),
        "intelligent": view.intelligent,
        "device_count": view.device_count,
        # Devices that started, finished or failed an update to this version via a release
        # (running now: device_count; updating: started - succeeded - failed).
        "release_stats": {
            "running": view.device_count,
            "updating": max(0, view.updates_started - view.updates_succeeded
                            - view.updates_failed),
            "succeeded": view.updates_succeeded,
            "failed": view.updates_failed,
        },
        "uploaded_on": iso(rec.uploaded_at),
        "uploaded_by": {"username": rec.uploaded_by},
        "running_seen_at": iso(rec.running_seen_at),
        "module": rec.module_info,
        # Its rollouts (issue 15), oldest first, each with where to watch it.
        "rollouts": [
            {"id": rollout_id, "state": state,
             "url": f"/v1/products/{rec.product_id}/rollouts/{rollout_id}"}
            for rollout_id, state in view.rollouts
        ],
    }
    if transfer_bytes is None:
        transfer_bytes = view.transfer_bytes
    if transfer_bytes is not None:
        stats: dict[str, Any] = body["release_stats"]
        stats["bytes_sent"] = transfer_bytes.get("bytes_sent", 0)
        stats["bytes_full_images"] = transfer_bytes.get("bytes_full", 0)
        stats["delta_transfers"] = transfer_bytes.get("delta_transfers", 0)
        stats["full_transfers"] = transfer_bytes.get("full_transfers", 0)
        stats["compressed_transfers"] = transfer_bytes.get("compressed_transfers", 0)
    return body


def flash_json(flash: FlashRecord | None) -> dict[str, Any] | None:
    """A per-device flash request."""
    if flash is None:
        return None
    return {
        "id": flash.id,
        "kind": flash.kind,
        "version": flash.version,
        "sha256": flash.sha256,
        "size": flash.size,
        "name": flash.filename,
        "status": flash.status,
        "error": flash.error,
        "requested_by": flash.requested_by,
        "requested_at": iso(flash.requested_at),
        "finished_at": iso(flash.finished_at),
    }


def device_json(view: DeviceView, *, detail: bool = False) -> dict[str, Any]:
    """A product device (Particle's fields; ``detail`` adds modules and the pending flash)."""
    rec = view.record
    body: dict[str, Any] = {
        "id": rec.id,
        "product_id": rec.product_id,
        "name": rec.name,
        "notes": rec.notes,
        "online": rec.online,
        "last_ip_address": rec.last_ip_address,
        "last_handshake_at": iso(rec.last_handshake_at),
        "last_heard": iso(rec.last_heard_at),
        "platform_id": rec.platform_id,
        "firmware_product_id": rec.product_id,
        "firmware_version": rec.firmware_version,
        "system_version": rec.system_version,
        "development": rec.development,
        "quarantined": False,
        "denied": False,
        "groups": list(rec.groups),
        "desired_firmware_version": rec.desired_firmware_version,
        "targeted_firmware_release_version": view.target.version,
        "target_reason": view.target.reason.name.lower(),
        "flash_requested": rec.flash_requested,
        "firmware_updates_enabled": rec.firmware_updates_enabled,
        "firmware_updates_forced": rec.firmware_updates_forced,
        "updates_pending": rec.updates_pending,
        "reset_pending": rec.reset_pending,
        "updated_at": iso(rec.updated_at),
    }
    update = view.update
    body["update"] = None if update is None else {
        "sha256": update.sha256, "version": update.version, "transfer": update.transfer,
        "bytes_done": update.bytes_done, "bytes_total": update.bytes_total,
        "status": update.status, "updated_at": iso(update.updated_at),
    }
    body["update_status"] = view.update_status
    status = view.status
    body["last_update"] = None if status is None or status.last_update_status is None else {
        "status": status.last_update_status, "error": status.last_update_error or "",
        "at": iso(status.last_update_at),
    }
    if detail:
        body["modules"] = rec.modules
        body["pending_flash"] = flash_json(view.pending_flash)
    return body


def group_json(view: GroupView) -> dict[str, Any]:
    """A device group."""
    return {
        "name": view.record.name,
        "description": view.record.description,
        "color": view.record.color,
        "fw_version": view.fw_version,
        "intelligent": view.intelligent,
        "device_count": view.device_count,
        "created_at": iso(view.record.created_at),
    }
