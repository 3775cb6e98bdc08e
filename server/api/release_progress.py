"""Release progress and the audit log over REST (issue 17):
``GET /v1/products/:product/firmware/:version/progress`` and ``GET /v1/products/:product/audit``.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.api.common import actor_of, fleet_of, product_of
from server.api.serialize import iso
from server.fleet import AuditPage, ReleaseProgress
from server.fleet.release_progress import LatencySummary


def latency_json(latency: LatencySummary) -> dict[str, Any]:
    """The update-latency curve: percentiles, histogram and cumulative points (ms)."""
    return {
        "count": latency.count,
        "p50_ms": latency.percentiles[50],
        "p90_ms": latency.percentiles[90],
        "p99_ms": latency.percentiles[99],
        "max_ms": latency.max_ms,
        "histogram": [{"le_ms": bound, "count": count} for bound, count in latency.histogram],
        "curve": [{"ms": ms, "updated": updated} for ms, updated in latency.curve],
    }


def progress_json(progress: ReleaseProgress) -> dict[str, Any]:
    """A version's release progress: totals, per release, devices updating and failed,
    latency and bytes."""
    sent = progress.transfer_bytes
    return {
        "version": progress.firmware.version,
        "state": progress.state,
        "target": progress.target,
        "updated": progress.updated,
        "updating": progress.updating_count,
        "failed": progress.failed_count,
        "pending": progress.pending,
        "releases": [
            {
                "scope": "product" if r.group_name is None else "group",
                "group": r.group_name,
                "intelligent": r.intelligent,
                "released_at": iso(r.released_at),
                "released_by": r.released_by,
                "target": r.target,
                "updated": r.updated,
                "updating": r.updating,
                "failed": r.failed,
                "pending": r.pending,
            }
            for r in progress.releases
        ],
        "updating_devices": [
            {
                "id": d.device_id,
                "transfer": d.transfer,
                "bytes_done": d.bytes_done,
                "bytes_total": d.bytes_total,
                "percent": None if d.bytes_total <= 0
                else round(100.0 * d.bytes_done / d.bytes_total, 1),
                "status": d.status,
                "started_at": iso(d.started_at),
                "updated_at": iso(d.updated_at),
                "online": bool(d.online),
            }
            for d in progress.updating
        ],
        "failed_devices": [
            {
                "id": d.device_id,
                "reason": d.error,
                "failed_at": iso(d.failed_at),
                "firmware_version": d.firmware_version,
                "online": bool(d.online),
            }
            for d in progress.failed
        ],
        "latency": latency_json(progress.latency),
        "bytes": {
            "sent": sent.bytes_sent,
            "full_images": sent.bytes_full,
            "full_images_for_target": sent.full_images_for_target,
            "saved_percent": None if sent.saved_percent is None
            else round(sent.saved_percent, 1),
            "full_transfers": sent.full_transfers,
            "compressed_transfers": sent.compressed_transfers,
            "delta_transfers": sent.delta_transfers,
        },
    }


async def get_release_progress(request: Request) -> Response:
    """How the releases of one firmware version are going (``?list_limit=`` caps the
    devices listed as updating and failed; default 50)."""
    progress = await fleet_of(request).release_progress(
        product_of(request).id, request.path_params["version"],
        list_limit=request.query_params.get("list_limit", "50"))
    return JSONResponse(progress_json(progress))


def audit_json(page: AuditPage) -> dict[str, Any]:
    """A page of audit entries, newest first, with the cursor of the next page."""
    return {
        "entries": [
            {"id": e.id, "at": iso(e.at), "actor": e.actor, "action": e.action,
             "target": e.target, "details": e.details}
            for e in page.entries
        ],
        "next_before": page.next_before,
    }


async def list_audit(request: Request) -> Response:
    """The product's audit log, newest first: ``?before=<id>`` pages on, ``?limit=``
    (1..200, default 50), ``?action=<prefix>``, ``?actor=<name>``."""
    query = request.query_params
    page = await fleet_of(request).list_audit(
        actor_of(request), product_of(request).id, before=query.get("before"),
        limit=query.get("limit", "50"), action=query.get("action"), by=query.get("actor"))
    return JSONResponse(audit_json(page))
