"""Product device endpoints: ``/v1/products/:product/devices[/:id]`` (Particle's paths)."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from otacore.errors import ValidationError
from server.api.common import (
    actor_of,
    as_bool,
    as_name_list,
    body_fields,
    fleet_of,
    int_field,
    is_multipart,
    multipart_form,
    optional_query_int,
    product_of,
    query_int,
    settings_of,
    upload_of,
)
from server.api.serialize import device_json, flash_json

log = logging.getLogger("ota.api")


def optional_query_bool(request: Request, name: str) -> bool | None:
    """A true/false query parameter, or None when absent or empty."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    return as_bool({name: raw}, name)


async def list_devices(request: Request) -> Response:
    """List a product's devices (filters deviceId, deviceName, groups, online, development,
    locked, firmware_version, update_status; page, per_page)."""
    query = request.query_params
    page = await fleet_of(request).list_devices(
        product_of(request).id,
        device_id=query.get("deviceId") or None,
        name=query.get("deviceName") or None,
        groups=tuple(as_name_list({"groups": query.get("groups")}, "groups")),
        online=optional_query_bool(request, "online"),
        development=optional_query_bool(request, "development"),
        locked=optional_query_bool(request, "locked"),
        firmware_version=optional_query_int(request, "firmware_version"),
        update_status=query.get("update_status") or None,
        page=query_int(request, "page", 1),
        per_page=query_int(request, "per_page", 25),
    )
    return JSONResponse(
        {
            "devices": [device_json(view) for view in page.devices],
            "customers": [],
            "meta": {
                "total_pages": page.total_pages,
                "total": page.total,
                "page": page.page,
                "per_page": page.per_page,
            },
        }
    )


async def import_device(request: Request) -> Response:
    """Add a device to the product: {id} (Particle's import)."""
    fields = await body_fields(request)
    if "id" not in fields:
        raise ValidationError("id is required (the 24-hex-digit device id)")
    unknown = sorted(set(fields) - {"id"})
    if unknown:
        raise ValidationError(f"unknown field(s) {', '.join(unknown)}; give id")
    result = await fleet_of(request).add_device(
        actor_of(request), product_of(request).id, fields["id"]
    )
    return JSONResponse(
        {
            "ok": True,
            "updated": len(result.updated),
            "updatedDeviceIds": list(result.updated),
            "existingDeviceIds": list(result.existing),
            "nonmemberDeviceIds": [],
            "invalidDeviceIds": list(result.invalid),
        }
    )


async def get_device(request: Request) -> Response:
    """Get one device of the product."""
    view = await fleet_of(request).get_device(
        product_of(request).id, request.path_params["device_id"]
    )
    return JSONResponse(device_json(view, detail=True))


async def update_device(request: Request) -> Response:
    """Change a device ({development, desired_firmware_version, flash, force_window, groups,
    firmware_updates_forced, name, notes}), or flash a development device (multipart file)."""
    product, device_id = product_of(request).id, request.path_params["device_id"]
    fleet, actor = fleet_of(request), actor_of(request)
    if is_multipart(request):
        async with multipart_form(request, settings_of(request).max_upload_bytes) as form:
            upload = await upload_of(form, ("file", "binary"))
        if upload is None:
            raise ValidationError("a multipart device update needs the binary in field 'file'")
        image, filename = upload
        flash = await fleet.flash_device_binary(actor, product, device_id, image, filename=filename)
        return JSONResponse(
            {
                "ok": True,
                "id": flash.device_id,
                "status": "Update pending",
                "flash": flash_json(flash),
            }
        )
    fields = await body_fields(request)
    changes = dict(fields)
    for key in ("development", "flash", "force_window", "firmware_updates_forced"):
        if key in changes:
            changes[key] = as_bool(fields, key)
    if "groups" in changes:
        changes["groups"] = as_name_list(fields, "groups")
    if changes.get("desired_firmware_version") in ("", "null"):  # form encoding of null
        changes["desired_firmware_version"] = None
    elif "desired_firmware_version" in changes:
        changes["desired_firmware_version"] = int_field(
            changes["desired_firmware_version"], "desired_firmware_version", max_digits=5
        )
    view = await fleet.update_device(actor, product, device_id, changes)
    return JSONResponse(device_json(view, detail=True))


async def remove_device(request: Request) -> Response:
    """Remove a device from the product."""
    await fleet_of(request).remove_device(
        actor_of(request), product_of(request).id, request.path_params["device_id"]
    )
    return Response(status_code=204)


async def revoke_device(request: Request) -> Response:
    """Revoke a device's certificates: refused at its next handshake, live session closed."""
    device_id = request.path_params["device_id"]
    # 404 unless the device is in the product, checked with the change.
    await fleet_of(request).set_certs_revoked(
        actor_of(request), product_of(request).id, device_id, True)
    log.warning("%s revoked the certificates of device %s (product %s)",
                actor_of(request).subject, device_id, product_of(request).id,
                extra={"event": "device_revoked", "device_id": device_id,
                       "product_id": product_of(request).id, "actor": actor_of(request).subject})
    return JSONResponse({"ok": True, "id": device_id, "revoked": True})


async def reinstate_device(request: Request) -> Response:
    """Lift a device's revocation: its certificates are accepted again (audit-logged)."""
    device_id = request.path_params["device_id"]
    await fleet_of(request).set_certs_revoked(
        actor_of(request), product_of(request).id, device_id, False)
    log.info("%s reinstated the certificates of device %s (product %s)",
             actor_of(request).subject, device_id, product_of(request).id,
             extra={"event": "device_reinstated", "device_id": device_id,
                    "product_id": product_of(request).id, "actor": actor_of(request).subject})
    return JSONResponse({"ok": True, "id": device_id, "revoked": False})
