"""Product endpoints: ``/v1/products[/:product]``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from otacore.errors import ValidationError
from server.api.common import actor_of, body_fields, fleet_of, int_field, product_of
from server.api.serialize import product_json


async def list_products(request: Request) -> Response:
    """List the products the caller belongs to (``products:list`` on each)."""
    actor = actor_of(request)
    products = await fleet_of(request).list_products()
    visible = [p for p in products if "products:list" in actor.scopes_on(p.id)]
    return JSONResponse({"products": [product_json(p) for p in visible]})


async def create_product(request: Request) -> Response:
    """Create a product: {name, platform_id, description}."""
    fields = await body_fields(request)
    unknown = sorted(set(fields) - {"name", "platform_id", "description"})
    if unknown:
        raise ValidationError(f"unknown field(s) {', '.join(unknown)}; give name, platform_id")
    platform = int_field(fields.get("platform_id"), "platform_id", max_digits=5)
    product = await fleet_of(request).create_product(
        actor_of(request), fields.get("name"), platform, description=fields.get("description", "")
    )
    return JSONResponse({"ok": True, "product": product_json(product)}, status_code=201)


async def get_product(request: Request) -> Response:
    """Get a product by id or slug."""
    return JSONResponse({"product": product_json(product_of(request))})


async def update_product(request: Request) -> Response:
    """Change a product: {name, description, firmware_updates_forced}."""
    fields = await body_fields(request)
    product = await fleet_of(request).update_product(
        actor_of(request), product_of(request).id, fields
    )
    return JSONResponse({"ok": True, "product": product_json(product)})
