"""Device group endpoints: ``/v1/products/:product/groups[/:name]``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.api.common import body_fields, fleet_of, require
from server.api.serialize import group_json
from server.fleet import Permission


async def list_groups(request: Request) -> Response:
    """List a product's groups."""
    await require(request, Permission.READ, "list groups")
    views = await fleet_of(request).list_groups(request.path_params["product"])
    return JSONResponse({"groups": [group_json(view) for view in views]})


async def create_group(request: Request) -> Response:
    """Create a group: {name, description, color}."""
    actor = await require(request, Permission.MANAGE_DEVICES, "create groups")
    fields = await body_fields(request)
    view = await fleet_of(request).create_group(actor, request.path_params["product"], fields)
    return JSONResponse({"ok": True, "group": group_json(view)}, status_code=201)


async def get_group(request: Request) -> Response:
    """Get one group."""
    await require(request, Permission.READ, "read groups")
    view = await fleet_of(request).get_group(
        request.path_params["product"], request.path_params["name"]
    )
    return JSONResponse({"group": group_json(view)})


async def update_group(request: Request) -> Response:
    """Rename a group or change its description or color."""
    actor = await require(request, Permission.MANAGE_DEVICES, "edit groups")
    fields = await body_fields(request)
    view = await fleet_of(request).update_group(
        actor, request.path_params["product"], request.path_params["name"], fields
    )
    return JSONResponse({"ok": True, "group": group_json(view)})


async def delete_group(request: Request) -> Response:
    """Delete a group (its devices leave it; its release is withdrawn)."""
    actor = await require(request, Permission.MANAGE_DEVICES, "delete groups")
    await fleet_of(request).delete_group(
        actor, request.path_params["product"], request.path_params["name"]
    )
    return Response(status_code=204)
