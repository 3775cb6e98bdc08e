"""Device OS modules: upload and list the system parts the server sends before applications.

Device OS modules are shared by every product of their platform, so adding one is an
installation-wide act (owner or administrator); listing them needs ``firmware:list`` on at
least one product, and a caller without it installation-wide sees the modules of the
platforms of its own products only.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from otacore.errors import ValidationError
from server.api.common import (
    actor_of,
    fleet_of,
    is_multipart,
    multipart_form,
    optional_query_int,
    settings_of,
    upload_of,
)
from server.api.firmware import BINARY_FIELDS


async def upload_device_os(request: Request) -> Response:
    """Upload a Device OS module (multipart: binary or file)."""
    if not is_multipart(request):
        raise ValidationError("upload the module as multipart/form-data in field 'binary'")
    async with multipart_form(request, settings_of(request).max_upload_bytes) as form:
        upload = await upload_of(form, BINARY_FIELDS)
    if upload is None:
        raise ValidationError("the upload has no binary: send it in multipart field 'binary'")
    module = await fleet_of(request).upload_device_os(actor_of(request), upload[0])
    return JSONResponse(module, status_code=201)


async def list_device_os(request: Request) -> Response:
    """List the stored Device OS modules (filter: platform_id)."""
    platform = optional_query_int(request, "platform_id")
    fleet, actor = fleet_of(request), actor_of(request)
    modules = await fleet.list_device_os(platform)
    if not actor.holds_installation_wide("firmware:list"):
        # A team member sees the modules of its products' platforms only.
        platforms = {p.platform_id for p in await fleet.list_products()
                     if "firmware:list" in actor.scopes_on(p.id)}
        modules = [m for m in modules if m["platform_id"] in platforms]
    return JSONResponse([
        {k: m[k] for k in ("platform_id", "module_function", "module_index", "module_version",
                           "size", "sha256")} for m in modules
    ])
