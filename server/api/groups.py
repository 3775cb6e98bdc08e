"""Device group endpoints: ``/v1/products/:product/groups[/:name]``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.api.common import actor_of, body_fields, fleet_of, product_of
from server.api.serialize import group_json


async def list_groups(request: Request) -> Response:
    """List a product's groups."""
    views = await fleet_of(request).list_groups(product_of(request).id)
    return JSONResponse({"groups": [group_json(view) for view in views]})


async def create_group(request: Request) -> Response:
    """Create a group: {name, description, color}."""
    fields = await body_fields(request)
    view = await fleet_of(request).create_group(actor_of(request), product_of(request).id, fields)
    return JSONResponse({"ok": True, "group": group_json(view)}, status_code=201)


async def get_group(request: Request) -> Response:
    """Get one group."""
    view = await fleet_of(request).get_group(product_of(request).id, request.path_params["name"])
    return JSONResponse({"group": group_json(view)})


async def update_group(request: Request) -> Response:
    """Rename a group or change its description or color."""
    fields = await body_fields(request)
    view = await fleet_of(request).update_group(
        actor_of(request), product_of(request).id, request.path_params["name"], fields
    )
    return JSONResponse({"ok": True, "group": group_json(view)})


async def delete_group(request: Request) -> Response:
    """Delete a group (its devices leave it; its release is withdrawn)."""
    await fleet_of(request).delete_group(
        actor_of(request), product_of(request).id, request.path_params["name"]
    )
    return Response(status_code=204)
