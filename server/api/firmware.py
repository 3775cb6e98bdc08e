"""Product firmware endpoints: ``/v1/products/:product/firmware[...]`` (Particle's paths)."""

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
    content_disposition,
    fleet_of,
    form_text,
    is_multipart,
    multipart_form,
    product_of,
    settings_of,
    upload_of,
)
from server.api.serialize import firmware_json

log = logging.getLogger("ota.api")

#: Multipart field names of the binary: Particle's docs say "binary", its clients send "file".
BINARY_FIELDS = ("binary", "file")
#: ``force_window`` (ours, optional): offer at once even where a maintenance window is closed.
RELEASE_FIELDS = frozenset(
    {"version", "product_default", "groups", "intelligent", "force", "force_window"}
)


async def list_firmware(request: Request) -> Response:
    """List a product's firmware versions, newest first."""
    views = await fleet_of(request).list_firmware(product_of(request).id)
    return JSONResponse([firmware_json(view) for view in views])


async def upload_firmware(request: Request) -> Response:
    """Upload a firmware version (multipart: binary or file, version, title, description)."""
    if not is_multipart(request):
        raise ValidationError(
            "upload firmware as multipart/form-data with the binary in field 'binary' "
            "(or 'file') and fields version and title"
        )
    async with multipart_form(request, settings_of(request).max_upload_bytes) as form:
        upload = await upload_of(form, BINARY_FIELDS)
        fields = form_text(form)
    if upload is None:
        raise ValidationError("the upload has no binary: send it in multipart field 'binary'")
    if "version" not in fields:
        raise ValidationError("version is required (the product version built into the binary)")
    image, filename = upload
    view = await fleet_of(request).upload_firmware(
        actor_of(request),
        product_of(request).id,
        image,
        version=fields["version"],
        title=fields.get("title"),
        description=fields.get("description", ""),
        filename=filename,
    )
    return JSONResponse(firmware_json(view), status_code=201)


async def get_firmware(request: Request) -> Response:
    """Get one firmware version."""
    view = await fleet_of(request).get_firmware(
        product_of(request).id, request.path_params["version"]
    )
    return JSONResponse(firmware_json(view))


async def edit_firmware(request: Request) -> Response:
    """Edit a firmware version's title and description."""
    fields = await body_fields(request)
    unknown = sorted(set(fields) - {"title", "description"})
    if unknown:
        raise ValidationError(f"unknown field(s) {', '.join(unknown)}; give title, description")
    if not fields:
        raise ValidationError("nothing to change; give title and/or description")
    view = await fleet_of(request).update_firmware(
        actor_of(request),
        product_of(request).id,
        request.path_params["version"],
        title=fields.get("title"),
        description=fields.get("description"),
    )
    return JSONResponse(firmware_json(view))


async def delete_firmware(request: Request) -> Response:
    """Delete an unreleased firmware version no device is locked to."""
    await fleet_of(request).delete_firmware(
        actor_of(request), product_of(request).id, request.path_params["version"]
    )
    return Response(status_code=204)


async def firmware_binary(request: Request) -> Response:
    """Download a firmware version's binary."""
    record, image = await fleet_of(request).firmware_binary(
        product_of(request).id, request.path_params["version"]
    )
    headers = {
        "Content-Disposition": content_disposition(record.filename),
        "X-Firmware-SHA256": record.sha256,
    }
    return Response(image, media_type="application/octet-stream", headers=headers)


async def release_firmware(request: Request) -> Response:
    """Release a version: {version, product_default, groups, intelligent, force,
    force_window}."""
    fields = await body_fields(request)
    unknown = sorted(set(fields) - RELEASE_FIELDS)
    if unknown:
        raise ValidationError(
            f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(RELEASE_FIELDS))}"
        )
    if "version" not in fields:
        raise ValidationError("version is required")
    outcome = await fleet_of(request).release_firmware(
        actor_of(request),
        product_of(request).id,
        fields["version"],
        product_default=as_bool(fields, "product_default") if "product_default" in fields else None,
        groups=as_name_list(fields, "groups") if "groups" in fields else None,
        intelligent=as_bool(fields, "intelligent"),
        force=as_bool(fields, "force"),
        force_window=as_bool(fields, "force_window"),
    )
    log.info("%s released firmware version %s of product %s (%s; %d devices affected, %d "
             "online)", actor_of(request).subject, outcome.firmware.record.version,
             product_of(request).id, "immediate" if outcome.forced else "standard",
             len(outcome.affected_devices), len(outcome.affected_online),
             extra={"event": "firmware_released", "product_id": product_of(request).id,
                    "version": outcome.firmware.record.version, "actor": actor_of(request).subject,
                    "forced": outcome.forced,
                    "affected_devices": len(outcome.affected_devices),
                    "affected_online": len(outcome.affected_online)})
    body = firmware_json(outcome.firmware)
    body.update(
        forced=outcome.forced,
        affected_devices=len(outcome.affected_devices),
        affected_online_devices=len(outcome.affected_online),
    )
    return JSONResponse(body)
