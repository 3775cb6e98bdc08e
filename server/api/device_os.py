"""Device OS modules: upload and list the system parts the server sends before applications."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from otacore.errors import ValidationError
from server.api.common import (
    fleet_of,
    is_multipart,
    multipart_form,
    require,
    settings_of,
    upload_of,
)
from server.api.firmware import BINARY_FIELDS
from server.fleet import Permission


async def upload_device_os(request: Request) -> Response:
    """Upload a Device OS module (multipart: binary or file)."""
    actor = await require(request, Permission.ADMINISTER, "upload Device OS modules")
    if not is_multipart(request):
        raise ValidationError("upload the module as multipart/form-data in field 'binary'")
    async with multipart_form(request, settings_of(request).max_upload_bytes) as form:
        upload = await upload_of(form, BINARY_FIELDS)
    if upload is None:
        raise ValidationError("the upload has no binary: send it in multipart field 'binary'")
    module = await fleet_of(request).upload_device_os(actor, upload[0])
    return JSONResponse(module, status_code=201)


async def list_device_os(request: Request) -> Response:
    """List the stored Device OS modules (filter: platform_id)."""
    await require(request, Permission.READ, "read Device OS modules")
    platform = request.query_params.get("platform_id")
    if platform is not None and not (platform.isascii() and platform.isdigit()):
        raise ValidationError("platform_id must be an integer")
    modules = await fleet_of(request).list_device_os(None if platform is None else int(platform))
    return JSONResponse([
        {k: m[k] for k in ("platform_id", "module_function", "module_index", "module_version",
                           "size", "sha256")} for m in modules
    ])
