"""Product endpoints: ``/v1/products[/:product]``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from otacore.errors import ValidationError
from server.api.common import body_fields, fleet_of, require
from server.api.serialize import product_json
from server.fleet import Permission


async def list_products(request: Request) -> Response:
    """List products."""
    await require(request, Permission.READ, "list products")
    products = await fleet_of(request).list_products()
    return JSONResponse({"products": [product_json(p) for p in products]})


async def create_product(request: Request) -> Response:
    """Create a product: {name, platform_id, description}."""
    actor = await require(request, Permission.ADMINISTER, "create products")
    fields = await body_fields(request)
    unknown = sorted(set(fields) - {"name", "platform_id", "description"})
    if unknown:
        raise ValidationError(f"unknown field(s) {', '.join(unknown)}; give name, platform_id")
    platform = fields.get("platform_id")
    if isinstance(platform, str) and (platform.isascii() and platform.isdigit()):
        platform = int(platform)
    product = await fleet_of(request).create_product(
        actor, fields.get("name"), platform, description=fields.get("description", "")
    )
    return JSONResponse({"ok": True, "product": product_json(product)}, status_code=201)


async def get_product(request: Request) -> Response:
    """Get a product by id or slug."""
    await require(request, Permission.READ, "read products")
    product = await fleet_of(request).get_product(request.path_params["product"])
    return JSONResponse({"product": product_json(product)})


async def update_product(request: Request) -> Response:
    """Change a product: {name, description, firmware_updates_forced}."""
    actor = await require(request, Permission.MANAGE_DEVICES, "change products")
    fields = await body_fields(request)
    product = await fleet_of(request).update_product(
        actor, request.path_params["product"], fields
    )
    return JSONResponse({"ok": True, "product": product_json(product)})
